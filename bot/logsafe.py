"""Logs without secrets or customers' words.

Two leaks are easy to miss. httpx (which python-telegram-bot uses) logs every request at INFO with
its URL, and Telegram puts the bot token in the URL path; `quiet_http_clients` keeps those
loggers at WARNING. And a library may put a secret into an exception message; `SecretFilter`
masks every configured secret and anything shaped like a credential in what the handlers write.
The shapes are the known ones of `learning/secrets_scan.py` (the one list of them, shared with
the output guard and the redactor); its entropy heuristic is left out here, because logs are
full of hashes and ids that are not secrets.
Our own modules log ids and counts, never message text, at any level.

Customers' words are easy to leak at DEBUG: python-telegram-bot logs whole updates and API calls
there, Slack's SDK whole request bodies, SQLAlchemy result rows. `quiet_http_clients` keeps those
loggers at INFO or above whatever APPRENTICE_LOG_LEVEL says, so DEBUG (for development) does not
write customer text either.

`ThrottleFilter` keeps a repeated warning or error (a flood of "too many open files", a failing
dependency) from filling the disk: the same line at most once per `every_s`, the next one written
saying how many were left out.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from knowledge.settings import Settings
from learning.secrets_scan import mask_secrets

NOISY_HTTP_LOGGERS = ("httpx", "httpcore", "hpack")
# Libraries whose DEBUG lines carry customers' words (whole updates, request bodies, result rows),
# with the lowest level each may have: at these none of them writes message text. SQLAlchemy stays
# at its own default, WARNING (at INFO it logs every statement).
TEXT_AT_DEBUG_LOGGERS = {
    "telegram": logging.INFO,
    "aiohttp.access": logging.INFO,
    "slack_sdk": logging.INFO,
    "slack_bolt": logging.INFO,
    "sqlalchemy": logging.WARNING,
}
MASK = "[secret]"
# Shorter configured "secrets" are test placeholders: matching them would mask ordinary words.
MIN_SECRET_CHARS = 8


def quiet_http_clients() -> None:
    """HTTP client request logs (URLs with tokens) only from WARNING up, and libraries that log customer
    text at DEBUG only from INFO up, whatever the root level (APPRENTICE_LOG_LEVEL=DEBUG included)."""
    floors = {**dict.fromkeys(NOISY_HTTP_LOGGERS, logging.WARNING), **TEXT_AT_DEBUG_LOGGERS}
    for name, floor in floors.items():
        logger = logging.getLogger(name)
        if logger.level < floor:  # NOTSET (0) too: it would inherit the root's DEBUG
            logger.setLevel(floor)


def secret_values(settings: Settings) -> list[str]:
    """The configured secrets worth matching, longest first: the one list of them, which this log
    filter masks and the output guard (bot/guard.py) never lets a reply print."""
    values = [
        settings.telegram_bot_token.get_secret_value(),
        settings.slack_bot_token.get_secret_value(),
        settings.slack_app_token.get_secret_value(),
        settings.slack_signing_secret.get_secret_value(),
        settings.telegram_webhook_secret.get_secret_value(),
    ]
    return sorted({v for v in values if len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True)


class SecretFilter(logging.Filter):
    """Masks secrets (configured values and token shapes) in a record before a handler writes it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return mask_secrets(text, MASK, heuristic=False)  # shapes of credentials, ours or not

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


class ThrottleFilter(logging.Filter):
    """The same warning or error at most once per `every_s`; the next one written counts the rest.

    "The same" is the logger, the level, the message and the exception type. Records below WARNING
    pass untouched. At most `max_keys` different lines are tracked; the least recent is forgotten.
    """

    def __init__(self, every_s: float = 60.0, max_keys: int = 1000, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.every_s, self.max_keys, self.clock = every_s, max_keys, clock
        self._seen: dict[tuple[str, int, str, str], tuple[float, int]] = {}  # -> (written at, left out)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        text = getattr(record, "unthrottled", None) or record.getMessage()  # another handler's count added
        key = (record.name, record.levelno, text[:500], exc)
        now = self.clock()
        last = self._seen.pop(key, None)
        if last is not None and now - last[0] < self.every_s:
            self._seen[key] = (last[0], last[1] + 1)  # re-inserted: the most recent is last
            return False
        if last is not None and last[1]:
            left_out = f" [{last[1]} more like this in the last {now - last[0]:.0f} s not logged]"
            record.unthrottled = text
            record.msg, record.args = text + left_out, None
        self._seen[key] = (now, 0)
        while len(self._seen) > self.max_keys:
            del self._seen[next(iter(self._seen))]
        return True


def install(settings: Settings, throttle_s: float = 60.0) -> None:
    """Apply the protections to the root logger's handlers (the CLI calls this once at start): quiet
    libraries, repeated warnings and errors throttled, secrets masked."""
    quiet_http_clients()
    guard = SecretFilter(secret_values(settings))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ThrottleFilter) for f in handler.filters):
            # one per handler (each sees every record once); first: a dropped repeat costs no masking
            handler.addFilter(ThrottleFilter(throttle_s))
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(guard)


def mask_also(secret: str) -> None:
    """A secret the bot makes itself at run time (the Telegram webhook secret it generates and keeps
    in the database): the installed filters mask it from now on too, like the configured ones."""
    if len(secret) < MIN_SECRET_CHARS:
        return
    for handler in logging.getLogger().handlers:
        for found in handler.filters:
            if isinstance(found, SecretFilter) and secret not in found.secrets:
                found.secrets.append(secret)
                found.secrets.sort(key=len, reverse=True)


__all__ = [
    "MIN_SECRET_CHARS",
    "SecretFilter",
    "ThrottleFilter",
    "install",
    "mask_also",
    "quiet_http_clients",
    "secret_values",
]
