"""What the customer reads: replies end on a full sentence, invented ones are replaced by the document."""

from __future__ import annotations

from knowledge.markup import tables_as_lists
from knowledge.passages import Passage
from learning.answer import cite, extract, finish, focus, ground, off_role, pinpoint, sentences, truncated

WARRANTY = Passage(
    text=(
        "All Northwind bikes come with our warranty against defects in materials and workmanship.\n\n"
        "- Frames: lifetime warranty for the original owner.\n"
        "- Forks, rear shocks and components: 2 years from the purchase date.\n"
        "- Paint and decals: 1 year.\n\n"
        "The warranty does not cover normal wear (tyres, brake pads, chains), crash damage, or damage from "
        "use in competitions or stunt riding. To make a claim, email warranty@northwindbikes.example with "
        "your order number. We answer within 3 business days."
    ),
    title="Warranty",
    source="warranty.md",
    score=0.7,
)
PAYMENTS = Passage(
    text="We accept Visa, Mastercard, PayPal, Apple Pay and Google Pay online and in our stores. "
    "Our stores also take cash. We do not accept cheques or cryptocurrencies.",
    title="Payment options",
    source="https://shop.example/payments",
    score=0.6,
)


def test_a_reply_cut_by_the_token_cap_ends_on_its_last_full_sentence() -> None:
    assert finish("You can pay by card. We also take PayPal and the") == "You can pay by card."
    assert truncated("We also take PayPal and the") and not truncated("We take PayPal.")


def test_an_unfinished_list_item_and_its_dangling_intro_are_dropped() -> None:
    assert (
        finish("Steps:\n1. Open the app.\n2. Tap Orders.\n3. You can")
        == "Steps:\n1. Open the app.\n2. Tap Orders."
    )
    assert finish("Here is how:\n1. You can") == ""
    assert finish("Sure. 7. You can") == "Sure."


def test_a_short_fragment_with_nothing_before_it_is_kept() -> None:
    assert finish("Yes") == "Yes"


def test_a_reply_that_is_only_the_intro_to_a_list_is_not_sent() -> None:
    # a retrained adapter wrote this, and stopped: the customer would wait for a list that never comes
    assert finish("You can easily get Samsung Remote Support service for your TV:") == ""
    reply = "You can easily get Samsung Remote Support service for your TV:"
    passage = Passage(
        "Samsung Remote Support offers one-on-one support with a technician who can diagnose your TV.",
        "Remote Support", "kb/remote.md", 0.8,
    )  # fmt: skip
    g = ground("How do you do remote support?", reply, [passage])
    assert g.fallback and g.reason == "empty" and g.text.startswith("Samsung Remote Support offers")


def test_list_numbers_stay_with_their_item() -> None:
    assert sentences("Do this:\n1. Open it. It is big.\n2. Close it.") == [
        "Do this:", "1. Open it.", "It is big.", "2. Close it."
    ]  # fmt: skip


def test_off_role_replies_are_recognised_and_plain_answers_are_not() -> None:
    for bad in (
        "As a customer support assistant, I can't assist you with the verification process.",
        "I'm sorry for your loss.",
        "In this case, the most appropriate response would be: 'Hello!'",
        "I am an AI language model and cannot check orders.",
        "The customer is asking about shipping. Here's the answer:",
    ):
        assert off_role(bad), bad
    for good in ("Frames have a lifetime warranty.", "We can't ship bikes to Hawaii.", "Please email us."):
        assert not off_role(good), good


def test_focus_keeps_the_sentences_that_answer_the_question_in_document_order() -> None:
    [warranty, payments] = focus("Can I pay with PayPal?", [WARRANTY, PAYMENTS], max_sentences=1)
    assert (
        payments.text
        == "We accept Visa, Mastercard, PayPal, Apple Pay and Google Pay online and in our stores."
    )
    # the best-ranked passage keeps its opening even when none of its sentences was chosen
    assert warranty.text.startswith("All Northwind bikes come with our warranty")
    [payments_only] = focus("Can I pay with PayPal?", [PAYMENTS], max_sentences=2)
    assert "PayPal" in payments_only.text and "cash" not in payments_only.text


def test_a_staff_correction_is_never_cut_by_focus() -> None:
    corr = Passage(
        "Yes, we ship to Hawaii since May. It takes 9 days.", "Staff", "c:1", 0.9, kind="correction"
    )
    assert focus("Do you ship to Hawaii?", [corr, WARRANTY], max_sentences=1)[0] == corr


def test_extract_sends_a_short_section_whole_and_ends_on_a_full_stop() -> None:
    assert extract("Can I pay with PayPal?", PAYMENTS) == PAYMENTS.text
    menu = Passage("Settings General Network Open Network Settings", "Network", "n.md", 0.5)
    assert extract("Where are the network settings?", menu).endswith("Network Settings.")


