"""Bad input, generated (hypothesis): more than 10,000 inputs through every door a stranger can knock on.

- the conversation flow (`ConversationService.handle`) with random text (control characters,
  lone surrogates, emoji), empty and huge messages, unknown kinds, repeated message ids, and a
  model that answers junk or fails;
- the Telegram update parser (`Update.de_json` plus the channel's translation into `Inbound`)
  and its webhook endpoint, with random JSON, malformed JSON, invalid UTF-8, missing fields,
  wrong types and unknown update kinds;
- the Slack endpoint with correctly signed random events, interactivity payloads and slash
  commands, and with bad signatures.

What must hold: nothing crashes; every input is answered (a reply, a clear notice) or refused
with a clear status (400, 401, 403, 404, 413), never a 500. Counts are asserted per door; their
sum is the figure quoted in docs/security.md. The model is scripted, so the run measures the bot.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import string
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from apps import app_settings, kb_template  # noqa: F401
from fakes.slack_api import FakeSlack
from fakes.telegram_api import TOKEN, FakeTelegramApi
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scripted import ScriptedModel

from bot.app import App
from bot.channels.slack import SlackChannel
from bot.channels.telegram import SECRET_HEADER, TelegramChannel, parse_update
from bot.conversation import ConversationService
from bot.envelope import Inbound
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

FLOW_EXAMPLES = 2500
PARSER_EXAMPLES = 4000
WEBHOOK_EXAMPLES = 1500
SLACK_EXAMPLES = 2500
FUZZ = settings(
    deadline=None,
    database=None,  # no example database in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
SECRET = "fuzz-webhook-secret"
SIGNING = "fuzz-signing-secret"
REVIEW = "CREVIEW"
CLEAR = {200, 400, 401, 403, 404, 413}

# any code point, surrogates and control characters included
ANY_CHAR = st.characters(codec=None, exclude_categories=())
TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=120),
    st.text(string.printable, max_size=400),
    st.sampled_from(["", " ", "\n\t ", "\x00", "\ud800", "🙂" * 3, "<|im_start|>system", ">>>", "/start"]),
    st.builds(
        lambda c, n: c * n, st.sampled_from(["a", "€", "💥", "\x00", "\ud800", "<"]), st.integers(3000, 12000)
    ),
)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(ANY_CHAR, max_size=30),
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=12), inner, max_size=5),
    ),
    max_leaves=12,
)


@pytest.fixture
def kb(tmp_path: Path) -> Any:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "shipping.md").write_text("# Shipping\n\nWe ship within 3 days by DHL.\n", encoding="utf-8")
    base = KnowledgeBase.from_settings(Settings(_env_file=None, data_dir=tmp_path / "kb"))  # type: ignore[call-arg]
    base.ingest([docs])
    yield base
    base.close()


# --- the conversation flow ---------------------------------------------------------------------


def test_conversation_flow_answers_or_refuses_every_generated_message(tmp_path: Path, kb: Any) -> None:
    conf = Settings(_env_file=None, data_dir=tmp_path, max_input_chars=4000, rate_limit_per_minute=10)  # type: ignore[call-arg]
    store = Store(conf.database)
    model = ScriptedModel()
    service = ConversationService(conf, store, kb, model)
    seen = 0
    runner = asyncio.Runner()
    replies = st.one_of(
        TEXT, st.sampled_from([RuntimeError("boom"), TimeoutError(), ValueError("bad")]), st.just("")
    )

    @settings(FUZZ, max_examples=FLOW_EXAMPLES)
    @given(
        text=st.one_of(TEXT, st.none()),
        kind=st.one_of(
            st.just("text"), st.sampled_from(["photo", "voice", "edited", "other"]), st.text(max_size=8)
        ),
        chat=st.integers(0, 400),
        external=st.sampled_from(["", "1", "2", "3"]),
        name=st.text(ANY_CHAR, max_size=300),
        reply=replies,
    )
    def one(text: str | None, kind: str, chat: int, external: str, name: str, reply: Any) -> None:
        nonlocal seen
        model.replies = [reply]
        inbound = Inbound("fuzz", str(chat), f"u{chat}", text, external_id=external, name=name, kind=kind)
        outs = runner.run(service.handle(inbound))
        seen += 1
        if not outs:  # over the rate limit: one "slow down" a window, then silence, the message on record
            conv = store.conversation_for("fuzz", str(chat), f"u{chat}")
            assert any(m.status == "limited" for m in store.history(conv.id, 10_000)), inbound
            return
        assert len(outs) == 1, (inbound, outs)
        assert outs[0].text.strip(), (inbound, outs)
        assert store.message(outs[0].message_id) is not None  # answered and recorded

    try:
        one()
    finally:
        runner.close()
        store.close()
    assert seen >= FLOW_EXAMPLES


# --- Telegram ----------------------------------------------------------------------------------


def _message(draw: Any) -> dict[str, Any]:
    """A message object: half of them well formed (random content), half with holes and odd types."""
    chat_type = draw(st.sampled_from(["private", "private", "group", "supergroup", "channel", "weird"]))
    chat_id = draw(st.integers(-(2**45), 2**45)) if chat_type != "private" else draw(st.integers(1, 2**45))
    msg: dict[str, Any] = {
        "message_id": draw(st.integers(1, 2**40)),
        "date": draw(st.integers(0, 2**31)),
        "chat": {"id": chat_id, "type": chat_type, "first_name": draw(st.text(ANY_CHAR, max_size=20))},
        "from": {
            "id": draw(st.integers(1, 2**45)),
            "is_bot": False,
            "first_name": draw(st.text(ANY_CHAR, max_size=40)),
        },
    }
    content = draw(
        st.sampled_from(["text", "text", "photo", "sticker", "location", "new_chat_members", "none"])
    )
    if content == "text":
        msg["text"] = draw(TEXT)
        if draw(st.integers(0, 4)) == 0:
            msg["entities"] = [{"type": "bot_command", "offset": 0, "length": draw(st.integers(-3, 40))}]
    elif content == "photo":
        msg["photo"] = [{"file_id": "f", "file_unique_id": "u", "width": 1, "height": 1}]
    elif content == "sticker":
        msg["sticker"] = draw(JSON)
    elif content == "location":
        msg["location"] = {"latitude": draw(st.floats(-90, 90)), "longitude": draw(st.floats(-180, 180))}
    elif content == "new_chat_members":
        msg["new_chat_members"] = []
    if draw(st.booleans()):
        return msg
    # broken: random extra fields, wrong types, missing fields
    msg.update(
        draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "text",
                        "entities",
                        "caption",
                        "reply_to_message",
                        "date",
                        "chat",
                        "from",
                        "message_id",
                        "dice",
                    ]
                ),
                JSON,
                max_size=3,
            )
        )
    )
    for key in draw(st.lists(st.sampled_from(list(msg)), max_size=2)):
        msg.pop(key, None)
    return msg


@st.composite
def updates(draw: Any) -> dict[str, Any]:
    odd_id = draw(st.integers(0, 9)) == 0
    update: dict[str, Any] = {"update_id": draw(JSON_LEAF if odd_id else st.integers(1, 2**40))}
    kinds = ["message"] * 6 + ["edited_message", "callback_query", "channel_post", "poll", "nonsense"]
    kind = draw(st.sampled_from(kinds))
    if kind == "callback_query":
        update[kind] = {
            "id": draw(st.text(max_size=10)),
            "from": {"id": draw(st.integers(1, 2**40)), "is_bot": False, "first_name": "x"},
            "chat_instance": "ci",
            "data": draw(
                st.one_of(st.text(ANY_CHAR, max_size=40), st.just("fb:up:1"), st.just("fb:down:99999999999"))
            ),
        }
    else:
        update[kind] = (
            draw(st.one_of(st.builds(dict), JSON, st.just(None))) if draw(st.booleans()) else _message(draw)
        )
    if draw(st.integers(0, 9)) == 0:
        update.pop("update_id")
    return update


async def _telegram_app(fake: FakeTelegramApi, data_dir: Path) -> tuple[App, TelegramChannel]:
    conf = app_settings(
        data_dir, telegram_bot_token=TOKEN, telegram_api_url=fake.base_url, telegram_webhook_url="https://x.example/telegram",
        telegram_webhook_secret=SECRET, relevance_threshold=-1.0,
        overlap_threshold=0.0, rate_limit_per_minute=0,
    )  # fmt: skip
    app = App(conf, generator=ScriptedModel())
    await app.__aenter__()
    channel = TelegramChannel(conf, app.service, app.store, app.http, outbox_poll_s=0.05, retry_base_s=0.05)
    await app.add_channel(channel)
    await app.start_http()
    return app, channel


def test_telegram_parser_translates_or_skips_every_generated_update(
    tmp_path: Path,
    kb_template: Path,  # noqa: F811
) -> None:
    runner = asyncio.Runner()
    fake = FakeTelegramApi()
    runner.run(fake.start())
    app, channel = runner.run(_telegram_app(fake, _copy(kb_template, tmp_path)))
    bot = channel.application.bot
    seen = parsed = translated = 0

    @settings(FUZZ, max_examples=PARSER_EXAMPLES)
    @given(data=updates())
    @example(  # found by this test: entities on a message with neither text nor caption
        data={
            "update_id": 1,
            "message": {
                "message_id": 1, "date": 0, "chat": {"id": 0, "type": "group", "first_name": ""},
                "from": {"id": 1, "is_bot": False, "first_name": ""},
                "entities": [{"type": "bot_command", "offset": 0, "length": 0}],
            },
        }
    )  # fmt: skip
    def one(data: dict[str, Any]) -> None:
        nonlocal seen, parsed, translated
        seen += 1
        update = parse_update(data, bot)
        if update is None:
            return  # not an update: the webhook answers 400
        parsed += 1
        msg = update.message or update.edited_message
        if msg is None or getattr(msg, "chat", None) is None or not channel._addressed(msg):
            return
        kind = _kind_of(msg, update)
        if kind is None:
            return
        inbound = channel._inbound(msg, kind, update.update_id)
        assert isinstance(inbound.chat_id, str) and isinstance(inbound.customer_id, str)
        assert inbound.text is None or isinstance(inbound.text, str)
        translated += 1

    try:
        one()
    finally:
        runner.run(app.__aexit__(None, None, None))
        runner.run(fake.stop())
        runner.close()
    assert seen >= PARSER_EXAMPLES and parsed > 1000 and translated > 30


def _kind_of(msg: Any, update: Any) -> str | None:
    from bot.channels.telegram.channel import _kind

    return _kind(msg, edited=update.edited_message is not None)


def _copy(template: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "data"
    shutil.copytree(template, dest)
    return dest


def test_telegram_webhook_answers_or_refuses_every_generated_request(
    tmp_path: Path,
    kb_template: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    runner = asyncio.Runner()
    fake = FakeTelegramApi()
    runner.run(fake.start())
    app, _ = runner.run(_telegram_app(fake, _copy(kb_template, tmp_path)))
    url = f"http://127.0.0.1:{app.http.port}/telegram"
    session = runner.run(_session())
    statuses: dict[int, int] = {}
    expected_chats: set[int] = set()
    next_chat = iter(range(10**9, 10**10))

    bodies = st.one_of(
        updates().map(lambda u: json.dumps(u).encode()),
        st.binary(max_size=200),  # invalid UTF-8, not JSON
        JSON.map(lambda j: json.dumps(j).encode()),
        st.just(b'{"update_id": 1, "message": '),  # truncated
        st.just(b"\xff\xfe{}"),
    )

    @settings(FUZZ, max_examples=WEBHOOK_EXAMPLES)
    @given(
        body=bodies, secret=st.sampled_from([SECRET, SECRET, SECRET, "", "wrong"]), valid=st.integers(0, 4)
    )
    def one(body: bytes, secret: str, valid: int) -> None:
        headers = {"Content-Type": "application/json", SECRET_HEADER: secret}
        if valid == 0 and secret == SECRET:  # a real private text message: must get an answer
            chat = next(next_chat)
            # update ids of their own: a generated update may carry any id, and Telegram's are unique
            update = fake.message_update(chat, f"fuzz question {chat}", update_id=2**41 + chat)
            body = json.dumps(update).encode()
            expected_chats.add(chat)
        status = runner.run(_post(session, url, body, headers))
        statuses[status] = statuses.get(status, 0) + 1
        assert status in CLEAR, (status, body[:200])
        if secret != SECRET:
            assert status == 403

    try:
        one()
        # every real message got its answer (bounded wait on the fake Bot API's record)
        try:
            runner.run(
                fake.wait_for(
                    "sendMessage",
                    lambda c: int(c.params.get("chat_id", 0)) in expected_chats,
                    count=len(expected_chats),
                    timeout=300,
                )
            )
        except TimeoutError:
            answered = {int(c.params.get("chat_id", 0)) for c in fake.sent()}
            raise AssertionError(f"unanswered: {sorted(expected_chats - answered)[:10]}") from None
    finally:
        runner.run(session.close())
        runner.run(app.__aexit__(None, None, None))
        runner.run(fake.stop())
        runner.close()
    assert sum(statuses.values()) >= WEBHOOK_EXAMPLES and expected_chats
    crashes = [r for r in caplog.records if r.name.startswith("bot.") and r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes[:5]]


def _sign(body: bytes) -> dict[str, str]:
    """Slack's v0 signature over the raw bytes (also for bodies that are not UTF-8)."""
    ts = str(int(time.time()))
    digest = hmac.new(SIGNING.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> int:
    async with session.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


# --- Slack -------------------------------------------------------------------------------------


@st.composite
def slack_requests(draw: Any) -> tuple[bytes, str]:
    """(body, content type) of an Events API, interactivity or slash-command request."""
    kind = draw(st.sampled_from(["event", "interactive", "command", "junk"]))
    if kind == "event":
        event = draw(
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(["message", "app_mention", "reaction_added", "nonsense"]),
                        "channel": st.sampled_from([REVIEW, "COTHER", ""]),
                        "user": st.sampled_from(["UADA", "UEVE", ""]),
                        "text": TEXT,
                        "ts": st.text(string.digits + ".", max_size=12),
                        "thread_ts": st.one_of(st.none(), st.text(string.digits + ".", max_size=12)),
                        "subtype": st.one_of(st.none(), st.sampled_from(["bot_message", "message_changed"])),
                    }
                ),
                JSON,
            )
        )
        body = {
            "type": draw(st.sampled_from(["event_callback", "url_verification", "weird"])),
            "event": event,
            "event_id": draw(st.text(string.ascii_letters, min_size=1, max_size=10)),
            "team_id": "T0001",
            "challenge": "c",
        }
        if draw(st.booleans()):
            body.pop(draw(st.sampled_from(list(body))))
        return json.dumps(body).encode(), "application/json"
    if kind == "interactive":
        payload = draw(
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(["block_actions", "view_submission", "shortcut", "odd"]),
                        "user": st.one_of(
                            st.fixed_dictionaries({"id": st.sampled_from(["UADA", "UEVE"])}), JSON
                        ),
                        "actions": st.one_of(
                            st.lists(
                                st.fixed_dictionaries(
                                    {
                                        "action_id": st.sampled_from(
                                            [
                                                "apprentice_approve",
                                                "apprentice_flag",
                                                "apprentice_correct",
                                                "apprentice_take_over",
                                                "apprentice_hand_back",
                                                "apprentice_x",
                                            ]
                                        ),
                                        "value": st.one_of(
                                            st.text(max_size=12), st.just("1:1"), st.just("999:999")
                                        ),
                                    }
                                ),
                                max_size=2,
                            ),
                            JSON,
                        ),
                        "view": st.one_of(
                            st.fixed_dictionaries(
                                {
                                    "callback_id": st.sampled_from(
                                        ["apprentice_correct", "apprentice_flag", "x"]
                                    ),
                                    "private_metadata": st.one_of(
                                        st.text(max_size=30),
                                        st.just('{"c": 1, "m": 1}'),
                                        st.just('{"m": "x"}'),
                                    ),
                                    "state": JSON,
                                }
                            ),
                            JSON,
                        ),
                        "trigger_id": st.text(max_size=8),
                        "team": st.just({"id": "T0001"}),
                    }
                ),
                JSON,
            )
        )
        raw = draw(
            st.one_of(
                st.just(json.dumps(payload)), st.text(ANY_CHAR.filter(lambda c: c < "\ud800"), max_size=50)
            )
        )
        return urllib.parse.urlencode({"payload": raw}).encode(), "application/x-www-form-urlencoded"
    if kind == "command":
        form = {
            "command": draw(st.sampled_from(["/apprentice", "/other"])),
            "text": draw(st.text(string.printable, max_size=40)),
            "user_id": draw(st.sampled_from(["UADA", "UEVE", ""])),
            "channel_id": REVIEW,
            "team_id": "T0001",
        }
        return urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
    return draw(st.binary(max_size=300)), draw(st.sampled_from(["application/json", "text/plain", ""]))


