"""Slack: the staff review channel (see `bot.channels.slack.app` and docs/slack.md).

The names other modules and tools use, from the modules that define them.
"""

from __future__ import annotations

from bot.channels.slack.app import EVENTS_PATH, REPLAY_KEY, SlackChannel
from bot.channels.slack.blocks import (
    CardState,
    correct_modal,
    flag_modal,
    render_card,
    render_digest,
    slack_to_plain,
)
from bot.channels.slack.sender import DIGEST_SIZE, queue_report
from bot.channels.slack.validation import FORM_SECRET_KV, form_metadata, request_key

__all__ = [
    "DIGEST_SIZE",
    "EVENTS_PATH",
    "FORM_SECRET_KV",
    "REPLAY_KEY",
    "CardState",
    "SlackChannel",
    "correct_modal",
    "flag_modal",
    "form_metadata",
    "queue_report",
    "render_card",
    "render_digest",
    "request_key",
    "slack_to_plain",
]
