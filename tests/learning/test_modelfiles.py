"""Resolving the base model: the bundled GGUF conversion, local folders, the Hugging Face cache, hashes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from learning import modelfiles
from learning.modelfiles import (
    BUNDLED_MODEL,
    ModelUnavailable,
    base_model_hash,
    bundled_gguf,
    chat_template_hash,
    convert_bundled,
    resolve_model,
)


def test_the_bundled_model_is_converted_to_safetensors(smollm2_dir: Path) -> None:
    assert bundled_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_dir.name == BUNDLED_MODEL
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    config = (smollm2_dir / "config.json").read_text()
    assert "quantization_config" not in config
    assert resolve_model(BUNDLED_MODEL, smollm2_dir.parent) == str(smollm2_dir)  # no second conversion


def _fake_conversion(calls: list[Path], fail: bool = False):  # type: ignore[no-untyped-def]
    """Stands in for the 20 s dequantisation: writes a model folder's files (or dies halfway)."""

    def write(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt("killed")
        (out / "model.safetensors").write_bytes(b"weights")

    return write


def test_conversion_is_atomic_and_happens_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    stale = tmp_path / f".converting-{BUNDLED_MODEL}-dead"
    stale.mkdir()  # left behind by a conversion that was killed

    monkeypatch.setattr(modelfiles, "_dequantise", _fake_conversion(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        convert_bundled(tmp_path)
    assert not (tmp_path / BUNDLED_MODEL).exists()  # never a half folder
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.setattr(modelfiles, "_dequantise", _fake_conversion(calls))
    threads = [threading.Thread(target=convert_bundled, args=(tmp_path,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2  # the killed attempt and exactly one of the four concurrent ones
    assert (tmp_path / BUNDLED_MODEL / "model.safetensors").read_bytes() == b"weights"


def test_a_local_folder_is_used_as_is(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model_dir), tmp_path) == str(tiny_model_dir)
    with pytest.raises(ModelUnavailable, match=r"config\.json"):
        resolve_model(str(tmp_path), tmp_path)
    with pytest.raises(ModelUnavailable, match="no such folder"):
        resolve_model(str(tmp_path / "missing"), tmp_path)


def test_hub_ids_come_from_the_cache_when_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE"):
        resolve_model("acme/support-7b", tmp_path / "models")

    # The layout huggingface_hub writes: refs/main names the snapshot folder.
    repo = tmp_path / "models--acme--support-7b"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert resolve_model("acme/support-7b", tmp_path / "models") == str(snapshot)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the operator allowed downloads: passed through
    assert resolve_model("acme/other-model", tmp_path / "models") == "acme/other-model"


def test_base_model_hash_is_cached_and_follows_the_bytes(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = base_model_hash(tmp_path)
    assert len(first) == 64 and (tmp_path / modelfiles.HASH_CACHE).is_file()
    assert base_model_hash(tmp_path) == first
    weights.write_bytes(b"b" * 1001)
    assert base_model_hash(tmp_path) != first
    weights.write_bytes(b"a" * 1000)
    assert base_model_hash(tmp_path) == first
    with pytest.raises(ModelUnavailable):
        base_model_hash(tmp_path / "nothing")


def test_chat_template_hash_changes_with_the_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    original = chat_template_hash(tokenizer)
    assert original == chat_template_hash(AutoTokenizer.from_pretrained(tiny_model_dir))
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert chat_template_hash(tokenizer) != original
