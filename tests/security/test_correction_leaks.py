"""One customer's personal data must not reach another through the correction memory.

The attack, as reported: staff correct Grace's answer to "Where is my order 5512?" with her name,
street address, SSN, date of birth and phone; Mallory asks the same question and the memory
hands her that text verbatim, and the output guard let all of it through. Here it runs through
the real flow (ConversationService, the demo knowledge base in Chroma, a scripted model) and
must now fail three times over: the correction is private to Grace's conversation (checked when
it is stored, with the redactor's detectors), the memory never recalls it for anyone else, and
the output guard blocks personal data the redactor finds. Grace still gets her correction, and a
correction without personal data is still shared with everyone: that is the product.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scripted import ScriptedModel
from sqlalchemy import select

from bot.conversation import ConversationService
from bot.envelope import Inbound, Outbound
from bot.guard import BLOCKED
from knowledge.models import AuditEntry, Conversation
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store

QUESTION = "Where is my order 5512?"
GRACE = ("grace", "Grace Hopper")
MALLORY = ("mallory", "Mal Lory")
PIECES = {
    "NAME": "Grace Hopper",
    "ADDRESS": "742 Evergreen Terrace",
    "SSN": "078-05-1120",
    "DOB": "09/12/1906",
    "PHONE": "(202) 555-0147",
}
GRACES_CORRECTION = (
    f"Hi {PIECES['NAME']}, order 5512 left our warehouse on Monday for {PIECES['ADDRESS']}, "
    f"Springfield. We verified you with SSN {PIECES['SSN']}, date of birth {PIECES['DOB']} "
    f"and phone {PIECES['PHONE']}."
)
SHARED_CORRECTION = "Orders ship within 3 working days; the tracking link comes by email once it leaves."


@pytest.fixture
def flow(tmp_path: Path, demo_kb: KnowledgeBase) -> Any:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        relevance_threshold=-1.0,
        overlap_threshold=0.0,  # every question reaches the model unless the memory answers
        rate_limit_per_minute=0,
        two_person_rule="off",  # about disclosure here, not poisoning
    )
    store = Store(settings.database)
    model = ScriptedModel()
    service = ConversationService(settings, store, demo_kb, model)
    sent: list[tuple[Conversation, Outbound]] = []

    async def deliver(conv: Conversation, out: Outbound) -> None:
        sent.append((conv, out))

    service.deliverers["test"] = deliver
    yield service, model, store, sent
    for corr in store.corrections(include_revoked=True):  # the demo KB is shared by the session
        demo_kb.forget(corr.id)
    store.close()


def ask(who: tuple[str, str], text: str = QUESTION) -> Inbound:
    chat, name = who
    return Inbound("test", chat, f"cust-{chat}", text, name=name)


def leaked(text: str) -> list[str]:
    return [kind for kind, value in PIECES.items() if value in text or value.split()[0] in text]


async def test_graces_correction_never_reaches_mallory_but_grace_still_gets_it(flow: Any) -> None:
    service, model, store, sent = flow
    [first] = await service.handle(ask(GRACE))
    result = await service.correct(first.message_id, GRACES_CORRECTION, "staff:ann")

    # checked when stored: the redactor's detectors (and the customer's name) make it private
    assert result.scoped and set(result.personal) >= set(PIECES)
    [(conv, out)] = sent  # Grace is sent her correction at once
    assert conv.chat_id == "grace" and out.text == GRACES_CORRECTION
    with store.session() as s:  # the audit entry says why it is private
        [audit] = s.scalars(select(AuditEntry).where(AuditEntry.action == "correct")).all()
    assert set(audit.after["personal"]) >= set(PIECES)

    # Mallory asks the very same question: the memory does not offer Grace's answer to her
    model.enqueue("Let me look up order 5512 for you.")
    [mallory] = await service.handle(ask(MALLORY))
    assert mallory.text == "Let me look up order 5512 for you."
    assert leaked(mallory.text) == []
    prompt = "\n".join(m["content"] for m in model.prompts[-1])
    assert leaked(prompt) == []  # not even the model saw it (no memory, no grounding evidence)
    stored = store.message(mallory.message_id)
    assert stored is not None and stored.model != "correction-memory"
    assert all(p.correction_id != result.correction.id for p in service.kb.recall(QUESTION, 5))

    # ...while Grace, asking again, gets the staff answer word for word
    [again] = await service.handle(ask(GRACE))
    assert again.text == GRACES_CORRECTION
    assert store.message(again.message_id).model == "correction-memory"  # type: ignore[union-attr]


async def test_a_private_correction_kept_from_the_customer_still_answers_them_later(flow: Any) -> None:
    """Staff unticked "send": the details never went out, yet the memory may give them to Grace."""
    service, _model, _store, sent = flow
    [first] = await service.handle(ask(GRACE))
    result = await service.correct(first.message_id, GRACES_CORRECTION, "staff:ann", send=False)
    assert result.scoped and sent == []
    [again] = await service.handle(ask(GRACE))
    assert again.text == GRACES_CORRECTION
    [mallory] = await service.handle(ask(MALLORY))
    assert leaked(mallory.text) == []


async def test_a_correction_without_personal_data_is_still_shared_with_everyone(flow: Any) -> None:
    service, _model, store, _sent = flow
    [first] = await service.handle(ask(GRACE))
    result = await service.correct(first.message_id, SHARED_CORRECTION, "staff:ann")
    assert not result.scoped and result.personal == []
    [mallory] = await service.handle(ask(MALLORY))
    assert mallory.text == SHARED_CORRECTION
    assert store.message(mallory.message_id).model == "correction-memory"  # type: ignore[union-attr]


async def test_the_shops_own_contacts_do_not_make_a_correction_private(flow: Any) -> None:
    """The demo KB prints the shop's phone and support address: public, not personal."""
    service, _model, _store, _sent = flow
    [first] = await service.handle(ask(GRACE, "How can I contact customer support by phone or email?"))
    text = "Call us at (503) 555-0142 or write to support@northwindbikes.example."
    result = await service.correct(first.message_id, text, "staff:ann")
    assert not result.scoped, result.personal
    [mallory] = await service.handle(ask(MALLORY, "How can I contact customer support by phone or email?"))
    assert mallory.text == text


