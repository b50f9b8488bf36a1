"""The loop benchmark: does the bot get better where staff corrected it, and no worse elsewhere?

`run_loop_bench` replays the product's learning loop on any data set in the bench format (a `kb/`
folder of markdown documents and a `questions.jsonl` with `id`, `question`, `answer`, `group`), in a
fresh temporary data directory:

1. ingest the KB;
2. choose N groups to correct (groups with two or more phrasings first) and M control questions
   from other groups, deterministically from the seed;
3. **baseline**: answer the held-out phrasings of the corrected groups and the controls;
4. **feedback**: answer each corrected group's first phrasing and submit its reference answer as a
   staff correction through `ConversationService.correct`, the code path a Slack correction takes
   (one the two-person rule holds back gets its second approval, as `/apprentice approve` gives it);
5. **memory**: answer the held-out phrasings and controls again (correction memory on, base model);
6. **retrain**: run the nightly job (datasets -> SFT + DPO -> gate) and, whatever the gate says,
   answer with the candidate adapter with the memory off (**weights**) and on (**both**).

Every answer is produced by the real `ConversationService.handle` (retrieval, thresholds, memory
mode, prompt layout, the batching runtime) and scored with the evaluation gate's own metric
(`learning.evaluate.score_pairs`: the mean of token F1 and MiniLM cosine to the reference).

Why the evaluation stages use a second store: the nightly job learns from "later customers whose
question the memory answered" (datasets.py). Had the held-out phrasings gone through the serving
store, they would be trained on and no longer be held out. The evaluation conversations therefore
go to a scratch database; only the feedback conversations and corrections reach the nightly job.
The job is told to keep none of the 40 corrections back for its own gate
(`heldout_fraction=0`): the benchmark's held-out phrasings and controls are the gate's held-out and
control sets instead (`BuildOptions.extra_eval`), so the gate judges exactly what this report shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    BenchChannel,
    bench_runtime,
    bench_service,
    bench_settings,
    latency_pair,
    load_questions,
    loadavg,
    percentiles,
    pyplot,
    save_chart,
    write_json,
    write_jsonl,
)

if TYPE_CHECKING:
    from knowledge.settings import Settings
    from learning.train import TrainConfig

log = logging.getLogger(__name__)

STAGES = ("baseline", "memory", "weights", "both")
NO_MEMORY = 2.0  # a cosine threshold no correction can reach: the memory is off


@dataclass(frozen=True)
class Item:
    """One question the benchmark asks, with the reference answer it is scored against."""

    set: str  # heldout | control | feedback
    id: str
    group: str
    question: str
    reference: str


@dataclass
class Selection:
    feedback: list[Item] = field(default_factory=list)  # first phrasing of each corrected group
    heldout: list[Item] = field(default_factory=list)  # the other phrasings (or the same, asked again)
    control: list[Item] = field(default_factory=list)


def select(rows: Sequence[dict[str, Any]], groups: int, controls: int, seed: int) -> Selection:
    """N groups to correct (two or more phrasings first) and M controls from the other groups.

    Deterministic for a seed. A group's first phrasing in file order is the one corrected; the
    others are held out. A singleton group's held-out "paraphrase" is the same question asked again.
    """
    by_group: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for row in rows:
        by_group.setdefault(str(row["group"]), []).append(row)
    rng = random.Random(seed)
    multi = sorted(g for g, members in by_group.items() if len(members) >= 2)
    single = sorted(g for g, members in by_group.items() if len(members) < 2)
    rng.shuffle(multi)
    rng.shuffle(single)
    if groups > len(by_group):
        raise ValueError(f"--groups {groups} is more than the {len(by_group)} groups in the questions file.")
    chosen = (multi + single)[:groups]
    rest = sorted(set(by_group) - set(chosen))
    rng.shuffle(rest)
    if controls > len(rest):
        raise ValueError(f"--controls {controls} is more than the {len(rest)} groups left for controls.")

    def item(set_: str, row: dict[str, Any]) -> Item:
        return Item(set_, str(row["id"]), str(row["group"]), str(row["question"]), str(row["answer"]))

    sel = Selection()
    for g in chosen:
        first, *others = by_group[g]
        sel.feedback.append(item("feedback", first))
        # The reference of every phrasing is the corrected answer: what staff taught.
        for row in others or [first]:
            sel.heldout.append(Item("heldout", str(row["id"]), g, str(row["question"]), str(first["answer"])))
    sel.control = [item("control", by_group[g][0]) for g in rest[:controls]]
    return sel


@dataclass
class LoopOptions:
    """What one loop benchmark run does; the defaults are the README's N=40, M=40."""

    groups: int = 40
    controls: int = 40
    seed: int = 0
    model: str | None = None  # default: the settings' model
    train: TrainConfig | None = None  # default: the nightly job's own TrainConfig()
    concurrency: int | None = None  # conversations in flight per stage (default: APPRENTICE_MAX_BATCH)
    latency_samples: int = 8  # questions timed one at a time, with and without retrieval
    data_dir: Path | None = None  # keep the run's data here (default: a temporary folder)


