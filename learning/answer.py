"""What the customer reads: a focused context in, a complete and grounded answer out.

A 135M-parameter model given four 900-character passages invents steps, talks about itself and is
cut mid-list by the token cap, and simply pasting the best passage scores better than its answers
(docs/answers.md has the figures). The steps around the model, each measured with
`apprentice bench answers`:

1. `focus`: the model sees only the sentences of the retrieved passages closest to the question
   (MiniLM cosine), in document order, within a character budget. Less to misread, less to prefill.
2. `finish`: the reply ends on a sentence boundary; a trailing fragment or an unfinished list item
   is dropped, never sent.
3. `ground`: every sentence of the reply must be supported by the passages (`supported`). A reply
   with an unsupported sentence, an off-role one (refuses, talks about being an assistant, writes a
   reply about a reply), an empty one or one that only restates the question is not sent: the
   customer gets `cite`, the best passage's relevant sentences under the document's title, and
   staff get a flag. (Dropping only the unsupported sentences was measured too: what the model had
   left scored 0.42 against 0.60 for the extract on the same questions; one invented sentence says
   the rest is not to be trusted.)

`learning.rerank.model_writes` decides, under the default answer mode (auto), whether the model
writes at all: on a CPU the bundled model's replies almost never pass the check and the few that
do score below the extract (a retrained adapter's too), so the customer gets the extract at once and
the model's time goes to reading the passages instead.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from knowledge.retrieve import tokenize

if TYPE_CHECKING:
    from knowledge.passages import Passage
    from knowledge.retrieve import KnowledgeBase

# The model sees at most this many sentences of the retrieved passages, within this many characters.
FOCUS_SENTENCES = 6
FOCUS_CHARS = 700
# An extract is the best window of this many consecutive sentences of the best passage, extended
# with the sentences after it up to EXTRACT_CHARS (a whole short section is sent whole).
EXTRACT_WINDOW = 4
EXTRACT_CHARS = 800
# A follow-up answered from the page the customer was just sent gets only its closest units.
PINPOINT_UNITS = 2
# A reply sentence is supported when its best MiniLM cosine to a passage sentence reaches SUPPORT,
# at least COVERAGE of its content words (BM25's tokens) occur in the passages, and at least
# PHRASES of its pairs of consecutive content words do too, and every number in it occurs in the
# passages. The cosine alone lets invented steps through ("Open the Time menu in the System tab"):
# they share the topic and most single words with the passages, but not the phrases.
# docs/answers.md gives the measurements behind the numbers.
SUPPORT = 0.6
COVERAGE = 0.75
PHRASES = 0.5
# A reply that adds fewer content words than this to the question's own only restates it ("Yes, you
# can check the Internet connection set up over IPv6."): it tells the customer nothing.
MIN_NEW_WORDS = 3
# A grounded reply shorter than this (characters) is not worth sending on its own.
MIN_ANSWER_CHARS = 24
# A staff correction of a question at least this close (MiniLM cosine, below the memory's threshold
# too) is evidence a reply may rest on: a retrained adapter learned from it (`similar_corrections`).
EVIDENCE = 0.5


# a table row as knowledge.markup.tables_as_lists writes it: its first column's name, then more
_TABLE_ROW = re.compile(r"^[-*•]\s+([^:;\n]{1,60}): [^;\n]*;")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ENDS_WELL = re.compile(r"[.!?][\"')\]]*$")
_HEADING = re.compile(r"^\s*#+\s*")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_SOURCE_LINE = re.compile(r"\n\(From: [^\n]*\)$")
_NUMBER_ONLY = re.compile(r"^\d{1,2}[.)]$")
_DANGLING_NUMBER = re.compile(r"(?:^|(?<=[.!?:])\s+)\d{1,2}[.)]$")

# Off-role: refusals, talk about being an AI or an assistant, condolences, replies about a reply.
_OFF_ROLE = re.compile(
    r"\bas an? (?:ai|language model|(?:customer[- ]support |support |virtual |helpful )?assistant)\b"
    r"|\bI(?:'m| am) (?:an? |just an? )?(?:ai|language model|virtual assistant|chatbot|bot)\b"
    r"|\bI (?:can't|cannot|can not|am unable to|'m unable to|am not able to) (?:assist|help)\b"
    r"|\bsorry for your loss\b"
    r"|\b(?:most )?appropriate (?:response|reply)\b"
    r"|\bhere(?:'s| is) (?:a |my |the )?(?:possible |suggested |sample )?(?:response|reply)\b"
    r"|\b(?:response|reply) (?:would|could|should) be\b"
    r"|\bthe customer(?:'s)? (?:is asking|asked|asks|wants|question)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class _Unit:
    """One sentence or list item, and whether it starts a line in its text."""

    text: str
    line_start: bool


def _units(text: str) -> list[_Unit]:
    out: list[_Unit] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or _HEADING.match(line):
            continue
        parts: list[str] = []
        for s in _SENTENCE_END.split(line):
            s = s.strip()
            if s and parts and _NUMBER_ONLY.match(parts[-1]):
                parts[-1] += " " + s  # "1." is the marker of the item that follows, not a sentence
            elif s:
                parts.append(s)
        out.extend(_Unit(s, k == 0) for k, s in enumerate(parts))
    return out


def _passage_units(text: str) -> list[_Unit]:
    """A passage's units without the section label the chunker puts on its first line."""
    units = _units(text)
    first = units[0] if units else None
    if (
        first is not None
        and len(units) > 1
        and text.lstrip().startswith(first.text + "\n")
        and len(first.text.split()) <= 8
        and truncated(first.text)
        and not _LIST_ITEM.match(first.text)
    ):
        return units[1:]
    return units


