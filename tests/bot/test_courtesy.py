"""Greetings, thanks and goodbyes get a courtesy back, not a search, and never page staff."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scripted import ScriptedModel

from bot.conversation import ConversationService
from bot.courtesy import courtesy
from bot.envelope import Inbound
from bot.messages import CATALOG
from knowledge.models import Conversation
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store

GOLDEN = Path(__file__).resolve().parents[2] / "knowledge" / "demo_golden.jsonl"


@pytest.mark.parametrize(
    ("text", "kind", "lang"),
    [
        ("hi", "greeting", "en"),
        ("Hello there!", "greeting", "en"),
        ("Guten Morgen", "greeting", "de"),
        ("¡Hola!", "greeting", "es"),
        ("thank you so much!", "thanks", "en"),
        ("great, thanks", "thanks", "en"),
        ("thanks for your help", "thanks", "en"),
        ("gracias", "thanks", "es"),
        ("Danke schön!", "thanks", "de"),
        ("teşekkürler", "thanks", "tr"),
        ("спасибо за помощь", "thanks", "ru"),
        ("شكرًا", "thanks", "ar"),
        ("thanks, bye", "goodbye", "en"),
        ("have a nice day!", "goodbye", "en"),
        ("ok", "ack", ""),
        ("got it", "ack", ""),
        ("yes", "ack", ""),
        ("Sí", "ack", ""),
        ("👍", "ack", ""),
    ],
)
def test_courtesies_are_recognised_with_their_language(text: str, kind: str, lang: str) -> None:
    found = courtesy(text)
    assert found is not None and (found.kind, found.lang) == (kind, lang)


@pytest.mark.parametrize(
    "text",
    [
        "hi, do you price match?",
        "thanks, but where is my order?",
        "Hi there, my bike is broken",
        "ok so how do I return it",
        "Can I pay later?",
        "good for you",
        "?",
        "...",
        "no",
        "",
        "thanks " * 11,
    ],
)
def test_anything_with_content_is_a_question(text: str) -> None:
    assert courtesy(text) is None


def test_no_golden_question_is_taken_for_a_courtesy() -> None:
    questions = [json.loads(line)["question"] for line in GOLDEN.read_text(encoding="utf-8").splitlines()]
    assert len(questions) >= 30 and [q for q in questions if courtesy(q)] == []


def test_every_reply_exists_in_every_language() -> None:
    for key in ("start", "welcome", "goodbye", "anything_else"):
        assert set(CATALOG[key]) == set(CATALOG["unsure"])


class Staff:
    """A reviewer that records what staff would be paged or shown."""

    def __init__(self) -> None:
        self.flags: list[str] = []
        self.answers: list[Any] = []

    async def answer_posted(self, conv: Conversation, answer: Any) -> None:
        self.answers.append(answer)

    async def relay(self, conv: Conversation, text: str) -> None: ...

    async def correction_stored(self, conv: Conversation | None, correction: Any) -> None: ...

    async def customer_flag(self, conv: Conversation, message_id: int | None, why: str) -> None:
        self.flags.append(why)


def msg(text: str, language: str = "", chat: str = "c1") -> Inbound:
    return Inbound("test", chat, f"cust-{chat}", text, name="Ada", language=language)


async def test_courtesies_are_answered_without_search_or_staff(
    tmp_path: Path, demo_kb: KnowledgeBase, database_url: str
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=database_url, rate_limit_per_minute=0)
    store = Store(settings.database)
    model, staff = ScriptedModel(), Staff()
    service = ConversationService(settings, store, demo_kb, model)
    service.reviewers.append(staff)  # type: ignore[arg-type]
    try:
        [hello] = await service.handle(msg("hi"))
        [thanks] = await service.handle(msg("great, thanks!"))
        [gracias] = await service.handle(msg("gracias", chat="c2"))
        # the channel's language wins over the phrase's
        [danke] = await service.handle(msg("gracias", language="de", chat="c3"))
        [bye] = await service.handle(msg("bye"))
        assert hello.text == CATALOG["start"]["en"] and thanks.text == CATALOG["welcome"]["en"]
        assert gracias.text == CATALOG["welcome"]["es"] and danke.text == CATALOG["welcome"]["de"]
        assert bye.text == CATALOG["goodbye"]["en"]
        assert not model.prompts and staff.flags == [] and staff.answers == []
        for out in (hello, thanks, bye):
            stored = store.message(out.message_id)
            assert (stored.role, stored.status, stored.flagged) == ("system", "courtesy", False)
            assert out.kind == "notice" and not out.feedback_buttons
        history = store.history(hello.conversation_id, 10)
        assert [m.text for m in history if m.role == "customer"] == ["hi", "great, thanks!", "bye"]
        # a greeting with a question is a question: answered from the documents
        model.enqueue("We match the price of a US retailer's in-stock accessory.")
        [answer] = await service.handle(msg("hi, do you price match?"))
        assert answer.kind == "answer" and len(model.prompts) == 1
    finally:
        store.close()
