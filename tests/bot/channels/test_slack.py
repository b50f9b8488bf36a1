"""The Slack review channel, read like a shift in the review channel.

Real bolt and slack_sdk against the fake Slack Web API (tests/support/fakes/slack_api.py), with signed
HTTP requests and a Socket Mode connection. The customer side is the real conversation flow
with a scripted generator; what reaches the customer is recorded by a deliverer registered for
the "test" channel.
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakes.slack_api import (
    FakeSlack,
    Posted,
    block_actions,
    event_callback,
    interactive_form,
    signed_post,
    slash_command,
    view_submission,
)
from scripted import ScriptedModel
from sqlalchemy import func, select

from bot.channels.slack import SlackChannel, queue_report, slack_to_plain
from bot.conversation import ConversationService
from bot.envelope import Inbound, Outbound
from bot.http import HttpServer
from knowledge.models import AuditEntry, Conversation, Feedback, RegistryState
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.nightly import NightlyReport

SECRET = "test-signing-secret"
REVIEW = "CREVIEW"
STAFF_ADA, STAFF_BOB, OUTSIDER = "UADA", "UBOB", "UEVE"
DOCS = {
    "warranty.md": "# Warranty\n\nEvery bike comes with a two-year warranty on the frame and parts.",
    "returns.md": "# Returns\n\nYou can return an unused bike within 30 days of delivery for a full refund.",
}


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A two-document knowledge base of our own (corrections written here must not leak elsewhere)."""
    root = tmp_path_factory.mktemp("slack-kb")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    kb = KnowledgeBase.from_settings(Settings(data_dir=root))
    kb.ingest([docs])
    yield kb
    kb.close()


class Customer:
    """The customer's side of the "test" channel: records what the service delivers."""

    def __init__(self) -> None:
        self.received: list[Outbound] = []
        self._changed = asyncio.Condition()

    async def __call__(self, conv: Conversation, out: Outbound) -> None:
        async with self._changed:
            self.received.append(out)
            self._changed.notify_all()

    async def wait(self, count: int = 1, timeout: float = 15) -> list[Outbound]:
        async def until() -> list[Outbound]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.received) >= count)
                return self.received

        return await asyncio.wait_for(until(), timeout)


