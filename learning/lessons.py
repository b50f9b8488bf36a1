"""A lesson, and the work on its text that needs no store: redaction, near-duplicates, rephrasings.

`learning/datasets.py` collects lessons from the store and writes the dataset files; what happens to
a lesson's words between the two lives here, so each step can be read and tested on its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from learning.redact import redact

# Lessons of one kind win a question over the others: a correction over a staff reply over an approval.
_KIND_RANK = {"correction": 0, "staff": 1, "approved": 2}


@dataclass
class Lesson:
    """One thing to learn: a question and the answer staff stand behind."""

    kind: str  # correction | approved | staff
    ids: list[str]  # lineage: "correction:12", "message:40"
    question: str
    answer: str
    rejected: str = ""  # the bot's answer that staff corrected
    history: list[tuple[str, str]] = field(default_factory=list)
    conversation_id: int | None = None
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime(1970, 1, 1))
    paraphrases: list[str] = field(default_factory=list)
    # every conversation whose text this lesson holds (its own, its paraphrases', merged lessons'):
    # written into the manifest's lineage, so `apprentice forget` finds the adapters trained on it
    sources: set[int] = field(default_factory=set)

    def conversations(self) -> list[int]:
        return sorted(self.sources | ({self.conversation_id} if self.conversation_id is not None else set()))


# --- cleaning ---------------------------------------------------------------------------------


def redact_lessons(
    lessons: Iterable[Lesson], known: Mapping[int, Sequence[str]] | None = None
) -> Counter[str]:
    """Redact every text of every lesson in place; return placeholder counts by kind. `known`:
    conversation id -> the customer's name(s) (`learning.datasets.known_names`), taken out of that
    conversation's lessons, staff corrections included ("Hi Grace, ...")."""
    report: Counter[str] = Counter()
    names: list[str] = []

    def clean(text: str) -> str:
        out, counts = redact(text, names)
        report.update(counts)
        return out

    for les in lessons:
        names = [n for cid in les.conversations() for n in (known or {}).get(cid, ())]
        les.question = clean(les.question)
        les.answer = clean(les.answer)
        les.rejected = clean(les.rejected)
        les.history = [(role, clean(text)) for role, text in les.history]
        les.paraphrases = [clean(p) for p in les.paraphrases]
    return report


def normalized(text: str) -> str:
    """Lower-case words and placeholders only: what two phrasings of one question share."""
    return " ".join(re.findall(r"[a-z0-9\[\]]+", text.lower()))


def _shingles(text: str) -> set[str]:
    words = normalized(text).split()
    return set(words) | {f"{a} {b}" for a, b in itertools.pairwise(words)}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def collapse_duplicates(lessons: list[Lesson], threshold: float) -> tuple[list[Lesson], int]:
    """Merge lessons whose questions are the same or nearly so; the best-ranked, newest one stays.

    A later correction of the same question supersedes an earlier one (staff changed their mind);
    lineage keeps every merged ID. Returns the survivors and how many were merged away.
    """
    ordered = sorted(lessons, key=lambda x: (_KIND_RANK.get(x.kind, 9), -x.created_at.timestamp()))
    kept: list[tuple[Lesson, set[str]]] = []
    exact: dict[str, int] = {}
    index: dict[str, set[int]] = {}  # shingle -> positions in kept, to compare only plausible pairs
    merged = 0
    for les in ordered:
        key, sh = normalized(les.question), _shingles(les.question)
        target = exact.get(key)
        if target is None:
            candidates: set[int] = set()
            for s_ in sh:
                candidates |= index.get(s_, set())
            target = next((i for i in sorted(candidates) if _jaccard(sh, kept[i][1]) >= threshold), None)
        if target is not None:
            winner = kept[target][0]
            winner.ids.extend(i for i in les.ids if i not in winner.ids)
            winner.sources.update(les.conversations())
            for p in [les.question, *les.paraphrases]:
                if normalized(p) != normalized(winner.question) and p not in winner.paraphrases:
                    winner.paraphrases.append(p)
            merged += 1
            continue
        exact[key] = len(kept)
        for s_ in sh:
            index.setdefault(s_, set()).add(len(kept))
        kept.append((les, sh))
    return [les for les, _ in kept], merged


# --- rephrasings -------------------------------------------------------------------------------

_REWRITES: list[tuple[str, list[str]]] = [
    (
        r"^how (?:do|can|should) i (.+)$",
        ["What are the steps to {0}?", "How would I {0}?", "Tell me how to {0}."],
    ),
    (r"^where (?:can|do) i (?:find|view|see|get) (.+)$", ["How do I get to {0}?", "Where is {0}?"]),
    (r"^can i (.+)$", ["Is it possible to {0}?", "Am I able to {0}?"]),
    (r"^is it possible to (.+)$", ["Can I {0}?"]),
    (r"^what (?:is|are) (.+)$", ["Can you explain {0}?", "Tell me about {0}."]),
    (r"^(?:does|do) (.+) (have|support|work with) (.+)$", ["Is {2} supported by {0}?"]),
]
_WRAPS = [
    "Hi, {q}",
    "Quick question: {q}",
    "{q} Thanks!",
    "Could you help me? {q}",
    "Hello. {q} Thank you.",
    "{lower}",
]


def rephrasings(question: str, n: int, seed: str) -> list[str]:
    """Up to n simple rewordings of `question`: pattern rewrites first, then polite wrappers."""
    q = question.strip()
    core = q.rstrip("?.! ")
    lower_core = core[:1].lower() + core[1:]
    found: list[str] = []
    for pattern, templates in _REWRITES:
        m = re.match(pattern, lower_core, re.IGNORECASE)
        if m:
            found.extend(t.format(*m.groups()) for t in templates)
    rng = random.Random(hashlib.sha256(seed.encode()).hexdigest())
    rng.shuffle(found)
    wraps = [w.format(q=q if q[:1].isupper() else q[:1].upper() + q[1:], lower=core.lower()) for w in _WRAPS]
    rng.shuffle(wraps)
    out: list[str] = []
    for cand in [*found, *wraps]:
        cand = cand[:1].upper() + cand[1:]
        if normalized(cand) != normalized(q) and cand not in out:
            out.append(cand)
        if len(out) >= n:
            break
    return out
