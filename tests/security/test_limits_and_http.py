"""Limits that limit, and an HTTP server a slow client cannot take down.

Each test replays the attack through the real flow: the App as `apprentice serve` builds it, real
python-telegram-bot against the fake Bot API, the real Slack channel against the fake Slack API, a
real aiohttp server on 127.0.0.1 hit with raw sockets. Nothing sleeps in place of synchronisation:
tests wait (bounded) for the state they expect.

- The customer rate limit is the first gate of every message (text, stickers, oversize, `/human`,
  `/help`, messages of a taken-over conversation relayed to staff): over the limit, one "slow down"
  per window, then silence. On-call pings: one per conversation per window.
- The counts live in the database (`rate_limits`, one atomic upsert), so replicas agree and a
  restart forgets nothing; ended windows are deleted; no per-customer state stays in memory.
- Half-open connections are closed after the read timeout, the oldest idle ones make room at the
  connection limit, /healthz still answers, a repeated log line is written once, /readyz probes its
  dependencies at most once per TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from apps import app_data_dir, app_settings, kb_template  # noqa: F401
from fakes.slack_api import FakeSlack
from fakes.telegram_api import TOKEN, FakeTelegramApi, fake_telegram  # noqa: F401
from scripted import ScriptedModel
from sqlalchemy import func, select

from bot.app import App
from bot.channels.slack import SlackChannel
from bot.channels.telegram import HELP_TEXT, TelegramChannel
from bot.conversation import ConversationService
from bot.envelope import Inbound
from bot.http import HttpServer
from bot.logsafe import ThrottleFilter
from bot.notices import HUMAN, NON_TEXT, SLOW_DOWN
from bot.ratelimit import RateLimiter
from knowledge.models import Message, ProcessedUpdate, RateLimit
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store

pytestmark = pytest.mark.timeout(180)

REVIEW = "CREVIEW"
STAFF = "UADA"
ONCALL = "SONCALL"
ROOT = Path(__file__).resolve().parents[2]


async def until(probe: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait (bounded) until `probe()` holds; the failure says what never happened."""
    try:
        async with asyncio.timeout(timeout):
            while not probe():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None


def processed(store: Store) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count(ProcessedUpdate.id))) or 0)


def customer_messages(store: Store, chat: str) -> list[Message]:
    conv = store.conversation_for("telegram", chat, chat)
    return [m for m in store.history(conv.id, 1000) if m.role == "customer"]


@contextlib.asynccontextmanager
async def shop(tg: FakeTelegramApi, slack: FakeSlack, data_dir: Path, **overrides: Any) -> AsyncIterator[App]:
    """`apprentice serve` with Telegram (customers) and Slack (staff, an on-call group), a scripted model."""
    settings = app_settings(
        data_dir,
        telegram_bot_token=TOKEN,
        telegram_api_url=tg.base_url,
        slack_bot_token="xoxb-security",
        slack_signing_secret="security-signing-secret",
        slack_channel=REVIEW,
        slack_api_url=slack.api_url,
        staff=STAFF,
        oncall_group=ONCALL,
        relevance_threshold=-1.0, overlap_threshold=0.0,
        **overrides,
    )
    async with App(settings, generator=ScriptedModel()) as app:
        slack_channel = SlackChannel(
            settings, app.service, app.store, app.http, poll_s=0.05, base_delay_s=0.05
        )
        await app.add_channel(slack_channel)
        telegram = TelegramChannel(
            settings,
            app.service,
            app.store,
            app.http,
            poll_timeout_s=2,
            outbox_poll_s=0.05,
            retry_base_s=0.05,
        )
        await app.add_channel(telegram)
        await app.start_http()
        await tg.wait_for("getUpdates")
        yield app


async def settled(app: App, updates: int) -> None:
    """Every pushed update handled, every reply and every Slack note delivered."""
    await until(lambda: processed(app.store) >= updates, f"{updates} updates handled")
    await until(
        lambda: app.store.outbox_depth("telegram") == 0 and app.store.outbox_depth("slack") == 0,
        "both outboxes drained",
    )