@dataclass
class Rig:
    slack: FakeSlack
    settings: Settings
    store: Store
    service: ConversationService
    model: ScriptedModel
    customer: Customer
    channel: SlackChannel
    http: HttpServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}/slack/events"

    async def ask(self, text: str, chat: str = "chat-1", ext: str = "") -> Outbound:
        [out] = await self.service.handle(
            Inbound("test", chat, f"cust-{chat}", text, external_id=ext, name="Ada")
        )
        return out

    async def card(self, message_id: int) -> Posted:
        """The review card of an answer, once it has been posted."""
        await self.slack.wait_for("chat.postMessage", where=lambda c: _is_card_of(c.params, message_id))
        return next(
            m for m in self.slack.messages.values() if _card_value(m.blocks).endswith(f":{message_id}")
        )

    async def press(self, user: str, card: Posted, action: str) -> int:
        payload = block_actions(user, REVIEW, card.ts, f"apprentice_{action}", _card_value(card.blocks))
        status, _ = await signed_post(self.url, SECRET, form=interactive_form(payload))
        await self.channel.idle()
        return status

    async def submit(self, user: str, view: dict[str, Any], values: dict[str, Any]) -> tuple[int, str]:
        result = await signed_post(
            self.url, SECRET, form=interactive_form(view_submission(user, view, values))
        )
        await self.channel.idle()
        return result

    async def event(self, event: dict[str, Any], event_id: str, retry: int = 0) -> int:
        headers = {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"} if retry else {}
        status, _ = await signed_post(
            self.url, SECRET, json_body=event_callback(event, event_id), headers=headers
        )
        await self.channel.idle()
        return status

    async def command(self, user: str, text: str) -> str:
        status, body = await signed_post(self.url, SECRET, form=slash_command(user, REVIEW, text))
        assert status == 200
        return body

    def count(self, model: Any, *where: Any) -> int:
        with self.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _card_value(blocks: list[dict[str, Any]]) -> str:
    for block in blocks:
        if block.get("type") == "actions":
            for element in block.get("elements", []):
                if str(element.get("action_id", "")).startswith("apprentice_"):
                    return str(element["value"])
    return ""


def _is_card_of(params: dict[str, Any], message_id: int) -> bool:
    blocks = params.get("blocks") or []
    buttons = [e for b in blocks if b.get("type") == "actions" for e in b.get("elements", [])]
    return any(e.get("action_id") == "apprentice_correct" for e in buttons) and _card_value(blocks).endswith(
        f":{message_id}"
    )


def correct_values(
    text: str, reason: str = "wrong_fact", options: tuple[str, ...] = ("send", "remember")
) -> dict:
    return {
        "corrected": {"text": {"type": "plain_text_input", "value": text}},
        "reason": {"reason": {"type": "static_select", "selected_option": {"value": reason}}},
        "options": {"options": {"type": "checkboxes", "selected_options": [{"value": o} for o in options]}},
    }


async def make_rig(tmp_path: Path, kb: KnowledgeBase, slack: FakeSlack, **overrides: Any) -> Rig:
    fields: dict[str, Any] = {
        "data_dir": tmp_path,
        "slack_bot_token": "xoxb-test",
        "slack_signing_secret": SECRET,
        "slack_channel": REVIEW,
        "slack_api_url": slack.api_url,
        "rate_limit_per_minute": 0,
        "overlap_threshold": 0.0,  # mechanics: a question the documents hold reaches the scripted model
        **overrides,
    }
    settings = Settings(**fields)
    store = Store(settings.database)
    model = ScriptedModel()
    service = ConversationService(settings, store, kb, model)
    customer = Customer()
    service.deliverers["test"] = customer
    http = HttpServer("127.0.0.1", 0)
    channel = SlackChannel(settings, service, store, http, poll_s=0.05, base_delay_s=0.05, lease_s=1)
    await channel.start()
    await http.start()
    return Rig(slack, settings, store, service, model, customer, channel, http)


async def close_rig(rig: Rig) -> None:
    await rig.channel.stop()
    for corr in rig.store.corrections(include_revoked=True):  # the module's KB outlives this database
        rig.service.kb.forget(corr.id)
    await rig.http.stop()
    rig.store.close()


@pytest.fixture
async def rig(tmp_path: Path, kb: KnowledgeBase) -> AsyncIterator[Rig]:
    members = {REVIEW: [STAFF_ADA, STAFF_BOB]}
    users = {STAFF_ADA: "ada", STAFF_BOB: "bob", OUTSIDER: "eve"}
    async with FakeSlack(members=members, users=users) as slack:
        rig = await make_rig(tmp_path, kb, slack, oncall_group="SONCALL")
        try:
            yield rig
        finally:
            await close_rig(rig)


# --- cards ----------------------------------------------------------------------------------
async def test_answer_gets_a_threaded_card_with_sources_version_and_latency(rig: Rig) -> None:
    rig.model.enqueue("The warranty lasts two years.")
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    [parent] = rig.slack.channel_messages(REVIEW)
    assert card.thread_ts == parent.ts
    assert "Ada" in parent.all_text() and "test" in parent.all_text()
    text = card.all_text()
    assert "How long is the warranty on a bike?" in text and "The warranty lasts two years." in text
    assert "Warranty (0." in text  # source title with its score
    assert "adapter *base*" in text and " ms" in text
    conv = rig.store.conversation(out.conversation_id)
    assert conv.review_thread == f"{REVIEW}:{parent.ts}"
    labels = [e["text"]["text"] for b in card.blocks if b["type"] == "actions" for e in b["elements"]]
    assert labels == ["Approve", "Flag", "Correct", "Take over"]

    # a second answer in the same conversation goes into the same thread
    out2 = await rig.ask("And can I return it?")
    card2 = await rig.card(out2.message_id)
    assert card2.thread_ts == parent.ts and len(rig.slack.channel_messages(REVIEW)) == 1


async def test_correct_opens_prefilled_modal_stores_sends_remembers_and_updates_card(rig: Rig) -> None:
    rig.model.enqueue("The warranty lasts one year.")
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)

    assert await rig.press(STAFF_ADA, card, "correct") == 200
    [view] = rig.slack.views
    field = view["blocks"][0]["element"]
    assert field["initial_value"] == "The warranty lasts one year."
    options = view["blocks"][2]["element"]
    assert options["initial_options"] == options["options"]  # both ticked by default
    reasons = [o["text"]["text"] for o in view["blocks"][1]["element"]["options"]]
    assert reasons == ["Wrong fact", "Missing information", "Tone", "Policy", "Other"]

    fixed = "Every bike has a two-year warranty on frame and parts."
    status, _ = await rig.submit(STAFF_ADA, view, correct_values(fixed))
    assert status == 200

    [received] = await rig.customer.wait(1)
    assert received.text == fixed and received.kind == "correction"
    [corr] = rig.store.corrections()
    assert (corr.staff, corr.original, corr.corrected, corr.reason) == (
        "slack:UADA",
        "The warranty lasts one year.",
        fixed,
        "wrong_fact",
    )
    assert rig.count(AuditEntry, AuditEntry.action == "correct", AuditEntry.actor == "slack:UADA") == 1
    [update] = await rig.slack.wait_for("chat.update")
    assert update.params["ts"] == card.ts
    assert "Corrected by @ada" in card.all_text() and fixed in card.all_text()

    # remembered: the next similar question gets the staff answer, and its card says where it came from
    out2 = await rig.ask("How long is the warranty on my bike?")
    assert out2.text == fixed
    card2 = await rig.card(out2.message_id)
    assert f"correction memory #{corr.id}" in card2.all_text()


