"""Staff corrections: stored, approved by a second person, revoked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from knowledge.models import (
    AuditEntry,
    Correction,
    utcnow,
)
from knowledge.store.base import StoreBase

log = logging.getLogger(__name__)


class CorrectionQueries(StoreBase):
    """The corrections staff write, and their review states."""

    # --- corrections ------------------------------------------------------------------
    def add_correction(
        self, *, audit: dict[str, Any] | None = None, **fields: Any
    ) -> tuple[Correction, bool]:
        """Store a correction; with a `request_key` a retry returns the first one and False.

        With `audit`, the "correct" audit entry is written in the same transaction, so a crash can
        leave neither a correction without its audit entry nor the reverse.
        """
        key = fields.get("request_key")
        try:
            with self.session() as s:
                corr = Correction(**fields)
                s.add(corr)
                s.flush()
                if audit is not None:
                    s.add(
                        AuditEntry(
                            actor=corr.staff,
                            action="correct",
                            target=f"message:{corr.message_id}",
                            before={"text": corr.original},
                            after={**audit, "text": corr.corrected, "correction_id": corr.id},
                        )
                    )
                return corr, True
        except IntegrityError:
            with self.session() as s:
                existing = s.scalar(select(Correction).where(Correction.request_key == key))
            if existing is None:
                raise
            return existing, False

    def correction_reviews(self, corrections: Sequence[Correction]) -> dict[int, str]:
        """Why each of `corrections` waits for a second approval (`reviews_of`)."""
        with self.session() as s:
            return reviews_of(s, corrections)

    def correction(self, correction_id: int) -> Correction | None:
        with self.session() as s:
            return s.get(Correction, correction_id)

    def corrections(self, *, include_revoked: bool = False, limit: int | None = None) -> list[Correction]:
        with self.session() as s:
            q = select(Correction).order_by(Correction.id.desc())
            if not include_revoked:
                q = q.where(Correction.status != "revoked")
            if limit:
                q = q.limit(limit)
            return list(s.scalars(q).all())

    def approve_correction(self, correction_id: int, staff: str) -> tuple[Correction | None, str]:
        """A second staff member approves a pending correction (the two-person rule).

        Returns the correction and "approved", or the reason it was not: "missing", "not pending"
        or "same person" (the author cannot be the second person). An active correction nobody
        approved yet can be approved too: the dataset builder may hold one back (see
        learning/datasets.hold_back), and this is how a second person releases it.
        """
        with self.session() as s:
            corr = s.get(Correction, correction_id, with_for_update=True)
            if corr is None:
                return None, "missing"
            if corr.status == "revoked" or (corr.status == "active" and corr.approved_by):
                return corr, "not pending"
            if corr.staff == staff:
                return corr, "same person"
            before = corr.status
            corr.status, corr.approved_by = "active", staff
            s.add(
                AuditEntry(
                    actor=staff,
                    action="approve_correction",
                    target=f"correction:{correction_id}",
                    before={"status": before, "author": corr.staff},
                    after={"status": "active"},
                )
            )
            return corr, "approved"

    def revoke_correction(self, correction_id: int) -> Correction | None:
        with self.session() as s:
            corr = s.get(Correction, correction_id)
            if corr is None:
                return None
            corr.status = "revoked"
            corr.revoked_at = utcnow()
            return corr


def reviews_of(s: Session, corrections: Sequence[Correction]) -> dict[int, str]:
    """Why each of `corrections` waits for a second approval: the two-person rule's summary, kept in
    the audit entry written with the correction. Corrections without one are left out."""
    if not corrections:
        return {}
    targets = {f"message:{c.message_id}" for c in corrections}
    wanted = {c.id for c in corrections}
    entries = s.scalars(
        select(AuditEntry).where(AuditEntry.action == "correct", AuditEntry.target.in_(targets))
    ).all()
    out: dict[int, str] = {}
    for entry in entries:
        after = entry.after or {}
        cid, review = after.get("correction_id"), after.get("review")
        if cid in wanted and review:
            out[int(cid)] = str(review)
    return out
