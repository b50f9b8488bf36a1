"""Logs without secrets or customers' words.

Two leaks are easy to miss. httpx (which python-telegram-bot uses) logs every request at INFO with
its URL, and Telegram puts the bot token in the URL path; `quiet_http_clients` keeps those
loggers at WARNING. And a library may put a secret into an exception message; `SecretFilter`
masks every configured secret and anything shaped like a token in what the handlers write.
Our own modules log ids and counts, never message text, at INFO and above.
"""

from __future__ import annotations

import logging
import re

from knowledge.settings import Settings

NOISY_HTTP_LOGGERS = ("httpx", "httpcore", "hpack")
MASK = "[secret]"

# Shapes of credentials, whether or not they are ours.
TOKEN_PATTERNS = (
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{8,}"),  # Slack bot/user/legacy tokens
    re.compile(r"\bxapp-\d-[A-Za-z0-9-]{8,}"),  # Slack app-level tokens
    re.compile(r"(?<![0-9])\d{6,12}:[A-Za-z0-9_-]{30,}"),  # Telegram bot tokens (id:secret), also in URLs
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style API keys
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
)


def quiet_http_clients() -> None:
    """HTTP client request logs (URLs with tokens) only from WARNING up, whatever the root level."""
    for name in NOISY_HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


def secret_values(settings: Settings) -> list[str]:
    """The configured secrets worth masking (long enough not to mask ordinary words)."""
    values = [
        settings.telegram_bot_token.get_secret_value(),
        settings.slack_bot_token.get_secret_value(),
        settings.slack_app_token.get_secret_value(),
        settings.slack_signing_secret.get_secret_value(),
        settings.telegram_webhook_secret.get_secret_value(),
    ]
    return sorted({v for v in values if len(v) >= 8}, key=len, reverse=True)


class SecretFilter(logging.Filter):
    """Masks secrets (configured values and token shapes) in a record before a handler writes it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        for pattern in TOKEN_PATTERNS:
            text = pattern.sub(MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        return True


def install(settings: Settings) -> None:
    """Apply both protections to the root logger's handlers (the CLI calls this once at start)."""
    quiet_http_clients()
    guard = SecretFilter(secret_values(settings))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(guard)


__all__ = ["SecretFilter", "install", "quiet_http_clients", "secret_values"]
