"""Customers write in their own language: BM25 stems each language's words, documents and questions
have their language detected (questions only among the knowledge base's own languages), and another
embedding model can be configured without mixing its vectors with MiniLM's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from knowledge import embed, language, retrieve, vectors
from knowledge.retrieve import KnowledgeBase, tokenize
from knowledge.settings import ConfigError, Settings

DATA = Path(__file__).resolve().parents[1] / "data" / "multilingual"


def _old_tokenize(text: str) -> list[str]:
    """knowledge.retrieve.tokenize before languages: English must tokenise exactly like this."""
    out = []
    for tok in re.findall(r"[a-z0-9]+(?:['.][a-z0-9]+)*", text.lower()):
        if tok in retrieve._STOPWORDS:
            continue
        if len(tok) > 4 and tok.endswith("ies"):
            tok = tok[:-3] + "y"
        elif tok.endswith("sses"):
            tok = tok[:-2]
        elif len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss"):
            tok = tok[:-1]
        out.append(tok)
    return out


@pytest.mark.parametrize(
    ("lang", "a", "b"),
    [
        ("de", "Rücksendungen", "Rücksendung"),
        ("de", "Samstags", "Samstag"),
        ("ru", "доставки", "доставка"),
        ("ru", "гарантии", "Гарантия"),
        ("es", "envíos", "envío"),
        ("es", "devoluciones", "devolución"),
    ],
)
def test_inflected_forms_share_a_stem(lang: str, a: str, b: str) -> None:
    assert tokenize(a, lang) == tokenize(b, lang) != []


def test_commonness_tells_everyday_words_from_rare_names_in_the_language_asked() -> None:
    assert language.commonness("morning", "en") > 0.6 > 0.3 > language.commonness("vudu", "en")
    assert language.commonness("morgen", "de") > language.commonness("morgen", "en")
    assert language.commonness("morning", "xx") == 0.0  # no word list: every unseen word weighs fully


def test_unicode_words_are_case_folded_with_digits_kept_and_underscores_split() -> None:
    assert tokenize("Сколько стоит доставка?", "ru") == ["сто", "доставк"]  # сколько is a stopword
    assert tokenize("Rücksendung", "en") == ["rücksendung"]  # not `r` + `cksendung` any more
    assert tokenize("Größe_42 kostet 4.90 Euro", "de") == ["gross", "42", "kost", "4.90", "euro"]
    assert tokenize("Скільки коштує доставка?", "uk") == ["коштує", "доставка"]  # no Ukrainian stemmer
    assert tokenize("l'adresse de livraison", "fr") == ["adress", "livraison"]


@pytest.mark.parametrize(
    "text",
    [
        "How do I pair bluetooth headphones? Batteries, glasses & the U.S. model's 3.5 mm jack!",
        "Don't reset Wi-Fi settings: press HOME, then Settings > General > Network (e.g. 192.168.0.1).",
    ],
)
def test_english_tokenises_exactly_as_before(text: str) -> None:
    assert tokenize(text) == tokenize(text, "en") == _old_tokenize(text)


@pytest.fixture(scope="module")
def bilingual_kb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnowledgeBase]:
    """The German and the Russian bike-shop documents in one knowledge base."""
    kb = KnowledgeBase(tmp_path_factory.mktemp("multilingual"))
    kb.ingest([DATA / "kb_de", DATA / "kb_ru"])
    yield kb
    kb.close()


def test_each_chunk_stores_its_documents_language(bilingual_kb: KnowledgeBase) -> None:
    langs: dict[str, set[str]] = {}
    for hit in vectors.get(bilingual_kb._docs, with_text=False):
        langs.setdefault(Path(hit.metadata["doc"]).parent.name, set()).add(hit.metadata["lang"])
    assert langs == {"kb_de": {"de"}, "kb_ru": {"ru"}}


@pytest.mark.parametrize(
    ("question", "source"),
    [
        ("Wie viele Tage habe ich für eine Rückgabe?", "rueckgabe.md"),
        ("Liefert ihr auch nach Österreich?", "versand.md"),
        ("Wie melde ich einen Schaden an meinem Fahrrad?", "garantie.md"),
        ("Сколько стоит доставка?", "dostavka.md"),
        ("Как отследить мою посылку?", "dostavka.md"),
        ("Сколько дней у меня есть на возврат товара?", "vozvrat.md"),
    ],
)
def test_german_and_russian_questions_find_their_document_first(
    bilingual_kb: KnowledgeBase, question: str, source: str
) -> None:
    assert [p.source for p in bilingual_kb.search(question, 4)][:1] == [source]


@pytest.mark.parametrize(("lang", "floor"), [("de", 0.75), ("ru", 0.8)])
def test_bm25_alone_answers_most_questions_at_rank_1(
    bilingual_kb: KnowledgeBase, lang: str, floor: float
) -> None:
    """The bench questions (paraphrased, inflected) by BM25 alone; the ASCII tokenizer got 0 in Russian."""
    rows = [json.loads(line) for line in (DATA / f"questions_{lang}.jsonl").read_text("utf-8").splitlines()]
    index = bilingual_kb._lexical()
    assert {index.query_language(r["question"]) for r in rows} == {lang}
    hits = 0
    for row in rows:
        top = bilingual_kb.search(row["question"], 1, dense=False, lexical=True)
        hits += bool(top) and Path(top[0].source).stem in row["gold_docs"]
    assert hits / len(rows) >= floor


def test_an_english_kb_never_reads_a_short_question_as_another_language(
    demo_kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = demo_kb._lexical()
    assert index.languages == ("en",)  # every demo document was detected as English

    def no_detector(languages: frozenset[str]) -> None:
        raise AssertionError("a knowledge base in one language needs no detector")

    monkeypatch.setattr(language, "_detector", no_detector)
    for question in ["Hours?", "UN55 reset", "Gift cards?", "Do you ship to Spain?", "Versand nach Wien?"]:
        assert index.query_language(question) == "en"
    assert demo_kb.search("Hours?", 1)[0].source == "opening-hours.md"


def test_detection_without_confidence_falls_back_to_the_default() -> None:
    assert language.detect("Wie lange dauert der Versand nach Österreich?") == "de"
    assert language.detect("Сколько стоит доставка?", ["en", "ru"]) == "ru"
    assert language.detect("42 42 42", ["en", "de"], default="de") == "de"


def test_an_unavailable_embedding_model_is_refused_with_the_setting_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    settings = Settings(data_dir=tmp_path / "data", embedding_model="paraphrase-multilingual-MiniLM-L12-v2")
    with pytest.raises(ConfigError, match="APPRENTICE_EMBEDDING_MODEL=paraphrase-multilingual") as err:
        KnowledgeBase.from_settings(settings)
    assert "hf download sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(embed.EmbeddingModelUnavailable, match="no sentence-transformers model"):
        KnowledgeBase(tmp_path / "data", embedding_model=str(tmp_path / "empty"))
    assert embed._name == ""  # the bundled model is still the one in use


def test_a_cached_hub_model_is_found_by_its_short_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--sentence-transformers--paraphrase-multilingual-MiniLM-L12-v2"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert embed.resolve("paraphrase-multilingual-MiniLM-L12-v2") == repo / "snapshots" / "abc123"


def test_another_embedding_model_gets_collections_of_its_own(tmp_path: Path) -> None:
    """A model folder (here a copy-free alias of the bundled MiniLM) never shares MiniLM's collections."""
    folder = str(embed.model_path())
    kb = KnowledgeBase(tmp_path)
    try:
        kb.ingest([DATA / "kb_de" / "versand.md"])
        kb.remember(1, "Liefert ihr nach Wien?", "Ja, nach Österreich für 14,90 Euro.")
    finally:
        kb.close()
    other = KnowledgeBase(tmp_path, embedding_model=folder)
    try:
        assert embed._name == folder
        assert other._docs.name != retrieve.DOCUMENTS and other._docs.name.startswith("documents-model-")
        assert other.count() == 0  # its documents are ingested anew
        assert [p.correction_id for p in other.recall("Liefert ihr nach Wien?")] == [1]  # carried over
    finally:
        other.close()
        embed.use("")