def _join(units: Sequence[_Unit]) -> str:
    """Units back into text: a list item, and the line after a list, start a line again."""
    out = ""
    in_list = False
    for u in units:
        item = u.line_start and bool(_LIST_ITEM.match(u.text))
        sep = "" if not out else ("\n" if u.line_start and (item or in_list) else " ")
        out += sep + u.text
        in_list = item or (in_list and not u.line_start)
    return out


def sentences(text: str) -> list[str]:
    """Sentences and list items of a text, in order (headings and blank lines dropped)."""
    return [u.text for u in _units(text)]


def off_role(text: str) -> bool:
    """The reply refuses, talks about itself as an AI or assistant, condoles or writes a meta-reply."""
    return bool(_OFF_ROLE.search(text))


def body(text: str) -> str:
    """The answer without the "(From: title)" line `cite` puts under an extract."""
    return _SOURCE_LINE.sub("", text.rstrip()).rstrip()


def truncated(text: str) -> bool:
    """The text stops mid-sentence (no closing punctuation at the end; a source line is not counted)."""
    text = body(text)
    return bool(text) and not _ENDS_WELL.search(text)


def finish(text: str) -> str:
    """The text up to its last complete sentence: a trailing fragment or unfinished item is cut."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or _ENDS_WELL.search(lines[-1]):
        return "\n".join(lines).strip()
    last = lines.pop()
    # the last line stops mid-sentence: keep its complete sentences, unless it is a list item
    # (an unfinished step is worse than none)
    if not _LIST_ITEM.match(last):
        keep = " ".join(p.strip() for p in _SENTENCE_END.split(last)[:-1]).strip()
        keep = _DANGLING_NUMBER.sub("", keep).strip()  # "... there. 7." was "7. You can"
        if keep:
            lines.append(keep)
    while lines and (not lines[-1].strip() or lines[-1].rstrip().endswith(":")):
        lines.pop()  # an intro to a list that no longer follows
    # a reply that is one short fragment ("Yes", "Order 5512") is kept: there is nothing before it;
    # not a step, nor an intro to a list that never came ("You can get remote support for your TV:")
    alone = not _LIST_ITEM.match(last) and not last.rstrip().endswith(":")
    return "\n".join(lines).strip() or (last.strip() if alone else "")


def cosines(left: Sequence[str], right: Sequence[str]) -> list[list[float]]:
    """MiniLM cosine of every left text to every right text."""
    from knowledge.embed import embed

    if not left or not right:
        return [[0.0] * len(right) for _ in left]
    vecs = embed([*left, *right])
    a, b = vecs[: len(left)], vecs[len(left) :]
    return [[sum(x * y for x, y in zip(u, v, strict=True)) for v in b] for u in a]


def focus(
    question: str,
    passages: Sequence[Passage],
    max_sentences: int = FOCUS_SENTENCES,
    budget: int = FOCUS_CHARS,
) -> list[Passage]:
    """The passages cut down to the sentences closest to the question, in document order.

    A staff correction is kept whole (it is the answer). Sentences are ranked across all document
    passages by MiniLM cosine to the question (the best-ranked passage gets a small bonus: retrieval
    saw more than the cosine does); the best `max_sentences` that fit `budget` characters are kept.
    A passage left with none is dropped, except the first.
    """
    docs = [i for i, p in enumerate(passages) if p.kind != "correction"]
    split = {i: _passage_units(passages[i].text) for i in docs}
    flat = [(i, j, u.text) for i in docs for j, u in enumerate(split[i])]
    if not flat:
        return list(passages)
    sims = cosines([question], [s for _, _, s in flat])[0]
    order = sorted(range(len(flat)), key=lambda n: -(sims[n] + (0.05 if flat[n][0] == docs[0] else 0.0)))
    chosen: set[tuple[int, int]] = set()
    used = 0
    for n in order:
        i, j, s = flat[n]
        if len(chosen) >= max_sentences:
            break
        if chosen and used + len(s) > budget:
            continue
        chosen.add((i, j))
        used += len(s) + 1
    out: list[Passage] = []
    for i, p in enumerate(passages):
        if p.kind == "correction":
            out.append(p)
            continue
        kept = [u for j, u in enumerate(split[i]) if (i, j) in chosen]
        if kept or i == docs[0]:
            out.append(replace(p, text=_join(kept or split[i][:2])))
    return out


def extract(question: str, passage: Passage) -> str:
    """The part of `passage` that answers the question, in the document's own words.

    A section up to EXTRACT_CHARS is sent whole; a longer one from the best window of
    EXTRACT_WINDOW consecutive sentences (mean MiniLM cosine to the question) onwards, up to
    EXTRACT_CHARS. Consecutive sentences read as the document does; picking the best sentences one
    by one scored lower on the bench (docs/answers.md).
    """
    units = _passage_units(passage.text)
    if len(units) > 1 and units[0].text[:1].islower():
        units = units[1:]  # the tail of a sentence the chunk overlap cut in half
    kept: list[_Unit] = units
    if len(_join(units)) > EXTRACT_CHARS:
        sims = cosines([question], [u.text for u in units])[0]
        width = min(EXTRACT_WINDOW, len(units))
        start = max(range(len(units) - width + 1), key=lambda k: sum(sims[k : k + width]))
        kept = []
        for u in units[start:]:
            if kept and len(_join([*kept, u])) > EXTRACT_CHARS:
                break
            kept.append(u)
    while len(kept) > 1 and not _complete(kept[-1]):
        kept = kept[:-1]  # end on a full sentence where the document has one (chunks end anywhere)
    return _ended(kept)


def _ended(units: Sequence[_Unit]) -> str:
    """`units` as the customer reads them: joined, and ending with a full stop. A last unit without
    one is a menu path, a label or a list item: it ends here, so say so."""
    text = _join(units).rstrip(" :;,")
    return text + "." if text and truncated(text) else text


def _complete(unit: _Unit) -> bool:
    """A unit that ends a thought: a full sentence, or a list item (they often have no full stop)."""
    return not truncated(unit.text) or (unit.line_start and bool(_LIST_ITEM.match(unit.text)))


def _rows(units: Sequence[_Unit], k: int) -> list[int]:
    """The rows of the table unit `k` is a row of (`knowledge.markup.tables_as_lists`: consecutive
    list items naming the same first column, "- Bike: …; Per day: …"), or just `k`."""
    label = _TABLE_ROW.match(units[k].text)
    if label is None:
        return [k]

    def same(i: int) -> bool:
        m = _TABLE_ROW.match(units[i].text)
        return m is not None and m.group(1) == label.group(1)

    first, last = k, k
    while first > 0 and same(first - 1):
        first -= 1
    while last + 1 < len(units) and same(last + 1):
        last += 1
    return list(range(first, last + 1))


def pinpoint(question: str, passage: Passage, n: int = PINPOINT_UNITS) -> str:
    """The `n` sentences or list items of `passage` closest to `question` (MiniLM cosine), in the
    document's order: the narrow answer to a follow-up whose page the customer was just sent.

    A table's row brings the table's other rows (within EXTRACT_CHARS): "how much per day?" on the
    rentals page matched two bikes' rows best, and the customer would read that two bikes rent."""
    units = _passage_units(passage.text)
    if len(units) > n:
        sims = cosines([question], [u.text for u in units])[0]
        # as in `extract`: not the tail of a sentence the chunk overlap cut, nor one the chunk cut
        whole_units = [
            k for k, u in enumerate(units) if _complete(u) and not (k == 0 and u.text[:1].islower())
        ]
        best = sorted(sorted(whole_units or range(len(units)), key=lambda k: -sims[k])[:n])
        whole = sorted({i for k in best for i in _rows(units, k)})
        if len(_join([units[k] for k in whole])) <= EXTRACT_CHARS:
            best = whole
        # units from different places of the page each start a line
        units = [units[k] if k - 1 in best else replace(units[k], line_start=True) for k in best]
    return _ended(units)