def pings(slack: FakeSlack) -> list[Any]:
    """On-call mentions posted to Slack."""
    return [c for c in slack.calls if c.method == "chat.postMessage" and ONCALL in json.dumps(c.params)]


# --- item 7: limits that do not limit --------------------------------------------------------------


async def test_a_flood_of_stickers_oversize_and_human_gets_one_notice_and_one_ping(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> None:
    """The report: 15 stickers, 15 oversize messages and 15 /human at 2 a minute got 45 replies and 15
    on-call pings. Now: two replies within the limit, one "slow down", then silence; one ping."""
    tg, chat = fake_telegram, 77
    sticker = {"sticker": {"file_id": "s", "file_unique_id": "u", "width": 1, "height": 1, "type": "regular",
                           "is_animated": False, "is_video": False}}  # fmt: skip
    async with (
        FakeSlack(users={STAFF: "ada"}, post_rate=None) as slack,
        shop(tg, slack, app_data_dir, rate_limit_per_minute=2, max_input_chars=500) as app,
    ):
        for _ in range(15):
            await tg.push_message(chat, "/human")
            await tg.push_message(chat, None, extra=sticker)
            await tg.push_message(chat, "x" * 2000)
            await tg.push_message(chat, "/help")
        await settled(app, 60)
        assert tg.texts(chat) == [HUMAN, NON_TEXT, SLOW_DOWN]
        assert len(pings(slack)) == 1
        # every message is on record (staff can see the flood), the ones over the limit as "limited"
        stored = customer_messages(app.store, str(chat))
        assert len(stored) == 45  # /help is not a message to the shop; it is counted, not stored
        assert [m.status for m in stored].count("limited") == 43


async def test_one_on_call_ping_per_conversation_however_often_a_customer_asks(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> None:
    """Within the customer's limit, /human is answered each time, but the on-call group is pinged once."""
    tg = fake_telegram
    async with (
        FakeSlack(users={STAFF: "ada"}, post_rate=None) as slack,
        shop(tg, slack, app_data_dir, rate_limit_per_minute=100) as app,
    ):
        for _ in range(15):
            await tg.push_message(81, "/human")
        await tg.push_message(82, "/human")  # another conversation has its own window
        await settled(app, 16)
        assert tg.texts(81) == [HUMAN] * 15 and tg.texts(82) == [HUMAN]
        assert len(pings(slack)) == 2
        assert all(app.store.conversation_for("telegram", c, c).flagged for c in ("81", "82"))


async def test_a_taken_over_conversation_relays_within_the_limit_only(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> None:
    """Taken-over conversations relayed every message to Slack unthrottled; now the limit applies."""
    tg, chat = fake_telegram, 78
    async with (
        FakeSlack(users={STAFF: "ada"}, post_rate=None) as slack,
        shop(tg, slack, app_data_dir, rate_limit_per_minute=2) as app,
    ):
        conv = app.store.conversation_for("telegram", str(chat), str(chat), "Ada")
        await app.service.take_over(conv.id, STAFF)
        for i in range(15):
            await tg.push_message(chat, f"hello? {i}")
        await settled(app, 15)
        relayed = [
            c for c in slack.calls if c.method == "chat.postMessage" and "Customer:" in c.params["text"]
        ]
        assert len(relayed) == 2
        assert tg.texts(chat) == [SLOW_DOWN]
        assert [m.status for m in customer_messages(app.store, str(chat))].count("relayed") == 2


async def test_replicas_share_one_count_and_concurrent_hits_never_collide(
    tmp_path: Path, demo_kb: KnowledgeBase, database_url: str
) -> None:
    """Per-process limiters let every replica grant the full limit; the count is now in the database."""
    settings = Settings(data_dir=tmp_path, database_url=database_url, rate_limit_per_minute=3)
    stores = [Store(settings.database), Store(settings.database)]
    try:
        models = [ScriptedModel(), ScriptedModel()]
        replicas = [ConversationService(settings, s, demo_kb, m) for s, m in zip(stores, models, strict=True)]
        outs = []
        for i in range(8):  # the load balancer alternates between the replicas
            ask = Inbound("test", "c1", "cust-1", f"What are your opening hours? ({i})", external_id=str(i))
            outs.append(await replicas[i % 2].handle(ask))
        texts = [o[0].text if o else None for o in outs]
        assert texts[:3] == ["scripted answer"] * 3 and texts[3] == SLOW_DOWN and texts[4:] == [None] * 4
        assert sum(len(m.prompts) for m in models) == 3  # the model ran 3 times in all, not 3 per replica
        # the increment is one atomic statement: hits racing from many threads each get their own count
        with ThreadPoolExecutor(8) as pool:
            counts = list(pool.map(lambda i: stores[i % 2].rate_hit("race", 60.0), range(80)))
        assert sorted(counts) == list(range(1, 81))
    finally:
        for s in stores:
            s.close()


async def test_ended_windows_are_deleted_and_no_customer_stays_in_memory(
    tmp_path: Path, demo_kb: KnowledgeBase
) -> None:
    """The old limiter kept every customer ever seen (about 123 MB per 100k customers)."""
    settings = Settings(data_dir=tmp_path, rate_limit_per_minute=5)
    store = Store(settings.database)
    try:
        service = ConversationService(settings, store, demo_kb, ScriptedModel())
        for i in range(200):
            await service.handle(Inbound("test", f"chat-{i}", f"cust-{i}", None, kind="sticker"))
        gc.collect()
        assert len(service._chat_locks) == 0  # a chat's lock lives only while its message is in hand
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(RateLimit)) == 200

        # an hour later every window has ended: the next write deletes them (the window restarts)
        later = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=1)
        assert store.rate_hit("customer:test:cust-0", 60.0, now=later) == 1
        assert store.rate_expire(now=later) == 199
        # the limiter sweeps on write, by itself
        limiter = RateLimiter(store, sweep_every_s=0.0)
        store.rate_hit("stale", 1.0, now=later - dt.timedelta(hours=3))
        await limiter.hit("fresh", 60.0)
        with store.session() as s:
            keys = set(s.scalars(select(RateLimit.key)))
        assert "stale" not in keys and "fresh" in keys
    finally:
        store.close()


# --- item 8: the HTTP server and slow clients ------------------------------------------------------


async def half_open(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections that each send half a request line and headers, and never finish."""
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        await writer.drain()
        conns.append((reader, writer))
    return conns


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 30.0) -> bool:
    """True when the server closes the connection (EOF or reset) within the (generous) timeout."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(4096):
                pass
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


async def healthz(port: int) -> int:
    timeout = aiohttp.ClientTimeout(total=20)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as resp,
    ):
        return resp.status


async def test_half_open_connections_are_closed_after_the_read_timeout() -> None:
    server = HttpServer("127.0.0.1", 0, read_timeout_s=0.5, max_connections=1000)
    seen: list[bytes] = []

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(await request.read())
        return aiohttp.web.Response(text="ok")

    server.add_route("POST", "/slow", handler)
    await server.start()
    try:
        conns = await half_open(server.port, 40)
        assert await healthz(server.port) == 200  # served alongside them
        closed = await asyncio.gather(*(closed_by_server(r) for r, _ in conns))
        assert all(closed) and server.closed_slow >= 40 and server.closed_for_room == 0
        # a request body that never completes: 408, the handler never runs
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b'POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"a": ')
        await writer.drain()
        async with asyncio.timeout(30):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 408") and not seen
        writer.close()
        for _, w in conns:
            w.close()
    finally:
        await server.stop()


