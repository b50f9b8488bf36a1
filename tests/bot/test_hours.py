"""Business hours: parsing, the notices outside them, and the on-call mention deferred to the opening.

The clock is pinned (`service.clock`, `now=`): nothing sleeps or depends on today's date.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from fakes.slack_api import FakeSlack
from scripted import ScriptedModel
from sqlalchemy import select, update
from test_slack import REVIEW, STAFF_ADA, close_rig, kb, make_rig  # noqa: F401

from bot import hours
from bot.conversation import ConversationService
from bot.envelope import Inbound
from bot.messages import CATALOG
from bot.notices import HUMAN, UNSURE
from knowledge.models import OutboxItem, utcnow
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import ConfigError, Settings
from knowledge.store import Store

pytestmark = pytest.mark.timeout(120)

BERLIN = "Mon-Fri 09:00-18:00; Sat 10:00-14:00 Europe/Berlin; holidays=2026-12-24,2026-12-25"
# 2026-06-05 is a Friday; Berlin is UTC+2 in summer, UTC+1 in winter
FRI_NOON = dt.datetime(2026, 6, 5, 10, 0, tzinfo=dt.UTC)  # 12:00 in Berlin
FRI_EVENING = dt.datetime(2026, 6, 5, 17, 30, tzinfo=dt.UTC)  # 19:30 in Berlin
SAT_EVENING = dt.datetime(2026, 6, 6, 15, 0, tzinfo=dt.UTC)  # 17:00 in Berlin, after Saturday's hours
MON_MONDAY_MORNING = dt.datetime(2026, 6, 8, 5, 0, tzinfo=dt.UTC)  # 07:00 in Berlin


def test_parse_ranges_lists_zone_and_holidays() -> None:
    h = hours.parse(BERLIN)
    assert h is not None and h.zone.key == "Europe/Berlin"
    assert h.windows[0] == ((dt.time(9), dt.time(18)),) and h.windows[5] == ((dt.time(10), dt.time(14)),)
    assert 6 not in h.windows and h.holidays == {dt.date(2026, 12, 24), dt.date(2026, 12, 25)}
    split = hours.parse("mon,wed 09:00-12:30,13:30-17:00", default_zone="America/New_York")
    assert split is not None and split.zone.key == "America/New_York" and set(split.windows) == {0, 2}
    assert split.windows[2] == ((dt.time(9), dt.time(12, 30)), (dt.time(13, 30), dt.time(17)))
    assert hours.parse("Sat-Mon 10:00-24:00 UTC").windows.keys() == {5, 6, 0}  # type: ignore[union-attr]
    assert hours.parse("") is None and hours.parse("   ") is None  # always open
    assert hours.from_settings(
        Settings(business_hours="Mon 08:00-09:00", timezone="Asia/Tokyo")
    ).zone.key == (  # type: ignore[union-attr]
        "Asia/Tokyo"
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("Mon-Fri", "has no opening time"),
        ("09:00-18:00", "comes without days"),
        ("Mon-Fri 18:00-09:00", "ends before it starts"),
        ("Mon 25:00-26:00", "not a time of day"),
        ("Mon-Fri 09:00-18:00 Mars/Olympus", "unknown time zone"),
        ("Mon-Fri 09:00-18:00 Europe/Berlin Europe/Paris", "two time zones"),
        ("Mon-Fri 09:00-18:00; holidays=2026-13-01", "not a date"),
        ("Weekdays 09:00-18:00", "is not a day"),
        ("holidays=2026-12-24", "no opening times"),
    ],
)
def test_bad_hours_name_the_setting(value: str, why: str) -> None:
    with pytest.raises(ConfigError, match="APPRENTICE_BUSINESS_HOURS") as err:
        hours.parse(value)
    assert why in str(err.value)


def test_bad_hours_stop_the_service(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, business_hours="Mon-Fri 9-18")
    with pytest.raises(ConfigError, match="APPRENTICE_BUSINESS_HOURS"):
        ConversationService(settings, Store(settings.database), None, ScriptedModel())  # type: ignore[arg-type]


def test_open_and_next_opening_with_a_pinned_clock() -> None:
    h = hours.parse(BERLIN)
    assert h is not None
    assert h.is_open(FRI_NOON) and h.closed_until(FRI_NOON) is None
    assert not h.is_open(FRI_EVENING)
    sat = h.next_opening(FRI_EVENING)
    assert sat == dt.datetime(2026, 6, 6, 10, 0, tzinfo=h.zone)
    assert h.next_opening(SAT_EVENING) == dt.datetime(2026, 6, 8, 9, 0, tzinfo=h.zone)  # Monday
    assert h.next_opening(MON_MONDAY_MORNING) == dt.datetime(2026, 6, 8, 9, 0, tzinfo=h.zone)  # today
    # a naive time is the store's UTC
    assert h.is_open(FRI_NOON.replace(tzinfo=None))


def test_holidays_are_closed_all_day() -> None:
    h = hours.parse(BERLIN)
    assert h is not None
    christmas_eve = dt.datetime(2026, 12, 24, 10, 0, tzinfo=dt.UTC)  # a Thursday, 11:00 in Berlin
    assert not h.is_open(christmas_eve)
    assert h.next_opening(christmas_eve) == dt.datetime(2026, 12, 26, 10, 0, tzinfo=h.zone)  # Saturday


@pytest.fixture
def closed_flow(tmp_path: Path, demo_kb: KnowledgeBase):  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path, business_hours=BERLIN, rate_limit_per_minute=0, relevance_threshold=1.5
    )
    store = Store(settings.database)
    service = ConversationService(settings, store, demo_kb, ScriptedModel())
    yield service
    store.close()


async def test_notices_inside_hours_promise_a_reply_shortly(closed_flow: ConversationService) -> None:
    closed_flow.clock = lambda: FRI_NOON
    [out] = await closed_flow.ask_human(Inbound("test", "c1", "u1", "/human", external_id="1"))
    assert out.text == HUMAN
    [out] = await closed_flow.handle(
        Inbound("test", "c2", "u2", "What is the meaning of life?", external_id="2")
    )
    assert out.text == UNSURE  # relevance_threshold 1.5: nothing is relevant enough


async def test_notices_outside_hours_say_when_a_colleague_replies(closed_flow: ConversationService) -> None:
    closed_flow.clock = lambda: SAT_EVENING
    [out] = await closed_flow.ask_human(Inbound("test", "c1", "u1", "/human", external_id="1"))
    assert out.text == (
        "Thanks, I've asked a colleague to join. Our team is away right now. "
        "A colleague will reply on Monday at 09:00."
    )
    [out] = await closed_flow.handle(
        Inbound("test", "c2", "u2", "What is the meaning of life?", external_id="2", language="de")
    )
    assert out.text == CATALOG["unsure_later"]["de"].format(when="am Montag um 09:00")
    closed_flow.clock = lambda: FRI_EVENING  # Saturday opens at 10:00
    [out] = await closed_flow.ask_human(Inbound("test", "c3", "u3", "/human", external_id="3", language="ru"))
    assert out.text == CATALOG["human_later"]["ru"].format(when="завтра в 10:00")
    closed_flow.clock = lambda: MON_MONDAY_MORNING
    [out] = await closed_flow.ask_human(Inbound("test", "c4", "u4", "/human", external_id="4"))
    assert out.text.endswith("A colleague will reply today at 09:00.")
    closed_flow.clock = lambda: dt.datetime(2026, 12, 24, 10, 0, tzinfo=dt.UTC)  # holiday, then Saturday
    [out] = await closed_flow.ask_human(Inbound("test", "c5", "u5", "/human", external_id="5"))
    assert out.text.endswith("A colleague will reply on Saturday at 10:00.")


def test_scheduled_outbox_items_wait_for_their_time(tmp_path: Path) -> None:
    store = Store(Settings(data_dir=tmp_path).database)
    try:
        later = store.enqueue(
            "slack", "note", {"text": "later"}, "oncall:1", not_before=utcnow() + dt.timedelta(hours=1)
        )
        now = store.enqueue("slack", "note", {"text": "now"}, "conv:1")
        assert [i.id for i in store.pending_outbox("slack")] == [now]  # not read, not counted as late
        assert not store.claim_outbox(later, 60) and store.outbox_depth("slack") == 1
        with store.session() as s:
            s.execute(update(OutboxItem).where(OutboxItem.id == later).values(next_attempt_at=utcnow()))
        assert later in [i.id for i in store.pending_outbox("slack")] and store.claim_outbox(later, 60)
    finally:
        store.close()


async def test_oncall_mention_waits_for_the_opening(tmp_path: Path, kb: KnowledgeBase) -> None:  # noqa: F811
    async with FakeSlack(members={REVIEW: [STAFF_ADA]}, users={STAFF_ADA: "ada"}) as slack:
        rig = await make_rig(tmp_path, kb, slack, oncall_group="SONCALL", business_hours=BERLIN)
        try:
            # a Saturday evening a week or more ahead (the outbox's own clock is the real one)
            today = dt.datetime.now(dt.UTC).replace(hour=15, minute=0, second=0, microsecond=0)
            saturday = today + dt.timedelta(days=7 + (5 - today.weekday()) % 7)
            monday_nine = dt.datetime.combine(
                (saturday + dt.timedelta(days=2)).date(), dt.time(9), tzinfo=ZoneInfo("Europe/Berlin")
            )
            rig.service.clock = lambda: saturday
            await rig.service.ask_human(Inbound("test", "chat-1", "cust-1", "/human", external_id="h1"))
            [note] = await slack.wait_for(
                "chat.postMessage", where=lambda c: "outside business hours" in str(c.params.get("text"))
            )
            assert re.search(r"on-call will be pinged at Mon 09:00 CES?T\)", note.params["text"])
            assert "SONCALL" not in str(note.params)
            with rig.store.session() as s:
                [item] = s.scalars(select(OutboxItem).where(OutboxItem.key == "oncall:1")).all()
            assert item.status == "scheduled" and item.next_attempt_at == monday_nine.astimezone(
                dt.UTC
            ).replace(tzinfo=None)
            # a second request overnight does not schedule a second ping
            await rig.service.ask_human(Inbound("test", "chat-1", "cust-1", "/human", external_id="h2"))
            # Monday 09:00 comes (the item's time is moved to now instead of waiting for it)
            with rig.store.session() as s:
                s.execute(update(OutboxItem).where(OutboxItem.id == item.id).values(next_attempt_at=utcnow()))
            rig.channel.outbox._wake.set()
            [ping] = await slack.wait_for(
                "chat.postMessage", where=lambda c: "<!subteam^SONCALL>" in str(c.params.get("text"))
            )
            assert "Business hours have started" in ping.params["text"] and ping.params["reply_broadcast"]
            with rig.store.session() as s:
                keys = s.scalars(select(OutboxItem.key).where(OutboxItem.key.like("oncall:%"))).all()
            assert keys == ["oncall:1"]
        finally:
            await close_rig(rig)
