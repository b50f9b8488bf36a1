"""What the benchmarks share: the question format, the settings and runtime of a run, the bench
channel through the real conversation flow, percentiles, and writing the report and its chart.

Every benchmark runs on a fresh data directory with embedded stores (`bench_settings`), answers
through the same code a customer reaches (`BenchChannel` plugs into `ConversationService` the way
the Telegram and terminal channels do) and writes a JSON report beside a PNG chart.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.conversation import ConversationService
    from bot.envelope import Answer
    from knowledge.models import Conversation
    from knowledge.retrieve import KnowledgeBase
    from knowledge.settings import Settings
    from learning.batching import LocalRuntime

CHANNEL = "bench"
QUESTION_FIELDS = ("id", "question", "answer", "group")


# --- inputs -----------------------------------------------------------------------------------------


def load_questions(path: Path, fields: Sequence[str] = QUESTION_FIELDS) -> list[dict[str, Any]]:
    """questions.jsonl rows in the bench format; each needs `fields` (id, question, answer, group)."""
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in fields if not str(row.get(k, "")).strip()]
            if missing:
                raise ValueError(f"{path}:{n}: missing {', '.join(missing)}; see ../shared/bench/README.md.")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no questions.")
    return rows


def bench_settings(
    base: Settings, data_dir: Path, kb_dir: Path, model: str | None = None, **overrides: Any
) -> Settings:
    """The operator's settings, pointed at a fresh data dir with embedded stores.

    The converted model cache is shared (no 20 s re-conversion), the per-customer rate limit and the
    golden file are off (the benchmark brings its own controls).
    """
    from knowledge.settings import Settings

    values = base.model_dump()
    values.update(
        data_dir=data_dir,
        database_url="",
        chroma_url="",
        llm_url="",
        kb=str(kb_dir),
        model_cache=base.models_dir.resolve(),
        rate_limit_per_minute=0,
        min_new_examples=1,
        golden="",
        two_person_rule="off",  # the benchmark is the one trusted operator teaching reference answers
    )
    if model:
        values["model"] = model
    values.update(overrides)
    return Settings(**values)


def bench_runtime(settings: Settings) -> LocalRuntime:
    """The in-process runtime with room for a whole stage in its queue and no answer timeout."""
    from learning.runtime import build_local

    return build_local(settings, max_queue=max(settings.max_queue, 256), timeout_s=3600.0)


# --- answering through the conversation flow ---------------------------------------------------------


class BenchChannel:
    """The benchmark's own channel: customers ask through it, and it keeps every posted answer.

    It connects to the service as every channel does, as the `bench` deliverer (there is no customer
    at the other end: a correction is stored and 'sent' nowhere) and as a reviewer, which is where
    the service hands over the full `Answer` record (status, sources, adapter, latency).
    """

    def __init__(self, service: ConversationService) -> None:
        self.service = service
        self.answers: dict[str, Answer] = {}
        service.reviewers.append(self)
        service.deliverers[CHANNEL] = self._deliver

    async def _deliver(self, conv: Conversation, out: Any) -> None:
        return None

    async def answer_posted(self, conv: Conversation, answer: Answer) -> None:
        self.answers[conv.chat_id] = answer

    async def customer_flag(self, conv: Conversation, message_id: int | None, why: str) -> None:
        return None

    async def relay(self, conv: Conversation, text: str) -> None:
        return None

    async def correction_stored(self, conv: Conversation | None, correction: Any) -> None:
        return None

    async def ask(self, questions: Iterable[tuple[str, str]], width: int) -> list[Answer | None]:
        """Each (chat id, question) in a new conversation, `width` at a time (the runtime batches
        them); the answers in the same order, None where the bot posted none."""
        from bot.envelope import Inbound

        gate = asyncio.Semaphore(width)

        async def one(chat: str, text: str) -> Answer | None:
            async with gate:
                await self.service.handle(Inbound(channel=CHANNEL, chat_id=chat, customer_id=chat, text=text))
            return self.answers.get(chat)

        return list(await asyncio.gather(*(one(chat, text) for chat, text in questions)))


def bench_service(settings: Settings, store: Any, kb: Any, runtime: Any) -> BenchChannel:
    """A `ConversationService` on the given store, knowledge base and runtime, with its bench channel."""
    from bot.conversation import ConversationService

    return BenchChannel(ConversationService(settings, store, kb, runtime))


# --- measuring --------------------------------------------------------------------------------------


def percentiles(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """p50 and p95 (inclusive method; one value is its own percentiles)."""
    vals = sorted(values)
    if not vals:
        return {"p50": float("nan"), "p95": float("nan")}
    if len(vals) == 1:
        return {"p50": round(vals[0], digits), "p95": round(vals[0], digits)}
    q = statistics.quantiles(vals, n=100, method="inclusive")
    return {"p50": round(q[49], digits), "p95": round(q[94], digits)}


def latency_pair(
    settings: Settings, kb: KnowledgeBase, runtime: LocalRuntime, questions: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Seconds per answer, one at a time, with retrieval (as served) and without (the bare question).

    With retrieval, the answer takes the path the answer mode takes when no staff correction won
    (`learning.rerank.model_writes`): the model writes and the reply is checked, or the
    extract is sent; reading the passages first where APPRENTICE_RERANK wants it. With and without
    alternate question by question, so load changes hit both alike. Blocking: call it from a plain
    thread.
    """
    from learning.answer import cite, ground
    from learning.prompt import answer_messages, build_messages
    from learning.rerank import model_writes, rerank, wanted

    writes = model_writes(settings.answer_mode, runtime, given_correction=False)
    rag: list[float] = []
    bare: list[float] = []
    for q in questions:
        t = time.perf_counter()
        retrieval = kb.retrieve(q, settings.top_k, settings.memory_threshold)
        if wanted(runtime, settings.rerank, writes):  # the model reads the passages first, as served
            retrieval.passages = asyncio.run(rerank(runtime, q, retrieval.passages))
        if writes or not retrieval.passages:
            reply = runtime.generate_batch([answer_messages(settings, q, retrieval.all)])[0].text
            if settings.answer_mode != "model":  # the check every served answer passes
                ground(q, reply, retrieval.all)
        else:
            cite(q, retrieval.passages[0])
        rag.append(time.perf_counter() - t)
        t = time.perf_counter()
        runtime.generate_batch([build_messages(settings.system_prompt_text, [], q)])
        bare.append(time.perf_counter() - t)
    return {"rag": percentiles(rag), "no_retrieval": percentiles(bare)}


def loadavg() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not Unix
        return []


# --- the report -------------------------------------------------------------------------------------


def write_json(path: Path, report: dict[str, Any]) -> None:
    """The report as indented UTF-8 JSON with a final newline."""
    Path(path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON object a line (the per-answer records beside a report)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run on machines without a display);
    imported on demand so that importing a benchmark stays cheap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_chart(fig: Any, path: Path, dpi: int | None = None) -> None:
    """Lay out, write and close a chart (closed figures free their memory in long runs)."""
    fig.tight_layout()
    if dpi is None:
        fig.savefig(path)
    else:
        fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
