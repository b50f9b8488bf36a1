"""Figures for people: counts for status displays, the satisfaction question, resolution stats."""

from __future__ import annotations

import datetime as dt
import logging
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from knowledge.models import (
    AuditEntry,
    Conversation,
    Correction,
    CsatAsk,
    Message,
    utcnow,
)
from knowledge.store.base import StoreBase

log = logging.getLogger(__name__)


class ReportQueries(StoreBase):
    """Counts, the satisfaction question (CSAT) and resolution figures."""

    def counts_since(self, since: dt.datetime) -> dict[str, int]:
        """Numbers for status displays: conversations, answers and corrections since `since`."""
        with self.session() as s:
            return {
                "conversations": int(
                    s.scalar(
                        select(func.count(func.distinct(Message.conversation_id))).where(
                            Message.created_at >= since
                        )
                    )
                    or 0
                ),
                "answers": int(
                    s.scalar(
                        select(func.count(Message.id)).where(
                            Message.role == "bot", Message.created_at >= since
                        )
                    )
                    or 0
                ),
                "corrections": int(
                    s.scalar(select(func.count(Correction.id)).where(Correction.created_at >= since)) or 0
                ),
            }

    # --- satisfaction question (CSAT) and resolution figures -----------------------------
    def csat_due(
        self,
        quiet_s: float,
        now: dt.datetime,
        channels: list[str] | None = None,
        within_s: float | None = None,
        limit: int = 100,
    ) -> list[tuple[int, int]]:
        """Conversations to ask "Did this solve your problem?": (conversation id, answer id).

        Those whose last message is a bot answer (status "ok") at least `quiet_s` old (and at most
        `within_s`, when given), still with the bot (not taken over), never asked before; only on
        `channels` when given.
        """
        last = (
            select(Message.conversation_id, func.max(Message.id).label("last_id"))
            .group_by(Message.conversation_id)
            .subquery()
        )
        q = (
            select(Message.conversation_id, Message.id)
            .join(last, last.c.last_id == Message.id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .outerjoin(CsatAsk, CsatAsk.conversation_id == Message.conversation_id)
            .where(
                Message.role == "bot",
                Message.status == "ok",
                Message.created_at <= now - dt.timedelta(seconds=quiet_s),
                Conversation.mode == "bot",
                CsatAsk.conversation_id.is_(None),
            )
            .order_by(Message.id)
            .limit(limit)
        )
        if channels is not None:
            q = q.where(Conversation.channel.in_(channels))
        if within_s is not None:
            q = q.where(Message.created_at >= now - dt.timedelta(seconds=within_s))
        with self.session() as s:
            return [(int(c), int(m)) for c, m in s.execute(q).all()]

    def claim_csat(
        self, conversation_id: int, message_id: int | None, now: dt.datetime | None = None
    ) -> bool:
        """Take the one question of this conversation: True for exactly one caller, ever (a row
        keyed by the conversation, inserted before the question is sent)."""
        try:
            with self.session() as s:
                when = now or utcnow()
                s.add(CsatAsk(conversation_id=conversation_id, message_id=message_id, asked_at=when))
            return True
        except IntegrityError:
            return False

    def record_csat(self, conversation_id: int, yes: bool, now: dt.datetime | None = None) -> bool:
        """The customer's answer; False when the conversation was not asked or answered already."""
        with self.session() as s:
            result = s.execute(
                update(CsatAsk)
                .where(CsatAsk.conversation_id == conversation_id, CsatAsk.answer.is_(None))
                .values(answer="yes" if yes else "no", answered_at=now or utcnow())
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def csat(self, conversation_id: int) -> CsatAsk | None:
        with self.session() as s:
            return s.get(CsatAsk, conversation_id)

    def stats(self, since: dt.datetime, now: dt.datetime | None = None) -> Stats:
        """Resolution figures of the conversations active in [since, now); see `Stats`."""
        now = now or utcnow()
        with self.session() as s:
            rows = s.execute(
                select(Message.conversation_id, Message.role, Message.status, Message.created_at)
                .where(Message.created_at >= since, Message.created_at < now)
                .order_by(Message.id)
            ).all()
            corrections = set(
                s.scalars(
                    select(Correction.conversation_id).where(
                        Correction.created_at >= since,
                        Correction.created_at < now,
                        Correction.conversation_id.is_not(None),
                    )
                ).all()
            )
            taken = s.scalars(
                select(AuditEntry.target).where(
                    AuditEntry.action == "take_over",
                    AuditEntry.created_at >= since,
                    AuditEntry.created_at < now,
                )
            ).all()
            asks = s.execute(
                select(CsatAsk.conversation_id, CsatAsk.answer).where(
                    CsatAsk.asked_at >= since, CsatAsk.asked_at < now
                )
            ).all()
        convs: set[int] = set()
        asked: Counter[int] = Counter()  # customer messages, and the courtesies answering some
        courtesies: Counter[int] = Counter()
        answered: set[int] = set()
        prefix = "conversation:"
        handed = {int(t[len(prefix) :]) for t in taken if t.startswith(prefix) and t[len(prefix) :].isdigit()}
        first_question: dict[int, dt.datetime] = {}
        waits: dict[int, float] = {}
        for cid, role, status, at in rows:
            if role == "customer":
                convs.add(cid)
                asked[cid] += 1
                first_question.setdefault(cid, at)
            elif role == "system" and status == "courtesy":
                courtesies[cid] += 1
                if cid not in waits:  # "hi" was not the question: the wait starts at the next one
                    first_question.pop(cid, None)
            elif role == "bot" and status == "ok":
                answered.add(cid)
            elif (role == "system" and status == "handoff") or (role == "staff" and status != "correction"):
                handed.add(cid)
            if role in ("bot", "staff") and cid in first_question and cid not in waits:
                waits[cid] = (at - first_question[cid]).total_seconds()
        said = {int(cid): answer for cid, answer in asks}
        # "hi" and nothing else (every customer message got a courtesy back): no question to resolve
        convs -= {c for c in convs if courtesies[c] >= asked[c]}
        handed &= convs
        corrected = {int(c) for c in corrections if c is not None} & convs
        alone = answered - handed - corrected
        resolved = {c for c in answered if said.get(c) == "yes" or (said.get(c) != "no" and c in alone)}
        replies = [a for a in said.values() if a is not None]
        yes = sum(1 for a in replies if a == "yes")
        return Stats(
            since=since,
            until=now,
            conversations=len(convs),
            answered=len(answered & convs),
            answered_alone=len(alone & convs),
            handed_to_staff=len(handed),
            corrected=len(corrected),
            resolved=len(resolved & convs),
            csat_asked=len(said),
            csat_answered=len(replies),
            csat_yes=yes,
            median_first_answer_s=statistics.median(waits.values()) if waits else None,
        )


@dataclass(frozen=True)
class Stats:
    """Resolution figures of the conversations with a customer message in [since, until).

    - `conversations`: conversations with at least one customer message in the window, other than
      those where every customer message was a courtesy ("hi", "thanks": bot/courtesy.py).
    - `answered`: of those, the ones the bot answered (a bot message with status "ok") in the window.
    - `handed_to_staff`: a hand-off notice (/human, plain words, repeats, two 👎), a take-over by
      staff, or a staff message to the customer (other than a correction) in the window.
    - `corrected`: a staff correction of one of its answers was stored in the window.
    - `answered_alone`: answered, neither handed to staff nor corrected.
    - `resolved`: answered, and the customer said Yes to "Did this solve your problem?", or did
      not say No and the conversation was answered alone.
    - `csat_*`: the questions asked in the window, those answered, the Yes answers.
    - `median_first_answer_s`: median, over conversations, of the time from the first customer
      message in the window to the first reply of the bot or staff after it.
    """

    since: dt.datetime
    until: dt.datetime
    conversations: int
    answered: int
    answered_alone: int
    handed_to_staff: int
    corrected: int
    resolved: int
    csat_asked: int
    csat_answered: int
    csat_yes: int
    median_first_answer_s: float | None

    @property
    def resolution_rate(self) -> float | None:
        """Resolved by the bot alone, out of all conversations (None without conversations)."""
        return self.resolved / self.conversations if self.conversations else None

    @property
    def csat(self) -> float | None:
        """The share of Yes among the answered questions (None when none was answered)."""
        return self.csat_yes / self.csat_answered if self.csat_answered else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"], out["until"] = self.since.isoformat(), self.until.isoformat()
        out["resolution_rate"], out["csat"] = self.resolution_rate, self.csat
        return out
