"""The same conversation through the in-process runtime and through the vLLM HTTP backend.

The fake OpenAI server runs the project's own runtime on the same tiny weights, so what differs
between the two runs is only the path the answer travels. The stored conversation records
(text, status, sources, model, adapter version, flags) must come out identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.openai_api import FakeOpenAIServer, RuntimeBackend

from bot.conversation import ConversationService
from bot.envelope import Inbound
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.batching import LocalRuntime
from learning.generation import Generator
from learning.llm_http import HttpGenerator
from learning.runtime import build_runtime

DOCS = {
    "returns.md": "# Returns\n\nBikes can be returned within 30 days for a full refund. Bring the receipt.\n",
    "hours.md": "# Opening hours\n\nThe shop opens Monday to Saturday from 9:00 to 18:00.\n",
}
TURNS = [
    "Can I return a bike I bought last week?",
    "What are your opening hours on Saturday?",
    "ADAPTER",  # staff promote adapter v1 here
    "Do I need the receipt to return a bike?",
]


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnowledgeBase]:
    root = tmp_path_factory.mktemp("parity-kb")
    (root / "docs").mkdir()
    for name, text in DOCS.items():
        (root / "docs" / name).write_text(text, encoding="utf-8")
    kb = KnowledgeBase(root / "data")
    kb.ingest([root / "docs"])
    yield kb
    kb.close()


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter for the tiny model with large B weights, so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("parity-adapter")
    model.save_pretrained(str(out))
    return out


async def _converse(settings: Settings, kb: KnowledgeBase, generator: Generator, adapter: Path) -> list[Any]:
    store = Store(settings.database)
    try:
        service = ConversationService(settings, store, kb, generator)
        for i, text in enumerate(TURNS):
            if text == "ADAPTER":
                generator.set_adapter(str(adapter), "v1")
                continue
            await service.handle(Inbound("telegram", "42", "7", text, external_id=str(i), name="Ada"))
        conv = store.conversation_for("telegram", "42", "7")
        return [
            (m.role, m.text, m.status, m.model, m.adapter_version, m.sources, m.flagged, m.external_id)
            for m in store.history(conv.id, 100)
        ]
    finally:
        store.close()


async def test_in_process_and_http_backends_store_the_same_records(
    tmp_path: Path, tiny_model_dir: Path, small_kb: KnowledgeBase, lora_dir: Path
) -> None:
    # the model's reading of the passages is off: auto reads over HTTP but not on this CPU
    common: dict[str, Any] = {
        "model": str(tiny_model_dir), "dtype": "float32", "max_new_tokens": 8, "rerank": "off"
    }
    local_settings = Settings(data_dir=tmp_path / "local", **common)
    local = build_runtime(local_settings)
    assert isinstance(local, LocalRuntime)
    try:
        local_records = await _converse(local_settings, small_kb, local, lora_dir)
    finally:
        await local.aclose()

    backend = RuntimeBackend(tiny_model_dir, name=str(tiny_model_dir), dtype="float32", max_new_tokens=8)
    try:
        async with FakeOpenAIServer(str(tiny_model_dir), backend) as fake:
            http_settings = Settings(data_dir=tmp_path / "http", llm_url=fake.base_url, **common)
            remote = build_runtime(http_settings)
            assert isinstance(remote, HttpGenerator)
            try:
                http_records = await _converse(http_settings, small_kb, remote, lora_dir)
            finally:
                await remote.aclose()
            served = [c.body["model"] for c in fake.paths("/v1/chat/completions")]
    finally:
        backend.close()

    answers = [r for r in local_records if r[0] == "bot"]
    assert len(answers) == 3 and all(r[2] == "ok" and r[1] for r in answers)
    assert [r[4] for r in answers] == [None, None, "v1"]
    assert served[:2] == [str(tiny_model_dir)] * 2 and served[2].startswith("v1-")
    assert http_records == local_records
