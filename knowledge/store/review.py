"""What the staff review desk reads and changes: cards, threads, digests, the desk's status line.

The Slack review channel and the staff commands read these; they never open a session themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from knowledge.models import (
    Conversation,
    Correction,
    Feedback,
    Message,
    OutboxItem,
    RegistryState,
    utcnow,
)
from knowledge.store.base import StoreBase
from knowledge.store.corrections import reviews_of


@dataclass
class CardState:
    """Everything an answer's review card shows, read from the store when the card is (re)drawn."""

    conversation_id: int
    message_id: int
    mode: str
    question: str
    answer: str
    status: str
    sources: list[dict[str, Any]]
    model: str | None
    adapter_version: str | None
    latency_ms: float | None
    feedback: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, actor, reason)
    # (correction id, staff, corrected text, reason, status)
    corrections: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    # why a pending correction waits for a second approval, by correction id
    reviews: dict[int, str] = field(default_factory=dict)

    def actors(self) -> set[str]:
        """The staff named on the card: who approved, flagged or corrected the answer."""
        return {a for k, a, _ in self.feedback if k in ("approve", "flag")} | {c[1] for c in self.corrections}


@dataclass(frozen=True)
class AnswerLine:
    """One answer as a digest lists it: the question it replied to, its text and its status."""

    question: str
    answer: str
    status: str


class ReviewQueries(StoreBase):
    """Queries of the review desk (Slack and the terminal's staff commands)."""

    def answer_card(self, message_id: int) -> CardState | None:
        """The card of a bot answer (None once the answer is gone), read in one session."""
        with self.session() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                return None
            conv = s.get(Conversation, msg.conversation_id)
            question = s.get(Message, msg.reply_to_id) if msg.reply_to_id else None
            feedback = s.scalars(
                select(Feedback).where(Feedback.message_id == message_id).order_by(Feedback.id)
            ).all()
            corrections = s.scalars(
                select(Correction).where(Correction.message_id == message_id).order_by(Correction.id)
            ).all()
            reviews = reviews_of(s, [c for c in corrections if c.status == "pending"])
        return CardState(
            conversation_id=msg.conversation_id,
            message_id=msg.id,
            mode=conv.mode if conv else "bot",
            question=question.text if question else "",
            answer=msg.text,
            status=msg.status,
            sources=list(msg.sources or []),
            model=msg.model,
            adapter_version=msg.adapter_version,
            latency_ms=msg.latency_ms,
            feedback=[(f.kind, f.actor, f.reason) for f in feedback],
            corrections=[(c.id, c.staff, c.corrected, c.reason, c.status) for c in corrections],
            reviews=reviews,
        )

    def answer_lines(self, message_ids: list[int]) -> dict[int, AnswerLine]:
        """The answers among `message_ids` that still exist, each with the question it replied to."""
        with self.session() as s:
            replies = {m.id: m for m in s.scalars(select(Message).where(Message.id.in_(message_ids))).all()}
            asked = [m.reply_to_id for m in replies.values() if m.reply_to_id]
            questions = {m.id: m.text for m in s.scalars(select(Message).where(Message.id.in_(asked))).all()}
        return {
            mid: AnswerLine(questions.get(m.reply_to_id or 0, ""), m.text, m.status)
            for mid, m in replies.items()
        }

    def fold_unflagged_cards(self, channel: str, after_s: float, digest_size: int) -> int:
        """When the oldest unflagged card of `channel` has waited `after_s`, mark every unflagged card
        still pending "folded" and queue "digest" items listing them (`digest_size` answers each, as
        `{"answers": [[conversation_id, message_id], ...]}`); returns how many were folded.

        One transaction, and only "pending" rows: a card another replica claimed (or folded) at the
        same moment is in exactly one place. The digests are queued last, so the flagged cards
        already waiting go first. A folded card still counts as queued (`outbox_has`).
        """
        waiting = (
            OutboxItem.channel == channel,
            OutboxItem.kind == "card",
            OutboxItem.status == "pending",
            OutboxItem.payload["flagged"].as_boolean().is_(False),
        )
        with self.session() as s:
            oldest = s.scalar(select(func.min(OutboxItem.created_at)).where(*waiting))
            if oldest is None or (utcnow() - oldest).total_seconds() < after_s:
                return 0
            rows = s.execute(
                update(OutboxItem)
                .where(*waiting)
                .values(status="folded")
                .returning(OutboxItem.id, OutboxItem.payload)
                .execution_options(synchronize_session=False)
            ).all()
            answers = [[int(p["conversation_id"]), int(p["message_id"])] for _, p in sorted(rows)]
            for start in range(0, len(answers), digest_size):
                digest = {"answers": answers[start : start + digest_size]}
                s.add(OutboxItem(channel=channel, kind="digest", key="", payload=digest))
        return len(answers)

    def outbox_scheduled(self, channel: str, key: str) -> bool:
        """Whether an item of `channel` under `key` waits for its time (enqueued with `not_before`)."""
        with self.session() as s:
            q = select(OutboxItem.id).where(
                OutboxItem.channel == channel, OutboxItem.key == key, OutboxItem.status == "scheduled"
            )
            return s.scalar(q.limit(1)) is not None

    def conversation_by_review_thread(self, thread: str) -> Conversation | None:
        """The conversation whose review thread is `thread` ("CHANNEL:ts"), if any."""
        with self.session() as s:
            return s.scalar(select(Conversation).where(Conversation.review_thread == thread).limit(1))

    def active_adapter(self) -> str | None:
        """The adapter the bot answers with (None: the base model, or the registry cannot be read:
        a status line must not fail for it)."""
        try:
            with self.session() as s:
                row = s.get(RegistryState, 1)
                return row.active_version if row is not None else None
        except SQLAlchemyError:
            return None