async def test_a_flood_of_half_open_connections_neither_starves_healthz_nor_floods_the_log() -> None:
    """More half-open sockets than the server keeps: the oldest idle ones make room, /healthz answers,
    and the warning about it is written once, with a count of the repeats, not once per socket."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keep = Keep(logging.WARNING)
    keep.addFilter(ThrottleFilter(every_s=3600))
    logging.getLogger("bot.http").addHandler(keep)
    server = HttpServer("127.0.0.1", 0, read_timeout_s=60, max_connections=32)
    await server.start()
    try:
        conns = await half_open(server.port, 150)
        assert await healthz(server.port) == 200
        assert server.closed_for_room >= 150 - 32
        await until(lambda: len(server._runner.server.connections) <= 32, "at most 32 connections kept")  # type: ignore[union-attr]
        limit_lines = [line for line in lines if "at its limit" in line]
        assert len(limit_lines) == 1, lines
        for _, w in conns:
            w.close()
    finally:
        logging.getLogger("bot.http").removeHandler(keep)
        await server.stop()


def test_300_half_open_connections_against_256_file_descriptors(tmp_path: Path) -> None:
    """The reported attack, as reported: a server process limited to 256 file descriptors, 300 half-open
    requests. It stalled legitimate requests for 95 s and wrote 157 MB of "too many open files"."""
    script = textwrap.dedent(
        """
        import asyncio, logging, resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from bot.http import HttpServer
        from bot.logsafe import ThrottleFilter
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(ThrottleFilter())
        logging.basicConfig(level=logging.INFO, handlers=[handler])

        async def main():
            server = HttpServer("127.0.0.1", 0)  # the defaults: read timeout, connection limit
            await server.start()
            print(server.port, server.max_connections, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            await server.stop()

        asyncio.run(main())
        """
    )
    log_file = tmp_path / "server.log"
    with open(log_file, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert proc.stdout is not None
            port, cap = map(int, proc.stdout.readline().split())
            assert cap == 128  # half the descriptors: the rest stay for the database, Chroma, clients

            async def attack() -> int:
                conns = await half_open(port, 300)
                status = await healthz(port)
                for _, w in conns:
                    w.close()
                return status

            assert asyncio.run(attack()) == 200
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=60)
    text = log_file.read_text(errors="replace")
    assert "Too many open files" not in text and "out of system resource" not in text
    assert len(text) < 10_000, text[-2000:]


async def test_readyz_probes_the_dependencies_at_most_once_per_ttl() -> None:
    server = HttpServer("127.0.0.1", 0, ready_ttl_s=3600)
    probes = {"database": 0, "vector_store": 0, "model": 0}

    def counted(name: str) -> Callable[[], Any]:
        async def check() -> bool:
            probes[name] += 1
            await asyncio.sleep(0)  # a real probe awaits I/O: let the other requests pile up
            return True

        return check

    server.ready_checks.update({name: counted(name) for name in probes})
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def hit() -> int:
                async with session.get(f"http://127.0.0.1:{server.port}/readyz") as resp:
                    return resp.status

            statuses = await asyncio.gather(*(hit() for _ in range(50)))
        assert statuses == [200] * 50
        assert probes == {"database": 1, "vector_store": 1, "model": 1}
    finally:
        await server.stop()


def test_a_repeated_error_is_written_once_with_a_count_of_the_repeats() -> None:
    now = [0.0]
    throttle = ThrottleFilter(every_s=10, clock=lambda: now[0])
    logger = logging.getLogger("tests.security.throttle")
    written: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(record.getMessage())

    keep = Keep()
    keep.addFilter(throttle)
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        for _ in range(1000):
            logger.error("socket.accept() out of system resource: %s", "[Errno 24] Too many open files")
        logger.error("another error")
        logger.info("info lines are never throttled")
        logger.info("info lines are never throttled")
        now[0] = 11.0
        logger.error("socket.accept() out of system resource: %s", "[Errno 24] Too many open files")
    finally:
        logger.removeHandler(keep)
        logger.propagate = True
    assert written == [
        "socket.accept() out of system resource: [Errno 24] Too many open files",
        "another error",
        "info lines are never throttled",
        "info lines are never throttled",
        "socket.accept() out of system resource: [Errno 24] Too many open files"
        " [999 more like this in the last 11 s not logged]",
    ]


async def test_help_is_counted_too(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> None:
    """/start and /help are answered by the channel itself; they pass the same limit."""
    tg, chat = fake_telegram, 79
    async with (
        FakeSlack(users={STAFF: "ada"}, post_rate=None) as slack,
        shop(tg, slack, app_data_dir, rate_limit_per_minute=1) as app,
    ):
        for _ in range(10):
            await tg.push_message(chat, "/help")
        await settled(app, 10)
        assert tg.texts(chat) == [HELP_TEXT, SLOW_DOWN]
