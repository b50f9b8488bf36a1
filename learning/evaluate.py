"""The evaluation gate: is the candidate adapter better than the active one, and nothing worse?

The score of one answer against its reference is deterministic and documented:

    score = (token_f1 + cosine) / 2

- `token_f1`: SQuAD-style F1 over words (lower-cased, punctuation and articles removed).
- `cosine`: cosine similarity of the all-MiniLM-L6-v2 embeddings of answer and reference,
  clipped to [0, 1].

The answers scored are the ones serving would send with each adapter, from the same runtime and
`APPRENTICE_ANSWER_MODE` (`learning.rerank.model_writes`; with APPRENTICE_LLM_URL set, as the model
server would, `AsServed`): where the model writes (a GPU, a model server, `grounded`), its greedy
reply to serving's prompt after serving's check (`learning.answer.ground`; staff corrections of
similar questions count as evidence, `learning.answer.similar_corrections`, as in serving), the
passages in the order the adapter reads them where serving reads first; where it does not (`auto` on a CPU,
`extract`), the extract of the passage the adapter reads as the best. Scoring the model's own
writing there would judge replies no customer reads: in the loop benchmark the gate rejected an
adapter on written replies scoring 0.39–0.63 while customers got extracts scoring 0.68
(docs/answers.md). By default the correction memory is OFF, so the gate measures what is in the
weights; `memory=True` measures the whole system instead (a winning correction is sent as it is, or
given to the model under memory_mode=prompt).

The sets (from eval.jsonl): `heldout` (corrections kept out of training, original and paraphrase
wording), `regression` (every past correction), `control` (approved answers kept out of training
and the golden file). Promotion needs the candidate to beat the baseline on `heldout` by
`margin` (relative) and to stay within `tolerance` (relative) of it on the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learning.answer import cite, ground, similar_corrections
from learning.prompt import answer_messages
from learning.rerank import model_writes, rerank, wanted

if TYPE_CHECKING:
    from knowledge.passages import Passage
    from knowledge.retrieve import KnowledgeBase
    from knowledge.settings import Settings
    from learning.batching import LocalRuntime
    from learning.generation import Generation, Messages

log = logging.getLogger(__name__)

SETS = ("heldout", "regression", "control")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


class EvaluationError(RuntimeError):
    """The evaluation could not run as asked; the message says what to fix."""


# --- scoring ------------------------------------------------------------------------------------


def normalize(text: str) -> list[str]:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return text.split()


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style word-overlap F1 (0..1)."""
    a, r = normalize(answer), normalize(reference)
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def score_pairs(answers: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Per pair: f1, cosine and score = (f1 + cosine) / 2."""
    from knowledge.embed import embed

    vectors = embed([*answers, *references]) if answers else []
    n = len(answers)
    out = []
    for i, (a, r) in enumerate(zip(answers, references, strict=True)):
        cos = sum(x * y for x, y in zip(vectors[i], vectors[n + i], strict=True)) if a.strip() else 0.0
        cos = min(1.0, max(0.0, cos))
        f1 = token_f1(a, r)
        out.append({"f1": round(f1, 4), "cosine": round(cos, 4), "score": round((f1 + cos) / 2, 4)})
    return out


# --- the gate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """Promotion rule: better on heldout by `margin`, not worse than `tolerance` elsewhere (relative)."""

    margin: float = 0.02
    tolerance: float = 0.02

    def decide(
        self, candidate: dict[str, float | None], baseline: dict[str, float | None]
    ) -> tuple[bool, str]:
        reasons = []
        key = "heldout" if candidate.get("heldout") is not None else "regression"
        c, b = candidate.get(key), baseline.get(key)
        if c is None or b is None:
            return False, "no held-out or regression questions to judge the candidate on"
        need = b * (1 + self.margin)
        better = c > b and c >= need
        reasons.append(
            f"{key} {c:.3f} vs {b:.3f} (needs >= {need:.3f}): {'better' if better else 'not better'}"
        )
        ok = better
        for name in SETS:
            if name == key:
                continue
            c2, b2 = candidate.get(name), baseline.get(name)
            if c2 is None or b2 is None:
                continue
            floor = b2 * (1 - self.tolerance)
            holds = c2 >= floor
            ok = ok and holds
            reasons.append(
                f"{name} {c2:.3f} vs {b2:.3f} (floor {floor:.3f}): {'ok' if holds else 'REGRESSED'}"
            )
        return ok, "; ".join(reasons)


# --- running ------------------------------------------------------------------------------------


def load_eval_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EvaluationError(
            f"{path} does not exist; build a dataset first: apprentice datasets build --out DIR"
        )
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class Served:
    """One eval question as serving would meet it: what retrieval found, once for both adapters."""

    question: str
    history: list[tuple[str, str]]
    documents: list[Passage]  # retrieval's documents, in its order
    correction: Passage | None = None  # a winning correction handed to the model (memory_mode=prompt)
    verbatim: str | None = None  # a winning correction that the memory sends as it is
    lessons: tuple[Passage, ...] = ()  # corrections of similar questions: evidence for the check


def served(
    settings: Settings, kb: KnowledgeBase, rows: Sequence[dict[str, Any]], memory: bool
) -> list[Served]:
    """Retrieval for the eval questions; with memory off only documents."""
    out = []
    for row in rows:
        question = row["question"]
        history = [(str(r), str(t)) for r, t in row.get("history", [])]
        if memory:
            found = kb.retrieve(question, settings.top_k, settings.memory_threshold)
            documents, won = found.passages, found.memory
        else:
            documents, won = kb.search(question, settings.top_k), None
        if won is not None and settings.memory_mode == "verbatim":
            out.append(Served(question, history, documents, verbatim=won.text))
            continue
        # serving's check counts staff corrections of similar questions as evidence, memory on or off
        near = similar_corrections(kb, settings.answer_mode, question, [won] if won is not None else [])
        out.append(Served(question, history, documents, correction=won, lessons=tuple(near)))
    return out


class AsServed:
    """The evaluation's runtime seen as serving's model. With a model server (APPRENTICE_LLM_URL)
    serving prefills on the server's GPU, so who writes and whether passages are read follow that
    (`learning.rerank`), whatever device the evaluation itself runs on; the reading is this
    runtime's, with the adapter under evaluation."""

    def __init__(self, runtime: LocalRuntime, server: bool) -> None:
        self.runtime = runtime
        self.device = "server" if server else runtime.device

    async def likelihoods(self, prompts: list[Messages], continuation: str) -> list[float]:
        return await self.runtime.likelihoods(prompts, continuation)


def _versions_checked(gens: Sequence[Generation], path: str | None, version: str | None) -> list[str]:
    wrong = {g.adapter_version for g in gens} - {version}
    if wrong:
        raise EvaluationError(
            f"the runtime answered with adapter {sorted(map(str, wrong))} instead of {version}; "
            f"check that {path} is a loadable PEFT adapter for this base model."
        )
    return [g.text for g in gens]


def generate_with(
    runtime: LocalRuntime,
    path: str | None,
    version: str | None,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int | None = None,
) -> list[str]:
    """Answers from one adapter (None: the base model); fails if the runtime could not load it."""
    runtime.set_adapter(path, version)
    return _versions_checked(runtime.generate_batch(prompts, max_new_tokens), path, version)


def answers_with(
    settings: Settings,
    runtime: LocalRuntime,
    adapter: tuple[str | None, str | None],
    questions: Sequence[Served],
    max_new_tokens: int | None = None,
) -> list[str]:
    """What serving sends for each question with `adapter` (path, version; None, None: the base
    model): the correction as it is, the model's checked reply, or the extract of the passage the
    adapter reads as the best (see the module docstring). Blocking: call it from a plain thread."""
    path, version = adapter
    answers: list[str] = [q.verbatim or "" for q in questions]
    todo = [i for i, q in enumerate(questions) if q.verbatim is None]
    if not todo:
        return answers
    model = AsServed(runtime, server=bool(settings.llm_url))
    writes = {
        i
        for i in todo
        if not questions[i].documents
        or model_writes(settings.answer_mode, model, questions[i].correction is not None)
    }

    def given(q: Served, documents: list[Passage]) -> list[Passage]:
        return [q.correction, *documents] if q.correction is not None else documents

    # scores carry no adapter version: one generated token first confirms the switch to this adapter
    first = questions[todo[0]]
    generate_with(
        runtime,
        path,
        version,
        [answer_messages(settings, first.question, given(first, first.documents), first.history)],
        1,
    )

    async def read() -> dict[int, list[Passage]]:
        out = {}
        for i in todo:
            q = questions[i]
            reads = wanted(model, settings.rerank, i in writes)  # as serving reads (learning/rerank.py)
            out[i] = await rerank(model, q.question, q.documents) if reads else q.documents
        return out

    documents = asyncio.run(read())
    order = sorted(writes)
    prompts = [
        answer_messages(
            settings, questions[i].question, given(questions[i], documents[i]), questions[i].history
        )
        for i in order
    ]
    replies = (
        _versions_checked(runtime.generate_batch(prompts, max_new_tokens), path, version) if prompts else []
    )
    for i, reply in zip(order, replies, strict=True):
        q = questions[i]
        if settings.answer_mode != "model":  # serving's check (learning/answer.py)
            reply = ground(q.question, reply, [*given(q, documents[i]), *q.lessons]).text
        answers[i] = reply
    for i in todo:
        if i not in writes:
            answers[i] = cite(questions[i].question, documents[i][0])
    return answers


def summarize(rows: Sequence[dict[str, Any]], scores: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Mean score, f1 and cosine per set (None for an empty set)."""
    out: dict[str, Any] = {}
    for name in SETS:
        picked = [s for r, s in zip(rows, scores, strict=True) if r["set"] == name]
        if not picked:
            out[name] = None
            continue
        out[name] = {
            k: round(sum(p[k] for p in picked) / len(picked), 4) for k in ("score", "f1", "cosine")
        } | {"n": len(picked)}
    return out


def evaluate(
    settings: Settings,
    kb: KnowledgeBase,
    dataset: Path,
    candidate: tuple[str, str],
    baseline: tuple[str, str] | None,
    out: Path,
    *,
    memory: bool = False,
    gate: Gate | None = None,
    runtime: LocalRuntime | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Score candidate (path, version) against baseline (None: base model); write eval.json and eval.png.

    Returns the report: per-set means for both, the gate's decision and reason, per-row answers.
    """
    gate = gate or Gate()
    rows = load_eval_rows(Path(dataset) / "eval.jsonl")
    rows = [r for r in rows if r.get("set") in SETS]
    if not rows:
        raise EvaluationError(f"{dataset}/eval.jsonl has no rows in the sets {SETS}.")
    started = time.perf_counter()
    questions = served(settings, kb, rows, memory)
    own = runtime is None
    rt = runtime if runtime is not None else _runtime(settings)
    try:
        cand_answers = answers_with(settings, rt, candidate, questions, max_new_tokens)
        base_answers = answers_with(settings, rt, baseline or (None, None), questions, max_new_tokens)
    finally:
        if own:
            rt.close()
    refs = [r["reference"] for r in rows]
    cand_scores = score_pairs(cand_answers, refs)
    base_scores = score_pairs(base_answers, refs)
    cand_sum, base_sum = summarize(rows, cand_scores), summarize(rows, base_scores)

    def means(summary: dict[str, Any]) -> dict[str, float | None]:
        return {k: (v["score"] if v else None) for k, v in summary.items()}

    promote, reason = gate.decide(means(cand_sum), means(base_sum))
    report: dict[str, Any] = {
        "candidate": candidate[1],
        "baseline": baseline[1] if baseline else None,
        "memory": memory,
        "score": "mean of token-F1 and MiniLM cosine similarity to the reference",
        "gate": asdict(gate),
        "sets": {"candidate": cand_sum, "baseline": base_sum},
        "promote": promote,
        "reason": reason,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "rows": [
            {
                **{k: r[k] for k in ("set", "question", "reference", "ids", "wording") if k in r},
                "candidate": ca,
                "baseline": ba,
                "candidate_score": cs,
                "baseline_score": bs,
            }
            for r, ca, ba, cs, bs in zip(
                rows, cand_answers, base_answers, cand_scores, base_scores, strict=True
            )
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    report["chart"] = str(chart(report, out / "eval.png"))
    return report


def _runtime(settings: Settings) -> LocalRuntime:
    from learning.runtime import build_local

    # the settings' own engine: the gate judges the answers serving would give
    return build_local(settings, max_queue=max(settings.max_queue, settings.max_batch), timeout_s=3600.0)


def chart(report: dict[str, Any], path: Path) -> Path:
    """A grouped bar chart of the mean score per set, candidate vs baseline (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SETS if report["sets"]["candidate"].get(n)]
    cand = [report["sets"]["candidate"][n]["score"] for n in names]
    base = [report["sets"]["baseline"][n]["score"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs],
        base,
        0.4,
        label=f"baseline ({report['baseline'] or 'base model'})",
        color="#9aa5b1",
    )
    ax.bar([x + 0.2 for x in xs], cand, 0.4, label=f"candidate ({report['candidate']})", color="#2f80ed")
    for x, b, c in zip(xs, base, cand, strict=True):
        ax.text(x - 0.2, b + 0.01, f"{b:.2f}", ha="center", fontsize=8)
        ax.text(x + 0.2, c + 0.01, f"{c:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [f"{n}\n(n={report['sets']['candidate'][n]['n']})" for n in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (F1 + cosine) / 2")
    verdict = "promote" if report["promote"] else "keep current"
    ax.set_title(f"Evaluation gate: {verdict} (memory {'on' if report['memory'] else 'off'})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
