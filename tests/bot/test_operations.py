"""Operations endpoints: /readyz checks the real dependencies (/metrics: tests/bot/test_metrics.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from fakes.openai_api import FakeOpenAIServer

from bot.app import App
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
        llm_url=llm_url, model="shop-model", http_port=0, relevance_threshold=-1.0,
        overlap_threshold=0.0, rate_limit_per_minute=0,
    )


async def get(app: App, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{app.http.port}{path}") as resp:
        return resp.status, await resp.text()


async def test_readyz_names_the_dependency_that_is_down(
    tmp_path: Path, database_url: str, model_server: FakeOpenAIServer
) -> None:
    async with App(ops_settings(tmp_path, database_url, model_server.base_url)) as app:
        await app.start_http()
        status, body = await get(app, "/readyz")
        assert status == 200, body
        assert '"database": "ok"' in body and '"vector_store": "ok"' in body and '"model": "ok"' in body
        await model_server.stop()  # the model server goes away
        # /readyz answers from a check at most `ready_ttl_s` old (bot/http.py): it says so within that
        async with asyncio.timeout(30):
            while status == 200:
                await asyncio.sleep(0.1)
                status, body = await get(app, "/readyz")
        assert status == 503 and '"model": "failing"' in body and '"database": "ok"' in body
        assert (await get(app, "/healthz"))[0] == 200  # alive, just not ready
