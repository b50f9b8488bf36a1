"""Telegram's limits and our button data, as plain functions (no SDK, no I/O).

A message holds at most 4096 UTF-16 code units, so a long answer is split between paragraphs,
else lines, sentences, words, characters. A button's callback data is ours ("fb:up:42"), but a
modified client can send any string, so it is parsed strictly.
"""

from __future__ import annotations

import datetime as dt
import re

MAX_MESSAGE = 4096  # Telegram's limit, counted in UTF-16 code units


def feedback_data(up: bool, message_id: int) -> str:
    """The callback data of 👍 (`up`) or 👎 under an answer."""
    return f"fb:{'up' if up else 'down'}:{message_id}"


def csat_data(yes: bool, conversation_id: int) -> str:
    """The callback data of Yes or No under "Did this solve your problem?"."""
    return f"csat:{'yes' if yes else 'no'}:{conversation_id}"


def parse_csat(data: str | object | None) -> tuple[bool, int] | None:
    """(yes, conversation id) of a Yes/No press; None for anything else."""
    if not isinstance(data, str):
        return None
    m = re.fullmatch(r"csat:(yes|no):(\d{1,18})", data)
    return (m.group(1) == "yes", int(m.group(2))) if m else None


def parse_feedback(data: str | object | None) -> tuple[bool, int] | None:
    """(up, answer id) of a 👍/👎 press; None for anything else."""
    if not isinstance(data, str):
        return None
    m = re.fullmatch(r"fb:(up|down):(\d{1,18})", data)
    return (m.group(1) == "up", int(m.group(2))) if m else None


def seconds(value: int | float | dt.timedelta) -> float:
    """A Retry-After as python-telegram-bot gives it (seconds, or a timedelta), in seconds."""
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


def _units(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


def split_text(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """Parts of at most `limit` units, cut between paragraphs, else lines, sentences, words, characters."""
    if _units(text) <= limit:
        return [text]
    pieces: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text):
        if para.strip():
            pieces.extend(_cut(para.strip(), limit))
    parts: list[str] = []
    current = ""
    for piece in pieces:
        joined = f"{current}\n\n{piece}" if current else piece
        if _units(joined) <= limit:
            current = joined
        else:
            parts.append(current)
            current = piece
    if current:
        parts.append(current)
    return parts


def _cut(para: str, limit: int) -> list[str]:
    out = []
    while _units(para) > limit:
        end = min(len(para), limit)
        while _units(para[:end]) > limit:
            end -= max(1, _units(para[:end]) - limit)
        window = para[:end]
        cut = -1
        for sep in ("\n", ". ", "! ", "? ", " "):
            at = window.rfind(sep)
            if at >= end // 2:
                cut = at + len(sep)
                break
        if cut <= 0:
            cut = end
        out.append(para[:cut].rstrip())
        para = para[cut:].lstrip()
    if para:
        out.append(para)
    return out
