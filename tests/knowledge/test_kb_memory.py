"""Correction memory: a staff answer is found again by questions like the one it corrected."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.retrieve import KnowledgeBase

QUESTION = "Do you deliver to Canada?"
ANSWER = "Sorry, we only ship within the contiguous United States."
THRESHOLD = 0.75


@pytest.fixture
def kb(tmp_path: Path, chroma_url: str):  # type: ignore[no-untyped-def]
    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "shipping.md").write_text(
        "# Shipping\n\nStandard shipping takes 3 to 5 business days, free over $100.\n", encoding="utf-8"
    )
    kb = KnowledgeBase(tmp_path / "data", chroma_url)  # embedded, then a Chroma server
    kb.ingest([folder])
    yield kb
    kb.close()


def test_remembered_correction_is_recalled_by_a_paraphrase(kb: KnowledgeBase) -> None:
    assert kb.recall(QUESTION) == []
    kb.remember(7, QUESTION, ANSWER)
    [hit] = kb.recall("do you ship to canada")
    assert hit.kind == "correction" and hit.correction_id == 7
    assert hit.text == ANSWER and hit.title == "Staff correction #7"
    assert hit.score >= THRESHOLD
    assert kb.recall(QUESTION)[0].score == pytest.approx(1.0, abs=1e-3)


def test_retrieve_lets_memory_win_only_above_the_threshold(kb: KnowledgeBase) -> None:
    kb.remember(7, QUESTION, ANSWER)
    close = kb.retrieve("do you ship to canada", 2, memory_threshold=THRESHOLD)
    assert close.memory is not None and close.memory.text == ANSWER
    assert close.passages and close.passages[0].source == "shipping.md"
    assert close.all[0] is close.memory

    unrelated = kb.retrieve("How long does standard shipping take?", 2, memory_threshold=THRESHOLD)
    assert unrelated.memory is None and unrelated.passages[0].source == "shipping.md"
    assert kb.recall("How long does standard shipping take?")[0].score < THRESHOLD  # found, but too far

    strict = kb.retrieve("do you ship to canada", 2, memory_threshold=0.99)
    assert strict.memory is None


def test_remember_replaces_forget_removes_and_memory_survives_restart(
    kb: KnowledgeBase, tmp_path: Path, chroma_url: str
) -> None:
    kb.remember(7, QUESTION, "old answer")
    kb.remember(7, QUESTION, ANSWER)  # a second correction of the same row replaces the first
    kb.remember(8, "Can I pay with PayPal?", "Yes, we accept PayPal.")
    assert [p.text for p in kb.recall(QUESTION, k=5)] == [ANSWER, "Yes, we accept PayPal."]
    kb.close()

    again = KnowledgeBase(tmp_path / "data", chroma_url)
    try:
        assert again.recall("Is PayPal accepted?")[0].correction_id == 8
        again.forget(8)
        again.forget(99)  # unknown ids are a no-op
        assert [p.correction_id for p in again.recall("Is PayPal accepted?", k=5)] == [7]
        assert again.retrieve("Is PayPal accepted?", 1, memory_threshold=THRESHOLD).memory is None
    finally:
        again.close()
