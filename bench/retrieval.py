"""Retrieval benchmark: recall@1, recall@5 and query latency of the hybrid search on a QA set.

The questions file is JSONL with `question` and `gold_docs` (knowledge-base file names without
their suffix). A question is a hit at k when any gold document is among the sources of the top
k passages. Dense-only and BM25-only recall are measured too, so the chart shows what fusion buys.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import percentiles, pyplot, save_chart, write_json
from knowledge.retrieve import KnowledgeBase

log = logging.getLogger(__name__)

# Hybrid first: its latencies are measured with a cold query-embedding cache.
MODES = {"hybrid": (True, True), "dense": (True, False), "bm25": (False, True)}


def _load_questions(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or not row.get("gold_docs"):
                raise ValueError(f"{path}:{n}: each line needs 'question' and a non-empty 'gold_docs' list.")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no questions.")
    return rows


def _chart(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    modes = list(MODES)
    r1 = [report["modes"][m]["recall@1"] for m in modes]
    r5 = [report["modes"][m]["recall@5"] for m in modes]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(modes))
    b1 = ax.bar([x - 0.2 for x in xs], r1, width=0.4, label="recall@1")
    b5 = ax.bar([x + 0.2 for x in xs], r5, width=0.4, label="recall@5")
    ax.bar_label(b1, fmt="%.2f")
    ax.bar_label(b5, fmt="%.2f")
    ax.set_xticks(list(xs), modes)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("recall")
    ax.set_title(
        f"Retrieval on {report['questions']} questions, {report['chunks']} chunks "
        f"(hybrid p50 {report['p50_ms']:.0f} ms)",
        fontsize=9,
    )
    ax.legend(loc="upper center", ncol=2, frameon=False)
    save_chart(fig, path, dpi=120)


def run_retrieval_bench(
    kb_dir: Path, questions_file: Path, out_dir: Path, data_dir: Path | None = None
) -> dict[str, Any]:
    """Ingest `kb_dir` into a fresh data dir (temporary unless given), run every question, report.

    Writes `retrieval.json` and `retrieval.png` into `out_dir` and returns the report dict.
    """
    questions = _load_questions(Path(questions_file))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apprentice-bench-") as tmp:
        kb = KnowledgeBase(Path(data_dir) if data_dir else Path(tmp))
        try:
            t0 = time.perf_counter()
            ingest_report = kb.ingest([Path(kb_dir)])
            ingest_s = time.perf_counter() - t0
            if ingest_report.skipped:
                log.warning("bench: %d files skipped", len(ingest_report.skipped))
            chunks = kb.count()
            kb.search("warm up", 5)  # loads the model and builds the BM25 index outside the timings
            modes: dict[str, dict[str, float]] = {}
            latencies: list[float] = []
            misses: list[str] = []
            by_kind: dict[str, list[int]] = {}  # kind -> [questions, hybrid hits@5]
            for mode, (dense, lexical) in MODES.items():
                hits1 = hits5 = 0
                for row in questions:
                    gold = set(row["gold_docs"])
                    t = time.perf_counter()
                    passages = kb.search(row["question"], 5, dense=dense, lexical=lexical)
                    if mode == "hybrid":
                        latencies.append((time.perf_counter() - t) * 1000)
                    sources = [Path(p.source).with_suffix("").as_posix() for p in passages]
                    hits1 += bool(sources[:1] and sources[0] in gold)
                    hit5 = bool(gold.intersection(sources[:5]))
                    hits5 += hit5
                    if mode == "hybrid":
                        tally = by_kind.setdefault(str(row.get("kind", "all")), [0, 0])
                        tally[0] += 1
                        tally[1] += hit5
                        if not hit5:
                            misses.append(str(row.get("id", row["question"])))
                modes[mode] = {"recall@1": hits1 / len(questions), "recall@5": hits5 / len(questions)}
        finally:
            kb.close()
    latency_ms = percentiles(latencies, digits=2)
    report: dict[str, Any] = {
        "kb": str(kb_dir),
        "questions": len(questions),
        "documents": len(ingest_report.added) + len(ingest_report.updated) + len(ingest_report.unchanged),
        "chunks": chunks,
        "skipped": [list(s) for s in ingest_report.skipped],
        "ingest_s": round(ingest_s, 2),
        "recall@1": round(modes["hybrid"]["recall@1"], 4),
        "recall@5": round(modes["hybrid"]["recall@5"], 4),
        "p50_ms": latency_ms["p50"],
        "p95_ms": latency_ms["p95"],
        "recall@5_by_kind": {kind: round(h / n, 4) for kind, (n, h) in sorted(by_kind.items())},
        "modes": {m: {key: round(v, 4) for key, v in r.items()} for m, r in modes.items()},
        "misses": misses,
    }
    write_json(out_dir / "retrieval.json", report)
    _chart(report, out_dir / "retrieval.png")
    return report