async def test_a_first_name_alone_makes_a_correction_private(flow: Any) -> None:
    service, _model, _store, _sent = flow
    [first] = await service.handle(ask(("ines", "Inès"), QUESTION))
    result = await service.correct(
        first.message_id, "Inès, your parcel is with DHL and arrives tomorrow.", "s"
    )
    assert result.scoped and result.personal == ["NAME"]


async def test_a_memory_entry_from_before_the_fix_is_blocked_by_the_guard(flow: Any) -> None:
    """Corrections remembered before scoping existed are shared; the output guard is the second line:
    it blocks every kind of personal data the redactor finds when the conversation never held it."""
    service, _model, store, _sent = flow
    [first] = await service.handle(ask(GRACE))
    corr, _ = store.add_correction(
        message_id=first.message_id, conversation_id=first.conversation_id, question=QUESTION,
        original=first.text, corrected=GRACES_CORRECTION, staff="staff:ann",
    )  # fmt: skip
    service.kb.remember(corr.id, QUESTION, GRACES_CORRECTION)  # the old call: no conversation, shared
    [mallory] = await service.handle(ask(MALLORY))
    assert mallory.text == BLOCKED and leaked(mallory.text) == []
    assert store.message(mallory.message_id).status == "blocked"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("SSN", "SSN 078-05-1120"),
        ("DOB", "date of birth 09/12/1906"),
        ("ADDRESS", "742 Evergreen Terrace"),
        ("PHONE", "phone (202) 555-0147"),
        ("EMAIL", "grace@navy.example"),
        ("CARD", "card 4111 1111 1111 1111"),
        ("IBAN", "IBAN DE89 3704 0044 0532 0130 00"),
    ],
)
def test_the_guard_blocks_what_the_redactor_finds_unless_the_customer_gave_it(
    flow: Any, kind: str, value: str
) -> None:
    service, _model, _store, _sent = flow
    reply = f"We have {value} on file."
    verdict = service.guard.check(reply, ["Where is my order 5512?"])
    assert not verdict.ok and kind in verdict.reason
    assert service.guard.check(reply, [f"Please use {value} for my order"]).ok  # the customer's own


def test_the_memory_filters_private_corrections_inside_chroma(tmp_path: Path) -> None:
    """Many private corrections near a question never crowd out the shared one (k=1)."""
    kb = KnowledgeBase(tmp_path)
    try:
        for i in range(1, 6):
            kb.remember(i, QUESTION, f"private answer {i}", conversation_id=100 + i)
        kb.remember(9, "Where is my order?", "shared answer")
        assert [p.text for p in kb.recall(QUESTION, 1)] == ["shared answer"]
        assert [p.text for p in kb.recall(QUESTION, 1, conversation_id=103)] == ["private answer 3"]
        assert {p.text for p in kb.recall(QUESTION, 10, conversation_id=103)} == {
            "private answer 3",
            "shared answer",
        }
        assert kb.retrieve(QUESTION, 2, 0.0, conversation_id=999).memory.text == "shared answer"  # type: ignore[union-attr]
    finally:
        kb.close()
