"""Chroma access details: server URLs, and our embedding function on every collection."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge import embed, vectors


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8123", ("127.0.0.1", 8123, False)),
        ("https://chroma.internal", ("chroma.internal", 443, True)),
        ("chroma:9000", ("chroma", 9000, False)),
        ("http://localhost", ("localhost", 8000, False)),
    ],
)
def test_chroma_url_is_parsed(url: str, expected: tuple[str, int, bool]) -> None:
    assert vectors.parse_url(url) == expected


def test_bad_chroma_url_says_what_it_should_look_like() -> None:
    with pytest.raises(ValueError, match="APPRENTICE_CHROMA_URL must look like http://host:8000"):
        vectors.parse_url("ftp://files.example")


def test_collections_embed_with_minilm_never_chromas_default(tmp_path: Path) -> None:
    client = vectors.open_client(tmp_path, "")
    try:
        col = vectors.collection(client, "probe")
        assert col.configuration_json["embedding_function"]["name"] == vectors.EMBEDDING_FUNCTION_NAME
        # documents added without embeddings are embedded by our function (Chroma's would download)
        col.add(ids=["a"], documents=["Our shop opens at nine."])
        [hit] = vectors.get(col, ids=["a"], with_embeddings=True)
        assert hit.embedding == pytest.approx(embed.embed(["Our shop opens at nine."])[0], abs=1e-5)
        [near] = vectors.query(col, embed.embed_query("When do you open?"), 3)
        assert near.id == "a" and 0.3 < near.score <= 1.0
    finally:
        vectors.close_client(client)
    assert (tmp_path / "chroma").is_dir()
