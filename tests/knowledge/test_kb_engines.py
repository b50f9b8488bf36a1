"""The knowledge base on embedded Chroma and on a real Chroma server (`chroma run`).

With a server, replicas share one store of documents and correction memory: what one
replica ingests or learns, the other retrieves at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge import vectors
from knowledge.retrieve import CORRECTIONS, DOCUMENTS, KnowledgeBase

DOCS = {
    "returns.md": "# Returns\n\nBikes can be returned within 30 days for a full refund. Bring the receipt.\n",
    "hours.md": "# Opening hours\n\nThe shop opens Monday to Saturday from 9:00 to 18:00.\n",
}


@pytest.fixture
def kb_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "kb"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_ingest_search_and_memory(tmp_path: Path, kb_folder: Path, chroma_url: str) -> None:
    kb = KnowledgeBase(tmp_path / "replica-a", chroma_url)
    try:
        kb.ingest([kb_folder])
        n = kb.count()
        assert n >= 2
        kb.ingest([kb_folder])  # idempotent on either engine
        assert kb.count() == n
        [best, *_] = kb.search("Can I get my money back for a bike?", 2)
        assert best.title == "Returns" and best.score > 0.3
        kb.remember(7, "Are you open on Sundays?", "No, we are closed on Sundays.")
        got = kb.retrieve("Is the shop open on a Sunday?", 2, memory_threshold=0.6)
        assert got.memory is not None and got.memory.correction_id == 7
        kb.forget(7)
        assert kb.retrieve("Is the shop open on a Sunday?", 2, memory_threshold=0.6).memory is None
    finally:
        kb.close()
    # embedded Chroma writes under the data dir; with a server nothing is stored locally
    assert (tmp_path / "replica-a" / "chroma").exists() == (chroma_url == "")


@pytest.mark.chroma_server
def test_replicas_share_documents_and_corrections_through_the_server(
    tmp_path: Path, kb_folder: Path, chroma_server
) -> None:
    chroma_server.wipe()
    a = KnowledgeBase(tmp_path / "a", chroma_server.url)
    b = KnowledgeBase(tmp_path / "b", chroma_server.url)
    try:
        assert b.count() == 0
        a.ingest([kb_folder])
        assert b.count() == a.count()
        assert b.search("When do you open on Monday?", 1)[0].title == "Opening hours"  # BM25 index rebuilt
        a.remember(3, "Do you sell gift cards?", "Yes, gift cards from 10 to 200 euros.")
        memory = b.retrieve("Can I buy a gift card?", 1, memory_threshold=0.6).memory
        assert memory is not None and memory.text == "Yes, gift cards from 10 to 200 euros."
        # the server stores our embedding function's name, never Chroma's default (which downloads)
        client = vectors.open_client(tmp_path, chroma_server.url)
        try:
            for name in (DOCUMENTS, CORRECTIONS):
                config = client.get_collection(name).configuration_json
                assert config["embedding_function"]["name"] == vectors.EMBEDDING_FUNCTION_NAME
                assert config["hnsw"]["space"] == "cosine"
        finally:
            vectors.close_client(client)
    finally:
        a.close()
        b.close()
