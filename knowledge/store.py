"""The store of record: conversations, messages, feedback, corrections, runs and adapters.

`Store` wraps one SQLAlchemy engine. SQLite (WAL mode) is the embedded default and
PostgreSQL the scaled-out one; both run the same Alembic migrations and the same code.
Methods are synchronous and short; the bot calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import case, create_engine, delete, event, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from knowledge.models import (
    AuditEntry,
    Conversation,
    Correction,
    CsatAsk,
    Customer,
    Feedback,
    InboxItem,
    KvState,
    Lock,
    Message,
    OutboxItem,
    ProcessedUpdate,
    RateLimit,
    utcnow,
)

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 0x61707072  # "appr": the PostgreSQL advisory lock held while migrating

# Outbox items not yet delivered: waiting, or claimed by a replica that is sending them right now.
_UNSENT = ("pending", "sending")
# ... and "scheduled": an item enqueued with `not_before`, not yet due. It is not in the depth (it is
# not late) and not read by pending_outbox until due, so a week of scheduled items never fills a
# drain round; once due it is delivered like any pending item.
_CLAIMABLE = (*_UNSENT, "scheduled")


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: a failed statement's message (logged with its traceback) must not carry
        # the customer's text it was inserting
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)


@contextlib.contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """Processes sharing one SQLite file (serve + a CLI command) migrate one after the other."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    with open(f"{path}.migrate-lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def migrate(engine: Engine) -> None:
    """Bring the schema up to the newest migration (append-only, safe to run on every start)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("knowledge") / "migrations"))
    with _sqlite_migration_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas starting together: one migrates, the others wait here and find the schema current.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    """Typed access to the database. One instance per process; thread-safe through its sessions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    # --- customers and conversations --------------------------------------------------
    def conversation_for(
        self,
        channel: str,
        chat_id: str,
        customer_id: str,
        name: str = "",
        username: str = "",
        phone: str = "",
    ) -> Conversation:
        """The conversation of (channel, chat), creating it and its customer on first contact."""
        for _ in range(3):
            try:
                with self.session() as s:
                    conv = s.scalar(
                        select(Conversation).where(
                            Conversation.channel == channel, Conversation.chat_id == chat_id
                        )
                    )
                    if conv is not None:
                        if phone:  # shared later in the conversation: remember it for redaction
                            s.execute(
                                update(Customer)
                                .where(Customer.channel == channel, Customer.external_id == customer_id)
                                .values(phone=phone[:64])
                            )
                        return conv
                    cust = s.scalar(
                        select(Customer).where(
                            Customer.channel == channel, Customer.external_id == customer_id
                        )
                    )
                    if cust is None:
                        cust = Customer(
                            channel=channel, external_id=customer_id, display_name=name[:256],
                            username=username[:256], phone=phone[:64],
                        )  # fmt: skip
                        s.add(cust)
                        s.flush()
                    conv = Conversation(customer_id=cust.id, channel=channel, chat_id=chat_id)
                    s.add(conv)
                    s.flush()
                    return conv
            except IntegrityError:  # another replica created it at the same moment
                continue
        raise RuntimeError(f"could not create conversation {channel}:{chat_id}")

    def conversation(self, conversation_id: int) -> Conversation | None:
        with self.session() as s:
            return s.get(Conversation, conversation_id)

    def customer(self, customer_id: int) -> Customer | None:
        with self.session() as s:
            return s.get(Customer, customer_id)

    def set_mode(self, conversation_id: int, mode: str) -> None:
        with self.session() as s:
            s.execute(update(Conversation).where(Conversation.id == conversation_id).values(mode=mode))

    def set_flagged(self, conversation_id: int, flagged: bool = True) -> None:
        with self.session() as s:
            s.execute(update(Conversation).where(Conversation.id == conversation_id).values(flagged=flagged))

    def set_review_thread(self, conversation_id: int, thread: str) -> None:
        with self.session() as s:
            s.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(review_thread=thread)
            )

    def mark_unreachable(self, channel: str, external_id: str) -> None:
        with self.session() as s:
            s.execute(
                update(Customer)
                .where(Customer.channel == channel, Customer.external_id == external_id)
                .values(unreachable=True)
            )

    # --- messages ---------------------------------------------------------------------
    def add_message(self, conversation_id: int, role: str, text: str, **fields: Any) -> Message:
        with self.session() as s:
            msg = Message(conversation_id=conversation_id, role=role, text=text, **fields)
            s.add(msg)
            s.flush()
            return msg

    def message(self, message_id: int) -> Message | None:
        with self.session() as s:
            return s.get(Message, message_id)

    def update_message(self, message_id: int, **fields: Any) -> None:
        with self.session() as s:
            s.execute(update(Message).where(Message.id == message_id).values(**fields))

    def history(self, conversation_id: int, limit: int) -> list[Message]:
        """The last `limit` messages of a conversation, oldest first."""
        with self.session() as s:
            rows = s.scalars(
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.id.desc())
                .limit(limit)
            ).all()
        return list(reversed(rows))

    def message_by_external(self, conversation_id: int, external_id: str) -> Message | None:
        """The message a channel delivered with this id in this conversation (redeliveries are found)."""
        with self.session() as s:
            return s.scalar(
                select(Message)
                .where(Message.conversation_id == conversation_id, Message.external_id == external_id)
                .limit(1)
            )

    def first_reply(self, message_id: int) -> Message | None:
        """The bot's answer or the notice sent in reply to a customer message (the first one)."""
        with self.session() as s:
            return s.scalar(
                select(Message)
                .where(Message.reply_to_id == message_id, Message.role.in_(("bot", "system")))
                .order_by(Message.id)
                .limit(1)
            )

    def followup_of(self, answer: Message, text: str) -> Message | None:
        """The staff follow-up that sent a correction of `answer` to the customer, if one was stored."""
        with self.session() as s:
            return s.scalar(
                select(Message)
                .where(
                    Message.conversation_id == answer.conversation_id,
                    Message.role == "staff",
                    Message.status == "correction",
                    Message.reply_to_id == answer.reply_to_id,
                    Message.text == text,
                )
                .limit(1)
            )

    def reply_to(self, message_id: int) -> Message | None:
        """The bot's answer to a customer message, if one was stored."""
        with self.session() as s:
            return s.scalar(
                select(Message).where(Message.reply_to_id == message_id, Message.role == "bot").limit(1)
            )

    # --- feedback ---------------------------------------------------------------------
    def add_feedback(self, message_id: int, kind: str, actor: str, reason: str = "") -> bool:
        """Store feedback once; returns False when the same actor already gave this kind."""
        try:
            with self.session() as s:
                s.add(Feedback(message_id=message_id, kind=kind, actor=actor, reason=reason))
                if kind == "approve":
                    s.execute(update(Message).where(Message.id == message_id).values(approved=True))
                elif kind in ("flag", "down"):
                    s.execute(update(Message).where(Message.id == message_id).values(flagged=True))
            return True
        except IntegrityError:
            return False

    def customer_ratings(self, conversation_id: int, limit: int) -> list[tuple[int, str]]:
        """The last `limit` customer ratings ("up"/"down") of this conversation's answers, newest
        first, as (message id, kind): two 👎 in a row hand the conversation to staff."""
        with self.session() as s:
            rows = s.execute(
                select(Feedback.message_id, Feedback.kind)
                .join(Message, Message.id == Feedback.message_id)
                .where(Message.conversation_id == conversation_id, Feedback.kind.in_(("up", "down")))
                .order_by(Feedback.id.desc())
                .limit(limit)
            ).all()
        return [(int(mid), str(kind)) for mid, kind in rows]

    # --- corrections ------------------------------------------------------------------
    def add_correction(
        self, *, audit: dict[str, Any] | None = None, **fields: Any
    ) -> tuple[Correction, bool]:
        """Store a correction; with a `request_key` a retry returns the first one and False.

        With `audit`, the "correct" audit entry is written in the same transaction, so a crash can
        leave neither a correction without its audit entry nor the reverse.
        """
        key = fields.get("request_key")
        try:
            with self.session() as s:
                corr = Correction(**fields)
                s.add(corr)
                s.flush()
                if audit is not None:
                    s.add(
                        AuditEntry(
                            actor=corr.staff,
                            action="correct",
                            target=f"message:{corr.message_id}",
                            before={"text": corr.original},
                            after={**audit, "text": corr.corrected, "correction_id": corr.id},
                        )
                    )
                return corr, True
        except IntegrityError:
            with self.session() as s:
                existing = s.scalar(select(Correction).where(Correction.request_key == key))
            if existing is None:
                raise
            return existing, False

    def correction(self, correction_id: int) -> Correction | None:
        with self.session() as s:
            return s.get(Correction, correction_id)

    def corrections(self, *, include_revoked: bool = False, limit: int | None = None) -> list[Correction]:
        with self.session() as s:
            q = select(Correction).order_by(Correction.id.desc())
            if not include_revoked:
                q = q.where(Correction.status != "revoked")
            if limit:
                q = q.limit(limit)
            return list(s.scalars(q).all())

    def approve_correction(self, correction_id: int, staff: str) -> tuple[Correction | None, str]:
        """A second staff member approves a pending correction (the two-person rule).

        Returns the correction and "approved", or the reason it was not: "missing", "not pending"
        or "same person" (the author cannot be the second person). An active correction nobody
        approved yet can be approved too: the dataset builder may hold one back (see
        learning/datasets.hold_back), and this is how a second person releases it.
        """
        with self.session() as s:
            corr = s.get(Correction, correction_id, with_for_update=True)
            if corr is None:
                return None, "missing"
            if corr.status == "revoked" or (corr.status == "active" and corr.approved_by):
                return corr, "not pending"
            if corr.staff == staff:
                return corr, "same person"
            before = corr.status
            corr.status, corr.approved_by = "active", staff
            s.add(
                AuditEntry(
                    actor=staff,
                    action="approve_correction",
                    target=f"correction:{correction_id}",
                    before={"status": before, "author": corr.staff},
                    after={"status": "active"},
                )
            )
            return corr, "approved"

    def revoke_correction(self, correction_id: int) -> Correction | None:
        with self.session() as s:
            corr = s.get(Correction, correction_id)
            if corr is None:
                return None
            corr.status = "revoked"
            corr.revoked_at = utcnow()
            return corr

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

    def outbox_depth(self, channel: str | None = None) -> int:
        with self.session() as s:
            q = select(func.count(OutboxItem.id)).where(OutboxItem.status.in_(_UNSENT))
            if channel:
                q = q.where(OutboxItem.channel == channel)
            return int(s.scalar(q) or 0)

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

    def counts_since(self, since: dt.datetime) -> dict[str, int]:
        """Numbers for status displays: conversations, answers and corrections since `since`."""
        with self.session() as s:
            return {
                "conversations": int(
                    s.scalar(
                        select(func.count(func.distinct(Message.conversation_id))).where(
                            Message.created_at >= since
                        )
                    )
                    or 0
                ),
                "answers": int(
                    s.scalar(
                        select(func.count(Message.id)).where(
                            Message.role == "bot", Message.created_at >= since
                        )
                    )
                    or 0
                ),
                "corrections": int(
                    s.scalar(select(func.count(Correction.id)).where(Correction.created_at >= since)) or 0
                ),
            }

    # --- satisfaction question (CSAT) and resolution figures -----------------------------
    def csat_due(
        self, quiet_s: float, now: dt.datetime, channels: list[str] | None = None, limit: int = 100
    ) -> list[tuple[int, int]]:
        """Conversations to ask "Did this solve your problem?": (conversation id, answer id).

        Those whose last message is a bot answer (status "ok") at least `quiet_s` old, still with
        the bot (not taken over), never asked before; only on `channels` when given.
        """
        last = (
            select(Message.conversation_id, func.max(Message.id).label("last_id"))
            .group_by(Message.conversation_id)
            .subquery()
        )
        q = (
            select(Message.conversation_id, Message.id)
            .join(last, last.c.last_id == Message.id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .outerjoin(CsatAsk, CsatAsk.conversation_id == Message.conversation_id)
            .where(
                Message.role == "bot",
                Message.status == "ok",
                Message.created_at <= now - dt.timedelta(seconds=quiet_s),
                Conversation.mode == "bot",
                CsatAsk.conversation_id.is_(None),
            )
            .order_by(Message.id)
            .limit(limit)
        )
        if channels is not None:
            q = q.where(Conversation.channel.in_(channels))
        with self.session() as s:
            return [(int(c), int(m)) for c, m in s.execute(q).all()]

    def claim_csat(
        self, conversation_id: int, message_id: int | None, now: dt.datetime | None = None
    ) -> bool:
        """Take the one question of this conversation: True for exactly one caller, ever (a row
        keyed by the conversation, inserted before the question is sent)."""
        try:
            with self.session() as s:
                when = now or utcnow()
                s.add(CsatAsk(conversation_id=conversation_id, message_id=message_id, asked_at=when))
            return True
        except IntegrityError:
            return False

    def record_csat(self, conversation_id: int, yes: bool, now: dt.datetime | None = None) -> bool:
        """The customer's answer; False when the conversation was not asked or answered already."""
        with self.session() as s:
            result = s.execute(
                update(CsatAsk)
                .where(CsatAsk.conversation_id == conversation_id, CsatAsk.answer.is_(None))
                .values(answer="yes" if yes else "no", answered_at=now or utcnow())
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def csat(self, conversation_id: int) -> CsatAsk | None:
        with self.session() as s:
            return s.get(CsatAsk, conversation_id)

    def stats(self, since: dt.datetime, now: dt.datetime | None = None) -> Stats:
        """Resolution figures of the conversations active in [since, now); see `Stats`."""
        now = now or utcnow()
        with self.session() as s:
            rows = s.execute(
                select(Message.conversation_id, Message.role, Message.status, Message.created_at)
                .where(Message.created_at >= since, Message.created_at < now)
                .order_by(Message.id)
            ).all()
            corrections = set(
                s.scalars(
                    select(Correction.conversation_id).where(
                        Correction.created_at >= since,
                        Correction.created_at < now,
                        Correction.conversation_id.is_not(None),
                    )
                ).all()
            )
            taken = s.scalars(
                select(AuditEntry.target).where(
                    AuditEntry.action == "take_over",
                    AuditEntry.created_at >= since,
                    AuditEntry.created_at < now,
                )
            ).all()
            asks = s.execute(
                select(CsatAsk.conversation_id, CsatAsk.answer).where(
                    CsatAsk.asked_at >= since, CsatAsk.asked_at < now
                )
            ).all()
        convs: set[int] = set()
        answered: set[int] = set()
        prefix = "conversation:"
        handed = {int(t[len(prefix) :]) for t in taken if t.startswith(prefix) and t[len(prefix) :].isdigit()}
        first_question: dict[int, dt.datetime] = {}
        waits: dict[int, float] = {}
        for cid, role, status, at in rows:
            if role == "customer":
                convs.add(cid)
                first_question.setdefault(cid, at)
            elif role == "bot" and status == "ok":
                answered.add(cid)
            elif (role == "system" and status == "handoff") or (role == "staff" and status != "correction"):
                handed.add(cid)
            if role in ("bot", "staff") and cid in first_question and cid not in waits:
                waits[cid] = (at - first_question[cid]).total_seconds()
        said = {int(cid): answer for cid, answer in asks}
        handed &= convs
        corrected = {int(c) for c in corrections if c is not None} & convs
        alone = answered - handed - corrected
        resolved = {c for c in answered if said.get(c) == "yes" or (said.get(c) != "no" and c in alone)}
        replies = [a for a in said.values() if a is not None]
        yes = sum(1 for a in replies if a == "yes")
        return Stats(
            since=since,
            until=now,
            conversations=len(convs),
            answered=len(answered & convs),
            answered_alone=len(alone & convs),
            handed_to_staff=len(handed),
            corrected=len(corrected),
            resolved=len(resolved & convs),
            csat_asked=len(said),
            csat_answered=len(replies),
            csat_yes=yes,
            median_first_answer_s=statistics.median(waits.values()) if waits else None,
        )


def _processed(s: Session, channel: str, update_id: str) -> bool:
    """Whether this update was handled already (a row in processed_updates)."""
    done = s.scalar(
        select(ProcessedUpdate.id).where(
            ProcessedUpdate.channel == channel, ProcessedUpdate.update_id == update_id
        )
    )
    return done is not None


@dataclass(frozen=True)
class Stats:
    """Resolution figures of the conversations with a customer message in [since, until).

    - `conversations`: conversations with at least one customer message in the window.
    - `answered`: of those, the ones the bot answered (a bot message with status "ok") in the window.
    - `handed_to_staff`: a hand-off notice (/human, plain words, repeats, two 👎), a take-over by
      staff, or a staff message to the customer (other than a correction) in the window.
    - `corrected`: a staff correction of one of its answers was stored in the window.
    - `answered_alone`: answered, neither handed to staff nor corrected.
    - `resolved`: answered, and the customer said Yes to "Did this solve your problem?", or did
      not say No and the conversation was answered alone.
    - `csat_*`: the questions asked in the window, those answered, the Yes answers.
    - `median_first_answer_s`: median, over conversations, of the time from the first customer
      message in the window to the first reply of the bot or staff after it.
    """

    since: dt.datetime
    until: dt.datetime
    conversations: int
    answered: int
    answered_alone: int
    handed_to_staff: int
    corrected: int
    resolved: int
    csat_asked: int
    csat_answered: int
    csat_yes: int
    median_first_answer_s: float | None

    @property
    def resolution_rate(self) -> float | None:
        """Resolved by the bot alone, out of all conversations (None without conversations)."""
        return self.resolved / self.conversations if self.conversations else None

    @property
    def csat(self) -> float | None:
        """The share of Yes among the answered questions (None when none was answered)."""
        return self.csat_yes / self.csat_answered if self.csat_answered else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"], out["until"] = self.since.isoformat(), self.until.isoformat()
        out["resolution_rate"], out["csat"] = self.resolution_rate, self.csat
        return out