def cite(question: str, passage: Passage, narrow: bool = False) -> str:
    """The extract of the best passage (`pinpoint`ed when `narrow`), with the document's title (and
    its link) underneath."""
    title = passage.title.strip() or "our documentation"
    link = passage.source if passage.source.startswith(("http://", "https://")) else ""
    text = pinpoint(question, passage) if narrow else extract(question, passage)
    return f"{text}\n\n(From: {title}{f', {link}' if link else ''})"


def supported(
    sentence: str, cosine: float, vocabulary: set[str], phrases: set[tuple[str, str]], figures: set[str]
) -> bool:
    """A sentence close in meaning to a passage sentence, in the passages' own words and figures."""
    if not set(_NUMBER.findall(sentence)) <= figures:
        return False  # a price, a time or a duration the passages do not give is invented
    words = tokenize(sentence)
    if not words or cosine < SUPPORT:
        return False
    if sum(w in vocabulary for w in words) / len(words) < COVERAGE:
        return False
    pairs = list(itertools.pairwise(words))
    return not pairs or sum(pair in phrases for pair in pairs) / len(pairs) >= PHRASES


def similar_corrections(
    kb: KnowledgeBase,
    mode: str,
    question: str,
    passages: Sequence[Passage],
    conversation_id: int | None = None,
) -> list[Passage]:
    """Staff corrections of questions like `question` (cosine ≥ EVIDENCE) not among `passages`:
    what a retrained adapter learned from, so evidence its reply may rest on. Serving's check and the
    gate's (learning/evaluate.py) both count them, so the gate sees a learned correction pass. None
    under APPRENTICE_ANSWER_MODE=`mode` "model" or "extract", where no reply is checked."""
    if mode not in ("auto", "grounded"):
        return []
    known = {p.correction_id for p in passages if p.kind == "correction"}
    return [
        p
        for p in kb.recall(question, 3, conversation_id)
        if p.score >= EVIDENCE and p.correction_id not in known
    ]


