"""What the staff review desk reads and changes: cards, threads, staff commands."""

from __future__ import annotations

from knowledge.store.base import StoreBase


class ReviewQueries(StoreBase):
    """Queries of the review desk (Slack and the terminal's staff commands)."""
