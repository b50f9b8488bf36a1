"""What the nightly job reads and writes: dataset rows, trust holds, adapter records, runs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from knowledge.models import (
    Adapter,
    AuditEntry,
    Conversation,
    Correction,
    Customer,
    Feedback,
    Message,
    RegistryState,
    TrainingRun,
    utcnow,
)
from knowledge.store.base import StoreBase

_IN_CHUNK = 500  # ids per IN (...) list: SQLite caps the parameters of one statement


@dataclass(frozen=True)
class Pointer:
    """The active adapter (None: the bare base model) and the one before it."""

    active: str | None
    previous: str | None


@dataclass(frozen=True)
class TrainingCandidates:
    """Every row a dataset may learn from, read in one transaction so the lists agree."""

    corrections: list[Correction]  # every correction, oldest first, whatever its status
    approved: list[Message]  # bot answers staff approved and nobody flagged, oldest first
    staff_replies: list[Message]  # staff replies that reached the customer, oldest first
    answers: list[Message]  # every bot answer sent: the memory's copies of a correction among them


class TrainingQueries(StoreBase):
    """Queries of the learning loop: datasets, the two-person rule, the adapter registry, runs."""

    # --- dataset rows -------------------------------------------------------------------
    def last_promotion(self) -> dt.datetime | None:
        """When the last promoted nightly run started: lessons after it are not in the weights yet."""
        with self.session() as s:
            return s.scalar(
                select(func.max(TrainingRun.started_at)).where(TrainingRun.status == "promoted")
            )

    def erased_conversations(self) -> set[int]:
        """The conversations of erased customers: no dataset may learn from them."""
        with self.session() as s:
            rows = s.scalars(
                select(Conversation.id)
                .join(Customer, Customer.id == Conversation.customer_id)
                .where(Customer.erased_at.is_not(None))
            ).all()
        return set(rows)

    def conversation_profiles(self) -> dict[int, tuple[str, str, str]]:
        """Conversation id -> its customer's (display name, @username, phone), as the channel gave them."""
        with self.session() as s:
            rows = s.execute(
                select(Conversation.id, Customer.display_name, Customer.username, Customer.phone).join(
                    Customer, Customer.id == Conversation.customer_id
                )
            ).all()
        return {int(cid): (name, user, phone) for cid, name, user, phone in rows}

    def training_candidates(self) -> TrainingCandidates:
        """The corrections, approved answers, staff replies and bot answers a dataset is built from."""
        with self.session() as s:
            corrections = list(s.scalars(select(Correction).order_by(Correction.id)).all())
            approved = s.scalars(
                select(Message)
                .where(Message.role == "bot", Message.approved.is_(True), Message.flagged.is_(False))
                .order_by(Message.id)
            ).all()
            staff = s.scalars(
                select(Message).where(Message.role == "staff", Message.status == "ok").order_by(Message.id)
            ).all()
            answers = s.scalars(select(Message).where(Message.role == "bot", Message.status == "ok")).all()
        return TrainingCandidates(corrections, list(approved), list(staff), list(answers))

    def last_customer_message_before(self, conversation_id: int, message_id: int) -> Message | None:
        """The customer's latest message in the conversation before `message_id` (what a staff reply
        after a take-over answers)."""
        with self.session() as s:
            return s.scalar(
                select(Message)
                .where(
                    Message.conversation_id == conversation_id,
                    Message.id < message_id,
                    Message.role == "customer",
                )
                .order_by(Message.id.desc())
                .limit(1)
            )

    def customer_texts_before(self, conversation_id: int, message_id: int | None, limit: int) -> list[str]:
        """The texts of the customer's last `limit` messages before `message_id` (None: the last
        ones), newest first."""
        q = select(Message.text).where(Message.conversation_id == conversation_id, Message.role == "customer")
        if message_id is not None:
            q = q.where(Message.id < message_id)
        with self.session() as s:
            rows = s.scalars(q.order_by(Message.id.desc()).limit(limit)).all()
        return list(rows)

    # --- the two-person rule ------------------------------------------------------------
    def message_approvers(self, message_ids: Collection[int]) -> dict[int, set[str]]:
        """Who approved each message (staff "approve" feedback); messages nobody approved are absent."""
        out: dict[int, set[str]] = {}
        ids = sorted(set(message_ids))
        with self.session() as s:
            for start in range(0, len(ids), _IN_CHUNK):
                rows = s.execute(
                    select(Feedback.message_id, Feedback.actor).where(
                        Feedback.kind == "approve", Feedback.message_id.in_(ids[start : start + _IN_CHUNK])
                    )
                ).all()
                for mid, actor in rows:
                    out.setdefault(mid, set()).add(actor)
        return out

    def staff_reply_author(self, reply: Message) -> str | None:
        """The staff member who wrote a take-over reply: its "staff_reply" audit entry, written just after."""
        with self.session() as s:
            return s.scalar(
                select(AuditEntry.actor)
                .where(
                    AuditEntry.action == "staff_reply",
                    AuditEntry.target == f"conversation:{reply.conversation_id}",
                    AuditEntry.created_at >= reply.created_at,
                )
                .order_by(AuditEntry.id)
                .limit(1)
            )

    def revoked_corrections(
        self, at: dt.datetime, window: dt.timedelta, revoked_by: str | None = None
    ) -> list[Correction]:
        """Corrections revoked at or before `at`: within `window` before it, or at any time by
        `revoked_by` (the audit log's "revoke" entries say who); newest first."""
        with self.session() as s:
            mine: set[int] = set()
            if revoked_by:
                for target in s.scalars(
                    select(AuditEntry.target).where(
                        AuditEntry.action == "revoke", AuditEntry.actor == revoked_by
                    )
                ):
                    if target.startswith("correction:") and target[len("correction:") :].isdigit():
                        mine.add(int(target[len("correction:") :]))
            recent = Correction.revoked_at >= at - window
            return list(
                s.scalars(
                    select(Correction)
                    .where(
                        Correction.status == "revoked",
                        Correction.revoked_at.is_not(None),
                        Correction.revoked_at <= at,
                        recent | Correction.id.in_(sorted(mine)) if mine else recent,
                    )
                    .order_by(Correction.id.desc())
                ).all()
            )

    def correction_was_pending(self, correction: Correction) -> bool:
        """Whether the two-person rule stored `correction` as pending (its creation's audit entry says)."""
        with self.session() as s:
            for after in s.scalars(
                select(AuditEntry.after).where(
                    AuditEntry.action == "correct", AuditEntry.target == f"message:{correction.message_id}"
                )
            ):
                if isinstance(after, dict) and after.get("correction_id") == correction.id:
                    return after.get("status") == "pending"
        return False

    # --- the adapter registry -----------------------------------------------------------
    def adapter_versions(self) -> set[str]:
        """Every adapter version name ever registered (a name is used once)."""
        with self.session() as s:
            return set(s.scalars(select(Adapter.version)).all())

    def add_adapter(
        self, version: str, path: str, base_model: str, base_hash: str, meta: dict[str, Any]
    ) -> Adapter:
        """Record a finished adapter; it serves only once the pointer moves to it."""
        with self.session() as s:
            row = Adapter(version=version, path=path, base_model=base_model, base_hash=base_hash, meta=meta)
            s.add(row)
            s.flush()
            return row

    def adapter(self, version: str) -> Adapter | None:
        with self.session() as s:
            return s.scalar(select(Adapter).where(Adapter.version == version))

    def adapters(self) -> list[Adapter]:
        """Every registered adapter, oldest first (a parent before the adapters trained on top of it)."""
        with self.session() as s:
            return list(s.scalars(select(Adapter).order_by(Adapter.id)).all())

    def adapter_pointer(self) -> Pointer:
        with self.session() as s:
            row = s.get(RegistryState, 1)
            return Pointer(row.active_version, row.previous_version) if row else Pointer(None, None)

    def move_adapter_pointer(
        self, target: str | None, *, actor: str, action: str, check: Callable[[Adapter | None], None]
    ) -> Pointer:
        """Point the active adapter at `target` (None: the base model), remembering the one before,
        with an audit entry, all in one transaction: every replica sees the old pointer or the new.

        `check` sees the target's row (None: no such version) before anything changes; it raises to
        refuse the move.
        """
        with self.session() as s:
            if target is not None:
                check(s.scalar(select(Adapter).where(Adapter.version == target)))
            state = s.get(RegistryState, 1, with_for_update=True)
            if state is None:
                state = RegistryState(id=1, active_version=None, previous_version=None)
                s.add(state)
            before = {"active": state.active_version, "previous": state.previous_version}
            if state.active_version != target:
                state.previous_version = state.active_version
                state.active_version = target
                state.changed_at = utcnow()
            after = {"active": state.active_version, "previous": state.previous_version}
            s.add(
                AuditEntry(
                    actor=actor,
                    action=action,
                    target=f"adapter:{target or 'base'}",
                    before=before,
                    after=after,
                )
            )
            return Pointer(state.active_version, state.previous_version)

    # --- nightly runs -------------------------------------------------------------------
    def start_training_run(self) -> int:
        """A new TrainingRun row, status "running"; returns its id (the run folder's name)."""
        with self.session() as s:
            run = TrainingRun(status="running")
            s.add(run)
            s.flush()
            return run.id

    def finish_training_run(
        self,
        run_id: int,
        *,
        status: str,
        reason: str,
        candidate: str | None,
        examples: int,
        report: dict[str, Any],
    ) -> None:
        """Record how a run ended and its whole report (JSON); a missing row is left alone."""
        with self.session() as s:
            run = s.get(TrainingRun, run_id)
            if run is None:
                return
            run.status = status
            run.reason = reason
            run.candidate_version = candidate
            run.examples = examples
            run.report = report
            run.finished_at = utcnow()
