"""Which backend answers: the settings pick one, everything else lives in the backend's own module.

- APPRENTICE_LLM_URL set: an OpenAI-compatible server (vLLM) does the batching (learning/llm_http.py).
- Otherwise the batching runtime in this process (learning/batching.py) with one engine:
  ONNX Runtime GenAI (learning/onnx_engine.py; the default on a CPU: the model exported once with int8
  weights, several times faster at the same quality) or transformers + peft (learning/hf_engine.py;
  GPUs, or APPRENTICE_ENGINE=transformers).

Loading is blocking (seconds): call these in a thread. torch is imported lazily.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learning.batching import Engine, LocalRuntime, check_limits, load_vocabulary
from learning.cpus import decode_threads
from learning.hf_engine import HfEngine
from learning.modelfiles import export_dirs, offline_by_default, resolve_model
from learning.onnx_engine import OnnxEngine, choose_pad

if TYPE_CHECKING:
    from knowledge.settings import Settings
    from learning.generation import Generator

log = logging.getLogger(__name__)

ENGINES = ("auto", "transformers", "onnx")  # auto: onnx on a CPU, transformers on a GPU

# Measured on SmolLM2-135M with retrieval prompts: 1.0 loops ("... ... ..."), a penalty over the
# whole prompt (HF's own) also punishes quoting the passages and the end-of-turn token, so the
# engines' penalty only looks at the tokens the model generated itself.
DEFAULT_REPETITION_PENALTY = 1.1


def build_runtime(settings: Settings) -> Generator:
    """The generator the settings ask for. Blocking (loads the model): call it in a thread."""
    if settings.llm_url:
        # An OpenAI-compatible server (vLLM with --enable-lora) does the batching; httpx stays lazy.
        from learning.llm_http import build_http_generator

        return build_http_generator(settings)
    return build_local(settings)


def build_local(settings: Settings, **overrides: Any) -> LocalRuntime:
    """The in-process runtime the settings describe (blocking: loads the model). Evaluation and the
    benchmarks override the queue and the timeout: they wait, they never tell a customer to come back
    later."""
    options: dict[str, Any] = {
        "name": settings.model,
        "dtype": settings.dtype,
        "max_batch": settings.max_batch,
        "max_queue": settings.max_queue,
        "max_new_tokens": settings.max_new_tokens,
        "timeout_s": settings.llm_timeout_s,
        "engine": settings.engine,
        "num_threads": settings.threads or None,
    }
    options["onnx_cache"], options["onnx_prebuilt"] = export_dirs(settings.models_dir, settings.data_dir)
    options.update(overrides)
    return load_local(resolve_model(settings.model, settings.models_dir), **options)


def load_local(
    model_path: str,
    *,
    name: str | None = None,
    engine: str = "transformers",
    dtype: str = "auto",
    device: str | None = None,
    num_threads: int | None = None,
    onnx_cache: str | Path | None = None,
    onnx_prebuilt: Sequence[Path] = (),
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    max_batch: int = 8,
    max_queue: int = 64,
    max_new_tokens: int = 160,
    timeout_s: float = 60.0,
    max_input_tokens: int | None = None,
    start: bool = True,
) -> LocalRuntime:
    """The model folder `model_path` served in this process by `engine` (one of ENGINES)."""
    check_limits(max_batch, max_queue, max_new_tokens)
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}.")
    offline_by_default()
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if engine == "auto":
        engine = "onnx" if device == "cpu" else "transformers"
    if engine == "onnx" and device != "cpu":
        raise ValueError("engine=onnx is the CPU decoding path; use engine=transformers on a GPU.")
    threads = None  # None: the GPU, or OMP_NUM_THREADS, decides
    if device == "cpu" and (num_threads or "OMP_NUM_THREADS" not in os.environ):
        threads = num_threads or decode_threads()

    started = time.perf_counter()
    vocabulary = load_vocabulary(model_path)
    chosen: Engine
    if engine == "onnx":
        chosen = OnnxEngine(
            model_path,
            pad=choose_pad(vocabulary.tokenizer, set(vocabulary.eos)),
            eos=vocabulary.eos,
            repetition_penalty=repetition_penalty,
            cache_dir=Path(onnx_cache) if onnx_cache else Path(model_path).parent / "onnx",
            prebuilt=onnx_prebuilt,
            threads=threads,
        )
    else:
        chosen = HfEngine(
            model_path,
            pad=vocabulary.pad,
            eos=vocabulary.eos,
            repetition_penalty=repetition_penalty,
            dtype=dtype,
            device=device,
            threads=threads,
        )
    runtime = LocalRuntime(
        chosen, vocabulary, model_path=model_path, name=name, max_batch=max_batch, max_queue=max_queue,
        max_new_tokens=max_new_tokens, timeout_s=timeout_s, max_input_tokens=max_input_tokens, start=start,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s, %s) in %.1f s", runtime.model_name, chosen.description, device, seconds)
    return runtime
