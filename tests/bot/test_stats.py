"""Resolution figures: the satisfaction question (CSAT), `Store.stats`, the CLI, the Slack verb and
the weekly report's schedule. Clocks are pinned (`now` is passed in); nothing sleeps."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from apps import app_data_dir, app_settings, kb_template  # noqa: F401
from fakes.slack_api import FakeSlack
from fakes.telegram_api import FakeTelegramApi, fake_telegram  # noqa: F401
from test_slack import DOCS, REVIEW, STAFF_ADA, STAFF_BOB, close_rig, make_rig
from test_telegram import ChatModel, buttons, telegram_app

from bot import cli
from bot.conversation import ConversationService
from bot.envelope import Outbound
from bot.messages import CATALOG
from bot.notices import CSAT_QUESTION, CSAT_THANKS_NO, CSAT_THANKS_YES
from knowledge.models import AuditEntry, Conversation, utcnow
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import ConfigError, Settings
from knowledge.store import Store
from learning.nightly import crontab_weekdays, report_trigger

pytestmark = pytest.mark.timeout(120)

MIN = dt.timedelta(minutes=1)


class Sent:
    """A channel's deliverer that records what it was given."""

    def __init__(self) -> None:
        self.outs: list[Outbound] = []

    async def __call__(self, conv: Conversation, out: Outbound) -> None:
        self.outs.append(out)


def service_on(store: Store, settings: Settings) -> tuple[ConversationService, Sent]:
    service = ConversationService(settings, store, None, None)  # type: ignore[arg-type]  # no KB/model needed
    sent = Sent()
    service.deliverers["test"] = sent
    return service, sent


def conversation(store: Store, chat: str, channel: str = "test") -> int:
    return store.conversation_for(channel, chat, f"cust-{chat}").id


def exchange(
    store: Store, chat: str, asked: dt.datetime, reply_after_s: float, status: str = "ok"
) -> tuple[int, int, int]:
    """A customer question at `asked` and the bot's reply `reply_after_s` later: (conv, q, answer)."""
    cid = conversation(store, chat)
    q = store.add_message(cid, "customer", f"question {chat}", created_at=asked).id
    when = asked + dt.timedelta(seconds=reply_after_s)
    a = store.add_message(cid, "bot", f"answer {chat}", reply_to_id=q, status=status, created_at=when).id
    return cid, q, a


# --- the satisfaction question ------------------------------------------------------------------


async def test_a_quiet_conversation_is_asked_once_after_the_threshold(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, csat_after=30)
    store = Store(settings.database)
    other = Store(settings.database)  # a second replica on the same database
    try:
        service, sent = service_on(store, settings)
        replica, replica_sent = service_on(other, settings)
        t0 = utcnow().replace(microsecond=0)
        cid, _, answer = exchange(store, "quiet", t0 - dt.timedelta(seconds=5), 5)
        # still talking: the last message is the customer's, never asked whatever the time
        busy, _, _ = exchange(store, "busy", t0, 1)
        store.add_message(busy, "customer", "and another thing", created_at=t0 + MIN)
        # taken over by staff: the bot does not ask
        taken, _, _ = exchange(store, "taken", t0, 1)
        store.set_mode(taken, "human")

        assert await service.ask_satisfaction(now=t0 + 29 * MIN) == 0  # not before the threshold
        assert sent.outs == []
        # two replicas sweep at the same moment: one question
        asked = await asyncio.gather(
            service.ask_satisfaction(now=t0 + 31 * MIN), replica.ask_satisfaction(now=t0 + 31 * MIN)
        )
        assert sorted(asked) == [0, 1]
        outs = sent.outs + replica_sent.outs
        assert [(o.text, o.kind, o.conversation_id) for o in outs] == [(CSAT_QUESTION, "csat", cid)]
        # later sweeps (a restart, more replicas) never ask again
        assert await service.ask_satisfaction(now=t0 + 90 * MIN) == 0
        assert await replica.ask_satisfaction(now=t0 + 90 * MIN) == 0
        assert len(sent.outs + replica_sent.outs) == 1
        ask = store.csat(cid)
        assert ask is not None and ask.message_id == answer and ask.answer is None
        assert store.csat(busy) is None and store.csat(taken) is None

        # the answer is recorded once; No flags the conversation for staff
        assert await service.satisfaction(cid, False) == CSAT_THANKS_NO
        assert await replica.satisfaction(cid, True) is None  # answered already
        assert store.csat(cid).answer == "no"
        assert store.conversation(cid).flagged
        assert await service.satisfaction(busy, True) is None  # never asked
    finally:
        other.close()
        store.close()


