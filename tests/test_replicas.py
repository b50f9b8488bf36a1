"""Two `apprentice serve` replicas behind one "load balancer": one PostgreSQL, one Chroma server,
one model server, Telegram in webhook mode.

Telegram may deliver an update again (a timeout, a retry after a 5xx), and a load balancer may send
the retry to the other replica. Update de-duplication and the outbox live in the database, so each
update is answered exactly once whichever replica gets it, however often.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa
from chroma_server import ChromaServer
from fakes.openai_api import FakeOpenAIServer
from fakes.telegram_api import TOKEN, FakeTelegramApi
from pg import PostgresServer, free_port
from replicas import Replica, metric_value, serve_env

from knowledge.store import Store

MODEL = "shop-model"
CUSTOMERS = 8
MESSAGES_EACH = 2


def replica_env(
    tmp: Path, name: str, port: int, db: str, chroma: str, llm: str, telegram: str
) -> dict[str, str]:
    kb = tmp / "kb"
    if not kb.exists():
        kb.mkdir()
        (kb / "shipping.md").write_text("# Shipping\n\nWe ship bikes within 3 days.\n", encoding="utf-8")
    return serve_env(
        tmp / name / "data", port, db=db, chroma=chroma, llm=llm, telegram=telegram, token=TOKEN,
        kb=str(kb), model=MODEL,  # no webhook secret: the replicas generate one and agree on it
        APPRENTICE_RELEVANCE_THRESHOLD="-1",  # mechanics: every question reaches the model
        APPRENTICE_RATE_LIMIT_PER_MINUTE="0",
        APPRENTICE_LOG_LEVEL="INFO",
        APPRENTICE_RETRAIN_CRON="* * * * *",  # every minute: both schedulers fire during the test
    )


@pytest.fixture
async def cluster(
    tmp_path: Path, postgres_server: PostgresServer, chroma_server: ChromaServer
) -> AsyncIterator[tuple[list[Replica], FakeTelegramApi, str]]:
    chroma_server.wipe()
    db = postgres_server.create_database()
    async with FakeTelegramApi() as telegram, FakeOpenAIServer(MODEL) as llm:
        replicas = [
            Replica(name, tmp_path / name, port,
                    replica_env(tmp_path, name, port, db, chroma_server.url, llm.base_url, telegram.base_url))
            for name, port in (("a", free_port()), ("b", free_port()))
        ]
        try:
            for r in replicas:
                r.start()
            async with aiohttp.ClientSession() as http:
                await asyncio.gather(*(r.wait_ready(http) for r in replicas))
            yield replicas, telegram, db
        finally:
            codes = [r.stop() for r in replicas]
        assert codes == [0, 0], "\n".join(r.log_tail() for r in replicas)  # clean shutdown on SIGTERM


async def test_each_update_is_answered_once_and_one_replica_runs_the_nightly_job(cluster) -> None:
    replicas, telegram, db = cluster
    a, b = replicas
    # both replicas registered the webhook with the one secret they agreed on in the database
    store = Store(db)
    try:
        secret = store.get_kv("telegram_webhook_secret")
    finally:
        store.close()
    registered = {c.params.get("secret_token") for c in telegram.find("setWebhook")}
    assert secret and registered == {secret} and len(telegram.find("setWebhook")) == 2
    updates = [
        telegram.message_update(9000 + c, f"Do you ship bike number {c}-{m} to Oslo?")
        for m in range(MESSAGES_EACH) for c in range(CUSTOMERS)
    ]
    # each update to one replica; every third delivered again to the OTHER one, every fifth twice
    # to the same one: Telegram's retries behind a load balancer
    deliveries = []
    for i, update in enumerate(updates):
        first, other = (a, b) if i % 2 == 0 else (b, a)
        deliveries.append((first, update))
        if i % 3 == 0:
            deliveries.append((other, update))
        if i % 5 == 0:
            deliveries.append((first, update))
    async with aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(r.post_update(http, u, secret) for r, u in deliveries))
        assert set(statuses) == {200}
        # the fake Bot API records every reply; wait for one per update
        await telegram.wait_for("sendMessage", count=len(updates), timeout=120)
        # quiescence: nothing left in the outbox, so no late duplicate can still be on its way
        store = Store(db)
        try:
            for _ in range(600):  # bounded polling of the shared outbox
                if store.outbox_depth() == 0:
                    break
                await asyncio.sleep(0.1)
            assert store.outbox_depth() == 0
            with store.engine.connect() as conn:
                claimed = conn.scalar(
                    sa.text("SELECT count(*) FROM processed_updates WHERE channel = 'telegram'")
                )
                answers = conn.scalar(sa.text("SELECT count(*) FROM messages WHERE role='bot'"))
        finally:
            store.close()
        metrics = [await r.metrics(http) for r in replicas]
    sent = [str(c.params["text"]) for c in telegram.sent()]
    assert len(sent) == len(updates) == claimed == answers
    for update in updates:
        question = update["message"]["text"]
        assert sum(question in text for text in sent) == 1, question
        chat = update["message"]["chat"]["id"]
        assert any(question in t for t in telegram.texts(chat))  # to the right customer
    handled = [metric_value(m, "apprentice_messages_in_total", channel="telegram") for m in metrics]
    assert all(n > 0 for n in handled) and sum(handled) == len(updates)  # both replicas answered

    # The nightly job: both schedulers fire every minute; one replica claims the slot and runs it,
    # the other sees it taken. Wait (bounded) until some slot was declined by a replica.
    for _ in range(1500):
        declined = [r for r in replicas if "already taken by another replica" in r.log_tail(100_000)]
        if declined:
            break
        await asyncio.sleep(0.1)
    assert declined, "no replica saw the nightly slot taken:\n" + "\n".join(r.log_tail() for r in replicas)
    store = Store(db)
    try:
        for _ in range(600):  # the winner records its run right after its claim
            with store.engine.connect() as conn:
                runs = conn.scalar(sa.text("SELECT count(*) FROM training_runs"))
                slots = conn.scalar(
                    sa.text("SELECT count(*) FROM processed_updates WHERE channel = 'nightly'")
                )
            if runs:
                break
            await asyncio.sleep(0.1)
    finally:
        store.close()
    assert 1 <= runs <= slots  # one run per slot, however many replicas' schedulers fired for it


def test_every_replica_computes_the_same_nightly_slot() -> None:
    """Schedulers fire a few milliseconds (or a misfire later) apart; the slot they claim is the same."""
    import datetime as dt

    from apscheduler.triggers.cron import CronTrigger

    from learning.nightly import scheduled_slot

    nightly = CronTrigger(minute="0", hour="3", timezone="UTC")
    utc = dt.UTC
    fired = [
        dt.datetime(2026, 11, 29, 3, 0, 0, 2000, tzinfo=utc),
        dt.datetime(2026, 11, 29, 5, 59, tzinfo=utc),
    ]
    assert {scheduled_slot(nightly, t) for t in fired} == {"2026-11-29T03:00+00:00"}
    next_night = dt.datetime(2026, 11, 30, 3, 0, 1, tzinfo=utc)
    assert scheduled_slot(nightly, next_night) == "2026-11-30T03:00+00:00"
