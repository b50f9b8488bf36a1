"""Rate limits every replica agrees on: counted in the database, forgotten when their window ends.

The conversation flow asks before it spends anything on a customer (a reply, a relay to staff, a
model call) and before it pings the on-call group. A window starts at a key's first hit and lasts
`window_s`; `Store.rate_hit` counts in one atomic upsert, so replicas behind one load balancer share
one count, and a restart forgets nothing. Ended windows are deleted every `sweep_every_s` by whichever
process is writing, so the table holds only the keys active in the last window, not every customer
ever seen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from knowledge.store import Store

log = logging.getLogger(__name__)

CUSTOMER_WINDOW_S = 60.0  # APPRENTICE_RATE_LIMIT_PER_MINUTE counts messages in this window
ONCALL_WINDOW_S = 600.0  # one on-call ping per conversation in this window

Verdict = Literal["ok", "notice", "drop"]


def verdict(count: int, limit: int) -> Verdict:
    """Within the limit: "ok". The first hit over it: "notice" (tell the customer once). Later: "drop"."""
    if limit <= 0 or count <= limit:
        return "ok"
    return "notice" if count == limit + 1 else "drop"


class RateLimiter:
    """Counts hits per key in the store; deletes ended windows now and then."""

    def __init__(self, store: Store, sweep_every_s: float = 60.0) -> None:
        self.store = store
        self.sweep_every_s = sweep_every_s
        self._next_sweep = 0.0  # the first hit sweeps what earlier runs left

    async def hit(self, key: str, window_s: float) -> int:
        """Count one hit; the hits of `key` in its current window, this one included."""
        count = await asyncio.to_thread(self.store.rate_hit, key[:200], window_s)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_every_s
            try:
                await asyncio.to_thread(self.store.rate_expire)
            except Exception as exc:  # the next sweep tries again; counting is what matters
                log.warning("could not delete ended rate-limit windows: %s", type(exc).__name__)
        return count


__all__ = ["CUSTOMER_WINDOW_S", "ONCALL_WINDOW_S", "RateLimiter", "Verdict", "verdict"]
