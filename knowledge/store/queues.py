"""Exactly-once delivery: handled updates, the inbox of received updates and the outbox of sends."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from knowledge.models import (
    InboxItem,
    OutboxItem,
    ProcessedUpdate,
    utcnow,
)
from knowledge.store.base import StoreBase

log = logging.getLogger(__name__)

# Outbox items not yet delivered: waiting, or claimed by a replica that is sending them right now.
_UNSENT = ("pending", "sending")
# ... and "scheduled": an item enqueued with `not_before`, not yet due. It is not in the depth (it is
# not late) and not read by pending_outbox until due, so a week of scheduled items never fills a
# drain round; once due it is delivered like any pending item.
_CLAIMABLE = (*_UNSENT, "scheduled")


class QueueQueries(StoreBase):
    """What came in and is not yet handled, and what goes out and is not yet sent."""

    # --- exactly-once and outbox -------------------------------------------------------
    def claim_update(self, channel: str, update_id: str) -> bool:
        """True the first time (channel, update_id) is seen, in this process or any replica."""
        try:
            with self.session() as s:
                s.add(ProcessedUpdate(channel=channel, update_id=str(update_id)))
            return True
        except IntegrityError:
            return False

    # --- inbox: updates received, not yet handled ------------------------------------------
    def inbox_put(self, channel: str, update_id: str, payload: dict[str, Any]) -> bool:
        """Keep a received update until it is handled. False when it was handled or is already kept."""
        try:
            with self.session() as s:
                if _processed(s, channel, update_id):
                    return False
                s.add(InboxItem(channel=channel, update_id=update_id, payload=payload))
            return True
        except IntegrityError:
            return False

    def inbox_claim(
        self, channel: str, update_id: str, lease_s: float, payload: dict[str, Any] | None = None
    ) -> int | None:
        """Take an update for handling: its attempt number for exactly one caller, None for the others.

        None also when it was handled already (in `processed_updates`). An update not in the inbox
        yet (long polling) is added, claimed. A claim lasts `lease_s`; after that, a process that
        died while handling it has lost it, and the update is handled again.
        """
        now = utcnow()
        until = now + dt.timedelta(seconds=lease_s)
        try:
            with self.session() as s:
                if _processed(s, channel, update_id):
                    return None
                result = s.execute(
                    update(InboxItem)
                    .where(
                        InboxItem.channel == channel,
                        InboxItem.update_id == update_id,
                        (InboxItem.lease_until.is_(None)) | (InboxItem.lease_until < now),
                    )
                    .values(lease_until=until, attempts=InboxItem.attempts + 1)
                    .returning(InboxItem.attempts)
                )
                attempts = result.scalar()
                if attempts is not None:
                    return int(attempts)
                exists = s.scalar(
                    select(InboxItem.id).where(InboxItem.channel == channel, InboxItem.update_id == update_id)
                )
                if exists is not None or payload is None:
                    return None  # another process holds it
                s.add(
                    InboxItem(
                        channel=channel, update_id=update_id, payload=payload, lease_until=until, attempts=1
                    )
                )
            return 1
        except IntegrityError:
            return None

    def inbox_done(self, channel: str, update_id: str) -> None:
        """The update is handled: out of the inbox, into `processed_updates`, in one transaction."""
        try:
            with self.session() as s:
                s.execute(
                    delete(InboxItem).where(InboxItem.channel == channel, InboxItem.update_id == update_id)
                )
                s.add(ProcessedUpdate(channel=channel, update_id=update_id))
        except IntegrityError:  # two holders (an expired lease) finished it; once is recorded
            with self.session() as s:
                s.execute(
                    delete(InboxItem).where(InboxItem.channel == channel, InboxItem.update_id == update_id)
                )

    def inbox_due(self, channel: str, older_than_s: float, limit: int = 100) -> list[InboxItem]:
        """Updates nobody handles: never claimed for `older_than_s`, or whose claim ran out. Oldest first."""
        now = utcnow()
        with self.session() as s:
            return list(
                s.scalars(
                    select(InboxItem)
                    .where(
                        InboxItem.channel == channel,
                        (
                            InboxItem.lease_until.is_(None)
                            & (InboxItem.created_at < now - dt.timedelta(seconds=older_than_s))
                        )
                        | (InboxItem.lease_until < now),
                    )
                    .order_by(InboxItem.id)
                    .limit(limit)
                ).all()
            )

    def enqueue(
        self,
        channel: str,
        kind: str,
        payload: dict[str, Any],
        key: str = "",
        not_before: dt.datetime | None = None,
    ) -> int:
        """Queue an item; with `not_before` (naive UTC, or aware) it is not delivered before then.

        A scheduled item should have a key of its own: until it is due, later items of its key wait.
        """
        with self.session() as s:
            item = OutboxItem(channel=channel, kind=kind, payload=payload, key=key)
            if not_before is not None:
                if not_before.tzinfo is not None:
                    not_before = not_before.astimezone(dt.UTC).replace(tzinfo=None)
                item.status, item.next_attempt_at = "scheduled", not_before
            s.add(item)
            s.flush()
            return item.id

    def pending_outbox(self, channel: str, limit: int = 200) -> list[OutboxItem]:
        """Undelivered items of a channel, oldest first (due or not, claimed or not: the caller keeps
        keys in order)."""
        with self.session() as s:
            due = or_(OutboxItem.status.in_(_UNSENT), OutboxItem.next_attempt_at <= utcnow())
            return list(
                s.scalars(
                    select(OutboxItem)
                    .where(OutboxItem.channel == channel, OutboxItem.status.in_(_CLAIMABLE), due)
                    .order_by(OutboxItem.id)
                    .limit(limit)
                ).all()
            )

    def claim_outbox(self, item_id: int, lease_s: float) -> bool:
        """Take a due item for delivery: True for exactly one caller among all replicas.

        The item becomes "sending" until `lease_s` from now; a replica that dies mid-send leaves it
        to be claimed again after the lease (at-least-once, never two senders at the same time).
        """
        now = utcnow()
        with self.session() as s:
            result = s.execute(
                update(OutboxItem)
                .where(
                    OutboxItem.id == item_id,
                    OutboxItem.status.in_(_CLAIMABLE),
                    OutboxItem.next_attempt_at <= now,
                )
                .values(status="sending", next_attempt_at=now + dt.timedelta(seconds=lease_s))
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def outbox_done(self, item_id: int) -> None:
        with self.session() as s:
            s.execute(update(OutboxItem).where(OutboxItem.id == item_id).values(status="sent"))

    def outbox_retry(self, item_id: int, delay_s: float, error: str) -> None:
        """Back to "pending" (nobody is sending it) until `delay_s` from now."""
        with self.session() as s:
            s.execute(
                update(OutboxItem)
                .where(OutboxItem.id == item_id)
                .values(
                    status="pending",
                    attempts=OutboxItem.attempts + 1,
                    next_attempt_at=utcnow() + dt.timedelta(seconds=delay_s),
                    last_error=error[:500],
                )
            )

    def outbox_has(self, channel: str, message_id: int, kind: str | None = None) -> bool:
        """Whether an item (queued or sent) for this stored message exists, so a resumed answer is
        not queued twice. Scans JSON payloads: for the rare resume path only."""
        with self.session() as s:
            q = select(OutboxItem.id).where(
                OutboxItem.channel == channel, OutboxItem.payload["message_id"].as_integer() == message_id
            )
            if kind is not None:
                q = q.where(OutboxItem.kind == kind)
            return s.scalar(q.limit(1)) is not None

    def outbox_depths(self, channel: str | None = None) -> dict[str, int]:
        """Undelivered items (waiting or being sent) per channel, of `channel` only when given;
        channels with none are left out. Scheduled items not yet due are not late, so not counted."""
        with self.session() as s:
            q = select(OutboxItem.channel, func.count(OutboxItem.id)).where(OutboxItem.status.in_(_UNSENT))
            if channel:
                q = q.where(OutboxItem.channel == channel)
            rows = s.execute(q.group_by(OutboxItem.channel)).all()
        return {str(name): int(n) for name, n in rows}

    def outbox_depth(self, channel: str | None = None) -> int:
        """Undelivered items of `channel`, or of every channel."""
        return sum(self.outbox_depths(channel).values())


def _processed(s: Session, channel: str, update_id: str) -> bool:
    """Whether this update was handled already (a row in processed_updates)."""
    done = s.scalar(
        select(ProcessedUpdate.id).where(
            ProcessedUpdate.channel == channel, ProcessedUpdate.update_id == update_id
        )
    )
    return done is not None
