"""Invisible characters out of text that reaches the model: customer messages, documents, corrections.

A reader sees nothing where these characters are, but a tokenizer sees every one of them, so they can
carry instructions no reviewer sees ("ASCII smuggling" in Unicode tag characters), reverse what staff
read (bidi overrides), split words, or inflate a short-looking message into thousands of tokens.

Removed: every format character (Unicode category Cf: zero-width space U+200B, word joiner U+2060,
BOM U+FEFF, soft hyphen U+00AD, bidi marks, embeddings, overrides and isolates U+200E/F, U+202A-E,
U+2066-9, invisible math operators, interlinear annotation, ...), the whole tag block
U+E0000-U+E007F (assigned or not), the variation selectors supplement U+E0100-U+E01EF (used to hide
bytes after an emoji), and repeated variation selectors (one is kept: it picks emoji or text style).

Kept, because ordinary text needs them: the zero-width non-joiner and joiner (U+200C, U+200D), which
Persian, Arabic and Indic spelling and emoji sequences use *inside* a word, but only one at a time
and only between two visible characters; elsewhere they are removed. Emoji flags of regions
(tag sequences) lose their tags and show as a plain black flag.
"""

from __future__ import annotations

import functools
import re
import unicodedata

_JOINERS = re.compile("[\u200c\u200d]+")
_SELECTORS = re.compile("([\ufe00-\ufe0f])[\ufe00-\ufe0f]+")


@functools.cache
def _table() -> dict[int, None]:
    """code point -> None for str.translate (built once, about 0.15 s)."""
    gone = {cp for cp in range(0x110000) if unicodedata.category(chr(cp)) == "Cf"}
    gone.update(range(0xE0000, 0xE0080))  # tags, also the ones this Python's Unicode leaves unassigned
    gone.update(range(0xE0100, 0xE01F0))  # variation selectors 17-256
    gone -= {0x200C, 0x200D}  # handled by _joiner
    return dict.fromkeys(gone)


def _joiner(m: re.Match[str]) -> str:
    text, start, end = m.string, m.start(), m.end()
    inside = start > 0 and end < len(text) and not text[start - 1].isspace() and not text[end].isspace()
    return m.group()[0] if inside else ""


def strip_invisible(text: str) -> str:
    """`text` without invisible format characters (see the module docstring for what stays)."""
    if text.isascii():
        return text
    text = text.translate(_table())
    text = _JOINERS.sub(_joiner, text)
    return _SELECTORS.sub(r"\1", text)


__all__ = ["strip_invisible"]
