"""The module boundaries of the model runtime: each engine keeps the one `Engine` interface, every
backend keeps the `Generator` contract, and the factory picks what the settings ask for.

The engines load the tiny random Llama (tests/conftest.py); nothing here decodes much.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from knowledge.settings import Settings
from learning.batching import Engine, LocalRuntime, load_vocabulary
from learning.generation import Generator
from learning.hf_engine import HfEngine, resolve_dtype
from learning.llm_http import HttpGenerator
from learning.onnx_engine import OnnxEngine, choose_pad
from learning.runtime import build_local, build_runtime, load_local

ROOT = Path(__file__).resolve().parents[2]


def both_engines(model_dir: Path, tmp_path: Path, repetition_penalty: float) -> tuple[HfEngine, OnnxEngine]:
    """The transformers (fp32) and ONNX (int8, one thread) engines on the same model."""
    vocabulary = load_vocabulary(str(model_dir))
    hf = HfEngine(
        str(model_dir), pad=vocabulary.pad, eos=vocabulary.eos, repetition_penalty=repetition_penalty,
        dtype="float32",
    )  # fmt: skip
    onnx = OnnxEngine(
        str(model_dir), pad=choose_pad(vocabulary.tokenizer, set(vocabulary.eos)), eos=vocabulary.eos,
        repetition_penalty=repetition_penalty, cache_dir=tmp_path / "onnx", threads=1,
    )  # fmt: skip
    return hf, onnx


def test_each_in_process_engine_keeps_the_engine_interface(tiny_model_dir: Path, tmp_path: Path) -> None:
    vocabulary = load_vocabulary(str(tiny_model_dir))
    assert vocabulary.eos and vocabulary.context_tokens == 2048
    hf, onnx = both_engines(tiny_model_dir, tmp_path, repetition_penalty=1.1)
    for engine, name in ((hf, "transformers"), (onnx, "onnx")):
        assert isinstance(engine, Engine)
        assert engine.name == name and engine.device == "cpu" and engine.loaded_adapters == []
    rows, budgets = [[1, 2, 3, 4], [5, 6]], [3, 5]
    for engine in (hf, onnx):
        new, first = engine.decode(rows, budgets, lambda row: False)
        assert len(new) == 2 and all(1 <= len(tokens) <= 5 for tokens in new) and first is not None


def test_no_engine_module_imports_another_engine_or_the_factory() -> None:
    """One module per engine, and none imports another engine or the factory (no cycles)."""
    modules = {
        "learning/hf_engine.py": set(),
        "learning/onnx_engine.py": set(),
        "learning/llm_http.py": set(),
        "learning/batching.py": set(),
        "learning/generation.py": set(),
    }
    for rel in modules:
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("learning"):
                modules[rel].add(node.module)
            elif isinstance(node, ast.Import):
                modules[rel].update(a.name for a in node.names if a.name.startswith("learning"))
    engines = {"learning.hf_engine", "learning.onnx_engine", "learning.llm_http", "learning.runtime"}
    for rel, imported in modules.items():
        assert not imported & engines, f"{rel} imports {sorted(imported & engines)}"
    assert modules["learning/generation.py"] == set()  # the contract depends on nothing of ours


def test_the_factory_picks_the_backend_the_settings_ask_for(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = {"model": str(tiny_model_dir), "dtype": "float32", "max_new_tokens": 3}
    remote = build_runtime(Settings(data_dir=tmp_path, llm_url="http://127.0.0.1:9/v1", **common))
    assert isinstance(remote, HttpGenerator) and isinstance(remote, Generator)
    assert remote.base_url == "http://127.0.0.1:9"  # nothing is contacted before the first answer

    local = build_local(Settings(data_dir=tmp_path, engine="transformers", threads=2, **common), start=False)
    try:
        assert isinstance(local, LocalRuntime) and isinstance(local, Generator)
        assert isinstance(local.engine, HfEngine) and local.engine.threads == 2
        assert local.model_path == str(tiny_model_dir) and local.max_new_tokens == 3
    finally:
        local.close()


def test_the_factory_checks_its_options_before_loading_anything(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-model-here")
    with pytest.raises(ValueError, match="at least 1"):
        load_local(missing, max_queue=0)
    with pytest.raises(ValueError, match="engine 'int8' is not one of auto, transformers, onnx"):
        load_local(missing, engine="int8")
    with pytest.raises(ValueError, match="engine=onnx is the CPU decoding path"):
        load_local(missing, engine="onnx", device="cuda")
    with pytest.raises(ValueError, match="dtype 'int4' is not one of"):
        resolve_dtype("int4")


def test_each_engine_scores_a_continuation_the_same_batched_as_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`score` (the reranker's query likelihood): padding must not leak into a row's score, and the
    int8 ONNX export must read the continuation as transformers does."""
    hf, onnx = both_engines(tiny_model_dir, tmp_path, repetition_penalty=1.0)
    rows, continuation = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]], [20, 21, 22]
    alone_hf = [hf.score([row], continuation)[0] for row in rows]
    batched_hf = hf.score(rows, continuation)
    assert batched_hf == pytest.approx(alone_hf, abs=1e-4)
    assert all(v < 0 for v in batched_hf) and len(set(batched_hf)) == 3
    alone_onnx = [onnx.score([row], continuation)[0] for row in rows]
    assert onnx.score(rows, continuation) == pytest.approx(alone_onnx, abs=1e-3)
    assert alone_onnx == pytest.approx(alone_hf, abs=0.05)
