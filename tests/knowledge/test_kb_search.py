"""Hybrid search: the demo questions land on the right document, scores are dense cosines,
and exact identifiers that MiniLM cannot tell apart are found through BM25, also after a restart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from knowledge import embed
from knowledge.retrieve import KnowledgeBase

DEMO_QUESTIONS = {
    "How many days do I have to return a bike?": "returns.md",
    "How much does the electric bike cost?": "bike-voltline-e-commuter.md",
    "Do gift cards expire?": "gift-cards.md",
    "What does a basic tune-up cost?": "repairs.md",
    "What is the address of your Seattle shop?": "store-locations.md",
    "Until what time are you open on Saturday?": "opening-hours.md",
    "Can I pay in monthly instalments?": "payments.md",
    "Is there a lifetime warranty on the frame?": "warranty.md",
    "How long does standard delivery take?": "shipping.md",
    "What size frame should I get if I am 180 cm tall?": "sizing-guide.md",
}


@pytest.mark.parametrize(("question", "source"), DEMO_QUESTIONS.items())
def test_demo_questions_find_their_document_first(demo_kb: KnowledgeBase, question: str, source: str) -> None:
    passages = demo_kb.search(question, 4)
    assert passages[0].source == source, [p.source for p in passages]


def test_passages_carry_their_dense_cosine_and_come_from_distinct_documents(demo_kb: KnowledgeBase) -> None:
    question = "Can I return a helmet after trying it on?"
    passages = demo_kb.search(question, 4)
    assert len(passages) == 4
    assert len({p.source for p in passages}) == 4  # one passage per document first
    q = embed.embed_query(question)
    embedded = [f"{p.title}\n{p.text}" for p in passages]  # chunks are embedded with their title in front
    for p, vec in zip(passages, embed.embed(embedded), strict=True):
        cosine = sum(a * b for a, b in zip(q, vec, strict=True))
        assert p.score == pytest.approx(max(0.0, cosine), abs=1e-3)
        assert 0.0 <= p.score <= 1.0 and p.kind == "document" and p.title and p.chunk_id
    off_topic = demo_kb.search("Who painted the Mona Lisa?", 1)[0]
    assert off_topic.score < passages[0].score


def test_overlap_is_the_share_of_the_questions_rarer_words_one_passage_holds(demo_kb: KnowledgeBase) -> None:
    def overlap(question: str) -> float:
        return demo_kb.overlap(question, demo_kb.search(question, 4))

    assert overlap("Do you have a warranty?") == 1.0  # its one word, "warranty", is a page's title
    assert overlap("the") == 1.0  # no word to miss: nothing to say
    assert overlap("What's your Instagram handle?") == 0.0  # no passage holds either word
    # "vudu" is in no document, so it outweighs "sell" and "bike" (which most hold) together
    assert overlap("Do you sell vudu bikes?") < 0.5 < 0.9 < overlap("Do you sell kids bikes?")
    # the pages never say "anyone" or "mornings" either, but those are everyday words: they weigh
    # less than "sunday", which the opening hours hold
    assert overlap("Is anyone at the store on Sunday mornings?") >= 0.5


def _parts_catalogue(folder: Path, models: list[str], seed: int) -> dict[str, str]:
    """Spare-part lists that read the same except for their numbers: part number -> document title."""
    rng = random.Random(seed)
    parts = ["brake pads", "chain", "cassette", "tyre", "inner tube", "saddle", "grips", "pedals"]
    owner = {}
    for model in models:
        title = f"Spare parts for the {model}"
        lines = []
        for part in parts:
            number = str(rng.randint(10000, 99999))
            owner[number] = title
            lines.append(f"- {part}: part number {number}")
        name = "parts-" + model.lower().replace(" ", "-") + ".md"
        (folder / name).write_text(f"# {title}\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return owner


def test_exact_part_numbers_are_found_through_bm25_also_after_restart_and_reingest(
    tmp_path: Path, chroma_url: str
) -> None:
    folder = tmp_path / "kb"
    folder.mkdir()
    owner = _parts_catalogue(folder, ["Metro 3", "Ridgeline 29", "Voltline", "Tempo Road Disc"], seed=7)
    kb = KnowledgeBase(tmp_path / "data", chroma_url)
    try:
        kb.ingest([folder])
        for number, title in owner.items():
            assert kb.search(f"do you have {number} in stock?", 1)[0].title == title, number
    finally:
        kb.close()

    kb = KnowledgeBase(tmp_path / "data", chroma_url)  # a restart: the BM25 index is rebuilt from Chroma
    try:
        number, title = next(iter(owner.items()))
        assert kb.search(f"do you have {number} in stock?", 1)[0].title == title
        new = _parts_catalogue(folder, ["Sprout 20"], seed=8)
        kb.ingest([folder])  # the in-memory BM25 index must see the new document at once
        for number, title in new.items():
            assert kb.search(f"do you have {number} in stock?", 1)[0].title == title, number
    finally:
        kb.close()


def test_empty_knowledge_base_and_empty_query_return_nothing(tmp_path: Path, chroma_url: str) -> None:
    kb = KnowledgeBase(tmp_path / "data", chroma_url)
    try:
        assert kb.count() == 0
        assert kb.search("anything at all?", 4) == []
    finally:
        kb.close()
