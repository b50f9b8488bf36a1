"""The application lifecycle: `async with App(settings) as app:` starts everything in order.

Start-up order is store → knowledge base (ingest) → model runtime → conversation service →
channels; teardown runs in reverse, also when start-up fails halfway (the exit stack
unwinds whatever was already started). Nothing connects at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from types import TracebackType
from typing import Any, Protocol

from bot.conversation import ConversationService
from bot.http import HttpServer
from bot.logsafe import quiet_http_clients
from bot.metrics import serve_operations
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import ConfigError, Settings
from knowledge.store import Store
from learning.generation import Generator
from learning.registry import AdapterWatcher
from learning.runtime import build_runtime

log = logging.getLogger(__name__)


class Channel(Protocol):
    """A chat service connection (Telegram, Slack). `start` returns once it is serving."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class App:
    """Owns the long-lived parts of one `apprentice serve` process."""

    def __init__(self, settings: Settings, generator: Generator | None = None, ingest: bool = True) -> None:
        self.settings = settings
        self._generator = generator
        self._ingest = ingest
        self._stack = contextlib.AsyncExitStack()
        self.store: Store
        self.kb: KnowledgeBase
        self.generator: Generator
        self.service: ConversationService
        self.channels: list[Channel] = []
        self.failure: asyncio.Future[str] | None = None  # set by a channel that cannot go on
        self.http = HttpServer(settings.http_host, settings.http_port)
        quiet_http_clients()  # httpx logs request URLs, and Telegram's carry the bot token

    async def __aenter__(self) -> App:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def fail(self, reason: str) -> None:
        """A channel cannot go on: `serve` stops the process with `reason` (one line, exit 2)."""
        if self.failure is not None and not self.failure.done():
            self.failure.set_result(reason)

    async def _start(self) -> None:
        s = self.settings
        self.failure = asyncio.get_running_loop().create_future()
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = await asyncio.to_thread(Store, s.database)
        self._stack.callback(self.store.close)
        self.kb = await asyncio.to_thread(KnowledgeBase.from_settings, s)
        self._stack.callback(self.kb.close)
        if self._ingest:
            report = await asyncio.to_thread(self.kb.ingest, [s.kb_path], False, False)
            log.info("knowledge base: %s", report)
        if self._generator is None:
            self.generator = await asyncio.to_thread(build_runtime, s)
        else:
            self.generator = self._generator
        self._stack.push_async_callback(self.generator.aclose)
        self.service = ConversationService(s, self.store, self.kb, self.generator)
        # Hot-swap: the nightly job only moves the registry pointer; this picks it up.
        watcher = AdapterWatcher(self.store, self.generator, interval_s=s.adapter_poll_s)
        await watcher.start()
        self._stack.push_async_callback(watcher.stop)
        serve_operations(self.http, self.store, self.kb, self.generator)  # /readyz and /metrics

    async def add_channel(self, channel: Channel) -> None:
        """Start a channel now and stop it (before the runtime and the store) on exit."""
        await channel.start()
        self._stack.push_async_callback(channel.stop)
        self.channels.append(channel)

    def start_scheduler(self) -> None:
        """Schedule the nightly learning job (its report goes to Slack when connected, else stdout),
        the weekly resolution figures and the satisfaction question's sweep."""
        from learning.nightly import NightlyReport, start_scheduler

        async def report(result: NightlyReport) -> None:
            for channel in self.channels:
                post = getattr(channel, "post_report", None)
                if post is not None:
                    await post(result)
                    return
            if result.status != "skipped":
                print(result.render(), flush=True)

        scheduler = start_scheduler(self.settings, self.store, self.kb, report)
        if scheduler is not None:  # None: APPRENTICE_RETRAIN_CRON is off in this process
            self._stack.callback(scheduler.shutdown, wait=False)
        self._start_figures()

    def _start_figures(self) -> None:
        """The satisfaction sweep (each minute) and the weekly resolution figures (bot/stats.py)."""
        from bot import stats
        from learning.nightly import start_report_scheduler

        if self.settings.csat_after > 0:
            sweep = asyncio.create_task(stats.sweep_forever(self.service), name="csat-sweep")
            self._stack.push_async_callback(stats.stop, sweep)

        async def post() -> None:
            figures = await asyncio.to_thread(stats.compute, self.store, 7)
            text = stats.format_stats(figures)
            for channel in self.channels:
                post_stats = getattr(channel, "post_stats", None)
                if post_stats is not None:
                    folder = self.settings.data_dir / "stats" / f"{figures.until:%Y-%m-%d}"
                    _, chart = await asyncio.to_thread(stats.write, figures, folder)
                    await post_stats(text, str(chart))
                    return
            print(text, flush=True)

        scheduler = start_report_scheduler(self.settings, self.store, post)
        if scheduler is not None:  # None: APPRENTICE_REPORT_CRON is off
            self._stack.callback(scheduler.shutdown, wait=False)

    async def start_http(self) -> None:
        """Start the HTTP server once every channel has added its routes."""
        await self.http.start()
        self._stack.push_async_callback(self.http.stop)


async def _wait_for_signal(failure: asyncio.Future[str]) -> None:
    """Return on SIGINT or SIGTERM; raise ConfigError when a channel fails for good first."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    either: list[asyncio.Future[Any]] = [stopped, failure]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if failure.done():
        raise ConfigError(failure.result())


def _stdin_can_chat() -> bool:
    """True when someone can type (a terminal) or input is piped in (a pipe or a file).

    A container, a systemd unit or a Kubernetes pod gives the process /dev/null or nothing: the
    terminal chat would meet end of input at once, exit 0 and be restarted forever.
    """
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return sys.stdin.isatty() or stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def check_deployment(settings: Settings) -> None:
    """Refuse, in one line, to start a server that could only fail or serve the wrong documents."""
    chat = bool(settings.telegram_bot_token.get_secret_value() or settings.slack_bot_token.get_secret_value())
    if not chat and not _stdin_can_chat():
        raise ConfigError(
            "no channel to serve: set TELEGRAM_BOT_TOKEN (customers) and/or SLACK_BOT_TOKEN with "
            "SLACK_SIGNING_SECRET or SLACK_APP_TOKEN (staff); without them `serve` is a terminal chat, "
            "which needs a terminal or piped input."
        )
    if chat and not settings.kb:
        raise ConfigError(
            "APPRENTICE_KB is empty, which means the bundled demo bike shop: set it to the folder of "
            "your documents (the demo is for the terminal chat only)."
        )


async def serve(settings: Settings) -> int:
    """`apprentice serve`: the channels that are configured, else the terminal chat."""
    check_deployment(settings)
    async with App(settings) as app:
        # Each chat service starts only when its token is set; see README "Connecting Telegram/Slack".
        # Staff's channel first: Telegram hands in the updates a killed process left as soon as it
        # starts, and each of their answers needs its review card (found by the soak, tests/bench/soak.py).
        if settings.slack_bot_token.get_secret_value():
            from bot.channels.slack import SlackChannel

            await app.add_channel(SlackChannel(settings, app.service, app.store, app.http))
        if settings.telegram_bot_token.get_secret_value():
            from bot.channels.telegram import TelegramChannel

            await app.add_channel(
                TelegramChannel(settings, app.service, app.store, app.http, on_fatal=app.fail)
            )
        app.start_scheduler()
        if not app.channels:
            from bot.channels.terminal import TerminalChannel

            return await TerminalChannel(app.service).run()
        await app.start_http()
        assert app.failure is not None
        await _wait_for_signal(app.failure)
    return 0
