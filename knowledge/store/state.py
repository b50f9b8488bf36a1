"""Shared state of the replicas: the audit log, key-value pairs, named leases and rate windows."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import case, delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from knowledge.models import (
    AuditEntry,
    KvState,
    Lock,
    RateLimit,
    utcnow,
)
from knowledge.store.base import StoreBase

log = logging.getLogger(__name__)


class StateQueries(StoreBase):
    """What replicas share besides conversations: audit, kv, leases, rate windows."""

    # --- audit, kv, locks -------------------------------------------------------------
    def audit(
        self,
        actor: str,
        action: str,
        target: str = "",
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> None:
        with self.session() as s:
            s.add(
                AuditEntry(actor=actor, action=action, target=target, before=before or {}, after=after or {})
            )

    def get_kv(self, key: str) -> str | None:
        with self.session() as s:
            row = s.get(KvState, key)
            return row.value if row else None

    def set_kv(self, key: str, value: str) -> None:
        with self.session() as s:
            row = s.get(KvState, key)
            if row is None:
                s.add(KvState(key=key, value=value))
            else:
                row.value = value

    def setdefault_kv(self, key: str, value: str) -> str:
        """Store `value` unless the key exists; return the stored value (replicas racing agree on one)."""
        try:
            with self.session() as s:
                row = s.get(KvState, key)
                if row is not None:
                    return row.value
                s.add(KvState(key=key, value=value))
            return value
        except IntegrityError:  # another replica stored it first
            stored = self.get_kv(key)
            if stored is None:
                raise
            return stored

    def acquire_lock(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew a named lease; False while another holder's lease is still valid."""
        now = utcnow()
        expires = now + dt.timedelta(seconds=ttl_s)
        try:
            with self.session() as s:
                lock = s.get(Lock, name, with_for_update=True)
                if lock is None:
                    s.add(Lock(name=name, holder=holder, expires_at=expires))
                    return True
                if lock.holder != holder and lock.expires_at > now:
                    return False
                lock.holder, lock.expires_at = holder, expires
                return True
        except IntegrityError:
            return False

    def release_lock(self, name: str, holder: str) -> None:
        with self.session() as s:
            lock = s.get(Lock, name)
            if lock is not None and lock.holder == holder:
                s.delete(lock)

    # --- rate limits, shared by replicas -------------------------------------------------
    def rate_hit(self, key: str, window_s: float, now: dt.datetime | None = None) -> int:
        """Count one hit of `key`; the number of hits in its current window, this one included.

        A window starts at the first hit and lasts `window_s`; the first hit after it ends starts
        a new one at 1. One atomic INSERT ... ON CONFLICT DO UPDATE ... RETURNING (SQLite and
        PostgreSQL alike), so replicas hitting the same key at once each get a different count.
        """
        now = now or utcnow()
        ends = now + dt.timedelta(seconds=window_s)
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        ins = dialect.insert(RateLimit).values(key=key, window_start=now, expires_at=ends, count=1)
        over = RateLimit.expires_at <= now  # the stored window has ended: this hit starts a new one
        stmt = ins.on_conflict_do_update(
            index_elements=[RateLimit.key],
            set_={
                "count": case((over, 1), else_=RateLimit.count + 1),
                "window_start": case((over, ins.excluded.window_start), else_=RateLimit.window_start),
                "expires_at": case((over, ins.excluded.expires_at), else_=RateLimit.expires_at),
            },
        ).returning(RateLimit.count)
        with self.session() as s:
            return int(s.execute(stmt).scalar_one())

    def rate_expire(self, now: dt.datetime | None = None) -> int:
        """Delete the windows that have ended (their keys start afresh anyway); how many went."""
        with self.session() as s:
            result = s.execute(delete(RateLimit).where(RateLimit.expires_at <= (now or utcnow())))
            return int(getattr(result, "rowcount", 0) or 0)
