"""The store of record: every database query of the product lives in this package.

`Store` wraps one SQLAlchemy engine. Its methods come in groups, one module each, so a newcomer
finds a query by what it is about; callers see one object and never touch SQLAlchemy. Methods are
synchronous and short; the bot calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

from knowledge.store.base import make_engine, migrate
from knowledge.store.conversations import ConversationQueries
from knowledge.store.corrections import CorrectionQueries
from knowledge.store.erasure import ErasureQueries
from knowledge.store.gauges import GaugeQueries
from knowledge.store.queues import QueueQueries
from knowledge.store.reports import ReportQueries, Stats
from knowledge.store.review import ReviewQueries
from knowledge.store.state import StateQueries
from knowledge.store.training import TrainingQueries

__all__ = ["Stats", "Store", "make_engine", "migrate"]


class Store(
    ConversationQueries,
    CorrectionQueries,
    QueueQueries,
    StateQueries,
    ReportQueries,
    ReviewQueries,
    GaugeQueries,
    TrainingQueries,
    ErasureQueries,
):
    """Typed access to the database. One instance per process; thread-safe through its sessions."""
