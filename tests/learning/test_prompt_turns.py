"""Serving and training put the same earlier turns into the prompt (learning.prompt.prompt_turns)."""

from __future__ import annotations

from pathlib import Path

from knowledge.store import Store
from learning.datasets import _history
from learning.prompt import prompt_turns


def _chat(tmp_path: Path) -> tuple[Store, list[int]]:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    conv = store.conversation_for("terminal", "c1", "u1")
    said = [
        ("customer", "hello", "ok"),
        ("bot", "hi, how can I help?", "ok"),
        ("customer", "my order is late", "ok"),
        ("bot", "a draft nobody saw", "unsure"),
        ("staff", "it ships tomorrow", "ok"),
        ("customer", "where is it now?", "ok"),  # the question
        ("customer", "hello??", "ok"),  # written after the question
    ]
    ids = [store.add_message(conv.id, role, text, status=status).id for role, text, status in said]
    return store, ids


def test_only_delivered_turns_before_the_question_enter_the_prompt(tmp_path: Path) -> None:
    store, ids = _chat(tmp_path)
    question = ids[5]
    earlier = store.messages_before(store.message(question).conversation_id, question, 4)  # type: ignore[union-attr]
    assert prompt_turns(earlier, 4) == [  # the last 4 messages, the unsent draft left out
        ("assistant", "hi, how can I help?"),
        ("user", "my order is late"),
        ("assistant", "it ships tomorrow"),
    ]
    assert prompt_turns(earlier, 1) == [("assistant", "it ships tomorrow")]
    assert prompt_turns(earlier, 0) == []


def test_training_rebuilds_the_turns_serving_used(tmp_path: Path) -> None:
    store, ids = _chat(tmp_path)
    question = store.message(ids[5])
    assert question is not None
    served = prompt_turns(store.messages_before(question.conversation_id, question.id, 6), 6)
    assert _history(store, question, 6) == served
    assert ("user", "hello??") not in served
    store.close()
