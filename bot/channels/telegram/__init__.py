"""Telegram: where customers chat with the bot (see `bot.channels.telegram.channel`).

The names other modules and tools use, from the modules that define them.
"""

from __future__ import annotations

from bot.channels.telegram.channel import (
    ALREADY_RATED,
    HELP_TEXT,
    MAX_ATTEMPTS,
    SECRET_HEADER,
    WEBHOOK_PATH,
    TelegramChannel,
    parse_update,
)
from bot.channels.telegram.sender import csat_markup, feedback_markup
from bot.channels.telegram.text import MAX_MESSAGE, split_text

__all__ = [
    "ALREADY_RATED",
    "HELP_TEXT",
    "MAX_ATTEMPTS",
    "MAX_MESSAGE",
    "SECRET_HEADER",
    "WEBHOOK_PATH",
    "TelegramChannel",
    "csat_markup",
    "feedback_markup",
    "parse_update",
    "split_text",
]
