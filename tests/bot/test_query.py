"""What the knowledge base is asked: courtesies left out, a follow-up searched with its question."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from scripted import ScriptedModel

from bot.conversation import ConversationService
from bot.envelope import Inbound
from bot.query import FOLLOW_UP_WITHIN, follows_up, says_again, search_text, without_courtesies
from knowledge.models import Message
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store

NOW = dt.datetime(2026, 12, 3, 12, 0)


@pytest.mark.parametrize(
    ("message", "searched"),
    [
        ("Hi! Can I pay with PayPal? Thanks so much", "Can I pay with PayPal?"),
        ("Hello, good morning. How long is the warranty? Thank you in advance.", "How long is the warranty?"),
        ("hey guys, do you ship to Canada? thanks a lot, have a nice day", "do you ship to Canada?"),
        ("Hi, thanks, but where is my order?", "but where is my order?"),
        ("Hola, ¿hacen envíos a Canadá? Gracias", "¿hacen envíos a Canadá?"),
        # a greeting that is all there is stays the message (it is answered as a courtesy, not searched)
        ("thanks!", "thanks!"),
        # what is kept is the customer's text as written
        (
            "I have a Blu-ray player ,can i attach a 4k cable? thank you",
            "I have a Blu-ray player ,can i attach a 4k cable?",
        ),
        ("My Metro 3 is making a clicking noise", "My Metro 3 is making a clicking noise"),
    ],
)
def test_courtesies_are_left_out_of_the_search(message: str, searched: str) -> None:
    assert without_courtesies(message) == searched


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("does it cover the battery?", True),
        ("Do they expire?", True),
        ("what about e-bikes?", True),
        ("how much is one per day?", True),
        ("how much is a helmet?", False),  # a new question
        ("and the Ridgeline?", False),  # names what it asks about
        ("My Metro 3 makes a clicking noise when I brake hard, can you fix it?", False),  # long: its own
    ],
)
def test_a_follow_up_is_short_and_points_back(message: str, expected: bool) -> None:
    assert follows_up(message) is expected


def said(text: str, minutes_ago: float, role: str = "customer", status: str = "ok", **fields: int) -> Message:
    created = NOW - dt.timedelta(minutes=minutes_ago)
    return Message(role=role, text=text, status=status, created_at=created, **fields)


def test_a_follow_up_is_searched_after_the_question_it_follows() -> None:
    earlier = [
        said("Hi", 9),
        said("Do you sell gift cards?", 8),
        said("Yes, from $25 to $500.", 7.9, role="bot"),
        said("thanks!", 7),
    ]
    assert search_text("Do they expire?", earlier, NOW) == "Do you sell gift cards?\nDo they expire?"
    # a follow-up of a follow-up goes back to the question that named the subject
    earlier += [said("Do they expire?", 5), said("No, never.", 4.9, role="bot")]
    assert search_text("can I use it online?", earlier, NOW) == (
        "Do you sell gift cards?\nDo they expire?\ncan I use it online?"
    )
    # a new question, or one long after, is searched alone
    assert search_text("How long is the warranty?", earlier, NOW) == "How long is the warranty?"
    late = NOW + FOLLOW_UP_WITHIN + dt.timedelta(minutes=6)
    assert search_text("can I use it online?", earlier, late) == "can I use it online?"
    # a question asked twice in a row is one step back, not two
    earlier = [
        said("How much is the Metro 3?", 5),
        said("$749.", 4.9, role="bot"),
        said("what sizes does it come in?", 4),
        said("S, M and L.", 3.9, role="bot"),
        said("What sizes does it come in?", 3),
        said("S, M and L.", 2.9, role="bot"),
    ]
    assert search_text("does it come in size L?", earlier, NOW) == (
        "How much is the Metro 3?\nWhat sizes does it come in?\ndoes it come in size L?"
    )
    assert search_text("what sizes does it come in?", earlier, NOW) == (
        "How much is the Metro 3?\nwhat sizes does it come in?"
    )
    assert search_text("what sizes does it come in?", earlier[2:], NOW) == "what sizes does it come in?"
    # with nothing asked before, a follow-up is searched as it is
    assert search_text("does it cover the battery?", [], NOW) == "does it cover the battery?"


def msg(text: str, ext: str) -> Inbound:
    return Inbound("test", "c1", "cust-c1", text, external_id=ext, name="Ada")


async def test_a_follow_up_gets_the_page_of_the_question_it_follows(
    tmp_path: Path, demo_kb: KnowledgeBase
) -> None:
    """Searched alone, "does it cover the battery?" finds the e-bike's page (it has a battery)."""
    assert demo_kb.search("does it cover the battery?", 4)[0].title != "Warranty"
    settings = Settings(data_dir=tmp_path, answer_mode="extract")
    store = Store(settings.database)
    service = ConversationService(settings, store, demo_kb, ScriptedModel())
    [first] = await service.handle(msg("How long is the warranty?", "m1"))
    [second] = await service.handle(msg("does it cover the battery?", "m2"))
    assert first.text.endswith("(From: Warranty)") and second.text.endswith("(From: Warranty)")
    assert "battery" in second.text.lower()
    # the stored question and what staff read are the customer's own words; the datasets read the
    # search beside it, and a message searched as written has none
    answer = store.message(second.message_id)
    asked = store.message(answer.reply_to_id)
    assert asked.text == "does it cover the battery?"
    assert asked.search_text == "How long is the warranty?\ndoes it cover the battery?"
    assert store.message(store.message(first.message_id).reply_to_id).search_text is None
    # a correction of the follow-up is remembered (and trained) under the question it follows
    result = await service.correct(second.message_id, "Yes, for 2 years.", staff="u1", request_key="k1")
    assert store.correction(result.correction.id).question == (
        "How long is the warranty?\ndoes it cover the battery?"
    )
    store.close()


