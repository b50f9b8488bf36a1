"""Chroma access: the only module that imports `chromadb`.

Everything else in the project speaks plain lists and the `Hit` record. `chromadb` is imported
inside functions so that `apprentice --help` never pays for it. Every collection gets our
MiniLM embedding function explicitly: Chroma's default one would try to download a model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from knowledge import embed

log = logging.getLogger(__name__)

EMBEDDING_FUNCTION_NAME = "apprentice-minilm-l6-v2"
Metadata = Mapping[str, str | int | float | bool]


@dataclass(frozen=True)
class Hit:
    """One stored item: its text, metadata and (when asked for) its cosine score and embedding."""

    id: str
    text: str
    metadata: dict[str, Any]
    score: float = 0.0
    embedding: list[float] = field(default_factory=list)


@cache
def _embedding_function_class() -> type:
    """Build the chromadb EmbeddingFunction subclass on first use (keeps chromadb import lazy)."""
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
    from chromadb.utils.embedding_functions import register_embedding_function

    class MiniLMEmbeddingFunction(EmbeddingFunction[Documents]):
        """all-MiniLM-L6-v2 from the local wheel, unit-normalised (for the "cosine" space)."""

        def __init__(self) -> None:
            pass

        def __call__(self, input: Documents) -> Embeddings:
            import numpy as np

            return [np.asarray(v, dtype=np.float32) for v in embed.embed(list(input))]

        def embed_query(self, input: Documents) -> Embeddings:
            import numpy as np

            return [np.asarray(embed.embed_query(t), dtype=np.float32) for t in input]

        @staticmethod
        def name() -> str:
            return EMBEDDING_FUNCTION_NAME

        def default_space(self) -> str:  # type: ignore[override]
            return "cosine"

        def get_config(self) -> dict[str, Any]:
            return {}

        @staticmethod
        def build_from_config(config: dict[str, Any]) -> MiniLMEmbeddingFunction:
            return MiniLMEmbeddingFunction()

    try:
        register_embedding_function(MiniLMEmbeddingFunction)
    except ValueError:  # already registered (e.g. module reloaded in tests)
        pass
    return MiniLMEmbeddingFunction


def embedding_function() -> Any:
    """A chromadb-compatible embedding function wrapping `knowledge.embed`."""
    return _embedding_function_class()()


def parse_url(url: str) -> tuple[str, int, bool]:
    """(host, port, ssl) from `http://host:port`; the port defaults to 8000 like `chroma run`."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"APPRENTICE_CHROMA_URL must look like http://host:8000, got {url!r}.")
    ssl = parts.scheme == "https"
    return parts.hostname, parts.port or (443 if ssl else 8000), ssl


def open_client(data_dir: Path, chroma_url: str = "") -> Any:
    """An embedded PersistentClient under `data_dir/chroma`, or an HttpClient when a URL is given."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if chroma_url:
        host, port, ssl = parse_url(chroma_url)
        log.info("using Chroma server at %s:%d", host, port)
        try:
            return chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=settings)
        except Exception as exc:
            raise RuntimeError(
                f"Cannot reach the Chroma server at {chroma_url} ({exc}). Start it with "
                "`chroma run --path DIR --port PORT`, or unset APPRENTICE_CHROMA_URL to use embedded Chroma."
            ) from exc
    path = Path(data_dir) / "chroma"
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=settings)


def close_client(client: Any) -> None:
    """Release the client (PersistentClient holds the SQLite file open otherwise)."""
    close = getattr(client, "close", None)
    if close is not None:
        close()


def collection(client: Any, name: str) -> Any:
    """Get or create a cosine-space collection that embeds with MiniLM, never Chroma's default."""
    return client.get_or_create_collection(
        name=name, embedding_function=embedding_function(), metadata={"hnsw:space": "cosine"}
    )


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def upsert(
    col: Any,
    ids: Sequence[str],
    texts: Sequence[str],
    metadatas: Sequence[Metadata],
    embeddings: Sequence[Sequence[float]] | None = None,
) -> None:
    """Insert or replace items; embeddings are computed by our function when not given."""
    if not ids:
        return
    if embeddings is None:
        embeddings = embed.embed(list(texts))
    step = 2000  # well below Chroma's max batch size
    for s in _batches(len(ids), step):
        col.upsert(
            ids=list(ids[s]),
            documents=list(texts[s]),
            metadatas=[dict(m) for m in metadatas[s]],
            embeddings=[list(e) for e in embeddings[s]],
        )


