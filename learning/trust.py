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
   or not the documents cover the question. A *revoked* correction counts too when the author
   of this one revoked it, or when it was revoked less than `REVOKED_WINDOW` earlier: revoking
   the correction in the way first must not make the contradiction a single person's call.
5. **New payment or contact details.** The correction adds a URL, an email address, a phone
   number, an IBAN, a card number, a postal address, a payment method ("wire transfer",
   "PayPal", "gift card") or a payment instruction ("send the money to ...") that no document
   contains, whether or not the documents cover the question. An IBAN or a card number always
   needs a second person, even when a document holds it: a poisoned page is no witness for
   where customers should send money.
6. **New amounts.** The correction states a sum of money (a number with a currency: "$499",
   "50 euros") that the well-matching passages do not state with that currency; when no
   passage matches the question, every amount is new.

Only the documents (and corrections a second person approved) make a figure known: figures in
the customer's question do not ("Is the warranty 99 years?" must not make "Yes, 99 years" agree).
Numbers written as words ("ninety days", "ten-year", "twelve months") are read as digits first.

The dataset builder (`learning/datasets.py`) applies these rules again to every correction it
would train on that no second person approved, so a row that was stored as `active` before a rule
existed, or whose author found a way around the check at correction time, is still held back.
It also holds back answers approved in Slack that carry a correction that is not trainable, that
only the author of the correction they carry approved, or that the customer steered
(`review_approved_answer`), and staff replies after a take-over that no second staff member
approved (`review_staff_reply`).

Measured limits (demo knowledge base): a changed figure is caught reliably; a flipped polarity
without a figure ("we do not accept returns" against a page on returns, similarity 0.42) is not,
because sentence embeddings score negations close to their statements. The rule narrows the
attack to such edits and makes every correction auditable; it does not replace review.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from knowledge import embed
from knowledge.models import Correction, Message, utcnow
from learning.redact import find_pii

if TYPE_CHECKING:
    from knowledge.passages import Passage
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store

QUESTION_MATCH = 0.45
ANSWER_SUPPORT = 0.35
SAME_ANSWER = 0.9
TOP_PASSAGES = 3
RECALL_K = 5  # corrections of similar questions compared with a new one
REVOKED_WINDOW = dt.timedelta(days=7)  # a correction revoked this recently still counts (rule 4)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass(frozen=True)
class Review:
    """What the two-person rule says about one correction."""

    needs_second: bool
    reason: str = ""
    details: dict[str, object] = field(default_factory=dict)
    code: str = ""  # a short, stable name of the reason (dataset manifests count held-back rows by it)

    def summary(self) -> str:
        """The reason with what it found, for the staff who approve: "states amounts the documents do
        not: 329 USD", "another correction answers a similar question differently: #4"."""
        found: list[str] = []
        for key, value in self.details.items():
            if key == "other":
                found.append(f"#{value}")
            elif key == "support":
                found.append(f"similarity {value}")
            elif isinstance(value, list | tuple | set):
                found.extend(str(v) for v in value)
        return f"{self.reason}: {', '.join(found)}" if found and self.reason else self.reason


# --- reading numbers, amounts and details ------------------------------------------------------

