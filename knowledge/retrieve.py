"""The knowledge base: the one entry point the rest of the app uses for documents and corrections.

Search is hybrid. Dense retrieval (MiniLM in Chroma) finds paraphrases; BM25 finds the exact
words customers use for product names, menu items and error codes. Their rankings are merged
with reciprocal-rank fusion, which needs no score calibration between the two. Every passage
still carries its dense cosine similarity as `score`, so the relevance and memory thresholds
keep one meaning whatever ranked it.

Correction memory is a second collection keyed by the customer QUESTION a staff member
corrected: a new question that is close enough to an old one gets the staff answer. A correction
that holds a customer's personal data is private to its conversation (`remember(...,
conversation_id)`) and recalled only there.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowledge import embed, language, vectors
from knowledge.bm25 import BM25
from knowledge.ingest import IngestReport, StoredDocument, ingest, remove, stored
from knowledge.passages import Passage, Retrieval

if TYPE_CHECKING:
    import numpy as np

    from knowledge.settings import Settings

log = logging.getLogger(__name__)

DOCUMENTS = "documents"
CORRECTIONS = "corrections"

# Fusion settings. The optimum is flat on the emanual bench (684 questions): BM25 weight 1-2,
# RRF constant 10-60 and BM25 b 0.4-0.75 land within 0.02 recall@5 of each other. Weighting
# BM25 up gained 0.01 there but lost 2 of 35 paraphrased demo-shop questions at rank 1, and
# customers paraphrase, so both retrievers count the same.
RRF_K = 20  # damps the gap between rank 1 and rank 2 of one retriever
DENSE_WEIGHT = 1.0
BM25_WEIGHT = 1.0
INDEX_CHECK_S = 2.0  # how stale the BM25 index may be after ANOTHER process's ingest
BM25_K1 = 1.2
BM25_B = 0.5  # weaker length normalisation: long chunks are not penalised much
CANDIDATES = 30  # per retriever, before fusion

# Words are runs of letters and digits in any script (underscores split them); `'` and `.` join
# two runs (don't, 3.5). On ASCII text this is exactly the former [a-z0-9]+(?:['.][a-z0-9]+)*.
_TOKEN = re.compile(r"[^\W_]+(?:['.][^\W_]+)*")
_TOKEN_NO_APOSTROPHE = re.compile(r"[^\W_]+(?:\.[^\W_]+)*")  # l'adresse, İstanbul'a: two words
# combining dot above (what casefold leaves of Turkish İ), Arabic tatweel and short-vowel marks
_MARKS = re.compile("[\u0307\u0640\u064b-\u065f\u0670]")
_STOPWORD_TEXT = """
    a an and are as at be but by can could do does did for from had has have how i if in into is it its
    me my of on or our so than that the their them then there these they this to was we were what when
    where which who why will with would you your yours
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def tokenize(text: str, lang: str = language.DEFAULT) -> list[str]:
    """Case-folded words for BM25, stemmed for `lang` (an ISO 639-1 code).

    English drops stopwords and makes plurals singular with the light rules below, exactly as before
    languages were told apart. Snowball's English (Porter2) was measured on the emanual bench: BM25
    alone 0.654 / 0.923 recall@1 / @5 against 0.627 / 0.914, hybrid recall@5 0.905 against 0.899
    (4 of 684 questions), but learning/answer.py checks answers against passages with these same
    tokens, so English stays. Other languages drop their stopwords and get their Snowball stemmer
    where PyStemmer has one (knowledge.language); Ukrainian and uncatalogued ones keep whole words.
    """
    text = _MARKS.sub("", unicodedata.normalize("NFC", text).casefold())
    if lang != "en":
        return language.stems(_TOKEN_NO_APOSTROPHE.findall(text), lang)
    out = []
    for tok in _TOKEN.findall(text):
        if tok in _STOPWORDS:
            continue
        if len(tok) > 4 and tok.endswith("ies"):
            tok = tok[:-3] + "y"
        elif tok.endswith("sses"):
            tok = tok[:-2]
        elif len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss"):
            tok = tok[:-1]
        out.append(tok)
    return out


