"""Slack identity: who may act in the review channel, and only once.

Each test replays the reported attack through the real Slack channel (bolt and slack_sdk against
the fake Slack Web API, signed HTTP requests or Socket Mode envelopes) and the real conversation
flow: a button press made in another workspace, for another app or by a Slack Connect user or a
guest who is in the review channel; a signed request sent again inside Slack's 5-minute window, to
the same replica or to another one sharing the database; a Socket Mode envelope delivered twice;
a correction form whose `private_metadata` was changed to point at another conversation.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.slack_api import (
    FakeSlack,
    Posted,
    block_actions,
    event_callback,
    interactive_form,
    sign,
    signed_post,
    slash_command,
    view_submission,
)
from scripted import ScriptedModel
from sqlalchemy import func, select

from bot.channels.slack import REPLAY_KEY, SlackChannel
from bot.conversation import ConversationService
from bot.envelope import Inbound, Outbound
from bot.http import HttpServer
from knowledge.models import AuditEntry, Conversation, Correction, Feedback, RateLimit, utcnow
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store

pytestmark = pytest.mark.timeout(120)

SECRET = "identity-signing-secret"
REVIEW = "CREVIEW"
ADA, BOB = "UADA", "UBOB"  # staff: full members of our workspace, in the review channel
CONNECT = "UCONNECT"  # a Slack Connect user from another organisation, in the shared review channel
STRANGER = "USTRANGER"  # an external user Slack marks as a stranger (no team in the payload)
GUEST = "UGUEST"  # a single-channel guest of our own workspace
REFUSAL = "Only support staff"
DOCS = {"warranty.md": "# Warranty\n\nEvery bike comes with a two-year warranty on the frame and parts."}


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("identity-kb")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    kb = KnowledgeBase.from_settings(Settings(data_dir=root))
    kb.ingest([docs])
    yield kb
    kb.close()


@dataclass
class Rig:
    slack: FakeSlack
    store: Store
    service: ConversationService
    channel: SlackChannel
    http: HttpServer
    received: list[Outbound]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}/slack/events"

    async def ask(self, text: str, chat: str = "chat-1") -> Outbound:
        [out] = await self.service.handle(Inbound("test", chat, f"cust-{chat}", text, name="Ada"))
        return out

    async def card(self, message_id: int | None) -> Posted:
        assert message_id is not None
        await self.slack.wait_for("chat.postMessage", where=lambda c: _is_card_of(c.params, message_id))
        return next(m for m in self.slack.messages.values() if _value(m.blocks).endswith(f":{message_id}"))

    async def send(self, payload: dict[str, Any]) -> tuple[int, str]:
        """Post an interactivity payload, signed as Slack signs it; wait for what it scheduled."""
        result = await signed_post(self.url, SECRET, form=interactive_form(payload))
        await self.channel.idle()
        return result

    def mode(self, conversation_id: int) -> str:
        conv = self.store.conversation(conversation_id)
        assert conv is not None
        return conv.mode

    def count(self, model: Any, *where: Any) -> int:
        with self.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _value(blocks: list[dict[str, Any]]) -> str:
    for block in blocks:
        for element in block.get("elements", []) if block.get("type") == "actions" else []:
            if str(element.get("action_id", "")).startswith("apprentice_"):
                return str(element["value"])
    return ""


def _is_card_of(params: dict[str, Any], message_id: int) -> bool:
    blocks = params.get("blocks") or []
    actions = [
        e.get("action_id") for b in blocks if b.get("type") == "actions" for e in b.get("elements", [])
    ]
    return "apprentice_correct" in actions and _value(blocks).endswith(f":{message_id}")


def press(user: str, card: Posted, action: str, **changes: Any) -> dict[str, Any]:
    """A block_actions payload for `user` pressing `action` on `card`, with top-level `changes`."""
    payload = block_actions(user, REVIEW, card.ts, f"apprentice_{action}", _value(card.blocks))
    payload.update(changes)
    return payload


def correct_values(text: str) -> dict[str, Any]:
    return {
        "corrected": {"text": {"type": "plain_text_input", "value": text}},
        "reason": {"reason": {"type": "static_select", "selected_option": {"value": "wrong_fact"}}},
        "options": {"options": {"type": "checkboxes", "selected_options": [{"value": "send"}]}},
    }


async def make_rig(tmp_path: Path, kb: KnowledgeBase, slack: FakeSlack, **overrides: Any) -> Rig:
    fields: dict[str, Any] = {
        "data_dir": tmp_path,
        "slack_bot_token": "xoxb-test",
        "slack_signing_secret": SECRET,
        "slack_channel": REVIEW,
        "slack_api_url": slack.api_url,
        "rate_limit_per_minute": 0,
        **overrides,
    }
    settings = Settings(**fields)
    store = Store(settings.database)
    service = ConversationService(settings, store, kb, ScriptedModel())
    received: list[Outbound] = []

    async def deliver(conv: Conversation, out: Outbound) -> None:
        received.append(out)

    service.deliverers["test"] = deliver
    http = HttpServer("127.0.0.1", 0)
    channel = SlackChannel(settings, service, store, http, poll_s=0.05, base_delay_s=0.05, lease_s=1)
    await channel.start()
    await http.start()
    return Rig(slack, store, service, channel, http, received)


async def close_rig(rig: Rig) -> None:
    await rig.channel.stop()
    for corr in rig.store.corrections(include_revoked=True):  # the module's KB outlives this database
        rig.service.kb.forget(corr.id)
    await rig.http.stop()
    rig.store.close()


def workspace() -> FakeSlack:
    """Our workspace (T0001, app A0001); the review channel is shared with another organisation."""
    return FakeSlack(
        members={REVIEW: [ADA, BOB, CONNECT, STRANGER, GUEST]},
        users={ADA: "ada", BOB: "bob"},
        user_fields={
            CONNECT: {"team_id": "T0999"},
            STRANGER: {"team_id": "T0888", "is_stranger": True},
            GUEST: {"is_restricted": True, "is_ultra_restricted": True},
        },
    )


@pytest.fixture
async def rig(tmp_path: Path, kb: KnowledgeBase) -> AsyncIterator[Rig]:
    async with workspace() as slack:
        rig = await make_rig(tmp_path, kb, slack)
        try:
            yield rig
        finally:
            await close_rig(rig)


def refusals(rig: Rig, user: str) -> list[str]:
    return [c.params["text"] for c in rig.slack.called("chat.postEphemeral") if c.params["user"] == user]


# --- (a) team, organisation, app and user identity ------------------------------------------------
async def test_a_button_press_from_another_workspace_or_app_is_refused(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    forged = [
        press(ADA, card, "take_over", team={"id": "T0999", "domain": "other"}),  # another workspace
        press(ADA, card, "take_over", enterprise={"id": "E0999", "name": "Other Org"}),  # an organisation
        press(ADA, card, "take_over", api_app_id="A0999"),  # another app
        {k: v for k, v in press(ADA, card, "take_over").items() if k != "team"},  # no team at all
        press(ADA, card, "approve", team={"id": "T0999", "domain": "other"}),
    ]
    for payload in forged:
        status, _ = await rig.send(payload)
        assert status == 200  # acked, then refused as today: an ephemeral refusal, nothing changes
    await rig.slack.wait_for("chat.postEphemeral", len(forged))
    assert len(refusals(rig, ADA)) == len(forged) and all(REFUSAL in t for t in refusals(rig, ADA))
    assert rig.mode(out.conversation_id) == "bot"
    assert rig.count(Feedback) == 0 and rig.count(AuditEntry) == 0
    # a correction form submitted from another workspace, and a slash command from one
    view = {"id": "V1", "type": "modal", "callback_id": "apprentice_correct", "private_metadata": "{}"}
    foreign = view_submission(ADA, view, correct_values("Free bikes for everyone."), team_id="T0999")
    _, body = await rig.send(foreign)
    assert REFUSAL in json.loads(body)["errors"]["corrected"]
    status, text = await signed_post(
        rig.url, SECRET, form=slash_command(ADA, REVIEW, "revoke 1", team_id="T0999")
    )
    assert status == 200 and REFUSAL in text
    assert rig.store.corrections() == [] and rig.received == []

    # the same person, pressing in our own workspace, is staff
    await rig.send(press(ADA, card, "take_over"))
    assert rig.mode(out.conversation_id) == "human"


async def test_slack_connect_users_and_guests_in_the_review_channel_are_refused(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    connect = press(CONNECT, card, "take_over")
    connect["user"]["team_id"] = "T0999"  # Slack Connect: the user keeps their own team's id
    attempts = [
        connect,
        press(CONNECT, card, "approve"),  # the payload says nothing: users.info says team T0999
        press(STRANGER, card, "take_over"),  # users.info: is_stranger
        press(GUEST, card, "take_over"),  # users.info: is_restricted (a guest of our own workspace)
        press(GUEST, card, "approve"),
    ]
    for payload in attempts:
        assert (await rig.send(payload))[0] == 200
    await rig.slack.wait_for("chat.postEphemeral", len(attempts))
    for user in (CONNECT, STRANGER, GUEST):
        assert refusals(rig, user) and all(REFUSAL in t for t in refusals(rig, user))
    assert rig.mode(out.conversation_id) == "bot" and rig.count(Feedback) == 0
    status, text = await signed_post(rig.url, SECRET, form=slash_command(GUEST, REVIEW, "status"))
    assert status == 200 and REFUSAL in text

    # staff take over; a Slack Connect user's reply in the thread never reaches the customer
    await rig.send(press(ADA, card, "take_over"))
    assert rig.mode(out.conversation_id) == "human"
    reply = {
        "type": "message",
        "channel": REVIEW,
        "user": CONNECT,
        "user_team": "T0999",
        "text": "Send me your card number",
        "ts": "1800000000.000500",
        "thread_ts": card.thread_ts,
    }
    status, _ = await signed_post(rig.url, SECRET, json_body=event_callback(reply, "EvConnect"))
    await rig.channel.idle()
    assert status == 200 and rig.received == []
    staff_reply = {**reply, "user": ADA, "user_team": "T0001", "text": "Hello", "ts": "1800000000.000600"}
    await signed_post(rig.url, SECRET, json_body=event_callback(staff_reply, "EvAda"))
    await rig.channel.idle()
    assert [o.text for o in rig.received] == ["Hello"]


# --- (b) replays ------------------------------------------------------------------------------------
def signed_request(payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """One signed interactivity request, kept so that it can be sent again byte for byte."""
    body = urllib.parse.urlencode(interactive_form(payload))
    headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(SECRET, body)}
    return body.encode(), headers


async def post(rig: Rig, body: bytes, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session, session.post(rig.url, data=body, headers=headers) as resp:
        await resp.read()
        status = resp.status
    await rig.channel.idle()
    return status


async def test_a_replayed_signed_request_is_handled_once(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    take = signed_request(press(ADA, card, "take_over"))
    assert await post(rig, *take) == 200
    assert rig.mode(out.conversation_id) == "human"
    assert await post(rig, *signed_request(press(ADA, card, "hand_back"))) == 200
    assert rig.mode(out.conversation_id) == "bot"

    with caplog.at_level(logging.WARNING, logger="bot.channels.slack"):
        # the same body, timestamp and signature, well inside the 5-minute window
        assert await post(rig, *take) == 200  # answered, so Slack would not retry; nothing done
    assert rig.mode(out.conversation_id) == "bot"  # not taken over a second time
    assert rig.count(AuditEntry, AuditEntry.action == "take_over") == 1
    assert any("replayed" in r.getMessage() for r in caplog.records)

    # the signature is remembered in the database until its timestamp leaves the window
    stamp = int(take[1]["X-Slack-Request-Timestamp"])
    with rig.store.session() as s:
        [row] = s.scalars(
            select(RateLimit).where(RateLimit.key == REPLAY_KEY + take[1]["X-Slack-Signature"])
        ).all()
    window_end = dt.datetime.fromtimestamp(stamp + 300, dt.UTC).replace(tzinfo=None)
    assert window_end <= row.expires_at <= window_end + dt.timedelta(seconds=120)
    assert rig.store.rate_expire(now=utcnow() + dt.timedelta(minutes=10)) >= 2  # old entries expire
    assert rig.count(RateLimit, RateLimit.key.startswith(REPLAY_KEY)) == 0


async def test_a_replay_sent_to_another_replica_is_refused_too(tmp_path: Path, kb: KnowledgeBase) -> None:
    async with workspace() as slack:
        first = await make_rig(tmp_path, kb, slack)
        second = await make_rig(tmp_path, kb, slack)  # one database: replicas behind a load balancer
        try:
            out = await first.ask("How long is the warranty on a bike?")
            card = await first.card(out.message_id)
            take = signed_request(press(ADA, card, "take_over"))
            assert await post(first, *take) == 200
            assert await post(first, *signed_request(press(ADA, card, "hand_back"))) == 200
            assert first.mode(out.conversation_id) == "bot"
            assert await post(second, *take) == 200  # replayed at the other replica
            assert second.mode(out.conversation_id) == "bot"
            assert second.count(AuditEntry, AuditEntry.action == "take_over") == 1
            # a fresh press (a new signature) still works on either replica
            assert await post(second, *signed_request(press(ADA, card, "take_over"))) == 200
            assert second.mode(out.conversation_id) == "human"
        finally:
            await close_rig(second)
            await close_rig(first)


async def test_a_socket_mode_envelope_delivered_twice_is_handled_once(
    tmp_path: Path, kb: KnowledgeBase
) -> None:
    async with workspace() as slack:
        rig = await make_rig(tmp_path, kb, slack, slack_signing_secret="", slack_app_token="xapp-test")
        try:
            await slack.wait_connected()
            out = await rig.ask("How long is the warranty on a bike?")
            card = await rig.card(out.message_id)
            envelope = await slack.push("interactive", press(ADA, card, "take_over"))
            await slack.wait_ack(envelope)
            await rig.channel.idle()
            assert rig.mode(out.conversation_id) == "human"
            await slack.wait_ack(await slack.push("interactive", press(ADA, card, "hand_back")))
            await rig.channel.idle()
            assert rig.mode(out.conversation_id) == "bot"
            del slack.acks[envelope]
            await slack.push("interactive", press(ADA, card, "take_over"), envelope_id=envelope)
            await slack.wait_ack(envelope)  # acked again, so Slack stops sending it, but not handled
            await rig.channel.idle()
            assert rig.mode(out.conversation_id) == "bot"
            assert rig.count(AuditEntry, AuditEntry.action == "take_over") == 1
        finally:
            await close_rig(rig)


# --- (c) forms are tied to the answer they were opened for -----------------------------------------
async def test_a_forged_form_metadata_is_refused(rig: Rig) -> None:
    mine = await rig.ask("How long is the warranty on a bike?", chat="chat-1")
    other = await rig.ask("Is the frame covered by the warranty?", chat="chat-2")
    assert mine.conversation_id != other.conversation_id
    card = await rig.card(mine.message_id)
    await rig.send(press(ADA, card, "correct"))
    [view] = rig.slack.views
    meta = json.loads(view["private_metadata"])
    assert (meta["c"], meta["m"]) == (mine.conversation_id, mine.message_id) and meta["s"]

    text = "Please email your card number to refunds@evil.example."
    forged = [
        {**meta, "c": other.conversation_id, "m": other.message_id},  # pointed at another conversation
        {k: meta[k] for k in ("c", "m", "ch")} | {"c": other.conversation_id, "m": other.message_id},
        {**meta, "s": "0" * 64},
    ]
    for fake in forged:
        status, body = await rig.send(
            view_submission(ADA, {**view, "private_metadata": json.dumps(fake)}, correct_values(text))
        )
        assert status == 200 and json.loads(body)["response_action"] == "errors"
    # a form opened by Ada, submitted by Bob (staff too): refused, it was not opened for him
    _, body = await rig.send(view_submission(BOB, view, correct_values(text)))
    assert json.loads(body)["response_action"] == "errors"
    flag = {**view, "callback_id": "apprentice_flag", "private_metadata": json.dumps(forged[0])}
    _, body = await rig.send(view_submission(ADA, flag, {}))
    assert json.loads(body)["response_action"] == "errors"
    assert rig.count(Correction) == 0 and rig.count(Feedback) == 0 and rig.received == []

    # the genuine form still works, for the answer it was opened for
    fixed = "Every bike has a two-year warranty on frame and parts."
    status, body = await rig.send(view_submission(ADA, view, correct_values(fixed)))
    assert status == 200 and not body
    [corr] = rig.store.corrections()
    assert (corr.message_id, corr.conversation_id) == (mine.message_id, mine.conversation_id)
    assert [o.text for o in rig.received] == [fixed]
