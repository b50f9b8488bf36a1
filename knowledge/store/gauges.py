"""Figures the metrics endpoint and the output guard read from the database.

/metrics and /readyz read these when they are scraped, and the output guard (bot/guard.py) before
every reply: which customers' names a reply may not print, and which staff texts this
conversation's customer has already been given. They are plain reads, kept here so that the bot
never builds a query itself.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text

from knowledge.models import Correction, Customer, TrainingRun
from knowledge.store.base import StoreBase


class GaugeQueries(StoreBase):
    """Gauges for /metrics and the lookups of the output guard."""

    # --- /readyz and /metrics ------------------------------------------------------------
    def reachable(self) -> bool:
        """The database answers a trivial query (the /readyz check)."""
        with self.engine.connect() as conn:
            return conn.scalar(text("SELECT 1")) == 1

    def training_runs_by_status(self) -> dict[str, int]:
        """How many nightly learning runs ended in each status (statuses with none are left out)."""
        return self._count_by_status(TrainingRun.status, TrainingRun.id)

    def corrections_by_status(self) -> dict[str, int]:
        """How many staff corrections are in each status (statuses with none are left out)."""
        return self._count_by_status(Correction.status, Correction.id)

    def _count_by_status(self, status: Any, key: Any) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(status, func.count(key)).group_by(status)).all()
        return {str(value): int(n) for value, n in rows}

    # --- the output guard ----------------------------------------------------------------
    def customer_names(self) -> dict[int, str]:
        """The display name of every customer not erased, by customer id (empty names included)."""
        with self.session() as s:
            rows = s.execute(
                select(Customer.id, Customer.display_name).where(Customer.erased_at.is_(None))
            ).all()
        return {int(cid): str(name or "") for cid, name in rows}

    def correction_texts(self, conversation_id: int) -> list[str]:
        """The corrected texts of this conversation's corrections that are not revoked: written for
        its customer, they may hold that customer's own details."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Correction.corrected).where(
                        Correction.conversation_id == conversation_id, Correction.status != "revoked"
                    )
                ).all()
            )