@dataclass
class _LexicalIndex:
    """All chunks in memory: BM25 over their text and their embeddings for scoring BM25-only hits.

    Each chunk is tokenised in its document's language (`lang` in its metadata; chunks ingested
    before languages were detected count as English) and a query in the language detected among
    those present, the most common one when the detector is unsure.
    """

    ids: list[str]
    texts: list[str]
    metas: list[dict[str, Any]]
    matrix: np.ndarray
    bm25: BM25 | None
    position: dict[str, int]
    languages: tuple[str, ...] = (language.DEFAULT,)  # most common first

    @classmethod
    def build(cls, col: Any) -> _LexicalIndex:
        import numpy as np

        hits = vectors.get(col, with_text=True, with_embeddings=True)
        ids = [h.id for h in hits]
        langs = [str(h.metadata.get("lang") or language.DEFAULT) for h in hits]
        matrix = np.asarray([h.embedding for h in hits], dtype=np.float32)
        matrix = matrix.reshape(len(hits), -1) if hits else np.zeros((0, 0), dtype=np.float32)
        bm25 = (BM25([tokenize(h.text, lang) or ["_"] for h, lang in zip(hits, langs, strict=True)],
                     k1=BM25_K1, b=BM25_B)
                if hits else None)
        ranked = tuple(lang for lang, _ in Counter(langs).most_common()) or (language.DEFAULT,)
        return cls(ids=ids, texts=[h.text for h in hits], metas=[h.metadata for h in hits], matrix=matrix,
                   bm25=bm25, position={id_: i for i, id_ in enumerate(ids)}, languages=ranked)

    def query_language(self, query: str) -> str:
        """The query's language among the knowledge base's (no detection when it has one)."""
        return language.detect(query, self.languages, default=self.languages[0])

    def top(self, query: str, n: int) -> list[int]:
        """Positions of the n best BM25 matches with a positive score."""
        import numpy as np

        if self.bm25 is None:
            return []
        tokens = tokenize(query, self.query_language(query))
        if not tokens:
            return []
        scores = self.bm25.get_scores(tokens)
        if n < len(scores):  # the n best without sorting every chunk
            top = np.argpartition(-scores, n)[:n]
            best = top[np.argsort(-scores[top], kind="stable")]
        else:
            best = np.argsort(-scores, kind="stable")
        return [int(i) for i in best if scores[i] > 0]


def _diverse(ranked: list[int], docs: list[str], k: int) -> list[int]:
    """The first k of `ranked`, one chunk per document before any document gets a second.

    Customers' questions usually need one passage from each of a few documents more than two
    neighbouring chunks of one; a single long manual still fills all k slots.
    """
    seen: set[str] = set()
    first: list[int] = []
    rest: list[int] = []
    for pos, doc in zip(ranked, docs, strict=True):
        (rest if doc in seen else first).append(pos)
        seen.add(doc)
    return (first + rest)[:k]