async def test_the_question_is_in_the_customers_language_and_not_about_old_answers(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, csat_after=30)
    store = Store(settings.database)
    try:
        service, sent = service_on(store, settings)
        t0 = utcnow().replace(microsecond=0)
        spanish = conversation(store, "es")
        q = store.add_message(
            spanish, "customer", "¿Dónde está mi pedido? Lo compré la semana pasada y todavía no ha llegado.",
            created_at=t0,
        ).id
        store.add_message(spanish, "bot", "Su pedido sale hoy.", reply_to_id=q, status="ok", created_at=t0)
        english, _, _ = exchange(store, "en", t0, 1)
        # answered two days before the sweep (the bot was down since): not asked out of the blue
        old, _, _ = exchange(store, "old", t0 - dt.timedelta(days=2), 1)

        assert await service.ask_satisfaction(now=t0 + 31 * MIN) == 2
        asked = {o.conversation_id: (o.text, o.choices) for o in sent.outs}
        assert asked == {
            spanish: (CATALOG["csat_question"]["es"], (CATALOG["csat_yes"]["es"], CATALOG["csat_no"]["es"])),
            english: (CSAT_QUESTION, ("Yes", "No")),
        }
        assert store.csat(old) is None
        # the thanks: the channel's language when it reports one, else the conversation's
        assert await service.satisfaction(spanish, True) == CATALOG["csat_thanks_yes"]["es"]
        assert await service.satisfaction(english, False, language="de") == CATALOG["csat_thanks_no"]["de"]
    finally:
        store.close()


async def test_csat_after_zero_never_asks(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, csat_after=0)
    store = Store(settings.database)
    try:
        service, sent = service_on(store, settings)
        t0 = utcnow()
        exchange(store, "a", t0 - dt.timedelta(days=1), 1)
        assert await service.ask_satisfaction(now=t0) == 0 and sent.outs == []
    finally:
        store.close()