def test_pinpoint_sends_the_units_closest_to_the_question_in_document_order() -> None:
    """The whole WARRANTY is short enough to be an extract; a follow-up gets its two closest units."""
    assert extract("How long is the frame warranty?", WARRANTY).startswith("All Northwind bikes")
    assert pinpoint("how long until you answer my claim?", WARRANTY) == (
        "To make a claim, email warranty@northwindbikes.example with your order number. "
        "We answer within 3 business days."
    )
    # two list items stay list items, a line each, in the page's order
    assert pinpoint("what about paint and frames?", WARRANTY) == (
        "- Frames: lifetime warranty for the original owner.\n- Paint and decals: 1 year."
    )
    # a passage of no more units than asked for is sent as it is
    assert pinpoint("do you take cash?", PAYMENTS, n=3) == PAYMENTS.text
    narrow = cite("how long until you answer my claim?", WARRANTY, narrow=True)
    assert narrow.startswith("To make a claim") and narrow.endswith(
        "We answer within 3 business days.\n\n(From: Warranty)"
    )


def test_pinpoint_skips_the_sentences_a_chunk_cut() -> None:
    """A chunk starts and ends anywhere: the tail of a sentence before it, one cut at its end."""
    chunk = Passage(
        text="claims about warranty repairs are answered by email. Warranty claims are answered within 3 "
        "business days. Frames have a lifetime warranty. Claims about paint need photos of the",
        title="Warranty",
        source="warranty.md",
        score=0.6,
    )
    text = pinpoint("how fast are warranty claims about paint answered?", chunk)
    assert text == "Warranty claims are answered within 3 business days. Frames have a lifetime warranty."


def test_a_tables_row_brings_the_tables_other_rows() -> None:
    """Two rows of four would tell the customer that two bikes rent."""
    rentals = Passage(
        text=tables_as_lists(
            "Both stores rent bikes by the day.\n\n| Bike | Per day |\n| --- | --- |\n| Metro 3 | $45 |\n"
            "| Tempo | $65 |\n| Ridgeline | $75 |\n\nWe take a $300 deposit on a credit card. "
            "Riders must be 16 or older. Book online up to 60 days ahead."
        ),
        title="Bike rentals",
        source="rentals.md",
        score=0.6,
    )
    rows = "- Bike: Metro 3; Per day: $45\n- Bike: Tempo; Per day: $65\n- Bike: Ridgeline; Per day: $75"
    assert rows in pinpoint("how much is it per day?", rentals)
    deposit = pinpoint("how much is the deposit, and how old must riders be?", rentals)
    assert "$300 deposit" in deposit and "Bike:" not in deposit


def test_cite_names_the_document_and_its_link() -> None:
    text = cite("Can I pay with PayPal?", PAYMENTS)
    assert "PayPal" in text and text.endswith("(From: Payment options, https://shop.example/payments)")
    assert not truncated(text)


def test_a_reply_in_the_documents_own_words_is_sent_as_written() -> None:
    reply = "Frames: lifetime warranty for the original owner. Paint and decals: 1 year."
    g = ground("How long is the warranty?", reply, [WARRANTY, PAYMENTS])
    assert not g.fallback and g.text == reply


def test_an_invented_reply_is_replaced_by_the_documents_own_words() -> None:
    reply = (
        "Our warranty covers everything for 5 years. Open the Warranty tab in the Settings menu of the app."
    )
    g = ground("How long is the warranty?", reply, [WARRANTY, PAYMENTS])
    assert g.fallback and g.reason == "unsupported" and g.unsupported >= 1
    assert "lifetime warranty" in g.text and "5 years" not in g.text and "(From: Warranty)" in g.text


def test_one_invented_sentence_makes_the_whole_reply_untrusted() -> None:
    reply = "Frames: lifetime warranty for the original owner. You also get a free helmet every year."
    g = ground("How long is the warranty?", reply, [WARRANTY])
    assert g.fallback and "helmet" not in g.text


def test_an_off_role_reply_falls_back_even_when_it_quotes_the_documents() -> None:
    reply = "As a customer support assistant, I can't assist you. Frames: lifetime warranty for the owner."
    g = ground("How long is the warranty?", reply, [WARRANTY])
    assert g.fallback and g.reason == "off-role" and not off_role(g.text)


def test_a_staff_correction_supports_what_the_model_learned_from_it() -> None:
    corr = Passage(
        "Yes, we ship bikes to Hawaii by sea freight; it takes 9 business days.", "Staff", "c:1", 0.6,
        kind="correction",
    )  # fmt: skip
    reply = "Yes, we ship bikes to Hawaii by sea freight; it takes 9 business days."
    assert not ground("Do you ship to Hawaii?", reply, [WARRANTY, corr]).fallback
    assert ground("Do you ship to Hawaii?", reply, [WARRANTY]).fallback


def test_a_reply_that_only_restates_the_question_is_replaced() -> None:
    question = "Can I pay with PayPal at the store?"
    g = ground(question, "Yes, you can pay with PayPal at the store.", [PAYMENTS])
    assert g.fallback and g.reason == "restates the question" and "Google Pay" in g.text


def test_an_extract_keeps_the_documents_list_and_the_paragraph_after_it_on_their_own_lines() -> None:
    text = extract("How long is the warranty?", WARRANTY)
    assert "\n- Paint and decals: 1 year.\nThe warranty does not cover" in text
