"""What the nightly job reads and writes: dataset rows, trust holds, adapter records."""

from __future__ import annotations

from knowledge.store.base import StoreBase


class TrainingQueries(StoreBase):
    """Queries of the learning loop: datasets, the two-person rule, the adapter registry."""