# --- answering through the conversation flow ------------------------------------------------------


async def _ask(channel: BenchChannel, items: Sequence[Item], stage: str, width: int) -> list[Any]:
    """Each question in a new conversation, `width` at a time (the runtime batches them)."""
    return await channel.ask(((f"{stage}-{it.set}-{i}", it.question) for i, it in enumerate(items)), width)


def _from_memory(answer: Any) -> bool:
    if answer is None:
        return False
    return answer.model == "correction-memory" or any(
        s.get("kind") == "correction" for s in (answer.sources or [])
    )


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _relative(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return round((new - old) / old, 4)


def _train_figures(report: dict[str, Any], adapter: Any) -> dict[str, Any]:
    """Examples, wall time and tokens/s of the nightly job's training (from its own log)."""
    examples = report.get("examples") or {}
    out: dict[str, Any] = {
        "examples": examples.get("sft"),
        "dpo_pairs": examples.get("dpo"),
        "wall_s": (report.get("timings") or {}).get("train_s"),
        "tokens_per_s": None,
    }
    if adapter is None:
        return out
    from learning.train import LOG_FILE

    log_path = Path(adapter.path) / LOG_FILE
    tokens = seconds = 0.0
    if log_path.is_file():
        rows = [
            json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        for stage in ("sft", "dpo"):
            mine = [r for r in rows if r.get("stage") == stage]
            seen = max((r.get("num_tokens", 0.0) for r in mine), default=0.0)
            runtime = max((r.get("train_runtime", 0.0) for r in mine), default=0.0)
            if seen and runtime:
                tokens += seen
                seconds += runtime
    if tokens and seconds:
        out["tokens_per_s"] = round(tokens / seconds, 1)
        out["tokens"] = int(tokens)
        out["trainer_s"] = round(seconds, 1)
    return out


def _chart(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    stages = [s for s in STAGES if report["scores"].get(s)]
    held = [report["scores"][s]["heldout"] or 0.0 for s in stages]
    ctrl = [report["scores"][s]["control"] or 0.0 for s in stages]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(stages))
    b1 = ax.bar(
        [x - 0.2 for x in xs],
        held,
        0.4,
        label=f"held-out phrasings (n={report['heldout_questions']})",
        color="#2f80ed",
    )
    b2 = ax.bar([x + 0.2 for x in xs], ctrl, 0.4, label=f"controls (n={report['controls']})", color="#9aa5b1")
    ax.bar_label(b1, fmt="%.3f", fontsize=8)
    ax.bar_label(b2, fmt="%.3f", fontsize=8)
    labels = []
    for s in stages:
        up = report["uplift_vs_baseline"].get(s)
        labels.append(s if up is None else f"{s}\n{up:+.0%} held-out")
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score = (token F1 + cosine) / 2")
    ax.set_title(
        f"Learning loop on {report['dataset']}: {report['groups']} corrected groups, {report['model']}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    save_chart(fig, path, dpi=120)


def run_loop_bench(
    settings: Settings,
    kb_dir: Path,
    questions_file: Path,
    out_dir: Path,
    options: LoopOptions | None = None,
) -> dict[str, Any]:
    """Run the whole loop benchmark; write report.json, answers.jsonl and report.png; return the report."""
    opts = options or LoopOptions()
    rows = load_questions(Path(questions_file))
    selection = select(rows, opts.groups, opts.controls, opts.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if opts.data_dir is not None:
        data = Path(opts.data_dir)
        if data.exists() and any(data.iterdir()):
            raise ValueError(f"{data} is not empty; the loop benchmark needs a fresh data directory.")
        return asyncio.run(_run(settings, data, kb_dir, questions_file, out_dir, opts, selection))
    with tempfile.TemporaryDirectory(prefix="apprentice-loop-") as tmp:
        return asyncio.run(_run(settings, Path(tmp), kb_dir, questions_file, out_dir, opts, selection))


async def _run(
    base: Settings,
    data_dir: Path,
    kb_dir: Path,
    questions_file: Path,
    out_dir: Path,
    opts: LoopOptions,
    sel: Selection,
) -> dict[str, Any]:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store
    from learning import registry
    from learning.cpus import cpu_budget
    from learning.datasets import BuildOptions
    from learning.evaluate import score_pairs
    from learning.nightly import run_nightly

    started = time.perf_counter()
    walls: dict[str, float] = {}
    settings = bench_settings(base, data_dir, Path(kb_dir), opts.model)
    no_memory = bench_settings(base, data_dir, Path(kb_dir), opts.model, memory_threshold=NO_MEMORY)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = await asyncio.to_thread(Store, settings.database)
    # The evaluation conversations go to a scratch database, out of the nightly job's sight (docstring).
    scratch = await asyncio.to_thread(Store, f"sqlite:///{(data_dir / 'bench-eval.db').resolve()}")
    kb = await asyncio.to_thread(KnowledgeBase.from_settings, settings)
    runtime: Any = None
    try:
        t = time.perf_counter()
        ingest = await asyncio.to_thread(kb.ingest, [Path(kb_dir)])
        walls["ingest"] = round(time.perf_counter() - t, 1)
        log.warning("loop bench: ingested %d chunks; loading %s", kb.count(), settings.model)
        runtime = await asyncio.to_thread(bench_runtime, settings)
        width = opts.concurrency or settings.max_batch
        front = bench_service(settings, store, kb, runtime)
        with_memory = bench_service(settings, scratch, kb, runtime)
        without_memory = bench_service(no_memory, scratch, kb, runtime)
        asked = [*sel.heldout, *sel.control]
        answers: dict[str, list[Any]] = {}
        stage_latency: dict[str, dict[str, float]] = {}

        async def stage(name: str, channel: BenchChannel) -> None:
            t0 = time.perf_counter()
            got = await _ask(channel, asked, name, width)
            walls[name] = round(time.perf_counter() - t0, 1)
            answers[name] = got
            ms = [a.latency_ms / 1000 for a in got if a is not None]
            if ms:
                stage_latency[name] = percentiles(ms)
            log.warning("loop bench: stage %s answered %d questions in %.0f s", name, len(got), walls[name])

        # 3. baseline, and the latency of one answer with and without retrieval (base model, batch 1)
        await stage("baseline", without_memory)
        latency = await asyncio.to_thread(
            latency_pair,
            settings,
            kb,
            runtime,
            [it.question for it in sel.control[: opts.latency_samples]]
            or [it.question for it in sel.heldout[: opts.latency_samples]],
        )

        # 4. feedback: the first phrasing is answered, then corrected by staff as in Slack
        t0 = time.perf_counter()
        first = await _ask(front, sel.feedback, "feedback", width)
        corrections = second_approvals = 0
        for it, answer in zip(sel.feedback, first, strict=True):
            if answer is None:
                log.warning("loop bench: no answer to correct for %s", it.id)
                continue
            result = await front.service.correct(answer.message_id, it.reference, "bench:staff")
            corrections += int(bool(result.created))
            if result.created and getattr(result.correction, "status", "active") == "pending":
                # The two-person rule held it back (it contradicts a document or another correction):
                # a second staff member approves it, as /apprentice approve would.
                await front.service.approve_correction(result.correction.id, "bench:second-staff")
                second_approvals += 1
        walls["feedback"] = round(time.perf_counter() - t0, 1)

        # 5. memory: the correction memory on, the base model
        await stage("memory", with_memory)

        # 6. retrain with the nightly job; the candidate is evaluated whatever the gate says
        extra = [
            {"set": it.set, "question": it.question, "reference": it.reference, "ids": [f"bench:{it.id}"]}
            for it in asked
        ]
        t0 = time.perf_counter()
        nightly_report = await asyncio.to_thread(
            run_nightly,
            settings,
            store,
            kb,
            force=True,
            options=BuildOptions(heldout_fraction=0.0, extra_eval=extra, seed=opts.seed),
            train_config=opts.train,
            runtime=runtime,
        )
        walls["retrain"] = round(time.perf_counter() - t0, 1)
        nightly = nightly_report.as_dict()
        candidate = registry.get_adapter(store, nightly["candidate"]) if nightly.get("candidate") else None
        if candidate is not None:
            runtime.set_adapter(candidate.path, candidate.version)
            await stage("weights", without_memory)
            await stage("both", with_memory)
            runtime.set_adapter(None, None)
        else:
            log.error(
                "loop bench: the nightly job made no adapter (%s): %s",
                nightly.get("status"),
                nightly.get("reason"),
            )
        train = _train_figures(nightly, candidate)
    finally:
        if runtime is not None:
            await asyncio.to_thread(runtime.close)
        kb.close()
        scratch.close()
        store.close()

    # --- scoring and the report ---------------------------------------------------------------------
    refs = [it.reference for it in asked]
    scores: dict[str, dict[str, float | None] | None] = {s: None for s in STAGES}
    records: list[dict[str, Any]] = []
    memory_hits: dict[str, float] = {}
    for name in STAGES:
        got = answers.get(name)
        if got is None:
            continue
        texts = [a.text if a is not None else "" for a in got]
        scored = score_pairs(texts, refs)
        by_set: dict[str, list[float]] = {"heldout": [], "control": []}
        hits = 0
        for it, answer, text, sc in zip(asked, got, texts, scored, strict=True):
            by_set[it.set].append(sc["score"])
            hits += int(it.set == "heldout" and _from_memory(answer))
            records.append(
                {
                    "stage": name,
                    "set": it.set,
                    "id": it.id,
                    "group": it.group,
                    "question": it.question,
                    "reference": it.reference,
                    "answer": text,
                    **sc,
                    "status": getattr(answer, "status", None),
                    "from_memory": _from_memory(answer),
                    "adapter_version": getattr(answer, "adapter_version", None),
                    "latency_s": round(answer.latency_ms / 1000, 3) if answer is not None else None,
                }
            )
        scores[name] = {"heldout": _mean(by_set["heldout"]), "control": _mean(by_set["control"])}
        memory_hits[name] = round(hits / len(sel.heldout), 4) if sel.heldout else 0.0
    for it, answer in zip(sel.feedback, first, strict=True):
        records.append(
            {
                "stage": "feedback",
                "set": "feedback",
                "id": it.id,
                "group": it.group,
                "question": it.question,
                "reference": it.reference,
                "answer": getattr(answer, "text", ""),
                "corrected_to": it.reference,
                "status": getattr(answer, "status", None),
            }
        )
    base_scores = scores["baseline"] or {}

    def change(key: str) -> dict[str, float | None]:
        return {
            s: _relative((scores[s] or {}).get(key), base_scores.get(key))
            for s in ("memory", "weights", "both")
        }

    report: dict[str, Any] = {
        "dataset": Path(kb_dir).resolve().parent.name or str(kb_dir),
        "model": settings.model,
        "groups": len(sel.feedback),
        "controls": len(sel.control),
        "seed": opts.seed,
        "scores": scores,
        "uplift_vs_baseline": change("heldout"),
        "control_change": change("control"),
        "latency_s": latency,
        "train": train,
        "gate": {
            "status": nightly.get("status"),
            "promote": nightly.get("status") == "promoted",
            "candidate": nightly.get("candidate"),
            "reason": nightly.get("reason"),
            "scores": nightly.get("scores"),
        },
        "answers": "answers.jsonl",
        # beyond the headline figures: what a reader needs to trust the figures
        "heldout_questions": len(sel.heldout),
        "corrections": corrections,
        "second_approvals": second_approvals,  # corrections the two-person rule held for a second approval
        "memory_answered_heldout": memory_hits,
        "stage_latency_s": stage_latency,
        "score": "mean of token F1 and all-MiniLM-L6-v2 cosine to the reference (learning.evaluate)",
        "kb": str(kb_dir),
        "questions_file": str(questions_file),
        "chunks": ingest.chunks,
        "settings": {
            "dtype": settings.dtype,
            "top_k": settings.top_k,
            "memory_threshold": settings.memory_threshold,
            "memory_mode": settings.memory_mode,
            "max_new_tokens": settings.max_new_tokens,
            "max_batch": settings.max_batch,
            "concurrency": width,
        },
        "conditions": {"cpus": cpu_budget(), "loadavg_at_end": loadavg()},
        "wall_s": walls | {"total": round(time.perf_counter() - started, 1)},
    }
    write_jsonl(out_dir / "answers.jsonl", records)
    write_json(out_dir / "report.json", report)
    _chart(report, out_dir / "report.png")
    if candidate is not None and opts.data_dir is None:
        # The temporary data dir goes away; keep the adapter the figures were measured with.
        shutil.copytree(candidate.path, out_dir / "adapter", dirs_exist_ok=True)
    return report