def delete(col: Any, ids: Sequence[str] | None = None, where: Metadata | None = None) -> None:
    """Delete by ids or by a metadata filter (one of the two)."""
    if ids is not None:
        if ids:
            col.delete(ids=list(ids))
    elif where is not None:
        col.delete(where=dict(where))


def purge_log(client: Any, col: Any, ids: Sequence[str]) -> int | None:
    """Remove what embedded Chroma still keeps of deleted items; None for a Chroma server.

    Embedded Chroma writes every add/upsert (document, metadata and vector) to a write-ahead
    queue, the `embeddings_queue` table of `chroma.sqlite3`, and purges a row only once every
    segment has applied it: the HNSW segment persists every `hnsw:sync_threshold` (1,000) writes,
    so a deleted item's text stays there until about 1,000 later writes, and SQLite leaves the
    freed pages of its deleted rows in the file. Chroma 1.5 has no API to purge one item's log.
    So, after the delete: the queue rows that carry these ids' data (add, update, upsert) are
    deleted, the delete rows (an id and no data) are kept, so a segment replaying the log from
    an older point still ends without the items, then the full-text index is merged and the file
    rewritten (`VACUUM`) so no freed page keeps their bytes. Returns the queue rows removed.
    """
    import sqlite3

    settings = getattr(client, "get_settings", lambda: None)()
    if settings is None or not getattr(settings, "is_persistent", False):
        return None  # a Chroma server: its operator purges (see docs/security.md, erasure)
    path = Path(str(settings.persist_directory)) / "chroma.sqlite3"
    if not ids or not path.exists():
        return 0
    marks = ",".join("?" * len(ids))
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("PRAGMA secure_delete = ON")
        with db:
            cur = db.execute(
                f"DELETE FROM embeddings_queue WHERE topic LIKE ? AND operation != 3 AND id IN ({marks})",
                [f"%/{col.id}", *ids],
            )
            removed = cur.rowcount
            try:  # merge the trigram index so deleted entries leave its segments too
                db.execute(
                    "INSERT INTO embedding_fulltext_search(embedding_fulltext_search) VALUES ('optimize')"
                )
            except sqlite3.DatabaseError:
                log.info("chroma full-text index not merged")
        db.execute("VACUUM")
    finally:
        db.close()
    return removed


def get(
    col: Any,
    ids: Sequence[str] | None = None,
    where: Metadata | None = None,
    with_text: bool = True,
    with_embeddings: bool = False,
) -> list[Hit]:
    """Stored items (all of them when neither ids nor where is given)."""
    include = ["metadatas"]
    if with_text:
        include.append("documents")
    if with_embeddings:
        include.append("embeddings")
    kwargs: dict[str, Any] = {"include": include}
    if ids is not None:
        kwargs["ids"] = list(ids)
    if where is not None:
        kwargs["where"] = dict(where)
    res = col.get(**kwargs)
    docs = res.get("documents") if with_text else None
    embs = res.get("embeddings") if with_embeddings else None
    hits = []
    for i, id_ in enumerate(res["ids"]):
        hits.append(
            Hit(
                id=id_,
                text=(docs[i] or "") if docs is not None else "",
                metadata=dict(res["metadatas"][i] or {}),
                embedding=[float(x) for x in embs[i]] if embs is not None else [],
            )
        )
    return hits


def query(
    col: Any, embedding: Sequence[float], k: int, where: Mapping[str, Any] | None = None
) -> list[Hit]:
    """The k nearest items to a (unit-length) query embedding; score = cosine similarity.

    `where` is a Chroma metadata filter (`{"key": value}`, `{"key": {"$ne": value}}`, `$or`, ...)."""
    n = col.count()
    if n == 0 or k <= 0:
        return []
    kwargs: dict[str, Any] = {
        "query_embeddings": [list(embedding)],
        "n_results": min(k, n),
        "include": ["documents", "metadatas", "distances"],
    }
    if where is not None:
        kwargs["where"] = dict(where)
    res = col.query(**kwargs)
    return [
        Hit(id=id_, text=doc or "", metadata=dict(meta or {}), score=1.0 - float(dist))
        for id_, doc, meta, dist in zip(
            res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0], strict=True
        )
    ]


def count(col: Any) -> int:
    return int(col.count())
