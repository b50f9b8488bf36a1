"""Logs at DEBUG hold no customer text.

python-telegram-bot logs whole updates and Bot API calls at DEBUG, slack_sdk whole request bodies,
SQLAlchemy result rows. `bot/logsafe.quiet_http_clients` (called by the App) keeps those loggers at
INFO or above whatever the root level, so an operator who sets APPRENTICE_LOG_LEVEL=DEBUG to chase a
problem does not start writing customers' words to disk. The test runs a conversation through the
real Telegram channel (fake Bot API) and the real Slack channel (fake Slack API) with the root
logger at DEBUG, and looks for a unique marker in everything that was logged.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from apps import app_data_dir, app_settings, kb_template  # noqa: F401
from fakes.slack_api import FakeSlack
from fakes.telegram_api import TOKEN, FakeTelegramApi, fake_telegram  # noqa: F401

from bot.app import App
from bot.channels.slack import SlackChannel
from bot.channels.telegram import TelegramChannel
from learning.generation import Generation

pytestmark = pytest.mark.timeout(120)


class EchoModel:
    """Answers with the customer's own question, so the marker travels out again (replies, cards)."""

    model_name = "echo"
    adapter_version: str | None = None

    async def generate(self, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> Generation:
        question = messages[-1]["content"].rsplit("Customer question: ", 1)[-1]
        return Generation(f"You asked: {question}", "echo", None, 10, 3, 0.01, 0.01)

    def set_adapter(self, path: str | None, version: str | None) -> None:
        self.adapter_version = version

    async def aclose(self) -> None:
        return None


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_debug_logs_hold_no_customer_text(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> None:
    marker = f"zebra{uuid.uuid4().hex[:12]}"
    tg, chat = fake_telegram, 5150
    keep, root = Keep(), logging.getLogger()
    level = root.level
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)  # what APPRENTICE_LOG_LEVEL=DEBUG does (bot/cli.py)
    try:
        async with FakeSlack(users={"UADA": "ada"}, post_rate=None) as slack:
            settings = app_settings(
                app_data_dir,
                log_level="DEBUG",
                telegram_bot_token=TOKEN,
                telegram_api_url=tg.base_url,
                slack_bot_token="xoxb-debug",
                slack_signing_secret="debug-signing-secret",
                slack_channel="CREVIEW",
                slack_api_url=slack.api_url,
                relevance_threshold=-1.0, overlap_threshold=0.0,
            )
            async with App(settings, generator=EchoModel()) as app:
                await app.add_channel(
                    SlackChannel(settings, app.service, app.store, app.http, poll_s=0.05, base_delay_s=0.05)
                )
                await app.add_channel(
                    TelegramChannel(
                        settings, app.service, app.store, app.http, poll_timeout_s=2, outbox_poll_s=0.05
                    )
                )
                await app.start_http()
                await tg.wait_for("getUpdates")
                await tg.push_message(chat, f"Where is my order? My code is {marker}", first_name="Ada")
                await tg.wait_for_text(chat, marker)  # the answer carried the marker back out
                await slack.wait_for("chat.postMessage", where=lambda c: marker in str(c.params))  # the card
    finally:
        root.removeHandler(keep)
        root.setLevel(level)
    assert any(r.levelno == logging.DEBUG for r in keep.records)  # DEBUG was really on
    written = [logging.Formatter("%(name)s %(message)s").format(r) for r in keep.records]
    leaks = [line[:300] for line in written if marker in line]
    assert not leaks
