"""Prometheus metrics through prometheus_client (the one module that imports it).

The conversation flow counts into the module-level `METRICS`: Counter and Histogram objects that
live for the whole process, in a `CollectorRegistry` of their own (never the library's global
one). Each App's /metrics gets its own registry holding those process metrics plus a custom
collector, `ScrapeCollector`, that reads what lives elsewhere when Prometheus scrapes: the database
(outbox depth, training runs, corrections by status; the same on every replica, aggregate with max())
and the model runtime (requests by outcome, queue depth, adapter loads). Collecting queries the
database, so the page is generated in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

if TYPE_CHECKING:
    from bot.http import HttpServer
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RETRIEVAL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# every known status is exported, 0 when there is none, so rate()/delta() see a series go from 0 to 1
TRAINING_STATUSES = ("running", "skipped", "failed", "rejected", "promoted")  # knowledge.models.TrainingRun
CORRECTION_STATUSES = ("active", "pending", "revoked")  # knowledge.models.Correction
# (outcome label, RuntimeStats attribute) for apprentice_model_requests_total
MODEL_OUTCOMES = (("ok", "requests"), ("busy", "busy"), ("timeout", "timeouts"), ("error", "errors"))


class Metrics:
    """The process-wide counters and histograms the conversation flow updates."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.messages_in = Counter(
            "apprentice_messages_in", "Customer messages received.", ["channel"], registry=r
        )
        self.messages_out = Counter(
            "apprentice_messages_out", "Messages the bot sent to customers.", ["channel", "kind"], registry=r
        )
        self.answer_latency = Histogram(
            "apprentice_answer_latency_seconds",
            "From the stored question to the stored answer (retrieval and generation).",
            ["status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.retrieval_latency = Histogram(
            "apprentice_retrieval_latency_seconds", "Knowledge-base retrieval for one question.",
            buckets=RETRIEVAL_BUCKETS, registry=r,
        )
        self.corrections = Counter("apprentice_corrections", "Staff corrections stored.", registry=r)
        self.feedback = Counter(
            "apprentice_feedback", "Feedback on answers (up, down, approve, flag).", ["kind"], registry=r
        )

    def collectors(self) -> list[Counter | Histogram]:
        return [v for v in vars(self).values() if isinstance(v, Counter | Histogram)]

    def sample(self, name: str, **labels: str) -> float:
        """A sample's value, 0 before the first: `sample("apprentice_feedback_total", kind="up")`."""
        return self.registry.get_sample_value(name, labels) or 0.0


METRICS = Metrics()


class ScrapeCollector:
    """A prometheus_client custom collector: numbers read when Prometheus scrapes.

    `store` (may be None) gives the database-backed gauges, `generator` (may be None) the model
    runtime's counters and gauges. `collect()` queries the database: call it off the event loop.
    """

    def __init__(self, store: Store | None, generator: Any = None) -> None:
        self.store, self.generator = store, generator

    def describe(self) -> Iterator[Metric]:
        """The families, without touching the database (the registry checks names with this)."""
        return self._families(None, None)

    def collect(self) -> Iterator[Metric]:
        db = None
        if self.store is not None:
            try:
                db = _db_numbers(self.store)
            except Exception as exc:  # the rest of the page still counts; /readyz reports the database
                log.warning("metrics: the database numbers could not be read: %s", type(exc).__name__)
        return self._families(db, self.generator)

    def _families(self, db: dict[str, dict[str, int]] | None, generator: Any) -> Iterator[Metric]:
        outbox = GaugeMetricFamily(
            "apprentice_outbox_depth", "Replies and cards waiting in the database outbox.", labels=["channel"]
        )
        runs = GaugeMetricFamily(
            "apprentice_training_runs", "Nightly learning runs recorded in the database, by outcome.",
            labels=["status"],
        )
        stored = GaugeMetricFamily(
            "apprentice_stored_corrections",
            "Staff corrections in the database by status (pending: waiting for a second approval).",
            labels=["status"],
        )
        if db is not None:
            for channel, n in sorted(db["outbox"].items()):
                outbox.add_metric([channel], n)
            for family, known, counts in ((runs, TRAINING_STATUSES, db["runs"]),
                                          (stored, CORRECTION_STATUSES, db["corrections"])):
                for status in sorted(set(known) | set(counts)):
                    family.add_metric([status], counts.get(status, 0))
        yield from (outbox, runs, stored)

        adapter = InfoMetricFamily(
            "apprentice_active_adapter", "The adapter version this replica answers with (base: none).",
            labels=["version"],
        )
        requests = CounterMetricFamily(
            "apprentice_model_requests", "Model requests by outcome since start (ok, busy, timeout, error).",
            labels=["outcome"],
        )
        adapter_errors = CounterMetricFamily(
            "apprentice_adapter_errors", "Adapter loads that failed (the previous adapter stayed in use)."
        )
        adapter_switches = CounterMetricFamily(
            "apprentice_adapter_switches", "Adapter loads that succeeded since start."
        )
        depth = GaugeMetricFamily(
            "apprentice_model_queue_depth", "Requests waiting for or inside the model right now."
        )
        capacity = GaugeMetricFamily(
            "apprentice_model_queue_capacity", "Requests the model queue holds before answering busy."
        )
        if generator is not None:
            version = getattr(generator, "adapter_version", None)
            adapter.add_metric([version or "base"], {})
            stats = getattr(generator, "stats", None)
            if stats is not None:
                for outcome, attr in MODEL_OUTCOMES:
                    requests.add_metric([outcome], float(getattr(stats, attr, 0)))
                adapter_errors.add_metric([], float(getattr(stats, "adapter_errors", 0)))
                adapter_switches.add_metric([], float(getattr(stats, "adapter_switches", 0)))
            queue_depth = getattr(generator, "queue_depth", None)
            max_queue = getattr(generator, "max_queue", None)
            if queue_depth is not None:
                depth.add_metric([], float(queue_depth))
            if max_queue is not None:
                capacity.add_metric([], float(max_queue))
        yield from (adapter, requests, adapter_errors, adapter_switches, depth, capacity)


def operations_registry(store: Store | None, generator: Any = None) -> CollectorRegistry:
    """A registry for one App's /metrics: the process metrics plus that App's scrape-time numbers."""
    registry = CollectorRegistry()
    for collector in METRICS.collectors():
        registry.register(collector)
    registry.register(ScrapeCollector(store, generator))
    return registry


async def metrics_page(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The /metrics body and its content type; generated in a thread (collecting reads the database)."""
    body = await asyncio.to_thread(generate_latest, registry)
    return body, CONTENT_TYPE_LATEST


def _db_numbers(store: Store) -> dict[str, dict[str, int]]:
    return {
        "outbox": store.outbox_depths(),
        "runs": store.training_runs_by_status(),
        "corrections": store.corrections_by_status(),
    }


def serve_operations(http: HttpServer, store: Store, kb: KnowledgeBase, generator: Any) -> None:
    """Give the HTTP server its /readyz checks and its /metrics source (called by the App)."""

    async def model() -> bool:
        ready = getattr(generator, "ready", None)  # the HTTP backend asks its server; in-process is loaded
        return bool(await ready()) if ready is not None else True

    async def in_thread(fn: Any) -> bool:
        return bool(await asyncio.to_thread(fn))

    http.ready_checks.update(
        database=lambda: in_thread(store.reachable),
        vector_store=lambda: in_thread(lambda: kb.count() >= 0),
        model=model,
    )
    registry = operations_registry(store, generator)
    http.metrics_page = lambda: metrics_page(registry)