async def test_yes_and_no_buttons_on_telegram(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> None:
    fake = fake_telegram
    async with telegram_app(fake, app_data_dir, ChatModel(), csat_after=30) as (app, _):
        await fake.push_message(61, "Where is my parcel?")
        await fake.wait_for_text(61, "Answer:")
        await fake.push_message(62, "Do you ship abroad?")
        await fake.wait_for_text(62, "Answer:")
        assert await app.service.ask_satisfaction(now=utcnow() + 31 * MIN) == 2
        q61 = await fake.wait_for_text(61, CSAT_QUESTION)
        q62 = await fake.wait_for_text(62, CSAT_QUESTION)
        yes61, no61 = buttons(q61)
        _, no62 = buttons(q62)
        c61 = int(yes61.rsplit(":", 1)[1])
        c62 = int(no62.rsplit(":", 1)[1])
        assert (yes61, no61) == (f"csat:yes:{c61}", f"csat:no:{c61}")

        mark = fake.mark()
        await fake.push_callback(61, yes61)
        [thanks] = await fake.wait_for("answerCallbackQuery", since=mark)
        assert thanks.params["text"] == CSAT_THANKS_YES
        await fake.wait_for("editMessageReplyMarkup", since=mark)  # the used buttons go away

        mark = fake.mark()
        await fake.push_callback(61, no62)  # another chat's button (forged): ignored, still answered
        await fake.push_callback(61, no61)  # answered already: once is recorded
        await fake.push_callback(62, no62)
        answers = await fake.wait_for("answerCallbackQuery", since=mark, count=3)
        assert sorted(c.params.get("text", "") for c in answers) == sorted(["", "", CSAT_THANKS_NO])

        assert app.store.csat(c61).answer == "yes" and app.store.csat(c62).answer == "no"
        assert app.store.conversation(c62).flagged  # No flags it for staff
        assert not app.store.conversation(c61).flagged
        # a second sweep asks nobody again
        assert await app.service.ask_satisfaction(now=utcnow() + 120 * MIN) == 0


async def test_a_spanish_customer_is_asked_and_thanked_in_spanish_on_telegram(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> None:
    fake = fake_telegram
    es = {key: CATALOG[key]["es"] for key in ("csat_question", "csat_yes", "csat_no", "csat_thanks_yes")}
    async with telegram_app(fake, app_data_dir, ChatModel(), csat_after=30) as (app, _):
        await fake.push_message(63, "¿Dónde está mi paquete? Lo pedí hace una semana y no ha llegado.")
        await fake.wait_for_text(63, "Answer:")
        assert await app.service.ask_satisfaction(now=utcnow() + 31 * MIN) == 1
        question = await fake.wait_for_text(63, es["csat_question"])
        [row] = question.params["reply_markup"]["inline_keyboard"]
        assert [b["text"] for b in row] == [es["csat_yes"], es["csat_no"]]

        mark = fake.mark()
        await fake.push_callback(63, row[0]["callback_data"])
        [thanks] = await fake.wait_for("answerCallbackQuery", since=mark)
        assert thanks.params["text"] == es["csat_thanks_yes"]


# --- the figures -----------------------------------------------------------------------------------


def seed(store: Store, now: dt.datetime) -> None:
    """Seven conversations whose figures are worked out by hand in the test below."""
    day = dt.timedelta(days=1)
    # 1: answered, CSAT yes -> resolved; first answer after 30 s
    c1, _, a1 = exchange(store, "c1", now - 2 * day, 30)
    store.claim_csat(c1, a1, now - 2 * day + 40 * MIN)
    store.record_csat(c1, True)
    # 2: answered, nobody from staff, but CSAT no -> not resolved; 10 s
    c2, _, a2 = exchange(store, "c2", now - 2 * day, 10)
    store.claim_csat(c2, a2, now - 2 * day + 40 * MIN)
    store.record_csat(c2, False)
    # 3: answered, then /human (the hand-off notice) -> handed to staff; 20 s
    c3, _, _ = exchange(store, "c3", now - day, 20)
    h = store.add_message(c3, "customer", "/human", status="refused", created_at=now - day + MIN).id
    store.add_message(c3, "system", "handoff", reply_to_id=h, status="handoff", created_at=now - day + MIN)
    # 4: unsure, taken over, staff replied -> handed, not answered; first reply (the bot's) after 5 s
    c4, _, _ = exchange(store, "c4", now - day, 5, status="unsure")
    store.add_message(c4, "staff", "Let me check.", created_at=now - day + 2 * MIN)
    with store.session() as s:
        s.add(AuditEntry(actor="slack:U1", action="take_over", target=f"conversation:{c4}",
                         created_at=now - day + MIN))  # fmt: skip
    # 5: answered, corrected -> not resolved; 40 s
    c5, _, a5 = exchange(store, "c5", now - 3 * day, 40)
    # 6: answered, corrected, but the customer said yes -> resolved; 50 s
    c6, _, a6 = exchange(store, "c6", now - 3 * day, 50)
    store.claim_csat(c6, a6, now - 3 * day + 40 * MIN)
    store.record_csat(c6, True)
    for cid, mid in ((c5, a5), (c6, a6)):
        store.add_correction(message_id=mid, conversation_id=cid, question="q", original="o", corrected="c",
                             staff="slack:U1", created_at=now - 2 * day)  # fmt: skip
    # 7: before the window: not counted
    c7, _, a7 = exchange(store, "c7", now - 10 * day, 1)
    store.claim_csat(c7, a7, now - 10 * day + 40 * MIN)
    store.record_csat(c7, False)


def test_figures_on_a_seeded_database(tmp_path: Path) -> None:
    store = Store(Settings(data_dir=tmp_path).database)
    try:
        now = utcnow().replace(microsecond=0)
        seed(store, now)
        stats = store.stats(now - dt.timedelta(days=7), now)
        assert (stats.conversations, stats.answered, stats.answered_alone) == (6, 5, 2)
        assert (stats.handed_to_staff, stats.corrected, stats.resolved) == (2, 2, 2)
        assert stats.resolution_rate == pytest.approx(2 / 6)
        assert (stats.csat_asked, stats.csat_answered, stats.csat_yes) == (3, 3, 2)
        assert stats.csat == pytest.approx(2 / 3)
        assert stats.median_first_answer_s == pytest.approx(25.0)  # 5 10 20 | 30 40 50
        empty = store.stats(now - dt.timedelta(days=30), now - dt.timedelta(days=20))
        assert (empty.conversations, empty.resolution_rate, empty.csat) == (0, None, None)
        assert empty.median_first_answer_s is None
    finally:
        store.close()


def test_a_conversation_of_courtesies_is_not_one_to_resolve(tmp_path: Path) -> None:
    store = Store(Settings(data_dir=tmp_path).database)
    try:
        now = utcnow().replace(microsecond=0)
        t0 = now - dt.timedelta(hours=1)
        hello = conversation(store, "hi-only")  # "hi", the greeting back, and nothing else
        hi = store.add_message(hello, "customer", "hi", created_at=t0).id
        store.add_message(hello, "system", "Hello!", reply_to_id=hi, status="courtesy", created_at=t0)
        asks = conversation(store, "hi-then-ask")  # "hi", then a question a minute later, answered in 5 s
        hi = store.add_message(asks, "customer", "hi", created_at=t0).id
        store.add_message(asks, "system", "Hello!", reply_to_id=hi, status="courtesy", created_at=t0)
        q = store.add_message(asks, "customer", "Do you ship abroad?", created_at=t0 + MIN).id
        later = t0 + MIN + dt.timedelta(seconds=5)
        store.add_message(asks, "bot", "Yes, to Canada.", reply_to_id=q, status="ok", created_at=later)
        stats = store.stats(now - dt.timedelta(days=1), now)
        assert (stats.conversations, stats.answered, stats.resolved) == (1, 1, 1)
        assert stats.median_first_answer_s == pytest.approx(5.0)  # from the question, not from "hi"
    finally:
        store.close()


def test_cli_writes_stats_json_and_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    data = tmp_path / "data"
    store = Store(Settings(data_dir=data).database)
    seed(store, utcnow().replace(microsecond=0))
    store.close()
    monkeypatch.setenv("APPRENTICE_DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["stats", "--days", "7", "--out", str(out)]) == 0
    figures = json.loads((out / "stats.json").read_text())
    assert (figures["conversations"], figures["resolved"], figures["csat_yes"]) == (6, 2, 2)
    assert figures["resolution_rate"] == pytest.approx(2 / 6)
    assert (out / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Resolution rate: 33%" in printed and "CSAT: 67%" in printed


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("stats-kb")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    kb = KnowledgeBase.from_settings(Settings(data_dir=root))
    kb.ingest([docs])
    yield kb
    kb.close()


async def test_slack_stats_verb_answers_with_the_figures(tmp_path: Path, kb: KnowledgeBase) -> None:
    members = {REVIEW: [STAFF_ADA, STAFF_BOB]}
    async with FakeSlack(members=members, users={STAFF_ADA: "ada", STAFF_BOB: "bob"}) as slack:
        rig = await make_rig(tmp_path, kb, slack)
        try:
            seed(rig.store, utcnow().replace(microsecond=0))
            reply = await rig.command(STAFF_BOB, "stats 7d")
            assert "Conversations: 6" in reply and "Resolution rate: 33%" in reply
            assert "CSAT: 67% (2 yes of 3 answers" in reply and "Median time to first answer: 25 s" in reply
            [done] = await slack.wait_for("files.completeUploadExternal")  # the chart, in the channel
            [chart] = slack.uploaded(REVIEW)
            assert (chart.data or b"").startswith(b"\x89PNG") and "last 7 days" in json.dumps(done.params)
            assert "Conversations: 6" in await rig.command(STAFF_BOB, "stats")
            assert "Usage" in await rig.command(STAFF_BOB, "stats forever")
        finally:
            await close_rig(rig)


# --- the weekly report's schedule -----------------------------------------------------------------


@pytest.mark.parametrize("off", ["", "off", "  OFF "])
def test_report_cron_off(tmp_path: Path, off: str) -> None:
    assert report_trigger(app_settings(tmp_path, report_cron=off)) is None


def test_report_cron_parses_like_the_retrain_cron(tmp_path: Path) -> None:
    trigger = report_trigger(app_settings(tmp_path, timezone="Europe/Berlin"))  # default: 0 9 * * 1
    monday = trigger.get_next_fire_time(None, dt.datetime(2026, 1, 7, tzinfo=trigger.timezone))
    assert (monday.weekday(), monday.hour, monday.minute) == (0, 9, 0)
    assert str(monday.tzinfo) == "Europe/Berlin"
    assert crontab_weekdays("1") == "mon"
    weekly = report_trigger(app_settings(tmp_path, report_cron="@weekly"))
    sunday = weekly.get_next_fire_time(None, dt.datetime(2026, 1, 7, tzinfo=weekly.timezone))
    assert (sunday.weekday(), sunday.hour) == (6, 0)
    with pytest.raises(ConfigError, match="APPRENTICE_REPORT_CRON"):
        report_trigger(app_settings(tmp_path, report_cron="every monday"))


async def test_terminal_chat_prints_the_question_and_takes_yes_and_no(tmp_path: Path) -> None:
    import io

    from bot.channels.terminal import TerminalChannel

    settings = Settings(data_dir=tmp_path, csat_after=30)
    store = Store(settings.database)
    try:
        service, _ = service_on(store, settings)
        out = io.StringIO()
        terminal = TerminalChannel(service, stdin=io.BytesIO(b"/no\n/yes\n"), stdout=out, user="local")
        t0 = utcnow()
        cid = store.conversation_for("terminal", "local", "local").id
        store.add_message(cid, "bot", "an answer", created_at=t0)
        assert await service.ask_satisfaction(now=t0 + 31 * MIN) == 1
        assert await terminal.run() == 0
        lines = out.getvalue().splitlines()
        assert f"bot> {CSAT_QUESTION} (/yes or /no)" in lines
        assert f"bot> {CSAT_THANKS_NO}" in lines and "(no open question to answer)" in lines
        assert store.csat(cid).answer == "no" and store.conversation(cid).flagged
    finally:
        store.close()
