"""One asyncio lock per key (a chat, a Slack thread), held only while someone uses it.

Messages of one chat must be handled in order while different chats run side by side. The locks
live in a `WeakValueDictionary`: a lock disappears once no task holds or waits on it, so a bot
that has seen a million chats keeps only the locks of the chats it is handling right now.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Hashable


class KeyedLocks:
    """`locks.get(key)` returns the lock for `key`, the same object while anyone still holds it."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[Hashable, asyncio.Lock] = weakref.WeakValueDictionary()

    def get(self, key: Hashable) -> asyncio.Lock:
        """The caller must keep the returned lock referenced (e.g. `async with`) for it to stay."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def __len__(self) -> int:
        """How many keys have a live lock: tests use it to see that finished chats let go."""
        return len(self._locks)