async def test_courtesies_around_a_question_do_not_move_the_answer(
    tmp_path: Path, demo_kb: KnowledgeBase
) -> None:
    """With its courtesies, "where is your store?" finds the opening hours first, not the addresses."""
    message = "Hi, where is your store? Thank you very much, have a great day!"
    assert demo_kb.search(message, 4)[0].title != "Store locations"
    settings = Settings(data_dir=tmp_path, answer_mode="extract")
    store = Store(settings.database)
    service = ConversationService(settings, store, demo_kb, ScriptedModel())
    [out] = await service.handle(msg(message, "m1"))
    assert out.text.endswith("(From: Store locations)")
    store.close()


def test_an_answer_said_again_is_the_last_answer_word_for_word_to_another_question() -> None:
    page = "Gift cards come in any amount.\n- They never expire."
    earlier = [
        said("Do you sell gift cards?", 3, id=1),
        said(page, 2.9, role="bot", id=2, reply_to_id=1),
    ]
    assert says_again(
        "Gift cards come in any amount. - They never expire.".replace(". -", ".\n-"),
        "do they expire?",
        earlier,
        NOW,
    )
    assert says_again(
        "Gift cards come  in any amount.\n- They never expire.", "do they expire?", earlier, NOW
    )
    # another text, the same question asked again (the customer lost the answer), or long after: no
    assert not says_again("- They never expire.", "do they expire?", earlier, NOW)
    assert not says_again(page, "Do you sell gift cards??", earlier, NOW)
    assert not says_again(page, "do they expire?", earlier, NOW + FOLLOW_UP_WITHIN + dt.timedelta(minutes=4))
    # only an answer counts: a hand-off notice or an unsure reply is not "the page already sent"
    unsure = [said("Do you sell gift cards?", 3, id=1), said(page, 2.9, role="bot", status="unsure", id=2)]
    assert not says_again(page, "do they expire?", unsure, NOW)


async def test_a_follow_up_on_the_page_just_sent_gets_only_the_part_it_asks_about(
    tmp_path: Path, demo_kb: KnowledgeBase
) -> None:
    """The Metro 3's page is short and sent whole; searched with its question, "what sizes does it come
    in?" finds that page again, and the customer would read it twice."""
    settings = Settings(data_dir=tmp_path, answer_mode="extract")
    store = Store(settings.database)
    service = ConversationService(settings, store, demo_kb, ScriptedModel())
    [first] = await service.handle(msg("How much is the Metro 3?", "m1"))
    [second] = await service.handle(msg("what sizes does it come in?", "m2"))
    assert "sizes S, M and L" in first.text and "$749" in first.text
    assert "sizes S, M and L" in second.text and "$749" not in second.text
    assert "sizes S, M and L\nA 4 mm" in second.text  # units from two places of the page, a line each
    assert second.text.endswith("(From: Northwind Metro 3 city bike)")
    assert len(second.text) < len(first.text) / 2
    assert store.message(second.message_id).status == "ok"
    # the same question again gets the same answer again (bot/handoff.py hands off the third time)
    [again] = await service.handle(msg("what sizes does it come in?", "m3"))
    assert again.text == second.text
    store.close()


async def test_a_follow_up_with_nothing_narrower_to_send_goes_to_staff(
    tmp_path: Path, demo_kb: KnowledgeBase
) -> None:
    """ "do you sell gravel bikes?" finds the FAQ's used-bikes answer (two sentences); its follow-up
    finds the same, and there is nothing narrower in it to send."""
    settings = Settings(data_dir=tmp_path, answer_mode="extract")
    store = Store(settings.database)
    service = ConversationService(settings, store, demo_kb, ScriptedModel())
    [first] = await service.handle(msg("do you sell gravel bikes?", "m1"))
    assert "used bikes" in first.text
    [second] = await service.handle(msg("what does it cost?", "m2"))
    assert second.text != first.text and "colleague" in second.text
    reply = store.message(second.message_id)
    assert reply.status == "unsure" and reply.flagged
    store.close()