_SMALL = {
    w: i
    for i, w in enumerate(
        [
            "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
            "nineteen",
        ]
    )
}  # fmt: skip
_TENS = {
    w: 10 * i
    for i, w in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], 2)
}
_SCALES = {"dozen": 12, "hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
_NUMBER_WORDS = {**_SMALL, **_TENS, **_SCALES}
# "one" alone is a number only before a unit ("one year", "one-year"), not in "the one you bought"
_UNIT_WORDS = frozenset(
    [
        "year", "years", "month", "months", "week", "weeks", "day", "days", "hour", "hours", "minute",
        "minutes", "euro", "euros", "dollar", "dollars", "cent", "cents", "percent", "kr",
    ]
)  # fmt: skip
_PIECES = re.compile(r"[A-Za-z]+|[^A-Za-z]+")


def _joins(gap: str) -> bool:
    """Two number words separated by `gap` belong to one number ("ninety-nine", "one hundred")."""
    return bool(gap) and "\n" not in gap and not gap.strip(" -")


def _may_follow(prev: str, word: str) -> bool:
    if word in _SCALES or prev in _SCALES:
        return True
    return prev in _TENS and 0 < _SMALL.get(word, 0) < 10  # twenty-one, not "ten twelve"


def _value(run: list[str]) -> int:
    total = current = 0
    for w in run:
        if w in _SMALL or w in _TENS:
            current += _NUMBER_WORDS[w]
        elif w in ("dozen", "hundred"):
            current = max(current, 1) * _SCALES[w]
        else:
            total += max(current, 1) * _SCALES[w]
            current = 0
    return total + current


def numbers_as_digits(text: str) -> str:
    """`text` with English number words written as digits ("ninety days" -> "90 days",
    "ten-year" -> "10-year", "one hundred and twenty" -> "120")."""
    parts = _PIECES.findall(text)
    out: list[str] = []
    i = 0
    while i < len(parts):
        word = parts[i].lower()
        if word not in _NUMBER_WORDS:
            out.append(parts[i])
            i += 1
            continue
        run, j = [word], i + 1
        while j + 1 < len(parts) and _joins(parts[j]):
            nxt = parts[j + 1].lower()
            if nxt in _NUMBER_WORDS and _may_follow(run[-1], nxt):
                run.append(nxt)
                j += 2
            elif (
                nxt == "and"
                and run[-1] in _SCALES
                and j + 3 < len(parts)
                and _joins(parts[j + 2])
                and parts[j + 3].lower() in _SMALL.keys() | _TENS.keys()
            ):
                run.append(parts[j + 3].lower())
                j += 4
            else:
                break
        if run == ["one"] and not (
            j + 1 < len(parts) and _joins(parts[j]) and parts[j + 1].lower() in _UNIT_WORDS
        ):
            out.append(parts[i])
            i += 1
            continue
        out.append(str(_value(run)))
        i = j
    return "".join(out)


def _plain_number(raw: str) -> str:
    value = raw.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value.lstrip("0")


def figures(text: str) -> set[str]:
    """The numbers a text states, normalised ("$1,299.00" -> "1299", "30" -> "30", "thirty" -> "30";
    zeros dropped)."""
    return {v for v in map(_plain_number, _NUMBER.findall(numbers_as_digits(text))) if v}


_CURRENCIES = {
    "$": "USD", "us$": "USD", "usd": "USD", "dollar": "USD", "dollars": "USD",
    "€": "EUR", "eur": "EUR", "euro": "EUR", "euros": "EUR",
    "£": "GBP", "gbp": "GBP", "¥": "JPY", "jpy": "JPY", "yen": "JPY", "chf": "CHF", "francs": "CHF",
    "kr": "KR", "nok": "KR", "sek": "KR", "dkk": "KR", "kroner": "KR", "kronor": "KR",
    "cent": "CENT", "cents": "CENT",
}  # fmt: skip
_AMOUNT = re.compile(
    r"(?:(?<![A-Za-z])(us\$|[$€£¥]|usd|eur|gbp|jpy|chf|nok|sek|dkk)\s?(\d+(?:[.,]\d+)*))"
    r"|(?:(\d+(?:[.,]\d+)*)\s?-?(us\$|[$€£¥]|usd|eur|euros?|gbp|jpy|yen|chf|francs|kr|nok|sek|dkk|kroner"
    r"|kronor|dollars?|cents?)(?![A-Za-z]))",
    re.IGNORECASE,
)


def amounts(text: str) -> set[str]:
    """The sums of money a text states, as "value CURRENCY" ("$1,299" -> "1299 USD", "fifty euros"
    -> "50 EUR")."""
    out = set()
    for m in _AMOUNT.finditer(numbers_as_digits(text)):
        currency, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        if _plain_number(value):
            out.add(f"{_plain_number(value)} {_CURRENCIES[currency.lower()]}")
    return out


_CONTACT_LABELS = frozenset({"EMAIL", "PHONE", "IBAN", "CARD", "ADDRESS"})
_URL = re.compile(
    r"(?:https?://|www\.)[^\s<>\"'()\[\]]+"
    r"|\b(?:[a-z0-9-]+\.)+(?:com|net|org|io|co|info|biz|shop|store|xyz|me|ly|eu|de|uk|no|se|dk|fi|fr|nl"
    r"|es|it|ru|cn|top|app|site|online|link|pay|money)\b(?:/[^\s<>\"'()\[\]]*)?",
    re.IGNORECASE,
)
_PAYMENT_WORDS = re.compile(
    r"\b(?:wire\s+transfer|by\s+wire|bank\s+transfer|bank\s+account|bank\s+details|account\s+number"
    r"|iban|bic|swift\s+code|sort\s+code|routing\s+number|paypal|western\s+union|moneygram|bitcoin|btc"
    r"|crypto(?:currency)?|usdt|ethereum|gift\s*cards?|venmo|zelle|cash\s*app|revolut)\b",
    re.IGNORECASE,
)
_MONEY_INSTRUCTION = re.compile(
    r"\b(?:send|transfer|wire|pay|deposit|move|forward)\s+(?:the\s+|your\s+|all\s+|any\s+|of\s+the\s+)?"
    r"(?:money|payment|funds|amount|balance|deposit|fee|cash|sum|total)\b",
    re.IGNORECASE,
)


def _words(text: str) -> str:
    """Lower-case words (dots and @ kept, so hosts and emails stay whole), space-separated and padded."""
    return " " + " ".join(w.strip(".") for w in re.findall(r"[a-z0-9@.]+", text.lower())) + " "


def _alnum(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass(frozen=True)
class _Detail:
    label: str  # EMAIL, PHONE, IBAN, CARD, ADDRESS, URL, PAYMENT, PAYMENT_INSTRUCTION
    text: str

    def found_in(self, text: str) -> bool:
        if self.label == "PAYMENT_INSTRUCTION":
            return bool(_MONEY_INSTRUCTION.search(text))
        if self.label in ("PHONE", "IBAN", "CARD"):
            return _alnum(self.text) in _alnum(text)
        return _words(self.text).strip() != "" and _words(self.text) in _words(text)


def details(text: str, pii: bool = True) -> set[_Detail]:
    """The payment and contact details a text gives: identifiers (with `pii`), URLs (by host),
    payment methods and payment instructions."""
    out: set[_Detail] = set()
    rest = text
    for span in find_pii(text):
        if span.label in _CONTACT_LABELS:
            if pii:
                out.add(_Detail(span.label, text[span.start : span.end]))
            rest = rest[: span.start] + " " * (span.end - span.start) + rest[span.end :]
    for m in _URL.finditer(rest):
        host = re.sub(r"^(?:https?://)?(?:www\.)?", "", m.group().lower()).split("/")[0].rstrip(".,;:!?")
        if host:
            out.add(_Detail("URL", host))
    out.update(_Detail("PAYMENT", " ".join(m.group().lower().split())) for m in _PAYMENT_WORDS.finditer(text))
    out.update(_Detail("PAYMENT_INSTRUCTION", m.group().lower()) for m in _MONEY_INSTRUCTION.finditer(text))
    return out


def unknown_details(
    kb: KnowledgeBase, text: str, passages: Iterable[Passage] = (), pii: bool = True
) -> list[str]:
    """The labels of the payment and contact details in `text` that no document contains.

    A detail is looked up among `passages` and the passages a search for the detail itself finds
    (an exact email, host or IBAN ranks its chunk first); the customer's words never count."""
    seen = " ".join(p.text for p in passages)
    out = set()
    for d in details(text, pii):
        if d.label in ("IBAN", "CARD"):  # where money goes: a (possibly poisoned) page is no witness
            out.add(d.label)
            continue
        if d.found_in(seen):
            continue
        if not any(d.found_in(p.text) for p in kb.search(d.text, TOP_PASSAGES + 2)):
            out.add(d.label)
    return sorted(out)


def _cosine(a: list[float], b: list[float]) -> float:
    return float(sum(x * y for x, y in zip(a, b, strict=True)))  # embeddings are unit length


def review_correction(
    kb: KnowledgeBase,
    store: Store,
    question: str,
    corrected: str,
    memory_threshold: float,
    exclude_id: int | None = None,
    *,
    author: str | None = None,
    at: dt.datetime | None = None,
    earlier_than: int | None = None,
) -> Review:
    """Apply the heuristic above to a correction of the answer to `question`.

    `author` (the staff member writing it) and `at` (when; default now) decide which revoked
    corrections still count; `earlier_than` limits the comparison to corrections with a lower id
    (the dataset builder reviews a stored correction against what existed when it was written).
    """
    if not question.strip():
        return Review(False)
    similar = _similar_corrections(kb, store, question, memory_threshold, exclude_id)
    other = _conflicting_correction(similar, corrected, earlier_than)
    if other is None:
        at = at or utcnow()
        other = _conflicting_revoked(store, question, corrected, memory_threshold, exclude_id, author, at)
    if other is not None:
        return other
    passages = [p for p in kb.search(question, TOP_PASSAGES) if p.score >= QUESTION_MATCH]
    new_details = unknown_details(kb, corrected, passages)
    if new_details:
        return Review(
            True, "adds payment or contact details no document has", {"details": new_details}, "new_details"
        )
    # what is known: the passages and corrections a second person approved, never the question
    approved = [c.corrected for c in similar if c.status == "active" and _second_person(c)]
    known = " ".join([*(p.text for p in passages), *approved])
    new_amounts = sorted(amounts(corrected) - amounts(known))
    if new_amounts:
        return Review(True, "states amounts the documents do not", {"amounts": new_amounts}, "new_amounts")
    if not passages:
        return Review(False, "the documents do not cover the question")
    new = sorted(figures(corrected) - figures(known))
    if new:
        return Review(True, "states figures the documents do not", {"figures": new}, "new_figures")
    vectors = embed.embed([corrected, *(p.text for p in passages)])
    support = max(_cosine(vectors[0], v) for v in vectors[1:])
    if support < ANSWER_SUPPORT:
        return Review(True, "disagrees with the documents", {"support": round(support, 3)}, "off_documents")
    return Review(False, "agrees with the documents", {"support": round(support, 3)})


def _second_person(corr: Correction) -> bool:
    return bool(corr.approved_by) and corr.approved_by != corr.staff


def _similar_corrections(
    kb: KnowledgeBase, store: Store, question: str, memory_threshold: float, exclude_id: int | None
) -> list[Correction]:
    """Corrections in the memory whose question is close to `question` (best first)."""
    out = []
    for hit in kb.recall(question, RECALL_K):
        if hit.score < memory_threshold or hit.correction_id in (None, exclude_id):
            continue
        assert hit.correction_id is not None
        corr = store.correction(hit.correction_id)
        if corr is not None:
            out.append(corr)
    return out


def _differs(earlier: str, corrected: str) -> bool:
    if figures(earlier) != figures(corrected):
        return True
    a, b = embed.embed([earlier, corrected])
    return _cosine(a, b) < SAME_ANSWER


def _conflicting_correction(
    similar: Iterable[Correction], corrected: str, earlier_than: int | None
) -> Review | None:
    for earlier in similar:
        if earlier.status not in ("active", "pending"):
            continue
        if earlier_than is not None and earlier.id >= earlier_than:
            continue
        if _differs(earlier.corrected, corrected):
            return Review(
                True,
                "another correction answers a similar question differently",
                {"other": earlier.id},
                "conflicting_correction",
            )
    return None


def _conflicting_revoked(
    store: Store,
    question: str,
    corrected: str,
    memory_threshold: float,
    exclude_id: int | None,
    author: str | None,
    at: dt.datetime,
) -> Review | None:
    """A correction of a similar question that was trusted, then revoked by this author (ever) or by
    anyone within `REVOKED_WINDOW` before `at`, and that answered differently."""
    candidates = [
        c for c in store.revoked_corrections(at, REVOKED_WINDOW, author)
        if c.id != exclude_id and c.question.strip() and c.corrected.strip()
        and (_second_person(c) or not store.correction_was_pending(c))
    ]  # fmt: skip
    if not candidates:
        return None
    q = embed.embed_query(question)
    for c in candidates:
        if _cosine(q, embed.embed_query(c.question)) >= memory_threshold and _differs(c.corrected, corrected):
            return Review(
                True,
                "contradicts a correction revoked just before, or revoked by the same person",
                {"other": c.id},
                "conflicting_revoked_correction",
            )
    return None


# --- rows the dataset builder would train on --------------------------------------------------


def review_for_training(kb: KnowledgeBase, store: Store, corr: Correction, memory_threshold: float) -> Review:
    """Whether an active correction may be trained on: approved by a second person, or the rules
    above find nothing against it as of when it was written."""
    if _second_person(corr):
        return Review(False, "approved by a second person")
    return review_correction(
        kb, store, corr.question, corr.corrected, memory_threshold, corr.id,
        author=corr.staff, at=corr.created_at, earlier_than=corr.id,
    )  # fmt: skip


_STEER = re.compile(
    r"\b(?:reply|respond|answer)\s+(?:me\s+|only\s+|just\s+)?(?:with|by\s+saying|exactly|verbatim)\b"
    r"|\b(?:say|write|type|print|output|repeat|copy)\s+(?:exactly\s+|only\s+|just\s+|back\s+|verbatim\s+)?"
    r"(?:this|the\s+following|after\s+me)\b"
    r"|\b(?:say|write|type|print|output|repeat|reply|respond)\s*(?:exactly|only|just|back|verbatim)?\s*[:\"“«]"
    r"|\b(?:just|only)\s+say\b"
    r"|\b(?:start|begin|end)\s+your\s+(?:answer|reply|response)\s+with\b"
    r"|\byour\s+(?:answer|reply|response)\s+(?:should|must|will)\s+(?:be|say|contain|include|read)\b"
    r"|\b(?:ignore|disregard|forget)\s+(?:all\s+|any\s+|your\s+|the\s+)*(?:previous\s+|prior\s+|earlier\s+)?"
    r"(?:instructions|rules|prompt)\b"
    r"|\bfrom\s+now\s+on\b|\byou\s+are\s+now\b|\bpretend\b",
    re.IGNORECASE,
)


def customer_steering(kb: KnowledgeBase, answer: str, question: str, customer_said: Iterable[str]) -> str:
    """How the customer steered `answer`, or "": they told the bot what to say ("reply with: ..."),
    the answer repeats figures or sums the customer gave that the documents on the question do not
    state, or it gives a payment method, payment instruction or URL no document has."""
    said = " ".join([question, *customer_said])
    if _STEER.search(said):
        return "instructed"
    passages = [p for p in kb.search(question, TOP_PASSAGES) if p.score >= QUESTION_MATCH]
    if passages:
        known = " ".join(p.text for p in passages)
        planted = (figures(answer) & figures(said)) - figures(known)
        if planted or (amounts(answer) & amounts(said)) - amounts(known):
            return "planted figures"
    if unknown_details(kb, answer, passages, pii=False):
        return "payment details"
    return ""


def review_approved_answer(
    kb: KnowledgeBase,
    store: Store,
    answer: Message,
    question: str,
    customer_said: Iterable[str],
    approved_by: set[str],
    correction_trainable: Callable[[Correction], bool],
) -> Review:
    """Whether a staff-approved bot answer may be trained on.

    Held back when it carries (as a memory answer) a correction that is pending, revoked or itself
    held back; when only the author of that correction approved it (never the second person); and
    when the customer steered it (`customer_steering`) and fewer than two staff members approved it.
    """
    authors: set[str] = set()
    for src in answer.sources or []:
        if not isinstance(src, dict) or src.get("kind") != "correction":
            continue
        cid = src.get("correction_id")
        corr = store.correction(cid) if isinstance(cid, int) else None
        if corr is None:
            return Review(True, "carries a correction that no longer exists", {}, "carries_held_correction")
        authors.add(corr.staff)
        if corr.status != "active":
            code = "carries_pending_correction" if corr.status == "pending" else "carries_revoked_correction"
            return Review(True, f"carries a {corr.status} correction", {"other": corr.id}, code)
        if not correction_trainable(corr):
            return Review(
                True, "carries a correction held back", {"other": corr.id}, "carries_held_correction"
            )
    independent = approved_by - authors
    if not independent:
        return Review(True, "approved only by the author of the correction it carries", {}, "author_approval")
    steering = customer_steering(kb, answer.text, question, customer_said)
    if steering and len(independent) < 2:
        return Review(
            True, "the customer steered it and one staff member approved it", {"steering": steering},
            "customer_steered",
        )  # fmt: skip
    return Review(False, "approved by staff")


def review_staff_reply(store: Store, reply: Message, approved_by: set[str]) -> Review:
    """A staff reply after a take-over is one person's word: trained on only once another staff
    member approved it (two approvers when its author is unknown)."""
    author = store.staff_reply_author(reply)
    others = approved_by - {author} if author else approved_by
    if len(others) < (1 if author else 2):
        return Review(True, "a staff reply no second staff member approved", {}, "staff_reply")
    return Review(False, "approved by a second staff member")


__all__ = [
    "ANSWER_SUPPORT",
    "QUESTION_MATCH",
    "REVOKED_WINDOW",
    "SAME_ANSWER",
    "Review",
    "amounts",
    "customer_steering",
    "details",
    "figures",
    "numbers_as_digits",
    "review_approved_answer",
    "review_correction",
    "review_for_training",
    "review_staff_reply",
    "unknown_details",
]
