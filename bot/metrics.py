"""Prometheus metrics without a client library: counters, gauges and histograms as plain text.

The conversation flow increments the module-level `METRICS` (one set per process, as with
prometheus_client's default registry). Values that live in the database (outbox depth, training
runs) are read when Prometheus scrapes, so every replica reports the same truth. The text follows
the exposition format 0.0.4 that Prometheus scrapes from `/metrics`.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.http import HttpServer
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RETRIEVAL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple((k, str(labels[k])) for k in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A value that only goes up (restarts reset it; Prometheus' rate() handles that)."""

    kind = "counter"

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_, labelnames)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down, or is set when scraped."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def replace(self, values: Iterable[tuple[dict[str, str], float]]) -> None:
        """Set the whole series at once (label sets not given disappear)."""
        fresh = {self._key(labels): float(v) for labels, v in values}
        with self._lock:
            self._values = fresh


class Histogram(_Metric):
    """Observations counted into cumulative `le` buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # counts per bucket(+Inf), [sum]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return sum(series[0]) if series else 0

    def lines(self) -> list[str]:
        out = []
        with self._lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self._series.items())
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = "+Inf" if math.isinf(bound) else repr(float(bound))  # "1.0", like client libraries
                out.append(f"{self.name}_bucket{_labels(key, (('le', le),))} {running}")
            out.append(f"{self.name}_sum{_labels(key)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(key)} {running}")
        return out


class Metrics:
    """Every metric the bot exports. `render()` is what /metrics returns."""

    def __init__(self) -> None:
        self.messages_in = Counter(
            "apprentice_messages_in_total", "Customer messages received.", ["channel"]
        )
        self.messages_out = Counter(
            "apprentice_messages_out_total", "Messages the bot sent to customers.", ["channel", "kind"]
        )
        self.answer_latency = Histogram(
            "apprentice_answer_latency_seconds",
            "From the stored question to the stored answer (retrieval and generation).",
            ["status"],
        )
        self.retrieval_latency = Histogram(
            "apprentice_retrieval_latency_seconds", "Knowledge-base retrieval for one question.",
            buckets=RETRIEVAL_BUCKETS,
        )
        self.corrections = Counter("apprentice_corrections_total", "Staff corrections stored.")
        self.feedback = Counter(
            "apprentice_feedback_total", "Feedback on answers (up, down, approve, flag).", ["kind"]
        )
        self.training_runs = Gauge(
            "apprentice_training_runs", "Nightly learning runs recorded in the database, by outcome.",
            ["status"],
        )
        self.active_adapter = Gauge(
            "apprentice_active_adapter_info", "The adapter version this replica answers with (1).",
            ["version"],
        )
        self.outbox_depth = Gauge(
            "apprentice_outbox_depth", "Replies and cards waiting in the database outbox.", ["channel"]
        )
        self.model_events = Gauge(
            "apprentice_model_requests", "Model requests by outcome since start (ok, busy, timeout, error).",
            ["outcome"],
        )

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.all():
            lines += metric.header() + metric.lines()
        return "\n".join(lines) + "\n"

    async def collect(self, store: Store | None, generator: Any = None) -> str:
        """Refresh the scrape-time gauges (database, model) and render."""
        if store is not None:
            depth, runs = await asyncio.to_thread(_db_numbers, store)
            self.outbox_depth.replace(({"channel": c}, n) for c, n in depth.items())
            self.training_runs.replace(({"status": s}, n) for s, n in runs.items())
        if generator is not None:
            version = getattr(generator, "adapter_version", None)
            self.active_adapter.replace([({"version": version or "base"}, 1.0)])
            stats = getattr(generator, "stats", None)
            if stats is not None:
                self.model_events.replace(
                    ({"outcome": name}, float(getattr(stats, attr, 0)))
                    for name, attr in (("ok", "requests"), ("busy", "busy"), ("timeout", "timeouts"),
                                       ("error", "errors"))
                )
        return self.render()


def _db_numbers(store: Store) -> tuple[dict[str, int], dict[str, int]]:
    from sqlalchemy import func, select

    from knowledge.models import OutboxItem, TrainingRun

    with store.session() as s:
        depth = dict(
            s.execute(
                select(OutboxItem.channel, func.count(OutboxItem.id))
                .where(OutboxItem.status.in_(("pending", "sending")))
                .group_by(OutboxItem.channel)
            ).all()
        )
        runs = dict(
            s.execute(
                select(TrainingRun.status, func.count(TrainingRun.id)).group_by(TrainingRun.status)
            ).all()
        )
    return {str(k): int(v) for k, v in depth.items()}, {str(k): int(v) for k, v in runs.items()}


METRICS = Metrics()


def serve_operations(http: HttpServer, store: Store, kb: KnowledgeBase, generator: Any) -> None:
    """Give the HTTP server its /readyz checks and its /metrics source (called by the App)."""

    def database() -> bool:
        from sqlalchemy import text

        with store.engine.connect() as conn:
            return conn.scalar(text("SELECT 1")) == 1

    async def model() -> bool:
        ready = getattr(generator, "ready", None)  # the HTTP backend asks its server; in-process is loaded
        return bool(await ready()) if ready is not None else True

    async def in_thread(fn: Any) -> bool:
        return bool(await asyncio.to_thread(fn))

    http.ready_checks.update(
        database=lambda: in_thread(database),
        vector_store=lambda: in_thread(lambda: kb.count() >= 0),
        model=model,
    )
    http.metrics_text = lambda: METRICS.collect(store, generator)
