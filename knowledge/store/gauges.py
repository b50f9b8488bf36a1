"""Figures the metrics endpoint and the output guard read from the database."""

from __future__ import annotations

from knowledge.store.base import StoreBase


class GaugeQueries(StoreBase):
    """Gauges for /metrics and the lookups of the output guard."""
