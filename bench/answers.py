"""The answer benchmark: is what the customer reads better than pasting the document?

`run_answers_bench` answers questions in the bench format (a `kb/` folder and a `questions.jsonl`
with `id`, `question`, `answer`, `group`) through the real `ConversationService.handle`, in a fresh
data directory with an empty correction memory, and scores every answer with the evaluation gate's
metric (`learning.evaluate.score_pairs`: the mean of token F1 and MiniLM cosine to the reference).
An abstention counts with its own text, as the gate counts it.

Two references are scored on the same questions, from the same retrieval:
- `passage`: the first 600 characters of the top retrieved passage (what pasting the document gives);
- `extract`: the 3 sentences of the top passage closest to the question by MiniLM cosine, in
  document order.

The failure shares, per answer unless said otherwise:
- `truncated`: the answer ends mid-sentence (no closing punctuation);
- `off_role`: it refuses to help, talks about being an AI or assistant, condoles or writes a reply
  about a reply (`learning.answer.off_role`);
- `unsupported`: share of answer SENTENCES whose best MiniLM cosine to any sentence of the retrieved
  passages is below `learning.answer.SUPPORT` (0.6): docs/answers.md shows that copied or reworded
  passage sentences score 0.75-1.0 and invented ones mostly below 0.5;
- `abstained`: the bot said it is not sure (status `unsure`);
- `fallback`: the model's reply was replaced by an extract of the best passage (grounded mode).

A questions file without reference answers (every row without one: emanual's
`customer_questions_ungrounded.jsonl`, shopper questions the manual mostly does not answer) is
answered the same way and not scored: `score`, `reference_scores` and `ratio_vs_passage` are null,
and the report says what the customers got (`abstained`: how often the bot said it is not sure and
handed the question to staff, `statuses`, and the failure shares of what it sent).

`--courteous` asks each question as customers write one, between an opening and a closing drawn
(seeded) from OPENINGS and CLOSINGS: a greeting, a line that says nothing, thanks, a signature. The
references are retrieved for that message too, as pasting would be.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    bench_runtime,
    bench_service,
    bench_settings,
    load_questions,
    percentiles,
    pyplot,
    save_chart,
    write_json,
    write_jsonl,
)

if TYPE_CHECKING:
    from knowledge.passages import Passage
    from knowledge.settings import Settings

log = logging.getLogger(__name__)

PASSAGE_CHARS = 600
EXTRACT_SENTENCES = 3
# What customers write around a question (`--courteous`); "" asks it bare.
OPENINGS = ("", "Hi,", "Hello there!", "Hey,", "Good morning.", "Hi team, I have a question.")
CLOSINGS = ("", "Thanks!", "Thank you in advance.", "Thanks, John", "Any help appreciated!", "I'm stuck.")


@dataclass
class AnswersOptions:
    """What one answer benchmark run does."""

    limit: int | None = None  # questions from a seeded shuffle (default: all)
    seed: int = 0
    model: str | None = None  # default: the settings' model
    adapter: str | None = None  # an adapter version from the operator's registry (default: none)
    concurrency: int | None = None  # conversations in flight (default: APPRENTICE_MAX_BATCH)
    courteous: bool = False  # each question between an opening and a closing (OPENINGS, CLOSINGS)


def pick(rows: Sequence[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """`limit` questions from a shuffle seeded by `seed` (all of them, shuffled, without a limit)."""
    out = list(rows)
    random.Random(seed).shuffle(out)
    return out[:limit] if limit else out


def courteous(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Each question between an opening and a closing drawn from OPENINGS and CLOSINGS (seeded)."""
    rng = random.Random(f"courteous-{seed}")
    out = []
    for r in rows:
        words = (rng.choice(OPENINGS), str(r["question"]).strip(), rng.choice(CLOSINGS))
        out.append({**r, "question": " ".join(w for w in words if w)})
    return out


def reference_extract(question: str, passage: Passage, n: int = EXTRACT_SENTENCES) -> str:
    """The n sentences of the passage closest to the question by MiniLM cosine, in document order."""
    from learning.answer import cosines, sentences

    sents = sentences(passage.text)
    if len(sents) <= n:
        return " ".join(sents)
    sims = cosines([question], sents)[0]
    best = sorted(sorted(range(len(sents)), key=lambda j: -sims[j])[:n])
    return " ".join(sents[j] for j in best)


def unsupported_sentences(answer: str, passages: Sequence[Passage]) -> tuple[int, int]:
    """(unsupported, total) sentences of the answer: best cosine to a passage sentence < SUPPORT."""
    from learning.answer import SUPPORT, body, cosines, sentences

    said = sentences(body(answer))
    evidence = [s for p in passages for s in sentences(p.text)]
    if not said:
        return 0, 0
    sims = cosines(said, evidence)
    return sum(max(row, default=0.0) < SUPPORT for row in sims), len(said)


