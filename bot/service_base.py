"""What every part of the conversation service stands on: its state and the steps all parts take.

The service is one object (`bot.conversation.ConversationService`) whose methods come in groups, one
module each: answering customers (bot/conversation.py), their ratings and the satisfaction question
(bot/notices.py), staff actions (bot/staff.py). Each group builds on `ServiceBase`, the way the
store's query groups build on `knowledge.store.base.StoreBase`: here live the settings, store and
model, and the steps they share (store a message, send a notice, deliver to a channel, tell the
reviewers, speak the customer's language, hand a conversation to staff).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from bot import handoff, hours
from bot.envelope import Deliver, Inbound, Outbound, Reviewer
from bot.guard import OutputGuard
from bot.keylock import KeyedLocks
from bot.messages import Messages
from bot.metrics import METRICS
from bot.ratelimit import ONCALL_WINDOW_S, RateLimiter
from knowledge.models import Conversation, Message
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.generation import Generator

log = logging.getLogger(__name__)


class ServiceBase:
    """The state of the conversation service and the steps its method groups share."""

    def __init__(self, settings: Settings, store: Store, kb: KnowledgeBase, generator: Generator) -> None:
        self.settings = settings
        self.store = store
        self.kb = kb
        self.generator = generator
        self.reviewers: list[Reviewer] = []
        # channel name -> how to send to a customer on that channel (a dict is enough)
        self.deliverers: dict[str, Deliver] = {}
        # channels whose deliverer drops an Outbound(repeat=True) it has queued before (a durable
        # outbox): a correction retried after a crash is delivered through them, never twice
        self.dedup_channels: set[str] = set()
        # one chat is served in order: its lock lives while a message of that chat is in hand
        self._chat_locks = KeyedLocks()
        # Customers' rate limit and the on-call pings, counted in the database: every replica agrees.
        self.limiter = RateLimiter(store)
        # Every reply passes the output guard (prompt, secrets, other customers' data): bot/guard.py.
        self.guard = OutputGuard(settings, store)
        # What customers read, in their language (bot/messages.py), and when staff are in (bot/hours.py)
        self.messages = Messages.from_settings(settings)
        self.hours = hours.from_settings(settings)
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)  # tests pin it

    # --- storing and sending ---------------------------------------------------------------
    async def _save(
        self, conversation_id: int, role: str, text: str, external_id: str | None, **fields: Any
    ) -> int:
        msg = await asyncio.to_thread(
            self.store.add_message, conversation_id, role, text, external_id=external_id or None, **fields
        )
        return msg.id

    async def _notice(
        self, conv: Conversation, text: str, question_id: int, status: str = "notice"
    ) -> Outbound:
        mid = await self._save(conv.id, "system", text, None, reply_to_id=question_id, status=status)
        return Outbound(text, conv.id, mid, kind="notice")

    async def _deliver(self, conv: Conversation, out: Outbound) -> bool:
        send = self.deliverers.get(conv.channel)
        if send is None:
            log.warning("no channel %r connected; message %s kept in the store", conv.channel, out.message_id)
            return False
        try:
            await send(conv, out)
            METRICS.messages_out.labels(channel=conv.channel, kind=out.kind).inc()
            return True
        except Exception:
            log.exception("delivery to %s failed; message %s kept in the store", conv.channel, out.message_id)
            return False

    async def _each_reviewer(self, method: str, *args: Any) -> None:
        for reviewer in self.reviewers:
            try:
                await getattr(reviewer, method)(*args)
            except Exception:  # staff tooling must never break the customer's answer
                log.exception("reviewer %s.%s failed", type(reviewer).__name__, method)

    # --- what customers read, in their language -------------------------------------------
    async def _language(self, inbound: Inbound | None, text: str | None = None, written: str = "") -> str:
        """The reply language: the channel's (Telegram's language_code), else the message's (`written`
        when known), else APPRENTICE_LANGUAGE (bot/messages.py). Detection runs in a thread: lingua is
        CPU work."""
        if inbound is None:
            return self.messages.default
        if text is None and inbound.kind == "text":
            text = inbound.text
        return await asyncio.to_thread(self.messages.choose, inbound.language, text, written)

    async def _say(self, key: str, inbound: Inbound | None, text: str | None = None, **values: Any) -> str:
        return self.messages.text(key, await self._language(inbound, text), **values)

    def _later(self, key: str, lang: str) -> str:
        """The `key` notice ("unsure", "human"), or outside business hours its `_later` form: "… A
        colleague will reply on Monday at 09:00." (the time in the business's zone)."""
        if self.hours is not None:
            now = self.clock()
            opening = self.hours.closed_until(now)
            if opening is not None:
                when = self.messages.when(lang, opening, now)
                return self.messages.text(f"{key}_later", lang, when=when)
        return self.messages.text(key, lang)

    async def _unsure(self, inbound: Inbound | None, text: str) -> str:
        return self._later("unsure", await self._language(inbound, text))

    # --- handing a conversation to staff ---------------------------------------------------
    async def _ping(self, conv: Conversation, message_id: int | None, why: str) -> None:
        """Tell staff (and the on-call group) about this conversation: once per ONCALL_WINDOW_S."""
        if await self.limiter.hit(f"oncall:{conv.id}", ONCALL_WINDOW_S) == 1:
            await self._each_reviewer("customer_flag", conv, message_id, why)

    async def _hand_off(self, conv: Conversation, reply_to: int, why: str, lang: str = "") -> Outbound:
        """What /human does, whatever triggered it: the conversation is flagged, staff get a note with
        Take over (`why` completes "The customer …"), and the customer the HUMAN notice (in `lang`;
        outside business hours it says when a colleague will reply)."""
        await asyncio.to_thread(self.store.set_flagged, conv.id, True)
        await self._ping(conv, None, why)
        return await self._notice(conv, self._later("human", lang), reply_to, status="handoff")

    def _since_handoff(self, conversation_id: int) -> list[Message]:
        """The recent messages (oldest first) after the last hand-off notice: frustration is counted
        afresh after each hand-off. From the store, so every replica counts the same."""
        rows = self.store.history(conversation_id, handoff.REPEAT_WINDOW)
        for i in range(len(rows) - 1, -1, -1):
            if rows[i].role == "system" and (
                rows[i].status == "handoff" or self.messages.is_text(rows[i].text, "human", "human_later")
            ):
                return rows[i + 1 :]
        return rows


__all__ = ["ServiceBase"]
