"""`apprentice forget CUSTOMER`: erase one customer's data and say which adapters learned from it.

What erasure does, and why each step is there:

- **Conversations**: every message of the customer's conversations (theirs, the bot's, staff's)
  loses its text and sources; the rows stay so feedback, corrections and answer counts keep
  their shape. Flag reasons staff typed about those answers are cleared too.
- **The customer**: name cleared, channel id replaced by `erased:<id>`, `erased_at` set. Their
  conversations' chat ids are replaced the same way, so if they write again they start afresh
  instead of landing in the erased record.
- **Corrections** made in their conversations are revoked, emptied and removed from the
  correction memory (their question is the memory's key). Dataset building already skips
  erased customers, revoked corrections and paraphrases from erased conversations.
- **Outbox and audit log**: queued and sent items for their conversations are deleted (they hold
  reply texts); audit entries about their messages keep who did what, but not the text.
- **Lineage**: each dataset manifest records, row by row, the store ids and the conversations a
  row came from. An adapter trained on a dataset with one of this customer's rows (or started
  from such an adapter) is listed. Weights cannot be un-trained: roll back or retrain without
  them (`apprentice retrain --force` now builds datasets without the customer). The dataset
  folders on disk that still hold their (redacted) text are listed for deletion.

Slack keeps its own copy of the review threads; their ids are listed so they can be deleted there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, or_, select, update

from knowledge.models import (
    Adapter,
    AuditEntry,
    Conversation,
    Correction,
    Customer,
    Feedback,
    Message,
    OutboxItem,
    utcnow,
)
from learning.registry import pointer

if TYPE_CHECKING:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store

log = logging.getLogger(__name__)


class CustomerNotFound(LookupError):
    """No customer matches the given reference."""


@dataclass
class ForgetReport:
    """What `forget` found and did (printed by the CLI, also as JSON)."""

    customers: list[str]
    conversations: list[int]
    messages_erased: int = 0
    corrections_revoked: list[int] = field(default_factory=list)
    outbox_items_deleted: int = 0
    audit_entries_scrubbed: int = 0
    adapters_trained_on_them: list[str] = field(default_factory=list)
    active_adapter_affected: bool = False
    datasets_with_their_data: list[str] = field(default_factory=list)
    manifests_unreadable: list[str] = field(default_factory=list)
    slack_threads: list[str] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_customers(store: Store, ref: str) -> list[Customer]:
    """Customers matching `ref`: "channel:external_id", an external id on any channel, or "#<row id>"."""
    ref = ref.strip()
    with store.session() as s:
        if ref.startswith("#") and ref[1:].isdigit():
            row = s.get(Customer, int(ref[1:]))
            return [row] if row is not None else []
        channel, sep, external = ref.partition(":")
        if sep and channel and external:
            rows = s.scalars(
                select(Customer).where(Customer.channel == channel, Customer.external_id == external)
            ).all()
            if rows:
                return list(rows)
        return list(s.scalars(select(Customer).where(Customer.external_id == ref)).all())


def _lineage_hits(manifest: dict[str, Any], ids: set[str], conversations: set[int]) -> bool:
    lineage = manifest.get("lineage", {})
    for entry in [*lineage.get("sft", []), *lineage.get("dpo", [])]:
        if ids.intersection(entry.get("ids", [])):
            return True
        if conversations.intersection(entry.get("conversations", [])):
            return True
    return False


def trained_on(
    store: Store, ids: set[str], conversations: set[int]
) -> tuple[list[str], list[str], list[str]]:
    """(adapter versions, dataset folders, unreadable manifests) touching these store ids/conversations.

    An adapter counts when its own dataset has such a row, or when it was trained on top of
    (`init_adapter`) an adapter that counts.
    """
    with store.session() as s:
        adapters = list(s.scalars(select(Adapter).order_by(Adapter.id)).all())
    hit_paths: set[str] = set()
    versions: list[str] = []
    datasets: list[str] = []
    unreadable: list[str] = []
    for adapter in adapters:  # oldest first: a parent is decided before its children
        meta = adapter.meta or {}
        folder = str(meta.get("dataset") or "")
        hit = False
        if folder:
            try:
                manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                unreadable.append(folder)
            else:
                if _lineage_hits(manifest, ids, conversations):
                    hit = True
                    if folder not in datasets:
                        datasets.append(folder)
        if meta.get("init_adapter") and str(meta["init_adapter"]) in hit_paths:
            hit = True
        if hit:
            versions.append(adapter.version)
            hit_paths.add(str(adapter.path))
    return versions, datasets, unreadable


def forget_customer(
    store: Store, kb: KnowledgeBase | None, ref: str, actor: str = "cli", dry_run: bool = False
) -> ForgetReport:
    """Erase the customer(s) matching `ref` (see the module docstring). Raises CustomerNotFound."""
    customers = find_customers(store, ref)
    if not customers:
        raise CustomerNotFound(
            f"No customer matches {ref!r}. Use CHANNEL:ID as the bot sees it (for example telegram:12345), "
            "or #ROW from the customers table."
        )
    cust_ids = [c.id for c in customers]
    with store.session() as s:
        convs = list(s.scalars(select(Conversation).where(Conversation.customer_id.in_(cust_ids))).all())
        conv_ids = [c.id for c in convs]
        msg_ids = list(s.scalars(select(Message.id).where(Message.conversation_id.in_(conv_ids))).all())
        corr_ids = list(
            s.scalars(
                select(Correction.id).where(
                    or_(Correction.conversation_id.in_(conv_ids), Correction.message_id.in_(msg_ids))
                )
            ).all()
        )
    lineage_ids = {f"message:{m}" for m in msg_ids} | {f"correction:{c}" for c in corr_ids}
    versions, datasets, unreadable = trained_on(store, lineage_ids, set(conv_ids))
    report = ForgetReport(
        customers=[f"{c.channel}:{c.external_id}" for c in customers],
        conversations=conv_ids,
        messages_erased=len(msg_ids),
        corrections_revoked=corr_ids,
        adapters_trained_on_them=versions,
        active_adapter_affected=pointer(store).active in versions,
        datasets_with_their_data=datasets,
        manifests_unreadable=unreadable,
        slack_threads=[c.review_thread for c in convs if c.review_thread],
        dry_run=dry_run,
    )
    if dry_run:
        return report
    chats = {(c.channel, c.chat_id) for c in convs}
    now = utcnow()
    with store.session() as s:
        s.execute(
            update(Message).where(Message.id.in_(msg_ids)).values(text="", sources=[], external_id=None)
        )
        s.execute(update(Feedback).where(Feedback.message_id.in_(msg_ids)).values(reason=""))
        s.execute(
            update(Correction)
            .where(Correction.id.in_(corr_ids))
            .values(question="", original="", corrected="", status="revoked", revoked_at=now)
        )
        for conv in convs:
            s.execute(
                update(Conversation).where(Conversation.id == conv.id).values(chat_id=f"erased:{conv.id}")
            )
        for cust in customers:
            s.execute(
                update(Customer)
                .where(Customer.id == cust.id)
                .values(display_name="", external_id=f"erased:{cust.id}", erased_at=now)
            )
        report.outbox_items_deleted = _delete_outbox(s, chats, set(conv_ids), set(msg_ids))
        report.audit_entries_scrubbed = _scrub_audit(s, conv_ids, msg_ids, corr_ids)
        s.add(
            AuditEntry(
                actor=actor,
                action="forget",
                target=f"customers:{','.join(str(i) for i in cust_ids)}",
                after={
                    "conversations": len(conv_ids),
                    "messages": len(msg_ids),
                    "corrections": corr_ids,
                    "adapters_trained_on_them": versions,
                    "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                },
            )
        )
    if kb is not None:
        for cid in corr_ids:
            kb.forget(cid)
    log.warning(
        "erased %d customer record(s): %d conversations, %d messages, %d corrections",
        len(cust_ids), len(conv_ids), len(msg_ids), len(corr_ids),
    )  # fmt: skip
    return report


def _delete_outbox(s: Any, chats: set[tuple[str, str]], conv_ids: set[int], msg_ids: set[int]) -> int:
    """Outbox items (queued or sent) that carry this customer's texts."""
    doomed = []
    for item in s.scalars(select(OutboxItem)).all():
        payload = item.payload or {}
        if (
            (item.channel, str(payload.get("chat_id"))) in chats
            or payload.get("conversation_id") in conv_ids
            or payload.get("message_id") in msg_ids
        ):
            doomed.append(item.id)
    if doomed:
        s.execute(delete(OutboxItem).where(OutboxItem.id.in_(doomed)))
    return len(doomed)


def _scrub_audit(s: Any, conv_ids: list[int], msg_ids: list[int], corr_ids: list[int]) -> int:
    """Audit entries about these records keep actor, action and target, but lose any text."""
    targets = (
        [f"conversation:{i}" for i in conv_ids]
        + [f"message:{i}" for i in msg_ids]
        + [f"correction:{i}" for i in corr_ids]
    )
    n = 0
    for entry in s.scalars(select(AuditEntry).where(AuditEntry.target.in_(targets))).all():
        entry.before = {k: ("" if k == "text" else v) for k, v in (entry.before or {}).items()}
        entry.after = {k: ("" if k in ("text", "reason") else v) for k, v in (entry.after or {}).items()}
        n += 1
    return n


__all__ = ["CustomerNotFound", "ForgetReport", "find_customers", "forget_customer", "trained_on"]
