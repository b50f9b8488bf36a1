"""Erasing a customer or a sender: every row that holds their words or details.

`learning/privacy.py` (`apprentice forget`) decides what erasure means and handles the files on
disk; the rows are found (`erasure_plan`) and changed (`erase`) here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from knowledge.models import (
    AuditEntry,
    Conversation,
    Correction,
    Customer,
    Feedback,
    InboxItem,
    Message,
    OutboxItem,
    RateLimit,
    utcnow,
)
from knowledge.store.base import StoreBase

ERASED = "[erased]"  # what copies of an erased correction in other customers' answers now say


@dataclass
class ErasurePlan:
    """The records of one erasure, found before anything changes."""

    customers: list[Customer]
    senders: set[tuple[str, str]]  # (channel, sender id) of every identity being erased
    private: list[Conversation]  # conversations they own where nobody else spoke: emptied whole
    owned: list[Conversation]  # every conversation they own (re-keyed)
    groups: list[int]  # conversations owned by someone else where they wrote
    messages: list[int]  # every message to empty
    corrections: list[int]
    own_texts: list[str]  # what they wrote and what was written for them (searched in datasets)
    copies: list[int]  # other customers' answers that copied one of their corrections
    copied_originals: list[int]  # other corrections whose `original` was such a copy


@dataclass
class ErasureCounts:
    """What `erase` changed beyond the plan's own rows."""

    feedback_scrubbed: int = 0
    outbox_items_deleted: int = 0
    audit_entries_scrubbed: int = 0


class ErasureQueries(StoreBase):
    """Queries that find and erase personal data."""

    # --- finding them -------------------------------------------------------------------
    def customers_matching(self, ref: str) -> list[Customer]:
        """Customers matching `ref`: "channel:external_id", an external id on any channel, or "#<row id>"."""
        ref = ref.strip()
        with self.session() as s:
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

    def senders_matching(self, ref: str) -> set[tuple[str, str]]:
        """(channel, sender id) pairs with stored messages matching `ref` ("channel:id" or a bare id):
        a group member who never wrote to the bot alone has messages but no customer record."""
        ref = ref.strip()
        if ref.startswith("#"):
            return set()
        pairs = select(Conversation.channel, Message.sender_id).join(
            Conversation, Conversation.id == Message.conversation_id
        )
        channel, sep, external = ref.partition(":")
        with self.session() as s:
            if sep and channel and external:
                rows = s.execute(
                    pairs.where(Conversation.channel == channel, Message.sender_id == external).distinct()
                ).all()
                if rows:
                    return {(str(c), str(x)) for c, x in rows}
            rows = s.execute(pairs.where(Message.sender_id == ref).distinct()).all()
            return {(str(c), str(x)) for c, x in rows}

    def erasure_plan(self, customers: list[Customer], senders: set[tuple[str, str]]) -> ErasurePlan:
        """Every row that holds these customers' and senders' words: their messages and the replies
        to them, their private conversations, corrections made on them and the copies of those."""
        with self.session() as s:
            return _plan(s, customers, senders)

    # --- erasing them -------------------------------------------------------------------
    def erase(self, plan: ErasurePlan, *, actor: str, adapters: list[str]) -> ErasureCounts:
        """Empty and re-key every row of `plan` in one transaction, with a "forget" audit entry by
        `actor` that names the `adapters` trained on their data."""
        customers, senders = plan.customers, plan.senders
        msg_ids = plan.messages
        corr_ids = plan.corrections
        private_ids = [c.id for c in plan.private]
        chats = {(c.channel, c.chat_id) for c in plan.private}
        actors = {f"{ch}:{x}" for ch, x in senders}
        counts = ErasureCounts()
        now = utcnow()
        with self.session() as s:
            # a search text may quote an earlier message of its conversation (bot/query.py: a group
            # chat's follow-up joins another member's question), so it goes in the whole conversation
            touched = select(Message.conversation_id).where(Message.id.in_(msg_ids))
            s.execute(update(Message).where(Message.conversation_id.in_(touched)).values(search_text=None))
            s.execute(
                update(Message).where(Message.id.in_(msg_ids)).values(text="", sources=[], external_id=None)
            )
            for ch, x in senders:  # their sender id goes too; the row stays theirs (erased:<customer>)
                mine = [c.id for c in customers if c.channel == ch and c.external_id == x]
                s.execute(
                    update(Message)
                    .where(Message.sender_id == x, Message.id.in_(msg_ids))
                    .values(sender_id=f"erased:{mine[0]}" if mine else "erased")
                )
            s.execute(update(Message).where(Message.id.in_(plan.copies)).values(text=ERASED))
            s.execute(
                update(Correction).where(Correction.id.in_(plan.copied_originals)).values(original=ERASED)
            )
            s.execute(update(Feedback).where(Feedback.message_id.in_(msg_ids)).values(reason=""))
            for fb in s.scalars(select(Feedback).where(Feedback.actor.in_(actors))).all():
                fb.actor = f"erased:f{fb.id}"
                counts.feedback_scrubbed += 1
            s.execute(
                update(Correction)
                .where(Correction.id.in_(corr_ids))
                .values(question="", original="", corrected="", status="revoked", revoked_at=now)
            )
            for conv in plan.owned:
                s.execute(
                    update(Conversation).where(Conversation.id == conv.id).values(chat_id=f"erased:{conv.id}")
                )
            for cust in customers:
                s.execute(
                    update(Customer)
                    .where(Customer.id == cust.id)
                    .values(display_name="", external_id=f"erased:{cust.id}", erased_at=now)
                )
            counts.outbox_items_deleted = _delete_outbox(
                s, chats, set(private_ids), set(msg_ids), {x for _, x in senders}
            )
            _delete_inbox(s, senders)
            s.execute(delete(RateLimit).where(RateLimit.key.in_([f"customer:{ch}:{x}" for ch, x in senders])))
            counts.audit_entries_scrubbed = _scrub_audit(s, private_ids, msg_ids, corr_ids)
            s.add(
                AuditEntry(
                    actor=actor,
                    action="forget",
                    target=f"customers:{','.join(str(c.id) for c in customers)}"[:128],
                    after={
                        "conversations": len(plan.owned),
                        "group_conversations": len(plan.groups),
                        "messages": len(msg_ids),
                        "corrections": corr_ids,
                        "copies": len(plan.copies),
                        "adapters_trained_on_them": adapters,
                        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    },
                )
            )
        return counts


