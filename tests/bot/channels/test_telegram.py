"""The Telegram channel read like chats: real python-telegram-bot against a fake Bot API on 127.0.0.1.

Each test runs the App the way `apprentice serve` does (store, demo KB, conversation service,
HTTP server) with a scripted model, so the mechanics are exact and fast. Nothing sleeps: tests
wait for the API calls they expect (`fake.wait_for`) and use chat order to prove a negative.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from apps import app_data_dir, app_settings, kb_template  # noqa: F401
from fakes.telegram_api import TOKEN, Call, FakeTelegramApi, fake_telegram  # noqa: F401
from sqlalchemy import func, select

from bot.app import App
from bot.channels.telegram import (
    ALREADY_RATED,
    HELP_TEXT,
    MAX_ATTEMPTS,
    MAX_MESSAGE,
    TelegramChannel,
    split_text,
)
from bot.logsafe import MASK, SecretFilter
from bot.messages import CATALOG
from bot.notices import APOLOGY, HUMAN, NON_TEXT, SLOW_DOWN, THANKS_DOWN, THANKS_UP
from knowledge.models import Conversation, Customer, Feedback, Message, OutboxItem
from knowledge.store import Store
from learning.generation import Generation

pytestmark = pytest.mark.timeout(120)


class ChatModel:
    """A scripted generator: answers "Answer: <question>" unless told otherwise; a question can be held.

    `hold(word)` makes every question containing `word` wait until `release(word)`; `started`
    records questions in the order generation began.
    """

    model_name = "scripted"
    adapter_version: str | None = None

    def __init__(self) -> None:
        self.replies: dict[str, str] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self._changed = asyncio.Condition()

    def reply(self, question: str, answer: str) -> None:
        self.replies[question] = answer

    def hold(self, word: str) -> None:
        self.gates[word] = asyncio.Event()

    def release(self, word: str) -> None:
        self.gates[word].set()

    async def wait_started(self, word: str) -> None:
        async with asyncio.timeout(20), self._changed:
            await self._changed.wait_for(lambda: any(word in q for q in self.started))

    async def generate(self, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> Generation:
        question = messages[-1]["content"].rsplit("Customer question: ", 1)[-1]
        self.started.append(question)
        async with self._changed:
            self._changed.notify_all()
        for word, gate in self.gates.items():
            if word in question:
                await gate.wait()
        text = self.replies.get(question, f"Answer: {question}")
        return Generation(text, "scripted", None, 10, 3, 0.01, 0.01)

    def set_adapter(self, path: str | None, version: str | None) -> None:
        self.adapter_version = version

    async def aclose(self) -> None:
        return None


@contextlib.asynccontextmanager
async def telegram_app(
    fake: FakeTelegramApi, data_dir: Path, model: ChatModel, **overrides: Any
) -> AsyncIterator[tuple[App, TelegramChannel]]:
    """The App with the Telegram channel started, as `apprentice serve` would run it."""
    values: dict[str, Any] = {
        "telegram_bot_token": TOKEN,
        "telegram_api_url": fake.base_url,
        "relevance_threshold": -1.0,
        "overlap_threshold": 0.0,  # mechanics: every question reaches the scripted model
    }
    values.update(overrides)
    settings = app_settings(data_dir, **values)
    async with App(settings, generator=model) as app:
        channel = TelegramChannel(
            settings,
            app.service,
            app.store,
            app.http,
            poll_timeout_s=2,
            typing_every_s=0.05,
            outbox_poll_s=0.05,
            retry_base_s=0.05,
        )
        await app.add_channel(channel)
        await app.start_http()
        if not channel.webhook_url:  # start_polling returns before the first poll is out
            await fake.wait_for("getUpdates")
        yield app, channel


@pytest.fixture
async def bot(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> AsyncIterator[tuple[FakeTelegramApi, App, ChatModel]]:
    model = ChatModel()
    async with telegram_app(fake_telegram, app_data_dir, model, start_text="Hi! Ask me about orders.") as (
        app,
        _,
    ):
        yield fake_telegram, app, model


def stored(store: Store, cls: type, **where: Any) -> list[Any]:
    with store.session() as s:
        q: Any = select(cls)
        for key, value in where.items():
            q = q.where(getattr(cls, key) == value)
        return list(s.scalars(q).all())


def buttons(call: Call) -> list[str]:
    markup = call.params.get("reply_markup") or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


# --- answering -------------------------------------------------------------------------------


async def test_polling_answer_is_plain_text_with_feedback_buttons_and_typing(bot) -> None:
    fake, app, model = bot
    question = "Is *bold* <b>markup</b> [safe](x) in my order_id?"
    model.reply(question, "Your *order* <i>ships</i> in_2_days [link](http://x).")
    model.hold("order_id")
    await fake.push_message(555, question)
    # "typing…" is renewed while the model works
    await fake.wait_for("sendChatAction", lambda c: c.params["chat_id"] == 555, count=2)
    assert fake.sent(555) == []
    model.release("order_id")
    call = await fake.wait_for_text(555, "ships")
    assert call.params["text"] == "Your *order* <i>ships</i> in_2_days [link](http://x)."
    assert "parse_mode" not in call.params  # plain text: model output cannot break formatting
    answer = stored(app.store, Message, role="bot")[0]
    assert buttons(call) == [f"fb:up:{answer.id}", f"fb:down:{answer.id}"]
    customer = stored(app.store, Message, role="customer")[0]
    assert customer.text == question and answer.reply_to_id == customer.id


async def test_the_profile_username_and_a_shared_own_phone_are_kept_for_redaction(bot) -> None:
    fake, app, model = bot
    model.reply("When does my order ship?", "Within 3 days.")
    profile = {"from": {"id": 901, "is_bot": False, "first_name": "Grace", "username": "grace_h"}}
    await fake.push_message(901, "When does my order ship?", extra=profile)
    await fake.wait_for_text(901, "Within 3 days.")
    friend = {"contact": {"phone_number": "+44 20 7946 0001", "first_name": "Bob", "user_id": 77}}
    await fake.push_message(901, None, extra={**profile, **friend})
    own = {"contact": {"phone_number": "+44 20 7946 0958", "first_name": "Grace", "user_id": 901}}
    await fake.push_message(901, None, extra={**profile, **own})
    await fake.wait_for("sendMessage", lambda c: c.params["chat_id"] == 901, count=3)
    [customer] = stored(app.store, Customer)
    assert (customer.username, customer.phone) == ("grace_h", "+44 20 7946 0958")  # never the friend's


async def test_start_help_and_human(bot) -> None:
    fake, app, _ = bot
    await fake.push_message(7, "/start")
    assert (await fake.wait_for_text(7, "Hi!")).params["text"] == "Hi! Ask me about orders."
    await fake.push_message(7, "/help")
    await fake.wait_for_text(7, HELP_TEXT)
    await fake.push_message(7, "/human")
    await fake.wait_for_text(7, HUMAN)
    conv = stored(app.store, Conversation, chat_id="7")[0]
    assert conv.flagged
    assert [c.params["text"] for c in fake.sent(7)] == ["Hi! Ask me about orders.", HELP_TEXT, HUMAN]


async def test_plain_words_and_two_thumbs_down_reach_a_person_like_human(bot) -> None:
    """bot/handoff.py: no /human needed; the 👎 hand-off notice arrives through the outbox."""
    fake, app, model = bot
    await fake.push_message(8, "Можно поговорить с оператором?")
    await fake.wait_for_text(8, CATALOG["human"]["ru"])  # written in Russian: the Russian notice
    assert stored(app.store, Conversation, chat_id="8")[0].flagged and model.started == []

    await fake.push_message(9, "Where is my parcel?")
    first = await fake.wait_for_text(9, "Answer:")
    await fake.push_message(9, "How long is the warranty on a bike?")
    second = await fake.wait_for_text(9, "warranty")
    await fake.push_callback(9, buttons(first)[1])
    await fake.wait_for("answerCallbackQuery")  # one 👎 is feedback, not a hand-off
    await fake.push_callback(9, buttons(second)[1])
    await fake.wait_for_text(9, HUMAN)
    assert fake.texts(9) == [first.params["text"], second.params["text"], HUMAN]


async def test_feedback_buttons_store_once_and_always_answer(bot) -> None:
    fake, app, _ = bot
    await fake.push_message(42, "Where is my parcel?")
    call = await fake.wait_for_text(42, "Answer:")
    up, down = buttons(call)
    mid = int(down.rsplit(":", 1)[1])

    await fake.push_callback(42, down)
    first = (await fake.wait_for("answerCallbackQuery"))[0]
    assert first.params["text"] == THANKS_DOWN
    await fake.wait_for("editMessageReplyMarkup")  # the used buttons go away
    mark = fake.mark()
    await fake.push_callback(42, down)  # pressed again (or on an old copy of the message)
    again = (await fake.wait_for("answerCallbackQuery", since=mark))[0]
    assert again.params["text"] == ALREADY_RATED
    mark = fake.mark()
    await fake.push_callback(99, down)  # from another chat (a forged callback): ignored, still answered
    await fake.push_callback(42, "garbage")
    await fake.push_callback(42, up)
    answers = await fake.wait_for("answerCallbackQuery", since=mark, count=3)
    assert sorted(c.params.get("text", "") for c in answers) == sorted(["", "", THANKS_UP])

    kinds = sorted(f.kind for f in stored(app.store, Feedback, message_id=mid))
    assert kinds == ["down", "up"]
    assert app.store.message(mid).flagged
    assert stored(app.store, Conversation, chat_id="42")[0].flagged


async def test_long_answer_is_split_on_paragraphs_with_buttons_on_the_last_part(bot) -> None:
    fake, _, model = bot
    paragraphs = [f"Paragraph {i}: " + "word " * 300 for i in range(12)]  # ~1.5k chars each
    long = "\n\n".join(p.strip() for p in paragraphs)
    assert len(long) > 2 * MAX_MESSAGE
    model.reply("Tell me everything", long)
    await fake.push_message(8, "Tell me everything")
    last = await fake.wait_for_text(8, "Paragraph 11:")
    parts = fake.sent(8)
    assert len(parts) >= 3 and parts[-1] is last
    assert all(len(p.params["text"]) <= MAX_MESSAGE for p in parts)
    assert all(p.params["text"].startswith("Paragraph") for p in parts)  # cut between paragraphs
    assert "\n\n".join(p.params["text"] for p in parts) == long
    assert [bool(buttons(p)) for p in parts] == [False] * (len(parts) - 1) + [True]


def test_split_text_boundaries() -> None:
    assert split_text("short") == ["short"]
    # one paragraph with no blank lines: cut at a sentence, never mid-word
    para = "This sentence is here. " * 400
    parts = split_text(para, 1000)
    assert all(len(p) <= 1000 for p in parts) and all(p.endswith(".") for p in parts)
    assert " ".join(parts) == para.strip()
    # no spaces at all: hard cut; emoji count as two UTF-16 units, as Telegram counts them
    blob = "😀" * 3000
    parts = split_text(blob, 4096)
    assert "".join(parts) == blob
    assert all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in parts)


async def test_non_text_messages_get_a_polite_reply_and_are_recorded(bot) -> None:
    fake, app, model = bot
    extras = {
        "photo": {"photo": [{"file_id": "p", "file_unique_id": "pu", "width": 1, "height": 1}]},
        "voice": {"voice": {"file_id": "v", "file_unique_id": "vu", "duration": 1}},
        "sticker": {
            "sticker": {
                "file_id": "s",
                "file_unique_id": "su",
                "type": "regular",
                "width": 1,
                "height": 1,
                "is_animated": False,
                "is_video": False,
            }
        },
        "document": {"document": {"file_id": "d", "file_unique_id": "du"}},
        "location": {"location": {"latitude": 1.0, "longitude": 2.0}},
    }
    for i, (_kind, extra) in enumerate(extras.items()):
        await fake.push_message(300 + i, None, extra=extra)
    await fake.push_message(310, "an edit", kind="edited_message")
    for chat in [*range(300, 300 + len(extras)), 310]:
        await fake.wait_for_text(chat, NON_TEXT)
    texts = sorted(m.text for m in stored(app.store, Message, role="customer"))
    assert texts == sorted(f"[{k}]" for k in [*extras, "edited"])
    assert model.started == []


async def test_group_chat_answers_only_when_mentioned_or_replied_to(bot) -> None:
    fake, _app, model = bot
    group = -1001

    def grp(text: str, **kw: Any) -> dict[str, Any]:
        return fake.message_update(group, text, user_id=11, chat_type="supergroup", **kw)

    await fake.push_update(grp("chatting among ourselves about shipping"))
    await fake.push_update(grp("/help@some_other_bot"))
    mention = grp("@apprentice_test_bot how long does shipping take?")
    mention["message"]["entities"] = [{"type": "mention", "offset": 0, "length": 20}]
    await fake.push_update(mention)
    first = await fake.wait_for_text(group, "Answer:")
    # chat order: the two earlier messages were handled (and ignored) before this answer
    assert first.params["text"] == "Answer: how long does shipping take?"
    bot_message = {
        "message_id": 1,
        "date": 0,
        "chat": {"id": group, "type": "supergroup"},
        "from": {"id": 123456, "is_bot": True, "first_name": "Apprentice"},
        "text": "earlier",
    }
    await fake.push_update(grp("and to Norway?", extra={"reply_to_message": bot_message}))
    await fake.wait_for_text(group, "Answer: and to Norway?")
    assert len(fake.sent(group)) == 2
    assert model.started == ["how long does shipping take?", "and to Norway?"]


async def test_rate_limit_through_telegram(fake_telegram, app_data_dir) -> None:  # noqa: F811
    fake, model = fake_telegram, ChatModel()
    async with telegram_app(fake, app_data_dir, model, rate_limit_per_minute=2):
        for i in range(3):
            await fake.push_message(77, f"question {i}")
        await fake.wait_for_text(77, SLOW_DOWN)
        assert len(model.started) == 2


# --- staff ----------------------------------------------------------------------------------------


async def test_taken_over_conversation_is_silent_and_staff_replies_arrive(bot) -> None:
    fake, app, model = bot
    await fake.push_message(61, "first question")
    await fake.wait_for_text(61, "Answer: first question")
    conv = stored(app.store, Conversation, chat_id="61")[0]
    await app.service.take_over(conv.id, "staff:U1")

    relayed = asyncio.Event()

    class Staff:
        async def answer_posted(self, conv, answer): ...
        async def customer_flag(self, conv, message_id, why): ...
        async def correction_stored(self, conv, correction): ...
        async def relay(self, conv, text):
            relayed.set()

    app.service.reviewers.append(Staff())
    mark = fake.mark()
    await fake.push_message(61, "are you a person?")
    async with asyncio.timeout(20):
        await relayed.wait()
    assert fake.find("sendMessage", since=mark) == []
    assert fake.find("sendChatAction", since=mark) == []  # no "typing…" from a silent bot
    assert model.started == ["first question"]

    assert await app.service.staff_reply(conv.id, "Hi, Maria from support here.", "staff:U1")
    await fake.wait_for_text(61, "Maria from support")


async def test_staff_correction_is_delivered_as_a_follow_up(bot) -> None:
    fake, app, _ = bot
    await fake.push_message(62, "Can I pay by invoice?")
    call = await fake.wait_for_text(62, "Answer:")
    mid = int(buttons(call)[0].rsplit(":", 1)[1])
    result = await app.service.correct(mid, "Yes, invoices are available for business accounts.", "staff:U2")
    assert result.delivered
    follow_up = await fake.wait_for_text(62, "invoices are available")
    assert buttons(follow_up) == []


# --- reliability ----------------------------------------------------------------------------


async def test_restart_does_not_answer_the_same_update_twice(
    fake_telegram,  # noqa: F811
    app_data_dir,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, model = fake_telegram, ChatModel()
    first = fake.message_update(21, "what are your opening hours?")
    async with telegram_app(fake, app_data_dir, model):
        await fake.push_update(first)
        await fake.wait_for_text(21, "opening hours")
    # Telegram redelivers the update (as after a crash before the offset was confirmed)
    await fake.push_update(first)
    await fake.push_message(21, "and on Sundays?")
    async with telegram_app(fake, app_data_dir, model):
        await fake.wait_for_text(21, "Sundays")
    assert fake.texts(21) == ["Answer: what are your opening hours?", "Answer: and on Sundays?"]
    assert model.started == ["what are your opening hours?", "and on Sundays?"]
    assert [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
    ] == []  # skipped, not crashed


async def test_an_update_that_failed_too_often_gets_an_apology_and_staff_a_flag(
    fake_telegram,  # noqa: F811
    app_data_dir,  # noqa: F811
) -> None:
    """Handling cut short MAX_ATTEMPTS times (a poison update, or crashes landing on it) is not
    tried again, and not dropped either: the customer hears from us and the conversation is flagged."""
    fake, model = fake_telegram, ChatModel()
    poison = fake.message_update(23, "a message that crashed the bot every time")
    settings = app_settings(app_data_dir)
    store = Store(settings.database)
    uid = str(poison["update_id"])
    assert store.inbox_put("telegram", uid, poison)
    for _ in range(MAX_ATTEMPTS):  # each claim as by a process that died before finishing
        assert store.inbox_claim("telegram", uid, lease_s=0) is not None
    store.close()
    async with telegram_app(fake, app_data_dir, model) as (app, _):
        await fake.push_update(poison)
        await fake.wait_for_text(23, APOLOGY)
        await fake.push_message(23, "and now a normal question")
        await fake.wait_for_text(23, "normal question")
        assert fake.texts(23) == [APOLOGY, "Answer: and now a normal question"]
        assert model.started == ["and now a normal question"]  # the poison never reached the model
        [conv] = stored(app.store, Conversation, chat_id="23")
        assert conv.flagged
        [question] = stored(app.store, Message, conversation_id=conv.id, role="customer", external_id=str(
            poison["message"]["message_id"]
        ))
        assert question.text == "a message that crashed the bot every time" and question.status == "error"


async def test_flood_control_and_server_errors_are_retried(bot) -> None:
    fake, _, _ = bot
    fake.fail("sendMessage", times=1, status=429, retry_after=1)
    fake.fail("sendMessage", times=2, status=502)
    await fake.push_message(31, "where is my order?")
    await fake.wait_for_text(31, "Answer: where is my order?")
    failed = [c.status for c in fake.find("sendMessage", ok=False)]
    assert failed == [429, 502, 502]
    assert len(fake.sent(31)) == 1


async def test_flood_control_schedules_the_retry_after_telegram_s_wait(bot) -> None:
    fake, app, _ = bot
    fake.fail("sendMessage", times=1, status=429, retry_after=3600)
    await fake.push_message(34, "first in line")
    await fake.wait_for("sendMessage", lambda c: c.status == 429, ok=False)
    await fake.push_message(35, "next customer")
    await fake.wait_for_text(35, "next customer")  # other chats are not held up meanwhile
    [waiting] = [i for i in stored(app.store, OutboxItem) if i.key == "34"]
    assert waiting.status != "sent" and waiting.attempts == 1
    assert (waiting.next_attempt_at - waiting.created_at).total_seconds() > 3500
    assert fake.texts(34) == []


async def test_blocked_customer_is_marked_unreachable_and_others_are_served(bot) -> None:
    fake, app, _ = bot
    fake.fail("sendMessage", times=1, status=403)
    await fake.push_message(32, "do you ship abroad?", user_id=3200)
    await fake.wait_for("sendMessage", lambda c: c.status == 403, ok=False)
    await fake.push_message(33, "do you repair bikes?")
    await fake.wait_for_text(33, "Answer: do you repair bikes?")  # the outbox went past the dropped reply
    blocked = stored(app.store, Customer, external_id="3200")[0]
    assert blocked.unreachable
    dropped = [i for i in stored(app.store, OutboxItem) if i.key == "32"]
    assert [i.status for i in dropped] == ["sent"]  # left the outbox: never retried


async def test_reply_survives_an_outage_and_a_restart(fake_telegram, app_data_dir) -> None:  # noqa: F811
    fake, model = fake_telegram, ChatModel()
    fake.fail("sendMessage", times=10_000, status=500)
    async with telegram_app(fake, app_data_dir, model) as (app, _):
        await fake.push_message(41, "is my reply kept?")
        await fake.wait_for("sendMessage", ok=False, count=2)  # tried, failed, retried
        assert app.store.outbox_depth("telegram") == 1
    fake.clear_failures()
    async with telegram_app(fake, app_data_dir, model):
        await fake.wait_for_text(41, "is my reply kept?")
    assert len(fake.sent(41)) == 1 and model.started == ["is my reply kept?"]


async def test_twenty_customers_concurrently_and_one_chat_in_order(bot) -> None:
    fake, _app, model = bot
    model.hold("slow")
    await fake.push_message(1000, "a slow question")
    await model.wait_started("slow")
    await fake.push_message(1000, "a quick follow-up")  # same chat: must wait for the slow one
    for chat in range(1001, 1020):
        await fake.push_message(chat, f"question from {chat}")
    # the 19 other customers are answered while customer 1000's answer is still being generated
    for chat in range(1001, 1020):
        await fake.wait_for_text(chat, f"question from {chat}")
    assert fake.sent(1000) == []
    model.release("slow")
    await fake.wait_for_text(1000, "quick follow-up")
    assert fake.texts(1000) == ["Answer: a slow question", "Answer: a quick follow-up"]
    assert len({c.params["chat_id"] for c in fake.sent()}) == 20


async def test_a_burst_from_one_chat_is_answered_in_order(bot) -> None:
    fake, _, model = bot
    for i in range(8):  # pushed without yielding: they arrive in one getUpdates batch
        fake._pending.append(fake.message_update(2000, f"message {i}"))
    await fake.push_message(2000, "message 8")
    await fake.wait_for_text(2000, "message 8")
    assert fake.texts(2000) == [f"Answer: message {i}" for i in range(9)]
    assert model.started == [f"message {i}" for i in range(9)]


# --- webhook -------------------------------------------------------------------------------------


async def test_webhook_accepts_only_the_secret_token(fake_telegram, app_data_dir) -> None:  # noqa: F811
    fake, model = fake_telegram, ChatModel()
    url = "https://bot.example.test/telegram"
    async with telegram_app(fake, app_data_dir, model, telegram_webhook_url=url) as (app, _):
        hook = (await fake.wait_for("setWebhook"))[0]
        secret = hook.params["secret_token"]
        assert hook.params["url"] == url and len(secret) >= 32
        assert app.store.get_kv("telegram_webhook_secret") == secret  # generated once, persisted
        assert fake.find("getUpdates") == []
        endpoint = f"http://127.0.0.1:{app.http.port}/telegram"

        async def post(text: str, headers: dict[str, str]) -> int:
            update = fake.message_update(51, text)
            async with (
                aiohttp.ClientSession() as http,
                http.post(endpoint, json=update, headers=headers) as r,
            ):
                return r.status

        header = "X-Telegram-Bot-Api-Secret-Token"
        assert await post("no secret", {}) == 403
        assert await post("wrong secret", {header: secret[:-1] + "x"}) == 403
        assert await post("right secret", {header: secret}) == 200
        await fake.wait_for_text(51, "right secret")
        assert model.started == ["right secret"]
    # a restart keeps the persisted secret, so updates already in flight still get in
    async with telegram_app(fake, app_data_dir, model, telegram_webhook_url=url):
        hooks = await fake.wait_for("setWebhook", count=2)
        assert hooks[1].params["secret_token"] == secret


async def test_a_generated_webhook_secret_is_masked_in_the_logs(fake_telegram, app_data_dir) -> None:  # noqa: F811
    """The secret the bot makes itself is no setting, yet a log line carrying it shows [secret]."""
    fake, model = fake_telegram, ChatModel()
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.addFilter(SecretFilter([]))  # what `apprentice serve` installs on its log handlers
    logging.getLogger().addHandler(handler)
    try:
        url = "https://bot.example.test/telegram"
        async with telegram_app(fake, app_data_dir, model, telegram_webhook_url=url):
            secret = (await fake.wait_for("setWebhook"))[0].params["secret_token"]
            logging.getLogger("some.library").warning("request failed: headers %s", {"token": secret})
    finally:
        logging.getLogger().removeHandler(handler)
    assert "request failed" in written.getvalue()
    assert secret not in written.getvalue() and MASK in written.getvalue()


async def test_feedback_rows_are_unique_per_customer(bot) -> None:
    """A burst of presses on one button (double taps) stores one row."""
    fake, app, _ = bot
    await fake.push_message(43, "Do you ship abroad?")
    call = await fake.wait_for_text(43, "Answer:")
    up = buttons(call)[0]
    for _ in range(5):
        await fake.push_callback(43, up)
    await fake.wait_for("answerCallbackQuery", count=5)
    with app.store.session() as s:
        assert s.scalar(select(func.count(Feedback.id))) == 1


def test_only_the_channel_and_its_sender_import_telegram() -> None:
    root = Path(__file__).resolve().parents[3]
    offenders = [
        str(p.relative_to(root))
        for pkg in ("bot", "knowledge", "learning")
        for p in (root / pkg).rglob("*.py")
        if re.search(r"^\s*(from|import) telegram\b", p.read_text(encoding="utf-8"), re.MULTILINE)
    ]
    assert sorted(offenders) == ["bot/channels/telegram/channel.py", "bot/channels/telegram/sender.py"]


def test_button_data_round_trips_and_forged_data_is_refused() -> None:
    from bot.channels.telegram.text import csat_data, feedback_data, parse_csat, parse_feedback

    assert parse_feedback(feedback_data(True, 42)) == (True, 42)
    assert parse_feedback(feedback_data(False, 7)) == (False, 7)
    assert parse_csat(csat_data(True, 3)) == (True, 3) and parse_csat(csat_data(False, 9)) == (False, 9)
    for forged in ("fb:up:", "fb:sideways:1", "fb:up:1:2", "csat:maybe:1", "fb:up:" + "9" * 19, None, 5):
        assert parse_feedback(forged) is None and parse_csat(forged) is None
