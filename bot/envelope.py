"""What crosses between a channel and the conversation service, and how customer text is cleaned.

Channels (Telegram, Slack, the terminal), staff tooling and the benchmarks build and read these
records. They live apart from the service so that every part of it (bot/conversation.py,
bot/staff.py, bot/notices.py) and every channel can import them without importing each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from knowledge.invisible import strip_invisible
from knowledge.models import Conversation, Correction


@dataclass(frozen=True)
class Inbound:
    """A customer's message, translated from the channel's own update type."""

    channel: str
    chat_id: str
    customer_id: str
    text: str | None
    external_id: str = ""
    name: str = ""
    kind: str = "text"  # text | photo | voice | sticker | document | location | edited | other
    # the sender's language as the channel reports it (Telegram's language_code), "" when unknown
    language: str = ""
    # the channel profile, redacted from the customer's lessons: Telegram's @username, and the phone
    # number of a contact the customer shared of themselves
    username: str = ""
    phone: str = ""


@dataclass
class Outbound:
    """Something to send to the customer. `message_id` is the stored message (for feedback buttons)."""

    text: str
    conversation_id: int
    message_id: int | None = None
    kind: str = "answer"  # answer | notice | correction | staff | csat (the Yes/No question)
    feedback_buttons: bool = False
    # The stored reply to a message seen before (a redelivery, or a retry after a crash): a channel
    # with a durable outbox sends it only if it has not queued it already.
    repeat: bool = False
    # The labels of a csat question's Yes / No buttons, in the customer's language.
    choices: tuple[str, ...] = ()


@dataclass
class Answer:
    """The record of one bot answer, as staff see it."""

    conversation_id: int
    question_id: int
    message_id: int
    question: str
    text: str
    sources: list[dict[str, Any]]
    status: str
    model: str | None
    adapter_version: str | None
    latency_ms: float
    flagged: bool = False
    repeat: bool = False  # posted before (see Outbound.repeat): reviewers skip what they already have
    # what the answer mode did to the model's reply: "extract", "grounded", "fallback:REASON"
    grounding: str = ""


class Reviewer(Protocol):
    """Where staff watch (Slack). Each method is called after the store is updated; none may raise."""

    async def answer_posted(self, conv: Conversation, answer: Answer) -> None: ...

    async def customer_flag(self, conv: Conversation, message_id: int | None, why: str) -> None: ...

    async def relay(self, conv: Conversation, text: str) -> None: ...

    async def correction_stored(self, conv: Conversation | None, correction: Correction) -> None: ...


Deliver = Callable[[Conversation, Outbound], Awaitable[None]]

_CONTROL = {c: " " for c in range(32) if c not in (9, 10)}
_CONTROL[127] = " "


def clean_text(text: str) -> str:
    """Text safe to store and prompt with: control characters, lone surrogates and invisible format
    characters (Unicode tags, zero-width, bidi: knowledge/invisible.py) removed, trimmed."""
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")
    return strip_invisible(text.translate(_CONTROL).replace("\x00", "")).strip()


__all__ = ["Answer", "Deliver", "Inbound", "Outbound", "Reviewer", "clean_text"]