def _plan(s: Session, customers: list[Customer], senders: set[tuple[str, str]]) -> ErasurePlan:
    cust_ids = [c.id for c in customers]
    owned = list(s.scalars(select(Conversation).where(Conversation.customer_id.in_(cust_ids))).all())
    sent: set[int] = set()
    for channel, sender in senders:
        sent.update(
            s.scalars(
                select(Message.id)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Conversation.channel == channel, Message.sender_id == sender)
            ).all()
        )
    private: list[Conversation] = []
    msg_ids: set[int] = set(sent)
    for conv in owned:
        others = [
            x
            for x in s.scalars(
                select(Message.sender_id)
                .where(
                    Message.conversation_id == conv.id,
                    Message.role == "customer",
                    Message.sender_id.is_not(None),
                )
                .distinct()
            ).all()
            if (conv.channel, x) not in senders
        ]
        if others:  # a group where others spoke: only their own (and unattributed, older) messages
            msg_ids.update(
                s.scalars(
                    select(Message.id).where(
                        Message.conversation_id == conv.id,
                        Message.role == "customer",
                        Message.sender_id.is_(None),
                    )
                ).all()
            )
        else:
            private.append(conv)
            msg_ids.update(s.scalars(select(Message.id).where(Message.conversation_id == conv.id)).all())
    frontier = set(msg_ids)
    for _ in range(3):  # replies to their messages (answers, notices, follow-ups), and theirs
        frontier = set(
            s.scalars(
                select(Message.id).where(Message.reply_to_id.in_(frontier), Message.role != "customer")
            ).all()
        ) - msg_ids
        if not frontier:
            break
        msg_ids |= frontier
    private_ids = [c.id for c in private]
    owned_ids = {c.id for c in owned}
    groups = sorted(
        set(s.scalars(select(Message.conversation_id).where(Message.id.in_(sent))).all()) - owned_ids
    )
    corrections = list(
        s.scalars(
            select(Correction).where(
                or_(Correction.conversation_id.in_(private_ids), Correction.message_id.in_(msg_ids))
            )
        ).all()
    )
    corr_ids = {c.id for c in corrections}
    own_texts = [
        t
        for t in s.scalars(
            select(Message.text).where(Message.id.in_(msg_ids), Message.role == "customer")
        ).all()
        if t
    ]
    own_texts += [t for c in corrections for t in (c.question, c.corrected) if t]
    copies: list[int] = []
    if corr_ids:
        since = min(c.created_at for c in corrections)
        for m in s.scalars(
            select(Message).where(
                Message.role == "bot", Message.created_at >= since, Message.id.not_in(msg_ids)
            )
        ).all():
            cited = {
                src.get("correction_id")
                for src in (m.sources or [])
                if isinstance(src, dict) and src.get("kind") == "correction"
            }
            if cited & corr_ids:
                copies.append(m.id)
    corrected = {c.corrected for c in corrections if c.corrected}
    copied_originals = [
        c.id
        for c in s.scalars(select(Correction).where(Correction.original.in_(corrected))).all()
        if c.id not in corr_ids
    ] if corrected else []  # fmt: skip
    return ErasurePlan(
        customers=customers,
        senders=senders,
        private=private,
        owned=owned,
        groups=groups,
        messages=sorted(msg_ids),
        corrections=sorted(corr_ids),
        own_texts=own_texts,
        copies=copies,
        copied_originals=copied_originals,
    )


def _delete_outbox(
    s: Session, chats: set[tuple[str, str]], conv_ids: set[int], msg_ids: set[int], senders: set[str]
) -> int:
    """Outbox items (queued or sent) that carry this customer's texts."""
    doomed = []
    for item in s.scalars(select(OutboxItem)).all():
        payload = item.payload or {}
        if (
            (item.channel, str(payload.get("chat_id"))) in chats
            or payload.get("conversation_id") in conv_ids
            or payload.get("message_id") in msg_ids
            or str(payload.get("customer_id")) in senders
        ):
            doomed.append(item.id)
    if doomed:
        s.execute(delete(OutboxItem).where(OutboxItem.id.in_(doomed)))
    return len(doomed)


def _delete_inbox(s: Session, senders: set[tuple[str, str]]) -> int:
    """Updates received from them and not yet handled (the raw update holds their text and id)."""
    doomed = []
    for item in s.scalars(select(InboxItem)).all():
        payload = item.payload or {}
        for key in ("message", "edited_message", "callback_query"):
            part = payload.get(key)
            sender = part.get("from") if isinstance(part, dict) else None
            if isinstance(sender, dict) and (item.channel, str(sender.get("id"))) in senders:
                doomed.append(item.id)
                break
    if doomed:
        s.execute(delete(InboxItem).where(InboxItem.id.in_(doomed)))
    return len(doomed)


def _scrub_audit(s: Session, conv_ids: list[int], msg_ids: list[int], corr_ids: list[int]) -> int:
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


__all__ = ["ERASED", "ErasureCounts", "ErasurePlan", "ErasureQueries"]
