"""Customers, conversations, messages and feedback."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from knowledge.models import (
    Conversation,
    Customer,
    Feedback,
    Message,
)
from knowledge.store.base import StoreBase

log = logging.getLogger(__name__)


class ConversationQueries(StoreBase):
    """Customers and their conversations: who wrote, what was said, how it was rated."""

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

    def messages_before(self, conversation_id: int, before_id: int, limit: int) -> list[Message]:
        """The last `limit` messages of a conversation written before message `before_id`, oldest first."""
        if limit <= 0:
            return []
        with self.session() as s:
            rows = s.scalars(
                select(Message)
                .where(Message.conversation_id == conversation_id, Message.id < before_id)
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

    def add_message_once(
        self, conversation_id: int, role: str, text: str, external_id: str | None = None, **fields: Any
    ) -> Message:
        """Store a message a channel delivered. When another replica stored the same `external_id` in
        this conversation a moment ago (a redelivery racing the first), that row is returned."""
        try:
            return self.add_message(conversation_id, role, text, external_id=external_id or None, **fields)
        except IntegrityError:
            again = self.message_by_external(conversation_id, external_id) if external_id else None
            if again is None:
                raise
            return again
