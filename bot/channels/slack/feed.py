"""What the review channel is told: the conversation service's `Reviewer` calls, as outbox items.

Nothing here talks to Slack: each call queues an item (a card, a card update, a thread note, a
report) for the sender, keyed by conversation so one thread stays in order, and returns at once.
`Mrkdwn` is the review channel's `Surface` for the staff commands.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.channels.slack.blocks import esc, quote
from bot.channels.slack.identity import CHANNEL, Directory
from bot.channels.slack.sender import card_key, report_items
from bot.conversation import ConversationService
from bot.envelope import Answer
from bot.hours import short as short_time
from bot.outbox import Outbox
from knowledge.models import Conversation, Correction
from knowledge.settings import Settings
from knowledge.store import Store

if TYPE_CHECKING:
    from learning.nightly import NightlyReport


class ReviewFeed:
    """The `Reviewer` side of the Slack channel (a mixin of `SlackChannel`, which sets these)."""

    settings: Settings
    service: ConversationService
    store: Store
    outbox: Outbox  # the sender's

    async def answer_posted(self, conv: Conversation, answer: Answer) -> None:
        review = self.settings.review
        if answer.repeat and await asyncio.to_thread(self._carded, answer.message_id):
            return  # a redelivered message whose card is already posted or queued
        if review == "all" or (review == "flagged" and answer.flagged):
            # "flagged": False marks a card that may be folded into a digest at volume
            await self._put("card", conv.id, {"message_id": answer.message_id, "flagged": answer.flagged})

    def _carded(self, message_id: int) -> bool:
        if self.store.get_kv(card_key(message_id)):
            return True
        return self.store.outbox_has(CHANNEL, message_id, "card")

    async def customer_flag(self, conv: Conversation, message_id: int | None, why: str) -> None:
        if self.settings.review == "none":
            return
        oncall = f" <!subteam^{self.settings.oncall_group}>" if self.settings.oncall_group else ""
        # outside APPRENTICE_BUSINESS_HOURS the mention waits for the opening (a scheduled note)
        now = self.service.clock()
        opening = self.service.hours.closed_until(now) if oncall and self.service.hours else None
        if message_id is not None:
            await self._put("update", conv.id, {"message_id": message_id})
            if oncall and opening is not None:
                await self._ping_later(conv.id, f"👎 The customer disliked an answer.{oncall}", opening)
            elif oncall:  # an edited message notifies nobody; a thread reply with the mention does
                await self._put("note", conv.id, {"text": f"👎 The customer disliked an answer.{oncall}"})
            return
        text = f"🙋 *The customer {esc(why)}.*{oncall} Press *Take over* to reply to them here."
        if opening is not None:
            when = short_time(opening, now.astimezone(opening.tzinfo))
            text = (
                f"🙋 *The customer {esc(why)}.* (outside business hours; on-call will be pinged at {when}) "
                "Press *Take over* to reply to them here."
            )
            ping = f"⏰ Business hours have started:{oncall} the customer {esc(why)} while we were away."
            await self._ping_later(conv.id, ping, opening)
        await self._put(
            "note",
            conv.id,
            {"text": text, "buttons": ["take_over"], "message_id": 0, "broadcast": True},
        )

    async def _ping_later(self, conversation_id: int, text: str, opening: dt.datetime) -> None:
        """The on-call mention as a note scheduled for the opening (one per conversation; skipped if
        staff took the conversation over by then). Its own outbox key: the thread's other notes and
        cards do not wait for it."""
        key = f"oncall:{conversation_id}"
        if await asyncio.to_thread(self.store.outbox_scheduled, CHANNEL, key):
            return
        payload = {"conversation_id": conversation_id, "text": text, "unless_taken": True, "broadcast": True}
        await self.outbox.put("note", payload, key=key, not_before=opening)

    async def relay(self, conv: Conversation, text: str) -> None:
        await self._put("note", conv.id, {"text": f"💬 *Customer:*\n{quote(text)}"})

    async def correction_stored(self, conv: Conversation | None, correction: Correction) -> None:
        if conv is not None and correction.message_id is not None and self.settings.review != "none":
            await self._put("update", conv.id, {"message_id": correction.message_id})

    async def post_report(self, result: NightlyReport) -> None:
        """The nightly learning report, posted to the review channel (through the outbox, like cards)."""
        for kind, payload in report_items(result):
            await self.outbox.put(kind, payload, key="report")

    async def post_stats(self, text: str, chart: str | None = None) -> None:
        """The weekly resolution figures (bot/stats.py), posted like the nightly report: the text,
        then the chart, through the outbox."""
        await self.outbox.put("report", {"text": text}, key="report")
        if chart:
            payload = {"path": chart, "title": "Resolution figures"}
            await self.outbox.put("report_chart", payload, key="report")

    async def _put(self, kind: str, conversation_id: int, payload: dict[str, Any]) -> None:
        await put(self.outbox, kind, conversation_id, payload)


async def put(outbox: Outbox, kind: str, conversation_id: int, payload: dict[str, Any]) -> None:
    """Queue an item about a conversation, behind that conversation's earlier items."""
    await outbox.put(kind, {"conversation_id": conversation_id, **payload}, key=f"conv:{conversation_id}")


class Mrkdwn:
    """The staff commands' `Surface` in Slack: mrkdwn, `@names`, charts posted to the review channel."""

    def __init__(self, people: Directory, outbox: Outbox) -> None:
        self.people, self.outbox = people, outbox

    def bold(self, text: str) -> str:
        return f"*{text}*"

    def escape(self, text: str) -> str:
        return esc(text)

    def quote(self, text: str) -> str:
        return quote(text)

    def preformatted(self, text: str) -> str:
        return f"```{esc(text)}```"

    async def name(self, actor: str) -> str:
        return await self.people.display(actor)

    async def show_chart(self, path: Path, days: int, staff: str) -> str:
        # the chart goes to the review channel (a slash command's reply cannot carry a file)
        user = staff.removeprefix(CHANNEL + ":")
        title = f"Resolution figures, last {days} days (asked by <@{user}>)"
        await self.outbox.put("report_chart", {"path": str(path), "title": title}, key="report")
        return "The chart follows in the review channel."

    async def correction_approved(self, correction: Correction) -> None:
        if correction.conversation_id is not None and correction.message_id is not None:
            await put(
                self.outbox, "update", correction.conversation_id, {"message_id": correction.message_id}
            )

    async def show_card(self, conversation_id: int, message_id: int) -> str:
        # an answer without a card yet (a digest line, or APPRENTICE_REVIEW=flagged) gets it posted,
        # one that has a card gets it redrawn: the outbox's "update" does either
        await put(self.outbox, "update", conversation_id, {"message_id": message_id})
        return (
            f"The card of answer #{message_id} follows in the thread of conversation #{conversation_id} "
            "in the review channel (redrawn there, if it had one already)."
        )