def run_answers_bench(
    settings: Settings,
    kb_dir: Path,
    questions_file: Path,
    out_dir: Path,
    options: AnswersOptions | None = None,
) -> dict[str, Any]:
    """Answer, score and chart; write answers.jsonl, report.json and report.png; return the report."""
    opts = options or AnswersOptions()
    rows = pick(answer_questions(Path(questions_file)), opts.limit, opts.seed)
    if opts.courteous:
        rows = courteous(rows, opts.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = _adapter(settings, opts.adapter) if opts.adapter else None
    with tempfile.TemporaryDirectory(prefix="apprentice-answers-") as tmp:
        return asyncio.run(_run(settings, Path(tmp), Path(kb_dir), out_dir, opts, rows, adapter))


def answer_questions(path: Path) -> list[dict[str, Any]]:
    """The benchmark's questions: every one with its reference answer (scored), or none with one.

    A set without references is what customers ask that the documents mostly do not answer (emanual's
    `customer_questions_ungrounded.jsonl`, real shopper questions): nothing is scored, and the report
    says what the customers got instead (how often the bot said it is not sure, and the failure
    shares of what it sent).
    """
    rows = load_questions(path, ("id", "question"))
    missing = sum(not str(r.get("answer", "")).strip() for r in rows)
    if missing == len(rows):
        return rows
    if missing:
        raise ValueError(
            f"{path}: {missing} of {len(rows)} questions have no answer; give every question its "
            "reference answer, or none (then nothing is scored)."
        )
    return load_questions(path)


def _adapter(settings: Settings, version: str) -> tuple[str, str]:
    """(path, version) of an adapter in the operator's registry."""
    from knowledge.store import Store
    from learning import registry

    store = Store(settings.database)
    try:
        found = registry.get_adapter(store, version)
    finally:
        store.close()
    if found is None:
        raise ValueError(f"No adapter {version!r} in {settings.data_dir}; see `apprentice adapters list`.")
    return found.path, found.version


async def _run(
    base: Settings,
    data_dir: Path,
    kb_dir: Path,
    out_dir: Path,
    opts: AnswersOptions,
    rows: list[dict[str, Any]],
    adapter: tuple[str, str] | None,
) -> dict[str, Any]:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store
    from learning.answer import off_role, truncated
    from learning.evaluate import score_pairs

    started = time.perf_counter()
    settings = bench_settings(base, data_dir, kb_dir, opts.model)
    store = await asyncio.to_thread(Store, settings.database)
    kb = await asyncio.to_thread(KnowledgeBase.from_settings, settings)
    runtime: Any = None
    try:
        await asyncio.to_thread(kb.ingest, [kb_dir])
        runtime = await asyncio.to_thread(bench_runtime, settings)
        if adapter is not None:
            await asyncio.to_thread(runtime.set_adapter, *adapter)
        channel = bench_service(settings, store, kb, runtime)
        log.warning("answers bench: %d questions, answer mode %s", len(rows), settings.answer_mode)
        answers = await channel.ask(
            ((f"answers-{i}", str(r["question"])) for i, r in enumerate(rows)),
            opts.concurrency or settings.max_batch,
        )
        retrievals = [await asyncio.to_thread(kb.search, r["question"], settings.top_k) for r in rows]
    finally:
        if runtime is not None:
            await asyncio.to_thread(runtime.close)
        await asyncio.to_thread(kb.close)
        await asyncio.to_thread(store.close)

    texts = [a.text if a is not None else "" for a in answers]
    # every row has its reference answer, or none has (answer_questions)
    scored = bool(str(rows[0].get("answer", "")).strip())
    scores: list[dict[str, float | None]]
    if scored:
        refs = [str(r["answer"]) for r in rows]
        passage_refs = [p[0].text[:PASSAGE_CHARS] if p else "" for p in retrievals]
        extract_refs = await asyncio.to_thread(
            lambda: [
                reference_extract(r["question"], p[0]) if p else ""
                for r, p in zip(rows, retrievals, strict=True)
            ]
        )
        scores = [dict(x) for x in await asyncio.to_thread(score_pairs, texts, refs)]
        passage_scores = await asyncio.to_thread(score_pairs, passage_refs, refs)
        extract_scores = await asyncio.to_thread(score_pairs, extract_refs, refs)
    else:
        scores = [{"score": None, "f1": None, "cosine": None} for _ in rows]
    support = await asyncio.to_thread(
        lambda: [
            unsupported_sentences(t, p) if a is not None and a.status == "ok" else (0, 0)
            for t, p, a in zip(texts, retrievals, answers, strict=True)
        ]
    )
    statuses = Counter(a.status if a is not None else "none" for a in answers)
    n = len(rows)

    def mean(values: Sequence[float | None]) -> float | None:
        if not scored:
            return None
        numbers = [v for v in values if v is not None]
        return round(sum(numbers) / len(numbers), 4) if numbers else 0.0

    def share(flags: Sequence[bool]) -> float:
        return round(sum(flags) / len(flags), 4) if flags else 0.0

    bot = mean([s["score"] for s in scores])
    passage = mean([s["score"] for s in passage_scores]) if scored else None
    ok = [a is not None and a.status == "ok" for a in answers]
    records = []
    for r, a, t, s, p, (uns, tot) in zip(rows, answers, texts, scores, retrievals, support, strict=True):
        records.append({
            "id": r["id"], "question": r["question"], "reference": r.get("answer"), "answer": t,
            "status": a.status if a is not None else "none",
            "grounding": a.grounding if a is not None else "",
            "sources": [{"title": x.title, "text": x.text, "score": round(x.score, 4)} for x in p],
            "score": s["score"], "f1": s["f1"], "cosine": s["cosine"],
            "unsupported_sentences": uns, "sentences": tot,
            "latency_s": round(a.latency_ms / 1000, 3) if a is not None else None,
        })  # fmt: skip
    total_sentences = sum(tot for _, tot in support)
    report: dict[str, Any] = {
        "kb": str(kb_dir),
        "questions": n,
        "seed": opts.seed,
        "courteous": opts.courteous,
        "model": settings.model,
        "adapter": adapter[1] if adapter else None,
        "answer_mode": settings.answer_mode,
        "score": bot,
        "f1": mean([s["f1"] for s in scores]),
        "cosine": mean([s["cosine"] for s in scores]),
        "reference_scores": (
            {"passage": passage, "extract": mean([s["score"] for s in extract_scores])} if scored else None
        ),
        "ratio_vs_passage": round(bot / passage, 4) if bot is not None and passage else None,
        "truncated": share([truncated(t) for t, good in zip(texts, ok, strict=True) if good]),
        "off_role": share([off_role(t) for t, good in zip(texts, ok, strict=True) if good]),
        "unsupported": round(sum(u for u, _ in support) / total_sentences, 4) if total_sentences else 0.0,
        "abstained": share([a is not None and a.status == "unsure" for a in answers]),
        "fallback": share([bool(a is not None and a.grounding.startswith("fallback")) for a in answers]),
        "statuses": dict(statuses),
        "words_p50": statistics.median([len(t.split()) for t in texts]) if texts else 0,
        "latency_s": percentiles([a.latency_ms / 1000 for a in answers if a is not None]),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "shares_of": "truncated and off_role: of answers with status ok; unsupported: of their sentences",
    }
    write_jsonl(out_dir / "answers.jsonl", records)
    write_json(out_dir / "report.json", report)
    _chart(report, out_dir / "report.png")
    return report


def _chart(report: dict[str, Any], path: Path) -> None:
    """Scores of the bot, the pasted passage and the extract; the failure shares beside them."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    if report["reference_scores"] is not None:
        names = ["bot", "passage", "extract"]
        refs = report["reference_scores"]
        values = [report["score"], refs["passage"], refs["extract"]]
        left.set_ylabel("score (F1 + cosine) / 2")
        title = f"{report['questions']} questions, ratio vs passage {report['ratio_vs_passage']}"
    else:  # no reference answers: what the customers got
        names = sorted(report["statuses"])
        values = [report["statuses"][k] / report["questions"] for k in names]
        left.set_ylabel("share of questions")
        title = f"{report['questions']} questions without reference answers: status"
    left.bar(names, values, color=["#2f80ed", "#9aa5b1", "#c3cad3", "#828282"][: len(names)])
    for x, v in enumerate(values):
        left.text(x, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    left.set_ylim(0, 1)
    left.set_title(title, fontsize=9)
    shares = ["truncated", "off_role", "unsupported", "abstained", "fallback"]
    right.bar(shares, [report[s] for s in shares], color="#eb5757")
    for x, s in enumerate(shares):
        right.text(x, report[s] + 0.01, f"{report[s]:.0%}", ha="center", fontsize=8)
    right.set_ylim(0, 1)
    right.set_title(f"failure shares (answer mode {report['answer_mode']})", fontsize=9)
    right.tick_params(axis="x", labelsize=8)
    save_chart(fig, path)
