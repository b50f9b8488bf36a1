"""Durable delivery: what could not be sent now waits in the database and is retried in order.

A channel enqueues an item (a customer reply, a Slack card) and the drainer delivers due
items oldest first with exponential backoff. An item leaves the outbox only when delivered,
so an outage or a restart never loses a message. `Retry(after)` honours a server's Retry-After;
`Retry(after, hold=True)` says the limit covers the whole channel (Slack allows about one message a
second per channel), so the drainer sends nothing at all until then instead of trying every other
item into the same limit. A `rank` lets urgent items overtake others (Slack: flagged answers' cards
before the rest) without reordering any one key.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from knowledge.models import OutboxItem, utcnow
from knowledge.store import Store

log = logging.getLogger(__name__)


class Retry(Exception):
    """Raised by a sender: try this item again after `after` seconds (None: backoff).

    `hold`: the whole channel waits `after` seconds (a per-channel rate limit), not just this item.
    """

    def __init__(self, reason: str, after: float | None = None, *, hold: bool = False) -> None:
        super().__init__(reason)
        self.after, self.hold = after, hold


class Drop(Exception):
    """Raised by a sender: this item can never be delivered (e.g. the user blocked the bot)."""


Sender = Callable[[str, dict[str, Any]], Awaitable[None]]
T = TypeVar("T")


class Outbox:
    """Delivers one channel's outbox items with `send(kind, payload)`."""

    def __init__(
        self,
        store: Store,
        channel: str,
        send: Sender,
        *,
        poll_s: float = 1.0,
        base_delay_s: float = 1.0,
        max_delay_s: float = 300.0,
        lease_s: float = 120.0,
        before_round: Callable[[], Awaitable[None]] | None = None,
        rank: Callable[[OutboxItem], int] | None = None,
        batch: int = 200,
    ) -> None:
        self.store, self.channel, self.send = store, channel, send
        # called at the start of every round (the Slack channel folds its review backlog there)
        self.before_round = before_round
        # lower ranks go first (see by_rank); `batch` items are read per round, oldest first
        self.rank, self.batch = rank, batch
        self._held_until = 0.0  # time.monotonic() before which a Retry(hold=True) stops all sending
        self.lease_s = lease_s  # a claimed item is retried by any replica after this (sender died)
        self.poll_s, self.base_delay_s, self.max_delay_s = poll_s, base_delay_s, max_delay_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Its own database thread: between "the API accepted the message" and "recorded as sent" a
        # crash means a second send, so that step must not queue behind slow work (retrieval,
        # embeddings) in the shared default thread pool.
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"outbox-{channel}")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def put(
        self, kind: str, payload: dict[str, Any], key: str = "", not_before: dt.datetime | None = None
    ) -> int:
        """Persist an item and wake the drainer. Returns the item id. With `not_before` the item is
        scheduled: not sent before then (give it a key of its own; see Store.enqueue)."""
        item_id = await self._call(self.store.enqueue, self.channel, kind, payload, key, not_before)
        self._wake.set()
        return item_id

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-{self.channel}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def drain_once(self) -> int:
        """Try every due item once, in order; returns how many were delivered.

        Items sharing a key stay in order: after one fails, later items of that key wait.
        A `Retry(hold=True)` ends the round: every other item would meet the same limit.
        """
        if self.before_round is not None:
            await self.before_round()
        items = await self._call(self.store.pending_outbox, self.channel, self.batch)
        if self.rank is not None:
            items = by_rank(items, self.rank)
        now = utcnow()
        blocked: set[str] = set()
        delivered = 0
        for item in items:
            if item.key and item.key in blocked:
                continue
            if item.next_attempt_at > now:
                if item.key:
                    blocked.add(item.key)
                continue
            # Several replicas drain one table: only the one that claims the item sends it.
            if not await self._call(self.store.claim_outbox, item.id, self.lease_s):
                if item.key:
                    blocked.add(item.key)
                continue
            try:
                await self.send(item.kind, item.payload)
            except Drop as exc:
                log.warning("outbox %s item %s dropped: %s", self.channel, item.id, exc)
                await self._call(self.store.outbox_done, item.id)
                await asyncio.to_thread(
                    self.store.audit,
                    "system",
                    "outbox_drop",
                    f"outbox:{item.id}",
                    {},
                    {"reason": str(exc)[:200]},
                )
                continue
            except Exception as exc:
                after = exc.after if isinstance(exc, Retry) and exc.after is not None else None
                delay = (
                    after
                    if after is not None
                    else min(self.max_delay_s, self.base_delay_s * 2**item.attempts)
                )
                log.info(
                    "outbox %s item %s retry in %.1fs: %s", self.channel, item.id, delay, type(exc).__name__
                )
                await self._call(self.store.outbox_retry, item.id, delay, repr(exc))
                if isinstance(exc, Retry) and exc.hold:
                    self._held_until = time.monotonic() + delay
                    break
                if item.key:
                    blocked.add(item.key)
                continue
            await self._call(self.store.outbox_done, item.id)
            delivered += 1
        return delivered

    async def _run(self) -> None:
        while True:
            held = self._held_until - time.monotonic()
            if held > 0:  # the server's Retry-After for the whole channel: wake-ups cannot shorten it
                await asyncio.sleep(held)
            # cleared BEFORE draining: an item put while the drain runs wakes the next round at once
            self._wake.clear()
            try:
                await self.drain_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox %s drain failed", self.channel)
            try:
                # not asyncio.wait_for: on Python 3.11 it can swallow stop()'s cancel when the
                # wake-up lands at the same moment, and stop() then waits forever
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            except TimeoutError:
                pass


def by_rank(items: list[OutboxItem], rank: Callable[[OutboxItem], int]) -> list[OutboxItem]:
    """`items` (oldest first) by rank, then age. An item goes as early as the most urgent item of its
    key behind it, so the items of one key keep their order."""
    best: dict[str, int] = {}
    ranked = []
    for item in reversed(items):
        r = rank(item)
        if item.key:
            r = best[item.key] = min(r, best.get(item.key, r))
        ranked.append((r, item.id, item))
    return [item for _, _, item in sorted(ranked, key=lambda x: (x[0], x[1]))]