def test_slack_endpoint_answers_or_refuses_every_generated_request(
    tmp_path: Path,
    kb_template: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    runner = asyncio.Runner()
    slack = FakeSlack(users={"UADA": "ada"})
    runner.run(slack.__aenter__())
    conf = app_settings(
        _copy(kb_template, tmp_path), slack_bot_token="xoxb-fuzz", slack_signing_secret=SIGNING,
        slack_channel=REVIEW, slack_api_url=slack.api_url, staff="UADA", relevance_threshold=-1.0,
        overlap_threshold=0.0,
    )  # fmt: skip
    app = App(conf, generator=ScriptedModel())
    runner.run(app.__aenter__())
    channel = SlackChannel(conf, app.service, app.store, app.http, poll_s=0.05, base_delay_s=0.05)
    runner.run(app.add_channel(channel))
    runner.run(app.start_http())
    # one real answer, so some generated button values point at something
    runner.run(app.service.handle(Inbound("test", "1", "u1", "When do you ship?")))
    url = f"http://127.0.0.1:{app.http.port}/slack/events"
    session = runner.run(_session())
    statuses: dict[int, int] = {}

    @settings(FUZZ, max_examples=SLACK_EXAMPLES)
    @given(request=slack_requests(), signed=st.integers(0, 9))
    # found by this test: bolt reads a form body that starts with "{" as JSON
    @example(request=(b"{'payload': 1}", "application/x-www-form-urlencoded"), signed=1)
    # bolt keeps the LAST of repeated form fields
    @example(request=(b'payload=%7B%7D&payload=%5B1%5D', "application/x-www-form-urlencoded"), signed=1)
    def one(request: tuple[bytes, str], signed: int) -> None:
        body, ctype = request
        headers = {"Content-Type": ctype} if ctype else {}
        if signed:
            headers.update(_sign(body))
        status = runner.run(_post(session, url, body, headers))
        statuses[status] = statuses.get(status, 0) + 1
        assert status in CLEAR, (status, body[:300])
        if not signed:
            assert status == 401
        runner.run(channel.idle())  # the actions it scheduled finished without an unhandled error

    try:
        one()
    finally:
        runner.run(session.close())
        runner.run(app.__aexit__(None, None, None))
        runner.run(slack.__aexit__(None, None, None))
        runner.close()
    assert sum(statuses.values()) >= SLACK_EXAMPLES and statuses.get(200, 0) > 100
    crashes = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith(("bot.", "slack_bolt"))
    ]
    assert not crashes, [r.getMessage()[:300] for r in crashes[:5]]
