"""Operations endpoints: /readyz checks the real dependencies, /metrics speaks Prometheus text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.openai_api import FakeOpenAIServer
from prometheus_client.parser import text_string_to_metric_families

from bot.app import App
from bot.conversation import Inbound
from bot.metrics import METRICS, Counter, Histogram
from knowledge.models import TrainingRun
from knowledge.settings import Settings


@pytest.fixture
async def model_server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer("shop-model") as fake:
        yield fake


def ops_settings(tmp_path: Path, database_url: str, llm_url: str) -> Settings:
    kb = tmp_path / "kb"
    kb.mkdir(exist_ok=True)
    (kb / "returns.md").write_text("# Returns\n\nBikes can be returned within 30 days.\n", encoding="utf-8")
    return Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path / "data", database_url=database_url, kb=str(kb),
        llm_url=llm_url, model="shop-model", http_port=0, relevance_threshold=-1.0, rate_limit_per_minute=0,
    )


async def get(app: App, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{app.http.port}{path}") as resp:
        return resp.status, await resp.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_readyz_names_the_dependency_that_is_down(
    tmp_path: Path, database_url: str, model_server: FakeOpenAIServer
) -> None:
    async with App(ops_settings(tmp_path, database_url, model_server.base_url)) as app:
        await app.start_http()
        status, body = await get(app, "/readyz")
        assert status == 200, body
        assert '"database": "ok"' in body and '"vector_store": "ok"' in body and '"model": "ok"' in body
        await model_server.stop()  # the model server goes away
        status, body = await get(app, "/readyz")
        assert status == 503 and '"model": "failing"' in body and '"database": "ok"' in body
        assert (await get(app, "/healthz"))[0] == 200  # alive, just not ready


async def test_metrics_count_what_happened_in_prometheus_text(
    tmp_path: Path, model_server: FakeOpenAIServer
) -> None:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    before_corrections = METRICS.corrections.value()
    before_answers = METRICS.answer_latency.count(status="ok")
    async with App(ops_settings(tmp_path, url, model_server.base_url)) as app:
        await app.start_http()
        question = Inbound("ops", "1", "c1", "Can I return my bike?", external_id="a")
        [first] = await app.service.handle(question)
        await app.service.handle(Inbound("ops", "1", "c1", "", external_id="b"))  # a notice, no model call
        assert first.message_id is not None
        assert await app.service.customer_feedback(first.message_id, "c1", up=False)
        await app.service.correct(first.message_id, "Yes, within 30 days with the receipt.", staff="U1")
        app.store.enqueue("telegram", "send", {"chat_id": "1", "text": "queued"})
        with app.store.session() as s:
            s.add(TrainingRun(status="rejected"))
            s.add(TrainingRun(status="promoted"))
        (tmp_path / "v3").mkdir()
        (tmp_path / "v3" / "adapter_config.json").write_text("{}")
        app.generator.set_adapter(str(tmp_path / "v3"), "v3")  # what this replica now answers with
        status, text = await get(app, "/metrics")
    assert status == 200
    got = samples(text)
    assert got[("apprentice_messages_in_total", (("channel", "ops"),))] == 2
    assert got[("apprentice_messages_out_total", (("channel", "ops"), ("kind", "answer")))] == 1
    assert got[("apprentice_messages_out_total", (("channel", "ops"), ("kind", "notice")))] == 1
    assert got[("apprentice_feedback_total", (("kind", "down"),))] >= 1
    assert got[("apprentice_corrections_total", ())] == before_corrections + 1
    assert got[("apprentice_answer_latency_seconds_count", (("status", "ok"),))] == before_answers + 1
    inf_bucket = ("apprentice_answer_latency_seconds_bucket", (("le", "+Inf"), ("status", "ok")))
    assert got[inf_bucket] == before_answers + 1
    assert got[("apprentice_retrieval_latency_seconds_count", ())] >= 1
    assert got[("apprentice_outbox_depth", (("channel", "telegram"),))] == 1
    assert got[("apprentice_training_runs", (("status", "promoted"),))] == 1
    assert got[("apprentice_training_runs", (("status", "rejected"),))] == 1
    assert got[("apprentice_active_adapter_info", (("version", "v3"),))] == 1
    assert got[("apprentice_model_requests", (("outcome", "ok"),))] == 1


def test_histogram_buckets_are_cumulative_and_labels_escaped() -> None:
    h = Histogram("t_seconds", "help", ["path"], buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 5.0):
        h.observe(v, path='a"b\\c\n')
    c = Counter("t_total", "help")
    c.inc(2.5)
    got: dict[Any, float] = samples("\n".join(h.header() + h.lines() + c.header() + c.lines()) + "\n")
    label = ("path", 'a"b\\c\n')
    buckets = [got[("t_seconds_bucket", tuple(sorted((label, ("le", le)))))] for le in ("0.1", "1.0", "+Inf")]
    assert buckets == [2, 3, 4]
    assert got[("t_seconds_sum", (label,))] == pytest.approx(5.65)
    assert got[("t_total", ())] == 2.5
