"""Unbounded consumption (OWASP LLM10): every resource a customer can make the bot spend has a bound.

Through the real conversation flow and the real in-process runtime (a tiny random Llama): a full
model queue answers "busy" at once, generation stops at APPRENTICE_MAX_NEW_TOKENS, a generation
that overruns APPRENTICE_LLM_TIMEOUT_S becomes an apology, an oversized request body is refused by
the HTTP server before anything reads it. Rate limits and the input length limit are in
tests/bot/test_conversation.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from scripted import ScriptedModel

from bot.conversation import ConversationService
from bot.envelope import Inbound
from bot.http import HttpServer
from bot.notices import APOLOGY, BUSY
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.runtime import load_local


@pytest.fixture
def flow_parts(tmp_path: Path) -> Any:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "shipping.md").write_text("# Shipping\n\nWe ship within 3 days by DHL.\n", encoding="utf-8")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path / "data",
        relevance_threshold=-1.0, overlap_threshold=0.0,
        rate_limit_per_minute=0,
        max_new_tokens=6,
        llm_timeout_s=1.0,
    )
    store = Store(settings.database)
    kb = KnowledgeBase.from_settings(settings)
    kb.ingest([docs])
    yield settings, store, kb
    kb.close()
    store.close()


def ask(chat: str) -> Inbound:
    return Inbound("test", chat, f"u{chat}", "When do you ship my bike?")


async def test_a_full_model_queue_answers_busy_and_the_next_customer_is_served(
    flow_parts: Any, tiny_model_dir: Path
) -> None:
    settings, store, kb = flow_parts
    runtime = load_local(str(tiny_model_dir), max_queue=1, max_new_tokens=6, dtype="float32", start=False)
    service = ConversationService(settings, store, kb, runtime)
    try:
        waiting = runtime.submit([{"role": "user", "content": "hi"}])  # the one place in the queue
        [busy] = await service.handle(ask("1"))
        assert busy.text == BUSY
        assert store.message(busy.message_id).status == "busy" and runtime.stats.busy == 1
        runtime.start()  # the model gets going: the waiting request is answered ...
        assert waiting.result(timeout=60).new_tokens <= 6
        [served] = await service.handle(ask("2"))  # ... and the next customer gets a real answer
        assert served.text not in (BUSY, APOLOGY)
        assert store.message(served.message_id).status in ("ok", "unsure", "blocked")
    finally:
        await runtime.aclose()


async def test_generation_stops_at_max_new_tokens(flow_parts: Any, tiny_model_dir: Path) -> None:
    settings, store, kb = flow_parts
    runtime = load_local(str(tiny_model_dir), max_new_tokens=500, dtype="float32")
    service = ConversationService(settings, store, kb, runtime)  # the flow asks for settings.max_new_tokens
    try:
        for chat in ("a", "b", "c"):
            await service.handle(ask(chat))
        assert runtime.stats.requests == 3
        assert runtime.stats.new_tokens <= 3 * settings.max_new_tokens
        assert all(r.new_tokens <= r.size * settings.max_new_tokens for r in runtime.stats.recent)
    finally:
        await runtime.aclose()


async def test_a_generation_over_the_timeout_becomes_an_apology(
    flow_parts: Any, tiny_model_dir: Path
) -> None:
    settings, store, kb = flow_parts
    # no worker: the answer never comes, the flow's wait is bounded by the timeout
    runtime = load_local(
        str(tiny_model_dir), timeout_s=settings.llm_timeout_s, dtype="float32", start=False
    )
    service = ConversationService(settings, store, kb, runtime)
    try:
        [out] = await service.handle(ask("1"))
        assert out.text == APOLOGY and runtime.stats.timeouts == 1
        stored = store.message(out.message_id)
        assert stored.status == "error" and stored.flagged
    finally:
        await runtime.aclose()


async def test_an_oversized_request_body_is_refused_before_it_is_read() -> None:
    http = HttpServer("127.0.0.1", 0)
    seen: list[int] = []

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(len(await request.read()))
        return aiohttp.web.Response(text="ok")

    http.add_route("POST", "/telegram", handler)
    await http.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{http.port}/telegram"
            async with session.post(url, data=b"x" * (2 * 1024 * 1024)) as resp:
                assert resp.status == 413
            async with session.post(url, data=b"{}") as resp:
                assert resp.status == 200
    finally:
        await http.stop()
    assert seen == [2]


async def test_the_flow_passes_the_generation_budget_to_any_backend(flow_parts: Any) -> None:
    settings, store, kb = flow_parts
    budgets: list[int | None] = []

    class Recording(ScriptedModel):
        async def generate(self, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> Any:
            budgets.append(max_new_tokens)
            return await super().generate(messages, max_new_tokens)

    service = ConversationService(settings, store, kb, Recording())
    await service.handle(ask("1"))
    assert budgets == [settings.max_new_tokens]
