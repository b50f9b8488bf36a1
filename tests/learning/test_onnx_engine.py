"""The ONNX export cache: what a cached export depends on, and that old exports are cleaned up.

The engine's serving mechanics (batching, padding, budgets, adapter hot-swap) are tested beside the
transformers engine in test_runtime.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from learning.onnx_engine import ExportError, ensure_export, export_key, prune


def _fake_export(root: Path, name: str, age_s: int) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}", encoding="utf-8")
    (folder / "model.onnx").write_bytes(b"onnx")
    stamp = 1_800_000_000 - age_s
    os.utime(folder, (stamp, stamp))
    return folder


def test_prune_keeps_the_most_recently_used_exports_and_the_new_one(tmp_path: Path) -> None:
    old = [_fake_export(tmp_path, f"m-{i}", age_s=100 * (i + 1)) for i in range(5)]  # m-0 newest
    new = _fake_export(tmp_path, "m-new", age_s=10_000)  # just exported: spared whatever its time
    half = tmp_path / ".exporting-m-x"
    half.mkdir()  # an export in progress is not complete: never pruned here
    gone = prune(tmp_path, keep=3, spare=new)
    assert sorted(p.name for p in gone) == ["m-2", "m-3", "m-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exporting-m-x", "m-0", "m-1", "m-new"]
    assert all(p.exists() for p in old[:2])


def test_the_export_key_follows_the_adapter_files_and_the_padding(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}', encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v1")
    base = export_key(str(tiny_model_dir), None, 0)
    first = export_key(str(tiny_model_dir), str(adapter), 0)
    assert export_key(str(tiny_model_dir), str(adapter), 0) == first  # stable: the cache hits
    assert first != base
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v2")  # retrained into the same path
    assert export_key(str(tiny_model_dir), str(adapter), 0) not in (first, base)
    assert export_key(str(tiny_model_dir), None, 1) != base


def test_a_model_the_builder_cannot_export_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    model = tmp_path / "odd-model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}')
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    cache = tmp_path / "onnx"
    with pytest.raises(ExportError, match=r"export of .* failed .*APPRENTICE_ENGINE=transformers"):
        ensure_export(str(model), cache, pad_token_id=0)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no half export
    with pytest.raises(ExportError, match="not one"):
        ensure_export("SomeOrg/not-a-local-folder", cache, pad_token_id=0)
