"""Staff actions on a conversation: corrections, approvals, feedback, take-over and replies.

They come in from Slack or the terminal alike and change what the bot knows or who talks to the
customer, so they are kept apart from answering customers (bot/conversation.py). A correction is
knowledge from the next message on: it is stored, remembered by the correction memory and sent
to the customer, unless it holds a secret (refused) or personal data (remembered for its own
conversation only); the two-person rule may hold it for a second approval.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from bot.envelope import Outbound, clean_text
from bot.metrics import METRICS
from bot.query import searched_for
from bot.service_base import ServiceBase
from knowledge.models import Correction, Message
from learning.secrets_scan import secret_kinds
from learning.trust import review_correction

log = logging.getLogger(__name__)


@dataclass
class CorrectionResult:
    correction: Correction
    created: bool
    delivered: bool = False
    # the personal data found in it ("EMAIL", "SSN", "NAME", ...): when any, the memory recalls the
    # correction only in the conversation it was written for (`scoped`), never for other customers
    personal: list[str] = field(default_factory=list)
    scoped: bool = False
    # why a pending correction waits for a second approval (learning.trust.Review.summary)
    review: str = ""


class CorrectionRefused(ValueError):
    """A staff correction that holds a secret: nothing was stored, remembered or delivered.

    `kinds` says what was found ("Stripe key", "password"), never the value; `str(exc)` is the
    message for the staff member (the same text `correction_problem` returns).
    """

    def __init__(self, kinds: list[str]) -> None:
        self.kinds = kinds
        super().__init__(_secret_message(kinds))


def _secret_message(kinds: list[str]) -> str:
    return (
        f"It contains what looks like a secret ({', '.join(kinds)}). Remove it and save again: "
        "secrets are never sent to customers, remembered or trained on."
    )


def correction_problem(text: str) -> str | None:
    """Why a correction text cannot be saved, for the staff member; None when it can.

    Cheap and synchronous, so a form can call it before acknowledging (Slack: `ack(
    response_action="errors", errors={"corrected": problem})` keeps the form open). `correct`
    checks the same and raises `CorrectionRefused`.
    """
    kinds = secret_kinds(clean_text(text))
    return _secret_message(kinds) if kinds else None


class StaffActions(ServiceBase):
    """What staff do to an answer or a conversation."""

    async def correct(
        self,
        message_id: int,
        corrected: str,
        staff: str,
        reason: str = "other",
        send: bool = True,
        remember: bool = True,
        request_key: str | None = None,
    ) -> CorrectionResult:
        """Store a staff correction of a bot answer, remember it, and send it to the customer.

        Idempotent on `request_key`: a retried submit returns the first correction untouched.
        A correction holding a secret raises `CorrectionRefused` and nothing is stored or sent; one
        holding personal data is remembered for its own conversation only (`result.scoped`).
        """
        corrected = clean_text(corrected)
        if not corrected:
            raise ValueError("The corrected answer is empty; type the answer the customer should get.")
        kinds = secret_kinds(corrected)
        if kinds:  # the kinds only: the value must not reach a log either
            log.warning("correction of message %s refused: a secret (%s)", message_id, ", ".join(kinds))
            raise CorrectionRefused(kinds)
        answer = await asyncio.to_thread(self.store.message, message_id)
        if answer is None or answer.role != "bot":
            raise LookupError(f"No bot answer with id {message_id}.")
        question = await asyncio.to_thread(self._question_of, answer)
        personal = await asyncio.to_thread(self._personal_data, answer.conversation_id, question, corrected)
        status, review = "active", ""
        if self.settings.two_person_rule != "off":
            verdict = await asyncio.to_thread(
                review_correction, self.kb, self.store, question, corrected, self.settings.memory_threshold
            )
            status, review = ("pending" if verdict.needs_second else "active"), verdict.summary()
        corr, created = await asyncio.to_thread(
            self.store.add_correction,
            audit={"reason": reason, "status": status, "review": review, "personal": personal},
            message_id=message_id,
            conversation_id=answer.conversation_id,
            request_key=request_key,
            question=question,
            original=answer.text,
            corrected=corrected,
            staff=staff,
            reason=reason,
            remember=remember,
            status=status,
        )
        scope = corr.conversation_id if personal else None
        held = review if corr.status == "pending" else ""
        result = CorrectionResult(corr, created, personal=personal, scoped=bool(personal), review=held)
        if corr.remember and question and self._memory_may_use(corr) and (scope is not None or not personal):
            # idempotent (an upsert): a retry after a crash between storing and remembering completes it
            await asyncio.to_thread(self.kb.remember, corr.id, question, corr.corrected, scope)
        if not created:
            if send:
                result.delivered = await self._resume_followup(answer, corr)
            return result
        METRICS.corrections.inc()
        conv = await asyncio.to_thread(self.store.conversation, answer.conversation_id)
        if send and conv is not None:
            mid = await self._save(
                conv.id, "staff", corrected, None, reply_to_id=answer.reply_to_id, status="correction"
            )
            result.delivered = await self._deliver(conv, Outbound(corrected, conv.id, mid, kind="correction"))
        await self._each_reviewer("correction_stored", conv, corr)
        return result

    def _personal_data(self, conversation_id: int | None, question: str, corrected: str) -> list[str]:
        """Personal data in a correction that the shop's documents do not print (see OutputGuard)."""
        name = ""
        conv = self.store.conversation(conversation_id) if conversation_id is not None else None
        if conv is not None:
            customer = self.store.customer(conv.customer_id)
            name = customer.display_name if customer is not None else ""
        k = self.settings.top_k
        public = [p.text for q in (question, corrected) if q for p in self.kb.search(q, k)]
        return self.guard.personal_data(corrected, "\n".join(public), name)

    def _memory_may_use(self, corr: Correction) -> bool:
        """Staff corrections teach the memory at once ("a correction is knowledge from the next
        message on"); with `two_person_rule=all` a pending one waits for its second approval."""
        rule = self.settings.two_person_rule
        return corr.status == "active" or (corr.status == "pending" and rule == "training")

    async def _resume_followup(self, answer: Message, corr: Correction) -> bool:
        """A retried correction: send the customer's follow-up if a crash stopped it (never twice)."""
        conv = await asyncio.to_thread(self.store.conversation, answer.conversation_id)
        if conv is None or conv.channel not in self.dedup_channels:
            return False  # no way to know whether it went out: do not risk a duplicate
        sent = await asyncio.to_thread(self.store.followup_of, answer, corr.corrected)
        mid = sent.id if sent is not None else None
        if mid is None:
            mid = await self._save(
                conv.id, "staff", corr.corrected, None, reply_to_id=answer.reply_to_id, status="correction"
            )
        out = Outbound(corr.corrected, conv.id, mid, kind="correction", repeat=True)
        return await self._deliver(conv, out)

    def _question_of(self, answer: Message) -> str:
        if answer.reply_to_id is None:
            return ""
        q = self.store.message(answer.reply_to_id)
        if q is None:
            return ""
        # a follow-up with the question it follows, as it was searched
        return searched_for(self.store, q.conversation_id, q.id, q.text, q.created_at)

    async def staff_feedback(self, message_id: int, kind: str, staff: str, reason: str = "") -> bool:
        """Approve (a good example for training) or flag (needs review) an answer."""
        if kind not in ("approve", "flag"):
            raise ValueError("kind must be approve or flag")
        created = await asyncio.to_thread(self.store.add_feedback, message_id, kind, staff, reason)
        if created:
            METRICS.feedback.labels(kind=kind).inc()
            await asyncio.to_thread(
                self.store.audit, staff, kind, f"message:{message_id}", {}, {"reason": reason}
            )
        return created

    async def approve_correction(self, correction_id: int, staff: str) -> tuple[Correction | None, str]:
        """The second approval of a pending correction; then memory and training may use it.

        Returns the correction and "approved", "missing", "not pending" or "same person".
        """
        corr, outcome = await asyncio.to_thread(self.store.approve_correction, correction_id, staff)
        if outcome == "approved" and corr is not None and corr.remember and corr.question:
            personal = await asyncio.to_thread(
                self._personal_data, corr.conversation_id, corr.question, corr.corrected
            )
            if not personal or corr.conversation_id is not None:
                scope = corr.conversation_id if personal else None
                await asyncio.to_thread(self.kb.remember, corr.id, corr.question, corr.corrected, scope)
        return corr, outcome

    async def revoke(self, correction_id: int, staff: str) -> Correction | None:
        """Stop using a correction for memory and training."""
        corr = await asyncio.to_thread(self.store.revoke_correction, correction_id)
        if corr is not None:
            await asyncio.to_thread(self.kb.forget, correction_id)
            await asyncio.to_thread(self.store.audit, staff, "revoke", f"correction:{correction_id}", {}, {})
        return corr

    async def take_over(self, conversation_id: int, staff: str) -> None:
        await asyncio.to_thread(self.store.set_mode, conversation_id, "human")
        await asyncio.to_thread(self.store.audit, staff, "take_over", f"conversation:{conversation_id}")

    async def hand_back(self, conversation_id: int, staff: str) -> None:
        await asyncio.to_thread(self.store.set_mode, conversation_id, "bot")
        await asyncio.to_thread(self.store.audit, staff, "hand_back", f"conversation:{conversation_id}")

    async def staff_reply(self, conversation_id: int, text: str, staff: str, external_id: str = "") -> bool:
        """A staff member writes to the customer (taken-over conversation). Stored as a staff answer."""
        text = clean_text(text)
        conv = await asyncio.to_thread(self.store.conversation, conversation_id)
        if conv is None or not text:
            return False
        mid = await self._save(conv.id, "staff", text, external_id or None, status="ok")
        await asyncio.to_thread(self.store.audit, staff, "staff_reply", f"conversation:{conversation_id}")
        return await self._deliver(conv, Outbound(text, conv.id, mid, kind="staff"))


__all__ = ["CorrectionRefused", "CorrectionResult", "StaffActions", "correction_problem"]
