"""SQLAlchemy models: the storage of record for conversations and what staff taught the bot.

The schema is created only by the Alembic migrations in `knowledge/migrations/`; these
classes describe it for queries. Nothing here assumes SQLite: PostgreSQL runs the same code.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = (UniqueConstraint("channel", "external_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    display_name: Mapped[str] = mapped_column(String(256), default="")
    # the channel profile (Telegram's @username; a phone only when they shared their own contact):
    # datasets redact these from the customer's lessons
    username: Mapped[str] = mapped_column(String(256), default="", server_default="")
    phone: Mapped[str] = mapped_column(String(64), default="", server_default="")
    unreachable: Mapped[bool] = mapped_column(Boolean, default=False)
    erased_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (UniqueConstraint("channel", "chat_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    channel: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(128))
    # "bot" while the bot answers, "human" after staff took over.
    mode: Mapped[str] = mapped_column(String(16), default="bot")
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    review_thread: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("conversation_id", "external_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    # customer | bot | staff | system
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    # The channel's own id of the inbound message (dedup), or of the sent reply.
    external_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reply_to_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    # Customer messages: the channel's id of the person who sent it (Telegram from_user.id); in a
    # group chat that is not always the conversation's customer. NULL for replies and old rows.
    sender_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    # Customer messages: what it was searched as (bot/query.py) where that is not `text`, e.g. a
    # follow-up after the question it follows; the datasets train it under this. NULL otherwise.
    search_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    sources: Mapped[list[Any]] = mapped_column(JSON, default=list)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    adapter_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # "ok", "unsure" (nothing relevant found), "error" (model failed), "refused", "relayed",
    # "limited" (over the customer's rate limit: neither answered nor relayed); system notices:
    # "notice", "handoff", "courtesy" (the reply to "hi" or "thanks", bot/courtesy.py)…
    status: Mapped[str] = mapped_column(String(16), default="ok")
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    approved: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("message_id", "actor", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    # up | down (customers), approve | flag (staff)
    kind: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Correction(Base):
    __tablename__ = "corrections"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True, index=True)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"), nullable=True)
    # Idempotency key: a retried Slack submit or a double click stores one correction.
    request_key: Mapped[str | None] = mapped_column(String(128), nullable=True, unique=True)
    question: Mapped[str] = mapped_column(Text)
    original: Mapped[str] = mapped_column(Text)
    corrected: Mapped[str] = mapped_column(Text)
    staff: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(64), default="other")
    # active | pending (needs a second approval) | revoked
    status: Mapped[str] = mapped_column(String(16), default="active")
    remember: Mapped[bool] = mapped_column(Boolean, default=True)
    approved_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class TrainingRun(Base):
    __tablename__ = "training_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # running | skipped | failed | rejected | promoted
    status: Mapped[str] = mapped_column(String(16), default="running")
    candidate_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    examples: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")


class Adapter(Base):
    __tablename__ = "adapters"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(String(256))
    base_hash: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class RegistryState(Base):
    """One row (id=1): the active adapter pointer. Changing it is one transaction."""

    __tablename__ = "registry_state"
    id: Mapped[int] = mapped_column(primary_key=True)
    active_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ProcessedUpdate(Base):
    """Channel updates already handled (Telegram update_id, Slack event id): exactly-once across restarts."""

    __tablename__ = "processed_updates"
    __table_args__ = (UniqueConstraint("channel", "update_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    update_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class InboxItem(Base):
    """A channel update received but not yet fully handled (its replies not yet in the outbox).

    `lease_until` is set while a process works on it; a row whose lease ran out (the process died)
    is taken up again. Done rows move to `processed_updates`.
    """

    __tablename__ = "inbox"
    __table_args__ = (UniqueConstraint("channel", "update_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), index=True)
    update_id: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class OutboxItem(Base):
    """A message owed to a channel (customer reply, Slack card). Deleted only once delivered."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    # Items of one ordering key are delivered in id order.
    key: Mapped[str] = mapped_column(String(128), default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # pending | sending (claimed) | sent | dead | folded (listed in a Slack digest item instead)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128), default="")
    before: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    after: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Lock(Base):
    """Named leases (the nightly job): several replicas share one database, one holds the lock."""

    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class KvState(Base):
    """Small persisted values (the generated webhook secret, last nightly run)."""

    __tablename__ = "kv_state"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RateLimit(Base):
    """One rate-limit window (a customer's messages, a conversation's on-call ping), shared by replicas.

    `count` hits since `window_start`; the window ends at `expires_at`, and a hit after that starts a
    new one (one atomic upsert, `Store.rate_hit`). Rows of ended windows are deleted periodically.
    """

    __tablename__ = "rate_limits"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    window_start: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


class CsatAsk(Base):
    """The "Did this solve your problem?" question of one conversation (asked once, ever).

    The row is the claim: the sweeper inserts it before sending, so a restart or a second replica
    finds it and never asks twice. `answer` is "yes" or "no" once the customer replies.
    """

    __tablename__ = "csat_asks"
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), primary_key=True)
    # the bot answer the question follows
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    asked_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    answer: Mapped[str | None] = mapped_column(String(8), nullable=True)
    answered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
