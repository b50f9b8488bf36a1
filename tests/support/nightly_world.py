"""A small bike shop for the nightly-job and registry tests: two documents, four corrected answers,
and a training config kept to a couple of steps on the tiny random Llama (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.train import TrainConfig

TINY = TrainConfig(
    rank=4, alpha=8, max_steps=2, batch_size=2, max_length=512, gradient_checkpointing=False, dpo_epochs=1
)
DOCS = {
    "warranty.md": "# Warranty\n\nEvery frame has a two-year warranty. Batteries are covered for one year.\n",
    "shipping.md": "# Shipping\n\nWe ship within 3 working days by DHL. Shipping is free above 50 euros.\n",
}
LESSONS = [
    ("How long is the frame warranty?", "One year.", "Frames have a two-year warranty."),
    ("Who delivers parcels?", "UPS.", "DHL delivers within 3 working days."),
    ("Is shipping free?", "Never.", "Shipping is free above 50 euros."),
    ("Are batteries covered?", "No.", "Batteries are covered for one year."),
]


def make_world(root: Path, model: Path, **overrides: Any) -> tuple[Settings, Store, KnowledgeBase]:
    docs = root / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    fields: dict[str, Any] = {
        "data_dir": root / "data", "model": str(model), "max_new_tokens": 8, "min_new_examples": 1,
        "dtype": "float32", "max_batch": 4, "top_k": 2,
    } | overrides  # fmt: skip
    settings = Settings(**fields)
    store = Store(settings.database)
    kb = KnowledgeBase.from_settings(settings)
    kb.ingest([docs])
    return settings, store, kb


def seed(store: Store, kb: KnowledgeBase) -> None:
    for i, (question, answer, corrected) in enumerate(LESSONS):
        conv = store.conversation_for("terminal", f"chat{i}", f"cust{i}")
        q = store.add_message(conv.id, "customer", question)
        a = store.add_message(conv.id, "bot", answer, reply_to_id=q.id)
        corr, _ = store.add_correction(
            message_id=a.id, conversation_id=conv.id, question=question, original=answer, corrected=corrected,
            staff="staff",
        )  # fmt: skip
        kb.remember(corr.id, question, corrected)
