"""What the customer says about the answers: 👍/👎, and the satisfaction question (CSAT).

A 👎 flags the conversation for staff, and two in a row hand it over; a conversation that goes
quiet after an answer is asked once "Did this solve your problem?". These are the customer's
own verdicts, kept apart from answering (bot/conversation.py) and from staff actions
(bot/staff.py). The English texts of the notices customers read are named here for tests and
tools; every language's text is in the catalog (bot/messages.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt

from bot.envelope import Outbound
from bot.messages import CATALOG
from bot.metrics import METRICS
from bot.service_base import ServiceBase
from knowledge.models import utcnow

# What customers read. Short, polite, and never a stack trace.
UNSURE = CATALOG["unsure"]["en"]
APOLOGY = CATALOG["apology"]["en"]
BUSY = CATALOG["busy"]["en"]
TOO_LONG = CATALOG["too_long"]["en"]
EMPTY = CATALOG["empty"]["en"]
NON_TEXT = CATALOG["non_text"]["en"]
SLOW_DOWN = CATALOG["slow_down"]["en"]
HUMAN = CATALOG["human"]["en"]
THANKS_DOWN = CATALOG["thanks_down"]["en"]
THANKS_UP = CATALOG["thanks_up"]["en"]
# The satisfaction question (CSAT), asked once when a conversation goes quiet after an answer.
CSAT_QUESTION = CATALOG["csat_question"]["en"]
CSAT_THANKS_YES = CATALOG["csat_thanks_yes"]["en"]
CSAT_THANKS_NO = CATALOG["csat_thanks_no"]["en"]
# An answer older than this is not asked about: after a restart or an outage the sweep would
# otherwise ask yesterday's customers, out of the blue, about a question they have moved on from.
CSAT_WITHIN = dt.timedelta(hours=24)


class CustomerFeedback(ServiceBase):
    """The customer's ratings of answers and their reply to the satisfaction question."""

    def _two_downs(self, conversation_id: int) -> bool:
        """The customer's last two ratings were both 👎, on answers given since the last hand-off."""
        answers = {m.id for m in self._since_handoff(conversation_id) if m.role == "bot"}
        last = self.store.customer_ratings(conversation_id, 2)
        return len(last) == 2 and all(kind == "down" and mid in answers for mid, kind in last)

    async def customer_feedback(
        self, message_id: int, actor: str, up: bool, language: str = ""
    ) -> str | None:
        """A customer's thumbs up/down on an answer. Returns the thanks to show (in `language`, the
        channel's language code of the customer; else APPRENTICE_LANGUAGE), None if a duplicate."""
        lang = self.messages.choose(language)
        msg = await asyncio.to_thread(self.store.message, message_id)
        if msg is None or msg.role != "bot":
            return None
        created = await asyncio.to_thread(self.store.add_feedback, message_id, "up" if up else "down", actor)
        if not created:
            return None
        METRICS.feedback.labels(kind="up" if up else "down").inc()
        if not up:
            conv = await asyncio.to_thread(self.store.conversation, msg.conversation_id)
            await asyncio.to_thread(self.store.set_flagged, msg.conversation_id, True)
            if conv is not None:
                await self._each_reviewer("customer_flag", conv, message_id, "customer 👎")
                if conv.mode != "human" and await asyncio.to_thread(self._two_downs, conv.id):
                    why = "disliked two answers in a row"
                    await self._deliver(conv, await self._hand_off(conv, message_id, why, lang))
            return self.messages.text("thanks_down", lang)
        return self.messages.text("thanks_up", lang)

    async def _customer_language(self, conversation_id: int, before_id: int | None, code: str = "") -> str:
        """The customer's language for a notice that answers no message of theirs (the satisfaction
        question, its thanks): the channel's `code` when we have texts in it, else the language of
        their last messages in the conversation, else APPRENTICE_LANGUAGE."""
        texts = await asyncio.to_thread(self.store.customer_texts_before, conversation_id, before_id, 3)
        return await asyncio.to_thread(self.messages.choose, code, "\n".join(reversed(texts)))

    async def ask_satisfaction(self, now: dt.datetime | None = None) -> int:
        """Ask "Did this solve your problem?" in every conversation quiet for APPRENTICE_CSAT_AFTER
        minutes since a bot answer (and not over CSAT_WITHIN), once per conversation ever, in the
        customer's language with Yes / No in it too; returns how many were asked.

        Called periodically by every replica (App's sweep): each conversation is claimed in the
        database (`store.claim_csat`) before the question goes out, so restarts and replicas never
        ask twice. Only conversations of channels connected here are considered.
        """
        minutes = self.settings.csat_after
        channels = sorted(self.deliverers)
        if minutes <= 0 or not channels:
            return 0
        now = now or utcnow()
        due = await asyncio.to_thread(
            self.store.csat_due, minutes * 60.0, now, channels, CSAT_WITHIN.total_seconds()
        )
        asked = 0
        for cid, answer_id in due:
            if not await asyncio.to_thread(self.store.claim_csat, cid, answer_id, now):
                continue  # another replica (or an earlier sweep) asked
            conv = await asyncio.to_thread(self.store.conversation, cid)
            if conv is None:
                continue
            lang = await self._customer_language(cid, answer_id)
            text = self.messages.text("csat_question", lang)
            choices = (self.messages.text("csat_yes", lang), self.messages.text("csat_no", lang))
            mid = await self._save(cid, "system", text, None, reply_to_id=answer_id, status="csat")
            asked += await self._deliver(conv, Outbound(text, cid, mid, kind="csat", choices=choices))
        return asked

    async def satisfaction(
        self, conversation_id: int, yes: bool, now: dt.datetime | None = None, language: str = ""
    ) -> str | None:
        """The customer's Yes/No to the satisfaction question. No flags the conversation for staff,
        as a 👎 does. Returns the thanks to show, in the customer's language (`language`: the
        channel's code, when it reports one); None when it was not asked or answered already."""
        if not await asyncio.to_thread(self.store.record_csat, conversation_id, yes, now):
            return None
        METRICS.feedback.labels(kind="csat_yes" if yes else "csat_no").inc()
        ask = await asyncio.to_thread(self.store.csat, conversation_id)
        answer_id = ask.message_id if ask is not None and ask.message_id is not None else None
        lang = await self._customer_language(conversation_id, answer_id, language)
        if yes:
            return self.messages.text("csat_thanks_yes", lang)
        await asyncio.to_thread(self.store.set_flagged, conversation_id, True)
        conv = await asyncio.to_thread(self.store.conversation, conversation_id)
        if conv is not None:
            why = "said the answer did not solve their problem"
            await self._each_reviewer("customer_flag", conv, answer_id, why)
        return self.messages.text("csat_thanks_no", lang)


__all__ = [
    "APOLOGY",
    "BUSY",
    "CSAT_QUESTION",
    "CSAT_THANKS_NO",
    "CSAT_THANKS_YES",
    "EMPTY",
    "HUMAN",
    "NON_TEXT",
    "SLOW_DOWN",
    "THANKS_DOWN",
    "THANKS_UP",
    "TOO_LONG",
    "UNSURE",
    "CustomerFeedback",
]
