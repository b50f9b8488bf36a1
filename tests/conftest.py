"""Shared fixtures. The server fixtures live in tests/support (on sys.path: pyproject `pythonpath`)."""

from __future__ import annotations

import os

import pytest
from chroma_server import chroma_server, chroma_url  # noqa: F401
from pg import database_url, postgres_server, postgres_url  # noqa: F401

# An operator's `.env` (real tokens) in the checkout must never reach a test; set before any Settings
# class exists, and passed on to the subprocesses the tests start (tests/support/replicas.py clean_env).
os.environ["APPRENTICE_ENV_FILE"] = os.devnull
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
# Conversation-mechanics tests script the model's replies word for word and assert that the customer
# gets them, so they run in the `model` answer mode. The default mode (`auto`), `grounded` and `extract` have
# their own tests (tests/learning/test_answer.py, tests/bot/test_conversation.py,
# tests/bot/test_golden_answers.py), which set the mode explicitly.
os.environ.setdefault("APPRENTICE_ANSWER_MODE", "model")


@pytest.fixture(scope="session")
def demo_kb(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The bundled demo knowledge base, ingested once per session into embedded Chroma."""
    from knowledge.retrieve import KnowledgeBase
    from knowledge.settings import Settings

    settings = Settings(data_dir=tmp_path_factory.mktemp("demo-kb"))
    kb = KnowledgeBase.from_settings(settings)
    kb.ingest([settings.kb_path])
    yield kb
    kb.close()


# --- models (learning/) --------------------------------------------------------------------------
# The real SmolLM2 is converted once into <repo>/.cache/models (gitignored) and reused across runs;
# the tiny random Llama shares its tokenizer and is what mechanics tests (batching, adapters) use.
MODELS_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "models")


@pytest.fixture(scope="session")
def smollm2_dir():  # type: ignore[no-untyped-def]
    """The bundled SmolLM2-135M-Instruct as safetensors (about 20 s the first time, then cached)."""
    from pathlib import Path

    from learning.modelfiles import convert_bundled

    return convert_bundled(Path(MODELS_CACHE))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir):  # type: ignore[no-untyped-def]
    """A randomly initialised 2-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # tied, a random model just repeats its last input token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _forget_log_throttling():  # type: ignore[no-untyped-def]
    """`apprentice` run in-process (cli.main) throttles repeated log lines on the root logger's handlers,
    and pytest reuses its capture handlers for the whole session: drop the throttle after each test,
    so a later test that logs the same warning still sees it."""
    yield
    import logging

    from bot.logsafe import ThrottleFilter

    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, ThrottleFilter)]:
            handler.removeFilter(f)
