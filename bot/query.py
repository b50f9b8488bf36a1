"""What the knowledge base is asked: the customer's message as a search, not always word for word.

Two things a customer writes that the documents do not:

- **Courtesies around the question.** "Hi, how do I record a program? Thanks!" A greeting or a thanks
  matches nothing useful, and it moves which passage comes first and which of its sentences are
  sent. Whole sentences and leading or trailing comma clauses that are courtesies (bot/courtesy.py,
  every language the bot speaks) are left out of the search; "Hi, thanks, but where is my order?"
  still searches "but where is my order?".
- **A follow-up.** "How long is the warranty?" then "does it cover the battery?": searched alone, the
  second message finds the e-bike's page (it mentions a battery), not the warranty. A short message
  (at most FOLLOW_UP_WORDS words) that points back ("it", "they", "that", "what about …") to a
  question the same conversation asked within FOLLOW_UP_WITHIN is searched together with that
  question. The rule is English's: other languages often drop the pronoun altogether ("¿cuánto
  cuesta?"), and a follow-up in them is searched alone, as before.

A message that names what it asks about is searched alone even right after another question ("and
the Ridgeline?" after "How much is the Metro 3?"): searched together, the earlier question's page
wins (docs/answers.md, "What is searched"). The stored message, the staff card and the model's prompt keep
the customer's own words; the search, the model's reading of the passages, the extract's choice of
sentences and a staff correction's question (`searched_for`) use this text, and it is stored beside
the message (`Message.search_text`) where it differs, for the nightly datasets.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from bot.courtesy import courtesy
from bot.handoff import question_key
from knowledge.models import Message
from knowledge.store import Store

FOLLOW_UP_WORDS = 8
FOLLOW_UP_WITHIN = dt.timedelta(minutes=30)
EARLIER = 6  # messages looked back at: a follow-up of a follow-up, with the answers between
# words that point back to something said before
_POINTING = re.compile(r"it|its|it's|itself|they|them|their|theirs|that|this|these|those|ones?")
_OPENERS = (("what", "about"), ("how", "about"), ("and", "what", "about"))

_SENTENCE = re.compile(r"(?<=[.!?…])\s+|\n+")
_CLAUSE = re.compile(r",\s*")


def without_courtesies(text: str) -> str:
    """`text` without its greeting and thanks sentences and clauses; `text` itself when that is all
    it is (a courtesy on its own is answered as one, never searched)."""
    kept: list[str] = []
    for sentence in _SENTENCE.split(text.strip()):
        if not sentence.strip() or courtesy(sentence) is not None:
            continue
        commas = list(_CLAUSE.finditer(sentence))
        start, end = 0, len(sentence)
        for m in commas:  # "Hi team, …": leading clauses
            if courtesy(sentence[start : m.start()]) is None:
                break
            start = m.end()
        for m in reversed(commas):  # "…, thanks": trailing ones
            if m.end() <= start or courtesy(sentence[m.end() : end]) is None:
                break
            end = m.start()
        kept.append(sentence[start:end].strip())
    return " ".join(k for k in kept if k) or text.strip()


def follows_up(text: str) -> bool:
    """A short message that points back to an earlier question ("does it cover the battery?")."""
    words = question_key(text).split()
    if not words or len(words) > FOLLOW_UP_WORDS:
        return False
    return any(_POINTING.fullmatch(w) for w in words) or any(tuple(words[: len(o)]) == o for o in _OPENERS)


def search_text(text: str, earlier: Sequence[Message], now: dt.datetime) -> str:
    """The search for customer message `text`, given the conversation's messages before it (oldest
    first): without courtesies, and after the question it follows up (itself after the question it
    followed up, once more at most; a question asked twice in a row counts once)."""
    query = without_courtesies(text)
    asked = [
        m for m in earlier
        if m.role == "customer" and m.status == "ok" and m.text.strip() and courtesy(m.text) is None
    ]  # fmt: skip
    after = now
    for _ in range(2):
        head = query.split("\n")[0]
        if not follows_up(head) or not asked:
            break
        previous = asked.pop()
        while asked and question_key(previous.text) == question_key(head):
            previous = asked.pop()  # the same message asked again is no step back
        if (
            question_key(previous.text) == question_key(head)
            or after - previous.created_at > FOLLOW_UP_WITHIN
        ):
            break
        query = f"{without_courtesies(previous.text)}\n{query}"
        after = previous.created_at
    return query


def same_text(a: str, b: str) -> bool:
    """The same words in the same order, whatever the spacing and line breaks."""
    return a.split() == b.split()


def says_again(reply: str, text: str, earlier: Sequence[Message], now: dt.datetime) -> bool:
    """Whether `reply`, the documents' answer to customer message `text`, is word for word an answer
    the bot sent to another question (among `earlier`, oldest first, within FOLLOW_UP_WITHIN).

    Then the customer already has it: "what sizes does it come in?" after "How much is the Metro 3?"
    is searched with that question and finds the same short page, which was sent whole. The
    conversation sends only the part of that page the message asks about instead
    (`learning.answer.pinpoint`), or hands the message to staff when there is no smaller part. The
    same question asked again gets its answer again (a customer who lost it; the third time hands
    off, bot/handoff.py).
    """
    asked = {m.id: m.text for m in earlier if m.role == "customer"}
    return any(
        m.role == "bot"
        and m.status == "ok"
        and now - m.created_at <= FOLLOW_UP_WITHIN
        and same_text(m.text, reply)
        and question_key(asked.get(m.reply_to_id or 0, "")) != question_key(text)
        for m in earlier
    )


def searched_for(store: Store, conversation_id: int, question_id: int, text: str, when: dt.datetime) -> str:
    """The search for customer message `text` (stored as `question_id`, written at `when`), given
    what the conversation said before it. A staff correction of a follow-up is remembered and trained
    under it too: "does it cover the battery?" on its own would be the warranty's answer to any
    battery question."""
    earlier = store.messages_before(conversation_id, question_id, EARLIER)
    return search_text(text, earlier, when)
