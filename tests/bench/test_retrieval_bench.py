"""The retrieval benchmark on a small slice of the emanual set (copied at test time, never committed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.retrieval import run_retrieval_bench

ROOT = Path(__file__).resolve().parents[2]


def emanual_dir() -> Path | None:
    """shared/bench/emanual beside (or inside) the checkout; APPRENTICE_BENCH_EMANUAL overrides."""
    candidates = [
        Path(os.environ.get("APPRENTICE_BENCH_EMANUAL", "")),
        ROOT.parent / "shared" / "bench" / "emanual",
        ROOT / "shared" / "bench" / "emanual",
    ]
    return next((c for c in candidates if str(c) != "." and (c / "questions.jsonl").is_file()), None)


@pytest.fixture
def emanual_slice(tmp_path: Path) -> tuple[Path, Path]:
    """20 questions, their gold documents and 10 distractor documents."""
    source = emanual_dir()
    if source is None:
        pytest.skip("shared/bench/emanual not found beside the checkout; set APPRENTICE_BENCH_EMANUAL")
    lines = (source / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    rows = [r for r in rows if r.get("kind") == "normal"][:20]
    gold = {d for r in rows for d in r["gold_docs"]}
    others = sorted(p.stem for p in (source / "kb").glob("*.md") if p.stem not in gold)[:10]
    kb = tmp_path / "kb"
    kb.mkdir()
    for name in sorted(gold) + others:
        text = (source / "kb" / f"{name}.md").read_text(encoding="utf-8")
        (kb / f"{name}.md").write_text(text, encoding="utf-8")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return kb, questions


def test_bench_reports_recall_latency_and_writes_json_and_chart(
    tmp_path: Path, emanual_slice: tuple[Path, Path]
) -> None:
    kb, questions = emanual_slice
    out = tmp_path / "out"
    report = run_retrieval_bench(kb, questions, out, data_dir=tmp_path / "data")
    assert report["questions"] == 20 and report["skipped"] == []
    assert report["documents"] == len(list(kb.glob("*.md")))
    assert 0.0 <= report["recall@1"] <= report["recall@5"] <= 1.0
    assert report["recall@5"] >= 0.8
    assert report["modes"]["hybrid"]["recall@5"] == report["recall@5"]
    assert set(report["modes"]) == {"hybrid", "dense", "bm25"}
    assert 0 < report["p50_ms"] <= report["p95_ms"]
    assert json.loads((out / "retrieval.json").read_text(encoding="utf-8")) == report
    png = (out / "retrieval.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert (tmp_path / "data" / "chroma").is_dir()  # the given data dir was used


def test_bench_rejects_questions_without_gold_documents(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Where is the remote?"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="gold_docs"):
        run_retrieval_bench(tmp_path, questions, tmp_path / "out")
