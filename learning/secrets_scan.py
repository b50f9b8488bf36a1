"""Secrets in free text: the one place that knows what a credential looks like.

A staff member can paste a live payment key or a password into a correction, a model can repeat
one, a library can put one in an exception message. Three consumers share these detectors:

- the correction check (`bot/staff.py`): a correction holding a secret is refused;
- the output guard (`bot/guard.py`): a reply holding a secret is blocked;
- the redactor (`learning/redact.py`): datasets get `[SECRET]` in its place;
- and, for the known shapes only, the log filter (`bot/logsafe.py`).

Two kinds of evidence. **Known shapes** are vendors' documented prefixes and formats (Stripe
`sk_live_…`, AWS `AKIA…`, GitHub `ghp_…`, Slack `xoxb-…`, Google `AIza…`, JWTs, private key
blocks, Telegram bot tokens, `sk-…` API keys) plus `password: …` / `pwd=…` style assignments.
**High-entropy strings** are tokens of 24 characters or more that look random: a separator-free
core of at least 16 characters, at least two character classes, Shannon entropy of at least
3.5 bits per character (3.0 for hexadecimal strings of 32 or more), and not mostly made of
words or long digit runs, so product codes (`SKU-4471-B`), slugs, UUIDs, tracking numbers and
order references are left alone. Findings carry a kind ("Stripe key", "password") for messages;
the value itself is never put in a message.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

# kind, pattern, group holding the secret (0: the whole match)
_KNOWN: tuple[tuple[str, re.Pattern[str], int], ...] = (
    (
        "private key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)"
        ),
        0,
    ),
    ("Stripe key", re.compile(r"(?<![A-Za-z0-9])(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"), 0),
    ("API key", re.compile(r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{20,}"), 0),  # OpenAI-style (sk-proj-…)
    ("AWS access key", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"), 0),
    (
        "GitHub token",
        re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),
        0,
    ),
    (
        "Slack token",
        re.compile(r"(?<![A-Za-z0-9])(?:xox[abposre]-[A-Za-z0-9-]{8,}|xapp-\d-[A-Za-z0-9-]{8,})"),
        0,
    ),
    ("Google API key", re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{35}"), 0),
    (
        "JSON Web Token",
        re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
        0,
    ),
    ("Telegram bot token", re.compile(r"(?<![0-9])\d{6,12}:[A-Za-z0-9_-]{30,}"), 0),
)
# "password: hunter2", "pwd=…", "api_key = …", "client_secret: …": the value after the key.
_ASSIGNED = re.compile(
    r"(?i)(?<![A-Za-z0-9])(?P<key>pass(?:word|wd|phrase|code)|pwd|pin|"
    r"(?:api|access|secret|private|client)[ _-]?(?:key|secret|token)|"
    r"(?:auth|bearer|access|refresh)[ _-]?token|"
    r"secret|token)\s*(?P<sep>[:=])\s*(?P<value>[^\s\"'<>,;]{4,})"
)
_TRAILING = ".!?)]}"
_CANDIDATE = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/=_-]{24,}(?![A-Za-z0-9+/=_-])")
_SEPARATORS = re.compile(r"[-_/+=]")
_HEX = re.compile(r"[0-9a-fA-F]+")
# "Words" inside a token: Title or lower-case letter runs, upper-case runs, digit runs.
_PIECE = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_VOWELS = frozenset("aeiouyAEIOUY")

MIN_TOKEN = 24
MIN_CORE = 16
MIN_ENTROPY = 3.5
MIN_HEX_ENTROPY = 3.0
MIN_HEX = 32
MAX_WORDLIKE = 0.5


@dataclass(frozen=True)
class Secret:
    """text[start:end] looks like a credential of `kind`.

    `known`: a vendor's documented format (always a secret); False for `password: …` assignments
    and the entropy heuristic, which a reader may judge by context (the output guard lets one
    through when the shop's own documents print it).
    """

    start: int
    end: int
    kind: str
    known: bool = True


def entropy(text: str) -> float:
    """Shannon entropy of `text` in bits per character."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _wordlike(token: str) -> float:
    """Share of `token` in pronounceable letter runs (4+ letters with vowels) or long digit runs."""
    covered = 0
    for m in _PIECE.finditer(token):
        piece = m.group()
        if piece.isdigit():
            covered += len(piece) if len(piece) >= 5 else 0
        elif len(piece) >= 4 and sum(ch in _VOWELS for ch in piece) / len(piece) >= 0.25:
            covered += len(piece)
    return covered / len(token)


def looks_random(token: str) -> bool:
    """A token of 24+ characters that reads like a generated key rather than a code, slug or number."""
    if len(token) < MIN_TOKEN or max(len(p) for p in _SEPARATORS.split(token)) < MIN_CORE:
        return False
    classes = sum(bool(re.search(c, token)) for c in ("[a-z]", "[A-Z]", "[0-9]"))
    if classes < 2:
        return False
    if _HEX.fullmatch(token):  # hex keys and digests: 16 symbols, so less entropy per character
        return (
            len(token) >= MIN_HEX and entropy(token) >= MIN_HEX_ENTROPY and _wordlike(token) <= MAX_WORDLIKE
        )
    return entropy(token) >= MIN_ENTROPY and _wordlike(token) <= MAX_WORDLIKE


def _assigned_value_is_secret(text: str, sep: str, value: str, end: int) -> bool:
    """`password: X` in prose ("Password: reset it here") is not a secret; a lone value or `=` is."""
    if sep == "=" or not value.isalpha():
        return True
    line_end = text.find("\n", end)
    rest = text[end : line_end if line_end >= 0 else len(text)]
    return not rest.strip(" \t" + _TRAILING + ",;:")


def find_secrets(text: str, heuristic: bool = True) -> list[Secret]:
    """Non-overlapping secrets in `text`, by position. `heuristic=False`: known shapes only."""
    found: list[Secret] = []

    def add(start: int, end: int, kind: str, known: bool = True) -> None:
        if end > start and all(end <= s.start or start >= s.end for s in found):
            found.append(Secret(start, end, kind, known))

    for kind, pattern, group in _KNOWN:
        for m in pattern.finditer(text):
            add(m.start(group), m.end(group), kind)
    for m in _ASSIGNED.finditer(text):
        value = m.group("value").rstrip(_TRAILING)
        start = m.start("value")
        if len(value) >= 4 and _assigned_value_is_secret(text, m.group("sep"), value, start + len(value)):
            kind = "password" if m.group("key").lower().startswith("p") else "secret"
            add(start, start + len(value), kind, known=False)
    if heuristic:
        for m in _CANDIDATE.finditer(text):
            if looks_random(m.group()):
                add(m.start(), m.end(), "high-entropy string", known=False)
    return sorted(found, key=lambda s: s.start)


def secret_kinds(text: str) -> list[str]:
    """The kinds of secret in `text`, each once, in order of appearance (for messages: no values)."""
    return list(dict.fromkeys(s.kind for s in find_secrets(text)))


def mask_secrets(text: str, mask: str = "[SECRET]", heuristic: bool = True) -> str:
    """`text` with every secret replaced by `mask`."""
    out, last = [], 0
    for s in find_secrets(text, heuristic):
        out.append(text[last : s.start])
        out.append(mask)
        last = s.end
    out.append(text[last:])
    return "".join(out)


__all__ = ["Secret", "entropy", "find_secrets", "looks_random", "mask_secrets", "secret_kinds"]
