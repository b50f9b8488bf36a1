"""The two-person rule: which staff corrections wait for a second approval before they are used.

A correction teaches the bot twice: at once through the correction memory (verbatim answers to
similar questions) and at night through training. One compromised or mistaken staff account
could therefore poison every later answer (OWASP LLM04). Most corrections fill gaps the
documents leave; the risky ones are those that *disagree* with what is already known. Those are
stored as `status="pending"`: the customer still gets the corrected text and (by default,
`APPRENTICE_TWO_PERSON_RULE=training`) the memory uses it at once, so the bot answers with it from
the next message on, but no dataset uses it until a *different* staff member approves it. A
revocation takes it out of the memory at once; weights are slower to clean, so they are what the
rule guards. `APPRENTICE_TWO_PERSON_RULE=all` keeps it out of the memory too.

The heuristic, in order (each rule names itself in `Review.reason`):

1. **The documents answer this question.** The best retrieved passage scores at least
   `QUESTION_MATCH` (dense cosine). Below that the correction adds knowledge the documents do
   not have, which is what corrections are for, so rules 2 and 3 do not apply.
2. **New figures.** The correction states a number (a price, a period, a quantity) that none of
   the well-matching passages (score >= `QUESTION_MATCH`) states: "$499" where the page says
   "$749", "90 days" where it says "30 days".
3. **Off the documents.** The correction's best similarity to those passages is below
   `ANSWER_SUPPORT`: it talks about something else than what the pages say on the question.
4. **Another correction disagrees.** An active or pending correction of a similar question (memory
   similarity >= the memory threshold) gives an answer that differs: its similarity to this
   one is below `SAME_ANSWER`, or the two state different figures. This rule applies whether
   or not the documents cover the question.

Measured limits (demo knowledge base): a changed figure is caught reliably; a flipped polarity
without a figure ("we do not accept returns" against a page on returns, similarity 0.42) is not,
because sentence embeddings score negations close to their statements. The rule narrows the
attack to such edits and makes every correction auditable; it does not replace review.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from knowledge import embed

if TYPE_CHECKING:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store

QUESTION_MATCH = 0.45
ANSWER_SUPPORT = 0.35
SAME_ANSWER = 0.9
TOP_PASSAGES = 3
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass(frozen=True)
class Review:
    """What the two-person rule says about one correction."""

    needs_second: bool
    reason: str = ""
    details: dict[str, object] = field(default_factory=dict)


def figures(text: str) -> set[str]:
    """The numbers a text states, normalised ("$1,299.00" -> "1299", "30" -> "30"; zeros dropped)."""
    out = set()
    for raw in _NUMBER.findall(text):
        value = raw.replace(",", "")
        if "." in value:
            value = value.rstrip("0").rstrip(".")
        value = value.lstrip("0")
        if value:
            out.add(value)
    return out


def _cosine(a: list[float], b: list[float]) -> float:
    return float(sum(x * y for x, y in zip(a, b, strict=True)))  # embeddings are unit length


def review_correction(
    kb: KnowledgeBase,
    store: Store,
    question: str,
    corrected: str,
    memory_threshold: float,
    exclude_id: int | None = None,
) -> Review:
    """Apply the heuristic above to a correction of the answer to `question`."""
    if not question.strip():
        return Review(False)
    other = _conflicting_correction(kb, store, question, corrected, memory_threshold, exclude_id)
    if other is not None:
        return other
    passages = [p for p in kb.search(question, TOP_PASSAGES) if p.score >= QUESTION_MATCH]
    if not passages:
        return Review(False, "the documents do not cover the question")
    stated = figures(" ".join(p.text for p in passages)) | figures(question)
    new = sorted(figures(corrected) - stated)
    if new:
        return Review(True, "states figures the documents do not", {"figures": new})
    vectors = embed.embed([corrected, *(p.text for p in passages)])
    support = max(_cosine(vectors[0], v) for v in vectors[1:])
    if support < ANSWER_SUPPORT:
        return Review(True, "disagrees with the documents", {"support": round(support, 3)})
    return Review(False, "agrees with the documents", {"support": round(support, 3)})


def _conflicting_correction(
    kb: KnowledgeBase,
    store: Store,
    question: str,
    corrected: str,
    memory_threshold: float,
    exclude_id: int | None,
) -> Review | None:
    for hit in kb.recall(question, 3):
        if hit.score < memory_threshold or hit.correction_id in (None, exclude_id):
            continue
        assert hit.correction_id is not None
        earlier = store.correction(hit.correction_id)
        if earlier is None or earlier.status not in ("active", "pending"):
            continue
        same_figures = figures(earlier.corrected) == figures(corrected)
        a, b = embed.embed([earlier.corrected, corrected])
        if not same_figures or _cosine(a, b) < SAME_ANSWER:
            return Review(
                True, "another correction answers a similar question differently", {"other": earlier.id}
            )
    return None


__all__ = ["ANSWER_SUPPORT", "QUESTION_MATCH", "SAME_ANSWER", "Review", "figures", "review_correction"]