async def test_correction_options_unticked_neither_sends_nor_remembers(rig: Rig) -> None:
    rig.model.enqueue("Returns within 14 days.")
    out = await rig.ask("Can I return a bike?")
    card = await rig.card(out.message_id)
    await rig.press(STAFF_BOB, card, "correct")
    await rig.submit(STAFF_BOB, rig.slack.views[0], correct_values("Within 30 days.", "tone", options=()))
    [corr] = rig.store.corrections()
    assert not corr.remember and rig.customer.received == []
    assert rig.service.kb.recall("Can I return a bike?") == []


async def test_double_submit_stores_one_correction_and_sends_once(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    await rig.press(STAFF_ADA, card, "correct")
    await rig.press(STAFF_ADA, card, "correct")  # a double click opens two modals
    first, second = rig.slack.views
    values = correct_values("Two years on frame and parts.")
    results = await asyncio.gather(rig.submit(STAFF_ADA, first, values), rig.submit(STAFF_ADA, first, values))
    await rig.submit(STAFF_ADA, second, values)
    assert [r[0] for r in results] == [200, 200]
    assert len(rig.store.corrections()) == 1
    assert len(rig.customer.received) == 1
    assert rig.count(AuditEntry, AuditEntry.action == "correct") == 1


async def test_empty_correction_is_refused_inside_the_modal(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    await rig.press(STAFF_ADA, card, "correct")
    status, body = await rig.submit(STAFF_ADA, rig.slack.views[0], correct_values("   "))
    assert status == 200 and json.loads(body)["response_action"] == "errors"
    assert rig.store.corrections() == []


async def test_a_correction_holding_a_secret_keeps_the_modal_open_and_stores_nothing(rig: Rig) -> None:
    out = await rig.ask("How do I pay by card?")
    card = await rig.card(out.message_id)
    await rig.press(STAFF_ADA, card, "correct")
    key = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
    status, body = await rig.submit(STAFF_ADA, rig.slack.views[0], correct_values(f"Use the key {key}."))
    errors = json.loads(body)
    assert status == 200 and errors["response_action"] == "errors"
    assert "secret" in errors["errors"]["corrected"] and key not in errors["errors"]["corrected"]
    assert rig.store.corrections() == [] and rig.customer.received == []


async def test_approve_and_flag_with_reason_update_the_card_once(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    await rig.press(STAFF_BOB, card, "approve")
    await rig.press(STAFF_BOB, card, "approve")  # double click
    await rig.slack.wait_for("chat.update")
    assert "Approved by @bob" in card.all_text()
    assert rig.store.message(out.message_id).approved
    assert rig.count(Feedback, Feedback.kind == "approve") == 1

    await rig.press(STAFF_ADA, card, "flag")
    [view] = rig.slack.views
    assert view["callback_id"] == "apprentice_flag"
    await rig.submit(
        STAFF_ADA, view, {"reason": {"reason": {"type": "plain_text_input", "value": "too vague"}}}
    )
    await rig.slack.wait_for("chat.update", 2)
    assert "Flagged by @ada: too vague" in card.all_text()
    assert rig.count(Feedback, Feedback.kind == "flag", Feedback.reason == "too vague") == 1
    assert rig.store.message(out.message_id).flagged
    assert rig.count(AuditEntry, AuditEntry.action.in_(["approve", "flag"])) == 2


async def test_take_over_relays_customer_delivers_staff_replies_and_hands_back(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    parent = card.thread_ts
    await rig.press(STAFF_ADA, card, "take_over")
    await rig.slack.wait_for("chat.postMessage", where=lambda c: "took over" in c.params["text"])
    assert rig.store.conversation(out.conversation_id).mode == "human"
    await rig.slack.wait_for("chat.update")
    assert "Hand back" in card.all_text()

    # the customer writes: the bot stays silent and staff see the message in the thread
    assert await rig.service.handle(Inbound("test", "chat-1", "cust-chat-1", "Is anyone there?")) == []
    await rig.slack.wait_for("chat.postMessage", where=lambda c: "Is anyone there?" in c.params["text"])
    assert len(rig.model.prompts) == 1

    # a staff reply in the thread goes to the customer, once, even when Slack retries the event
    reply = {
        "type": "message",
        "channel": REVIEW,
        "user": STAFF_ADA,
        "text": "Hi! Yes &amp; welcome <@UBOB>",
        "ts": "1800000000.000200",
        "thread_ts": parent,
    }
    assert await rig.event(reply, "Ev1") == 200
    assert await rig.event(reply, "Ev1", retry=1) == 200
    [received] = await rig.customer.wait(1)
    assert received.text == "Hi! Yes & welcome" and received.kind == "staff"
    staff_msgs = [m for m in rig.store.history(out.conversation_id, 20) if m.role == "staff"]
    assert [m.text for m in staff_msgs] == ["Hi! Yes & welcome"]
    assert rig.count(AuditEntry, AuditEntry.action == "staff_reply") == 1

    # hand back from the note's button: the bot answers again
    note_msg = next(m for m in rig.slack.thread(parent) if "took over" in m.text)
    await rig.press(STAFF_ADA, note_msg, "hand_back")
    assert rig.store.conversation(out.conversation_id).mode == "bot"
    await rig.slack.wait_for("chat.postMessage", where=lambda c: "handed back" in c.params["text"])
    assert rig.count(AuditEntry, AuditEntry.action.in_(["take_over", "hand_back"])) == 2
    rig.model.enqueue("Back to you.")
    assert (await rig.ask("Thanks, one more question about returns")).text == "Back to you."


async def test_staff_chat_in_a_thread_is_not_sent_unless_taken_over(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    chat = {
        "type": "message",
        "channel": REVIEW,
        "user": STAFF_BOB,
        "text": "looks fine to me",
        "ts": "1800000000.000300",
        "thread_ts": card.thread_ts,
    }
    await rig.event(chat, "Ev2")
    assert rig.customer.received == []


async def test_non_staff_are_refused_and_nothing_is_stored(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    for action in ("approve", "correct", "take_over"):
        await rig.press(OUTSIDER, card, action)
    refusals = await rig.slack.wait_for("chat.postEphemeral", 3)
    assert all(c.params["user"] == OUTSIDER and "Only support staff" in c.params["text"] for c in refusals)
    assert rig.slack.views == []
    # even a forged submission of a correction modal is refused
    view = {
        "id": "V9",
        "type": "modal",
        "callback_id": "apprentice_correct",
        "private_metadata": json.dumps({"c": out.conversation_id, "m": out.message_id, "ch": REVIEW}),
    }
    _, body = await rig.submit(OUTSIDER, view, correct_values("Free bikes for everyone."))
    assert json.loads(body)["response_action"] == "errors"
    # and so is a slash command
    assert "Only support staff" in await rig.command(OUTSIDER, "revoke 1")
    assert rig.store.corrections() == [] and rig.count(Feedback) == 0 and rig.count(AuditEntry) == 0
    assert rig.store.conversation(out.conversation_id).mode == "bot"
    assert rig.customer.received == []


async def test_bad_or_stale_signature_is_refused(rig: Rig) -> None:
    out = await rig.ask("How long is the warranty on a bike?")
    card = await rig.card(out.message_id)
    payload = block_actions(STAFF_ADA, REVIEW, card.ts, "apprentice_approve", _card_value(card.blocks))
    status, _ = await signed_post(rig.url, "wrong-secret", form=interactive_form(payload))
    assert status == 401
    status, _ = await signed_post(rig.url, SECRET, form=interactive_form(payload), timestamp=1_000_000)
    assert status == 401
    await rig.channel.idle()
    assert rig.count(Feedback) == 0


async def test_slash_command_status_corrections_and_revoke(rig: Rig) -> None:
    rig.model.enqueue("One year.")
    out = await rig.ask("How long is the warranty on a bike?")
    result = await rig.service.correct(out.message_id, "Two years.", "slack:UADA", reason="wrong_fact")
    corr_id = result.correction.id

    status = await rig.command(STAFF_BOB, "status")
    assert "1 conversation, 1 answer, 1 correction" in status and "Active adapter:* base" in status
    with rig.store.session() as s:
        s.add(RegistryState(id=1, active_version="v7"))
    assert "Active adapter:* v7" in await rig.command(STAFF_BOB, "status")

    listing = await rig.command(STAFF_BOB, "corrections")
    assert f"#{corr_id}" in listing and "Two years." in listing and "@ada" in listing

    assert "revoked" in await rig.command(STAFF_BOB, f"revoke {corr_id}")
    assert rig.store.correction(corr_id).status == "revoked"
    assert rig.service.kb.recall("How long is the warranty on a bike?") == []
    assert rig.count(AuditEntry, AuditEntry.action == "revoke", AuditEntry.actor == "slack:UBOB") == 1
    assert "no correction #999" in await rig.command(STAFF_BOB, "revoke 999")
    assert "Usage" in await rig.command(STAFF_BOB, "dance")


async def test_slack_outage_then_recovery_delivers_every_card_in_order(
    tmp_path: Path, kb: KnowledgeBase
) -> None:
    async with FakeSlack(members={REVIEW: [STAFF_ADA]}, users={STAFF_ADA: "ada"}) as slack:
        slack.fail("chat.postMessage", times=10**6, status=500)  # Slack is down
        rig = await make_rig(tmp_path, kb, slack)
        questions = ["How long is the warranty?", "Can I return a bike?", "Is the frame covered?"]
        outs = []
        try:
            for q in questions:
                rig.model.enqueue(f"answer to {q}")
                outs.append(await rig.ask(q))  # the customer is answered while Slack is down
            assert [o.text for o in outs] == [f"answer to {q}" for q in questions]
            await slack.wait_for("chat.postMessage", failed=True)  # the drainer tried and failed
        finally:
            await close_rig(rig)  # a restart in the middle of the outage loses nothing
        assert slack.called("chat.postMessage") == []
        store = Store(rig.settings.database)
        assert store.outbox_depth("slack") == 3
        store.close()

        slack.heal("chat.postMessage")  # Slack comes back, first rate-limited, then with one hiccup
        slack.fail("chat.postMessage", times=1, status=429, retry_after=1)
        slack.fail("chat.postMessage", times=1, status=200, error="internal_error")
        rig = await make_rig(tmp_path, kb, slack)
        try:
            await slack.wait_for("chat.postMessage", 4)  # the thread parent, then three cards
            [parent] = slack.channel_messages(REVIEW)
            cards = slack.thread(parent.ts)
            assert [_card_value(c.blocks) for c in cards] == [
                f"{o.conversation_id}:{o.message_id}" for o in outs
            ]
            assert all(q in c.all_text() for q, c in zip(questions, cards, strict=True))
            assert (
                len(slack.called("chat.postMessage", failed=True)) >= 3
            )  # at least one 500, the 429 and the ok:false were all retried
        finally:
            await close_rig(rig)


async def test_review_flagged_posts_only_flagged_answers_and_marks_customer_flags(
    tmp_path: Path, kb: KnowledgeBase
) -> None:
    async with FakeSlack(members={REVIEW: [STAFF_ADA]}) as slack:
        rig = await make_rig(tmp_path, kb, slack, review="flagged", oncall_group="SONCALL")
        try:
            ok = await rig.ask("How long is the warranty on a bike?")
            unsure = await rig.ask("zxqv wibble frobnicate quantum chromodynamics lattice")
            await rig.card(unsure.message_id)
            assert not any(_is_card_of(c.params, ok.message_id) for c in slack.calls)

            # the customer's 👎 on the unposted answer: its card appears, marked, on-call mentioned
            await rig.service.customer_feedback(ok.message_id, "cust-chat-1", up=False)
            card = await rig.card(ok.message_id)
            assert (
                "customer disliked this answer" in card.all_text() and "<!subteam^SONCALL>" in card.all_text()
            )
            await slack.wait_for("chat.postMessage", where=lambda c: "<!subteam^SONCALL>" in c.params["text"])

            # /human: a visible note in the thread with the on-call mention and a Take over button
            await rig.service.ask_human(Inbound("test", "chat-1", "cust-chat-1", "/human"))
            [human] = await slack.wait_for(
                "chat.postMessage", where=lambda c: "asked for a human" in c.params["text"]
            )
            assert human.params["reply_broadcast"] is True and "<!subteam^SONCALL>" in human.params["text"]
            note = slack.messages[max(slack.messages)]
            await rig.press(STAFF_ADA, note, "take_over")
            assert rig.store.conversation(ok.conversation_id).mode == "human"
        finally:
            await close_rig(rig)


async def test_socket_mode_cards_buttons_commands_and_thread_replies(
    tmp_path: Path, kb: KnowledgeBase
) -> None:
    async with FakeSlack(usergroups={"SSTAFF": [STAFF_ADA]}, users={STAFF_ADA: "ada"}) as slack:
        rig = await make_rig(
            tmp_path, kb, slack, slack_signing_secret="", slack_app_token="xapp-test", staff="SSTAFF"
        )
        try:
            assert not any(r.resource.canonical == "/slack/events" for r in rig.http.app.router.routes())
            await slack.wait_connected()
            out = await rig.ask("How long is the warranty on a bike?")
            card = await rig.card(out.message_id)

            press = block_actions(STAFF_ADA, REVIEW, card.ts, "apprentice_approve", _card_value(card.blocks))
            await slack.wait_ack(await slack.push("interactive", press))
            await rig.channel.idle()
            await slack.wait_for("chat.update")
            assert "Approved by @ada" in card.all_text()

            command = slash_command(STAFF_ADA, REVIEW, "status")
            ack = await slack.wait_ack(await slack.push("slash_commands", command))
            assert "1 answer," in json.dumps(ack.get("payload"))

            take = block_actions(STAFF_ADA, REVIEW, card.ts, "apprentice_take_over", _card_value(card.blocks))
            await slack.wait_ack(await slack.push("interactive", take))
            await rig.channel.idle()
            reply = {
                "type": "message",
                "channel": REVIEW,
                "user": STAFF_ADA,
                "text": "Hello from staff",
                "ts": "1800000000.000400",
                "thread_ts": card.thread_ts,
            }
            for attempt in (0, 1):  # Slack redelivers when an ack is late: same event id
                await slack.wait_ack(await slack.push("events_api", event_callback(reply, "Ev9"), attempt))
                await rig.channel.idle()
            [received] = await rig.customer.wait(1)
            assert received.text == "Hello from staff" and len(rig.customer.received) == 1
        finally:
            await close_rig(rig)


async def test_nightly_report_is_posted_to_the_review_channel(rig: Rig) -> None:
    await rig.channel.post_report(NightlyReport(status="skipped"))
    report = {
        "status": "promoted",
        "candidate": "v3",
        "examples": {"new": 7},
        "reason": "wins & no regressions",
    }
    await rig.channel.post_report(NightlyReport.from_dict(report))
    [call] = await rig.slack.wait_for("chat.postMessage")
    assert call.params["channel"] == REVIEW and "adapter v3 promoted" in call.params["text"]
    assert "wins &amp; no regressions" in json.dumps(call.params["blocks"])  # escaped for mrkdwn


async def test_a_report_queued_by_a_separate_retrain_job_is_posted_by_the_running_bot(rig: Rig) -> None:
    # bot replicas run with the nightly job off; `apprentice retrain` (a CronJob) queues its report
    assert queue_report(rig.store, NightlyReport(status="skipped")) == 0
    assert queue_report(rig.store, NightlyReport(status="rejected", candidate="v4", reason="no better")) == 1
    [call] = await rig.slack.wait_for("chat.postMessage")
    assert call.params["channel"] == REVIEW and "v4" in call.params["text"]


def tiny_png(path: Path) -> bytes:
    """A valid 2x2 RGB PNG written to `path`; returns its bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))  # filter byte + two red pixels
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    png = b"\x89PNG\r\n\x1a\n" + body
    path.write_bytes(png)
    return png


def promoted_report(chart: Path) -> NightlyReport:
    return NightlyReport(status="promoted", candidate="v3", baseline="v2", reason="wins", chart=str(chart))


async def test_nightly_report_uploads_its_chart_to_the_review_channel(rig: Rig, tmp_path: Path) -> None:
    png = tiny_png(tmp_path / "eval.png")
    await rig.channel.post_report(promoted_report(tmp_path / "eval.png"))
    [text] = await rig.slack.wait_for("chat.postMessage")
    assert text.params["channel"] == REVIEW and "adapter v3 promoted" in text.params["text"]
    [done] = await rig.slack.wait_for("files.completeUploadExternal")
    [reserved] = rig.slack.called("files.getUploadURLExternal")
    assert reserved.params["filename"] == "eval.png" and int(reserved.params["length"]) == len(png)
    [chart] = rig.slack.uploaded(REVIEW)
    assert chart.data == png and chart.filename == "eval.png"
    assert "v3 vs v2" in chart.title and done.params["channel_id"] == REVIEW
    assert [c.method for c in rig.slack.calls[-4:]] == [
        "chat.postMessage",  # the text first: both items share the outbox key "report"
        "files.getUploadURLExternal",
        "upload",
        "files.completeUploadExternal",
    ]


async def test_a_missing_files_write_scope_drops_only_the_chart(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny_png(tmp_path / "eval.png")
    rig.slack.fail("files.getUploadURLExternal", status=200, error="missing_scope")
    await rig.channel.post_report(promoted_report(tmp_path / "eval.png"))
    await rig.channel.post_report(NightlyReport(status="rejected", candidate="v4", reason="no gain"))
    # the second report shares the key "report": it arrives only once the chart has left the outbox
    await rig.slack.wait_for("chat.postMessage", where=lambda c: "v4" in c.params["text"])
    texts = [c.params["text"] for c in rig.slack.called("chat.postMessage")]
    assert "adapter v3 promoted" in texts[0] and len(texts) == 2
    assert rig.slack.called("files.getUploadURLExternal", failed=True)
    assert rig.slack.called("files.completeUploadExternal") == [] and rig.slack.uploaded(REVIEW) == []
    assert rig.count(AuditEntry, AuditEntry.action == "outbox_drop") == 1
    assert "add the files:write bot scope" in caplog.text


async def test_a_report_whose_chart_file_is_gone_still_posts_its_text(rig: Rig, tmp_path: Path) -> None:
    await rig.channel.post_report(promoted_report(tmp_path / "missing.png"))
    await rig.channel.post_report(NightlyReport(status="rejected", candidate="v4", reason="no gain"))
    await rig.slack.wait_for("chat.postMessage", count=2)
    assert rig.slack.called("files.getUploadURLExternal") == []
    assert rig.count(AuditEntry, AuditEntry.action == "outbox_drop") == 1


async def test_a_failed_chart_upload_is_retried(rig: Rig, tmp_path: Path) -> None:
    png = tiny_png(tmp_path / "eval.png")
    rig.slack.fail("files.completeUploadExternal", status=500)
    await rig.channel.post_report(promoted_report(tmp_path / "eval.png"))
    await rig.slack.wait_for("files.completeUploadExternal")
    [chart] = rig.slack.uploaded(REVIEW)
    assert chart.data == png and len(rig.slack.called("files.getUploadURLExternal")) == 2


def test_slack_markup_becomes_plain_text_for_customers() -> None:
    assert slack_to_plain("See <https://shop.example/warranty|our warranty> &amp; ask <@U1>") == (
        "See our warranty (https://shop.example/warranty) & ask"
    )
    assert slack_to_plain("<mailto:help@shop.example|help@shop.example> &lt;3") == "help@shop.example <3"


def test_missing_configuration_says_what_to_set(tmp_path: Path) -> None:
    http = HttpServer("127.0.0.1", 0)
    base = {"data_dir": tmp_path, "slack_bot_token": "xoxb-x", "slack_channel": REVIEW}
    with pytest.raises(ValueError, match=r"SLACK_APP_TOKEN .* or SLACK_SIGNING_SECRET"):
        SlackChannel(Settings(**base), None, None, http)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="APPRENTICE_SLACK_CHANNEL"):
        SlackChannel(Settings(**{**base, "slack_channel": "", "slack_app_token": "xapp-x"}), None, None, http)  # type: ignore[arg-type]


def test_a_digest_line_says_when_an_answer_is_erased_or_was_busy() -> None:
    from bot.channels.slack.blocks import digest_line
    from knowledge.store.review import AnswerLine

    line = digest_line(3, 12, AnswerLine("When  does\nit <ship>?", "In 3 days.", "ok"))
    assert line == "#3 · answer #12: “When does it &lt;ship&gt;?” → In 3 days."
    assert digest_line(3, 13, AnswerLine("q", "a", "busy")).startswith("#3 · answer #13 ⏳: ")
    assert digest_line(4, 14, None) == "#4 · answer #14: (erased)"