@dataclass(frozen=True)
class Grounded:
    """A reply after the checks: the text to send and what happened to the model's own words."""

    text: str
    fallback: bool  # the model's reply was replaced by an extract of the best passage
    reason: str  # why it fell back: off-role, empty, restates the question, unsupported ("" if not)
    unsupported: int  # sentences of the model's reply no passage supports


def ground(question: str, reply: str, passages: Sequence[Passage]) -> Grounded:
    """The reply finished at a sentence boundary if the passages support every sentence of it, else
    `cite` of the first document passage.

    `passages` are the evidence: retrieved documents and staff corrections (staff-verified text is
    what a retrained adapter learned from, so it supports a reply as a document does).
    """
    evidence_passages = [p for p in passages if p.text.strip()]
    text = finish(reply)
    said = sentences(text)
    if not evidence_passages:
        return Grounded(text, False, "", 0)
    unsupported = 0
    if off_role(reply):
        reason = "off-role"
    elif len(text) < MIN_ANSWER_CHARS:
        reason = "empty"
    elif len(set(tokenize(text)) - set(tokenize(question))) < MIN_NEW_WORDS:
        reason = "restates the question"
    else:
        evidence = [s for p in evidence_passages for s in sentences(p.text)]
        tokens = [tokenize(e) for e in evidence]
        vocabulary = {t for words in tokens for t in words}
        phrases = {pair for words in tokens for pair in itertools.pairwise(words)}
        figures = {n for e in evidence for n in _NUMBER.findall(e)}
        sims = cosines(said, evidence)
        unsupported = sum(
            not supported(s, max(row, default=0.0), vocabulary, phrases, figures)
            for s, row in zip(said, sims, strict=True)
        )
        reason = "unsupported" if unsupported else ""
    if not reason:
        return Grounded(text, False, "", 0)
    documents = [p for p in evidence_passages if p.kind != "correction"]
    return Grounded(cite(question, (documents or evidence_passages)[0]), True, reason, unsupported)
