"""The CPU decoding engine: the model exported once to ONNX and run by ONNX Runtime GenAI.

Why: on a CPU, batch-1 decoding has to read every weight once per token, and PyTorch's matrix-vector
kernels plus per-layer Python overhead reach about 12% of the memory-bandwidth bound (docs/engines.md, README
Benchmarks). ONNX Runtime GenAI fuses each layer (GroupQueryAttention, SkipSimplifiedLayerNorm,
MatMulNBits) and its int8 weight-only matmuls read half the bytes of bf16: on SmolLM2-135M it decodes
4.8x faster (`apprentice bench speed`) with answers as good as bf16's (the loop benchmark's baseline:
0.449 / 0.418 held-out / controls, against 0.450 / 0.413 on transformers bf16). An exploratory loss
check agreed (1.1857 vs 1.1855 nats per token on emanual references); int4 rose to 1.44, so it is not
used.

The export is ONNX Runtime GenAI's own model builder, run in a subprocess: a few seconds for
SmolLM2, cached under `<models_dir>/onnx/` by the base model's hash and the adapter's hash. A LoRA
adapter is merged into a copy of the base first, so an answer costs what a base-model answer costs;
the nightly gate exports the candidate while it evaluates it, so promotion finds the export cached.

`OnnxEngine` keeps the `Engine` interface of learning/batching.py. `onnxruntime_genai` is imported
here and nowhere else, lazily (`apprentice --help` stays fast).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from learning.modelfiles import base_model_hash, file_lock, merged_with_adapter

log = logging.getLogger(__name__)

PRECISION = "int8"  # MatMulNBits, 8-bit weights, block 32, int8 activations (accuracy_level 4)
BUILDER = "onnxruntime_genai.models.builder"
EXPORT_TIMEOUT_S = 1800.0
KEEP_EXPORTS = 4  # exports unused the longest are deleted beyond this many (about 260 MB each for SmolLM2)
_TMP_PREFIX = ".exporting-"


class ExportError(RuntimeError):
    """The model (or a model with an adapter merged in) could not be exported to ONNX."""


def _files_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f.name.encode("utf-8") + b"\0" + f.read_bytes())
    return digest.hexdigest()


def export_key(model_path: str, adapter: str | None, pad_token_id: int) -> str:
    """What the export depends on: base weights, adapter files, padding token, precision, builder."""
    from importlib.metadata import version

    parts = [
        base_model_hash(model_path),
        _files_hash(Path(adapter)) if adapter else "-",
        str(pad_token_id),
        PRECISION,
        version("onnxruntime-genai"),
    ]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:20]


def _is_complete(folder: Path) -> bool:
    return (folder / "genai_config.json").is_file() and (folder / "model.onnx").is_file()


def ensure_export(
    model_path: str,
    cache_dir: Path,
    *,
    pad_token_id: int,
    adapter: str | None = None,
    prebuilt: Sequence[Path] = (),
) -> Path:
    """The ONNX folder for `model_path` (+ `adapter` merged in), exporting it the first time.

    `prebuilt` folders are read-only caches searched first (a container image exports the base model
    at build time). Written into a temporary folder and renamed into place under a file lock, so a
    killed export never leaves a half-written model and two processes never export the same thing.
    """
    if not Path(model_path).is_dir():
        raise ExportError(
            f"The ONNX engine exports a local model folder; {model_path!r} is not one. Set APPRENTICE_MODEL "
            "to a folder, or APPRENTICE_ENGINE=transformers."
        )
    name = f"{Path(model_path).name}-{export_key(model_path, adapter, pad_token_id)}"
    for shipped in prebuilt:
        if _is_complete(shipped / name):
            return shipped / name
    target = cache_dir / name
    if _is_complete(target):
        with contextlib.suppress(OSError):
            os.utime(target)  # "used now": pruning keeps the recently used exports
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / f".{target.name}.lock"):
        if _is_complete(target):
            return target
        for stale in cache_dir.glob(f"{_TMP_PREFIX}{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=cache_dir))
        try:
            started = time.perf_counter()
            source = model_path
            if adapter:
                source = str(tmp / "merged")
                _merge(model_path, adapter, source)
            _build(source, tmp / "onnx", tmp / "cache")
            config_path = tmp / "onnx" / "genai_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            # Rows of a batch are right-padded with this token: it must never occur inside a prompt.
            config["model"]["pad_token_id"] = pad_token_id
            config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)  # incomplete: not ours to trust
            os.rename(tmp / "onnx", target)
            log.info("exported %s to ONNX in %.1f s", target.name, time.perf_counter() - started)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        prune(cache_dir, keep=KEEP_EXPORTS, spare=target)
    return target


def prune(cache_dir: Path, *, keep: int, spare: Path) -> list[Path]:
    """Delete the exports used the longest ago beyond `keep` (never `spare`); returns what went.

    Every promoted adapter gets its own export, so without this the cache grows every night. A process
    still serving a deleted export keeps its open files (POSIX); a later switch back re-exports it.
    """
    exports = sorted(
        (p for p in cache_dir.iterdir() if _is_complete(p) and p != spare),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    gone = exports[max(0, keep - 1) :]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("deleted the unused ONNX export %s", folder.name)
    return gone


def _merge(model_path: str, adapter: str, out: str) -> None:
    """The base with the LoRA adapter folded into its weights (fp32, so nothing is rounded twice)."""
    import torch
    from transformers import AutoTokenizer

    merged_with_adapter(model_path, adapter, torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)


def _build(source: str, out: Path, cache: Path) -> None:
    command = [sys.executable, "-m", BUILDER, "-i", source, "-o", str(out), "-p", PRECISION, "-e", "cpu",
               "-c", str(cache)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"the ONNX export of {source} took over {EXPORT_TIMEOUT_S:g} s") from exc
    if done.returncode != 0 or not _is_complete(out):
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-5:]
        raise ExportError(
            f"the ONNX export of {source} failed (exit {done.returncode}): {' | '.join(tail)[-800:]}. "
            "Set APPRENTICE_ENGINE=transformers to serve without ONNX."
        )


def choose_pad(tokenizer: Any, eos: set[int]) -> int:
    """A special token a rendered prompt never holds, to right-pad batch rows with.

    ONNX Runtime GenAI finds where each row ends by its padding, so the pad must not be a token a prompt
    ends with; the chat template's own tokens (<|im_start|>, <|im_end|>, the usual pad) are avoided, and
    customer text cannot produce special tokens (learning.prompt.defang).
    """
    sample = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    used = set(tokenizer(sample, add_special_tokens=False)["input_ids"]) | eos
    for token in sorted(getattr(tokenizer, "all_special_ids", [])):
        if token not in used:
            return int(token)
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else max(eos))


class OnnxModel:
    """One exported model, loaded by ONNX Runtime GenAI; greedy generation of a right-padded batch."""

    def __init__(self, folder: Path, *, threads: int | None, pad_token_id: int) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(folder))
        if threads:
            options = {"session_options": {"intra_op_num_threads": threads}}
            config.overlay(json.dumps({"model": {"decoder": options}}))
        self.folder = folder
        self.pad = pad_token_id
        self._og = og
        self._model = og.Model(config)

    def generate(
        self,
        rows: Sequence[list[int]],
        budgets: Sequence[int],
        *,
        eos: set[int],
        repetition_penalty: float,
        stop: Callable[[int], bool],
        on_step: Callable[[int], None],
    ) -> list[list[int]]:
        """Greedy tokens for each row: up to its budget, its first eos, or until `stop(row)` says so.

        The repetition penalty is applied here, to the tokens each row generated itself (never the
        prompt: penalising the passages stops the model from quoting them), then ONNX Runtime picks the
        argmax. `on_step(step)` runs after every decoding step (step 0 = the first token).
        """
        import numpy as np

        batch, width, most = len(rows), max(len(ids) for ids in rows), max(budgets)
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=width + most, batch_size=batch, do_sample=False)
        generator = self._og.Generator(self._model, params)
        ids = np.full((batch, width), self.pad, dtype=np.int32)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = tokens  # right padding: what GroupQueryAttention expects
        generator.append_tokens(ids)
        out: list[list[int]] = [[] for _ in rows]
        live = [True] * batch
        for step in range(most):
            if repetition_penalty != 1.0:
                logits = np.array(generator.get_logits(), dtype=np.float32).reshape(batch, -1)
                for row, tokens in enumerate(out):
                    if tokens and live[row]:  # a finished row's logits are never read again
                        seen = np.fromiter(set(tokens), dtype=np.int64)
                        values = logits[row, seen]
                        logits[row, seen] = np.where(values > 0, values / repetition_penalty,
                                                     values * repetition_penalty)  # fmt: skip
                generator.set_logits(logits)
            generator.generate_next_token()
            chosen = generator.get_next_tokens()
            on_step(step)
            for row in range(batch):
                if not live[row]:
                    continue
                token = int(chosen[row])
                out[row].append(token)
                if token in eos or len(out[row]) >= budgets[row] or stop(row):
                    live[row] = False
            if not any(live) or generator.is_done():
                break
        return out

    def score(self, rows: Sequence[list[int]], continuation: list[int]) -> list[float]:
        """Mean log-probability per token of `continuation` after each (right-padded) row.

        ONNX Runtime GenAI appends tokens to a batch only once and returns the last position's logits,
        so the continuation is forced a token at a time: its log-probability is read from the logits,
        then the logits are replaced by a one-hot on that token and the generator takes it.
        """
        import numpy as np

        batch, width = len(rows), max(len(ids) for ids in rows)
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=width + len(continuation), batch_size=batch, do_sample=False)
        generator = self._og.Generator(self._model, params)
        ids = np.full((batch, width), self.pad, dtype=np.int32)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = tokens
        generator.append_tokens(ids)
        total = np.zeros(batch, dtype=np.float64)
        for step, token in enumerate(continuation):
            logits = np.array(generator.get_logits(), dtype=np.float32).reshape(batch, -1)
            top = logits.max(axis=1)
            total += logits[:, token] - top - np.log(np.exp(logits - top[:, None]).sum(axis=1))
            if step + 1 < len(continuation):
                forced = np.full_like(logits, -1e9)
                forced[:, token] = 0.0
                generator.set_logits(forced)
                generator.generate_next_token()
        return [float(v) for v in total / len(continuation)]


class OnnxEngine:
    """The `Engine` on ONNX Runtime GenAI: the base export, or the export with the adapter merged in.

    An adapter switch loads the candidate's export (cached: the nightly gate exported it while it
    evaluated it), so a promotion only loads files; answers cost what base-model answers cost.
    """

    name = "onnx"
    description = "onnxruntime-genai, int8 weight-only (MatMulNBits)"
    device = "cpu"

    def __init__(
        self,
        model_path: str,
        *,
        pad: int,
        eos: frozenset[int],
        repetition_penalty: float,
        cache_dir: Path,
        prebuilt: Sequence[Path] = (),
        threads: int | None = None,
    ) -> None:
        self.model_path = model_path
        self.cache_dir = cache_dir
        self.prebuilt = list(prebuilt)
        self.threads = threads
        self.repetition_penalty = repetition_penalty
        self._eos = set(eos)
        folder = ensure_export(model_path, cache_dir, pad_token_id=pad, prebuilt=self.prebuilt)
        self.base = OnnxModel(folder, threads=threads, pad_token_id=pad)
        self._model = self.base  # the model answering now: the base or an adapter merged in
        self._adapter: str | None = None

    def attach(self) -> None:
        """Nothing per thread: the session options carry the thread count."""

    def decode(
        self, rows: Sequence[list[int]], budgets: Sequence[int], stop: Callable[[int], bool]
    ) -> tuple[list[list[int]], float | None]:
        first: list[float] = []

        def on_step(step: int) -> None:
            if step == 0 and not first:
                first.append(time.perf_counter())

        new = self._model.generate(
            rows, budgets, eos=self._eos, repetition_penalty=self.repetition_penalty, stop=stop,
            on_step=on_step,
        )  # fmt: skip
        return new, (first[0] if first else None)

    def score(self, prefixes: Sequence[list[int]], continuation: list[int]) -> list[float]:
        return self._model.score(prefixes, continuation)

    def use_adapter(self, path: str | None, version: str | None) -> None:
        if path is None:
            self._model, self._adapter = self.base, None
            return
        folder = ensure_export(
            self.model_path, self.cache_dir, pad_token_id=self.base.pad, adapter=path, prebuilt=self.prebuilt
        )
        self._model = OnnxModel(folder, threads=self.threads, pad_token_id=self.base.pad)
        self._adapter = version or "adapter"

    @property
    def loaded_adapters(self) -> list[str]:
        """The adapter merged into the export answering now, if any."""
        return [self._adapter] if self._adapter else []


def weights_bytes_per_token(folder: Path) -> int:
    """Bytes of weights one decoding step reads from an exported model: every initializer once, except
    the input embedding table, of which a step only gathers one row."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name in gathered:
            continue
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total