class KnowledgeBase:
    """Documents and correction memory over Chroma; thread-safe for concurrent searches."""

    def __init__(self, data_dir: Path, chroma_url: str = "", embedding_model: str = "") -> None:
        """`embedding_model`: APPRENTICE_EMBEDDING_MODEL (empty: the bundled MiniLM). It becomes the
        process's model, and its vectors live in collections of their own (see embed.collection_suffix).
        """
        embed.use(embedding_model)  # an unavailable model stops here, with what to do
        suffix = embed.collection_suffix(embedding_model)
        self.data_dir = Path(data_dir)
        self._client = vectors.open_client(self.data_dir, chroma_url)
        self._docs = vectors.collection(self._client, DOCUMENTS + suffix)
        self._corrections = vectors.collection(self._client, CORRECTIONS + suffix)
        if suffix and vectors.count(self._corrections) == 0:
            self._carry_corrections(vectors.collection(self._client, CORRECTIONS))
        self._lock = threading.Lock()
        self._index: _LexicalIndex | None = None
        self._index_count = -1
        self._index_checked = 0.0  # monotonic time of the last look at the collection's size

    @classmethod
    def from_settings(cls, settings: Settings) -> KnowledgeBase:
        return cls(settings.data_dir, settings.chroma_url, settings.embedding_model)

    # --- documents ---------------------------------------------------------------------------

    def ingest(
        self, paths: Sequence[Path] | Path, prune: bool = False, progress: bool = False
    ) -> IngestReport:
        """Ingest files and folders (idempotent; see knowledge.ingest) and refresh the BM25 index."""
        if isinstance(paths, (str, Path)):
            paths = [Path(paths)]
        try:
            return ingest(self._docs, [Path(p) for p in paths], prune=prune, progress=progress)
        finally:
            with self._lock:
                self._index = None

    def documents(self) -> list[StoredDocument]:
        """The ingested documents (`apprentice kb list`)."""
        return stored(self._docs)

    def remove(self, names: Sequence[str]) -> list[StoredDocument]:
        """Delete documents by source name, path or folder (`apprentice kb rm`)."""
        try:
            return remove(self._docs, names)
        finally:
            with self._lock:
                self._index = None

    def count(self) -> int:
        """Number of document chunks stored."""
        return vectors.count(self._docs)

    def _lexical(self) -> _LexicalIndex:
        """The BM25 index, rebuilt when an ingest (here or by another replica) changed the chunks.

        Another replica's ingest is noticed within `INDEX_CHECK_S`: asking Chroma for the count on
        every query cost 2.3 ms of a 25 ms search at 10k chunks (measured); our own ingest resets
        the index at once.
        """
        now = time.monotonic()
        with self._lock:
            index = self._index
            # an empty index is always re-checked: a new replica must not wait for the first ingest
            fresh = index is not None and bool(index.ids) and now - self._index_checked < INDEX_CHECK_S
        if fresh:
            assert index is not None
            return index
        n = vectors.count(self._docs)
        with self._lock:
            if self._index is None or n != self._index_count:
                self._index = _LexicalIndex.build(self._docs)
                self._index_count = n
                log.debug("BM25 index rebuilt over %d chunks", n)
            self._index_checked = now
            return self._index

    def search(self, query: str, k: int = 4, dense: bool = True, lexical: bool = True) -> list[Passage]:
        """The k best document passages for `query`, best first: hybrid dense + BM25 with RRF, or one
        of the two alone (`apprentice bench retrieval` compares them)."""
        import numpy as np

        if not query.strip() or k <= 0:
            return []
        index = self._lexical()
        if not index.ids:
            return []
        q = embed.embed_query(query)
        fused: dict[str, float] = {}
        if dense:
            for rank, hit in enumerate(vectors.query(self._docs, q, max(CANDIDATES, k))):
                fused[hit.id] = fused.get(hit.id, 0.0) + DENSE_WEIGHT / (RRF_K + rank + 1)
        if lexical:
            for rank, pos in enumerate(index.top(query, max(CANDIDATES, k))):
                id_ = index.ids[pos]
                fused[id_] = fused.get(id_, 0.0) + BM25_WEIGHT / (RRF_K + rank + 1)
        ranked = [index.position[id_] for id_ in sorted(fused, key=lambda id_: -fused[id_])
                  if id_ in index.position]
        positions = _diverse(ranked, [str(index.metas[p].get("doc", "")) for p in ranked], k)
        if not positions:
            return []
        cosines = index.matrix[positions] @ np.asarray(q, dtype=np.float32)
        passages = []
        for pos, cos in zip(positions, cosines, strict=True):
            meta = index.metas[pos]
            title = str(meta.get("title", ""))
            text = index.texts[pos]
            if title and text.startswith(title + "\n"):  # the prompt shows the title already
                text = text[len(title) :].lstrip("\n")
            passages.append(
                Passage(
                    text=text,
                    title=title,
                    source=str(meta.get("source", "")),
                    score=min(1.0, max(0.0, float(cos))),
                    chunk_id=index.ids[pos],
                )
            )
        return passages

    # --- correction memory -------------------------------------------------------------------

    def _carry_corrections(self, old: Any) -> None:
        """Copy the corrections remembered with the bundled model, their questions embedded anew."""
        hits = vectors.get(old, with_text=True)
        if hits:
            vectors.upsert(self._corrections, [h.id for h in hits], [h.text for h in hits],
                           [h.metadata for h in hits])
            log.info("correction memory: %d corrections re-embedded with the new model", len(hits))

    def remember(
        self, correction_id: int, question: str, answer: str, conversation_id: int | None = None
    ) -> None:
        """Index a staff correction's answer under the customer question it corrects.

        With `conversation_id` the correction is private to that conversation (it holds the
        customer's personal data): `recall` returns it only when asked for that conversation.
        """
        meta: dict[str, str | int | float | bool] = {"correction_id": int(correction_id), "answer": answer}
        meta["private"] = conversation_id is not None
        if conversation_id is not None:
            meta["conversation_id"] = int(conversation_id)
        embedding = embed.embed_query(question)
        vectors.upsert(self._corrections, [f"correction-{correction_id}"], [question], [meta], [embedding])

    def forget(self, correction_id: int) -> None:
        """Remove a correction from memory (a no-op when it is not there)."""
        vectors.delete(self._corrections, ids=[f"correction-{correction_id}"])

    def purge_forgotten(self, correction_ids: Sequence[int]) -> int | None:
        """Erasure: after `forget`, remove what embedded Chroma's write-ahead queue and free pages
        still hold of these corrections (vectors.purge_log); None for a Chroma server."""
        ids = [f"correction-{int(c)}" for c in correction_ids]
        removed = vectors.purge_log(self._client, self._corrections, ids)
        if self._corrections.name != CORRECTIONS:  # the bundled model's copy, carried from at start
            old = vectors.collection(self._client, CORRECTIONS)
            vectors.delete(old, ids=ids)
            more = vectors.purge_log(self._client, old, ids)
            removed = None if removed is None else removed + (more or 0)
        return removed

    def recall(self, query: str, k: int = 1, conversation_id: int | None = None) -> list[Passage]:
        """The k stored corrections whose questions are closest to `query`, best first: the shared
        ones, and the private ones of `conversation_id` (none without it).

        Filtered inside Chroma, so other conversations' private corrections never take the k
        places. `$ne` also matches corrections remembered before the flag existed: they stay
        shared, as they were (the output guard still checks what they say).
        """
        if not query.strip():
            return []
        where: dict[str, Any] = {"private": {"$ne": True}}
        if conversation_id is not None:
            where = {"$or": [where, {"conversation_id": int(conversation_id)}]}
        hits = vectors.query(self._corrections, embed.embed_query(query), k, where)
        return [
            Passage(
                text=str(h.metadata.get("answer", "")),
                title=f"Staff correction #{h.metadata.get('correction_id')}",
                source=f"correction:{h.metadata.get('correction_id')}",
                score=min(1.0, max(0.0, h.score)),
                kind="correction",
                chunk_id=h.id,
                correction_id=int(h.metadata["correction_id"]),
            )
            for h in hits
        ]

    def retrieve(
        self, query: str, k: int, memory_threshold: float, conversation_id: int | None = None
    ) -> Retrieval:
        """Documents for `query`, plus the best correction when its question is close enough
        (shared, or private to `conversation_id`)."""
        memory = next(iter(self.recall(query, 1, conversation_id)), None)
        if memory is not None and memory.score < memory_threshold:
            memory = None
        return Retrieval(passages=self.search(query, k), memory=memory)

    def overlap(self, query: str, passages: Sequence[Passage]) -> float:
        """The largest share of `query`'s words that one of `passages` holds (title included), each
        word weighted by its BM25 idf over the documents; 1.0 for a query without words.

        Why: dense similarity alone cannot tell a question the documents answer in other words
        ("The box showed up all dented") from one they do not answer at all ("Does it have vudu?",
        "How many years of warranty?"): on the emanual manual, shoppers' questions it mostly does not
        answer have a median best similarity of 0.39, the manual's own questions 0.59 and the demo
        shop's customer-worded golden questions 0.57. What the off-topic ones lack is their rarest
        words: a brand, a place, a part the documents never mention weighs most here, so it alone
        keeps the share low. An everyday word the documents happen not to use ("anyone",
        "mornings") weighs less, by how common it is in the language (`language.commonness`).
        docs/answers.md, "Saying not sure", has the figures.
        """
        index = self._lexical()
        if index.bm25 is None:
            return 0.0
        lang = index.query_language(query)
        bm25 = index.bm25
        weights = {}
        for word in set(tokenize(query, lang)):
            weights[word] = bm25.idf(word)
            if not bm25.holds(word):  # the rarest weight, less how common the word is in the language
                weights[word] *= 1 - language.commonness(word, lang)
        total = sum(weights.values())
        if total <= 0:
            return 1.0
        best = 0.0
        for p in passages:
            held = set(tokenize(f"{p.title}\n{p.text}", lang))
            best = max(best, sum(w for word, w in weights.items() if word in held) / total)
        return best

    def close(self) -> None:
        """Release the Chroma client; the object must not be used afterwards."""
        vectors.close_client(self._client)
