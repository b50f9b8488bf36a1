"""Erasing a customer or a sender: every row that holds their words or details."""

from __future__ import annotations

from knowledge.store.base import StoreBase


class ErasureQueries(StoreBase):
    """Queries that find and erase personal data."""
