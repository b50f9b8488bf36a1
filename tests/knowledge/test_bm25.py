"""knowledge.bm25 gives rank_bm25's Okapi scores, from an inverted index."""

from __future__ import annotations

import random

import numpy as np
from rank_bm25 import BM25Okapi

from knowledge.bm25 import BM25
from knowledge.retrieve import BM25_B, BM25_K1, tokenize


def test_scores_match_rank_bm25_including_the_idf_floor_and_repeated_words() -> None:
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(60)] + ["common"] * 30  # "common": in most docs, negative idf
    corpus = [[rng.choice(vocab) for _ in range(rng.randint(1, 40))] for _ in range(300)]
    ours = BM25(corpus, k1=BM25_K1, b=BM25_B)
    ref = BM25Okapi(corpus, k1=BM25_K1, b=BM25_B)
    for query in (["w1"], ["w3", "w3", "w17"], ["common", "w5"], ["absent"], []):
        np.testing.assert_allclose(ours.get_scores(query), ref.get_scores(query), rtol=1e-9, atol=1e-12)


def test_idf_is_the_scores_weight_and_an_unseen_word_weighs_most() -> None:
    corpus = [["bike", "frame"], ["bike", "tyre"], ["bike", "lock"], ["helmet"]]
    bm25 = BM25(corpus)
    assert bm25.idf("helmet") > bm25.idf("bike") > 0  # "bike" is in 3 of 4: the idf floor
    assert bm25.idf("vudu") > bm25.idf("helmet")  # in no document at all
    assert bm25.holds("helmet") and not bm25.holds("vudu")


def test_real_text_ranks_the_same_documents_first() -> None:
    docs = [
        "Pair the remote: hold HOME and BACK for five seconds until the light blinks.",
        "Screen mirroring works with phones that support Miracast; open Source and pick the phone.",
        "To reset the picture settings open Settings, Picture, Expert settings, Reset picture.",
        "Bluetooth headphones are paired from Settings, Sound, Sound output, Bluetooth speaker list.",
    ]
    corpus = [tokenize(d) for d in docs]
    query = tokenize("How do I pair bluetooth headphones?")
    ours, ref = BM25(corpus).get_scores(query), BM25Okapi(corpus).get_scores(query)
    assert int(np.argmax(ours)) == int(np.argmax(ref)) == 3
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
