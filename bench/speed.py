"""The speed benchmark: how fast this machine answers, retrieves, ingests and trains, in one run.

All figures come from one process on one machine at one time, so their ratios hold:

- batch-1 decode tokens/s and time to first token (the runtime's own batch records);
- aggregate tokens/s with 1, 4 and 8 concurrent conversations through the real serving path
  (`LocalRuntime.generate` from concurrent asyncio tasks; the runtime's micro-batching does the rest);
- answer latency with retrieval (retrieve -> prompt -> generate) and without (prompt -> generate);
- hybrid retrieval p50/p95 at 1k and 10k chunks;
- ingestion documents/s of the knowledge base;
- training tokens/s: a few SFT steps of the nightly job's own training subprocess (learning.train);
- the memory-bandwidth roofline: the measured read bandwidth divided by the bytes of bf16 weights one
  decoded token has to read (the README's yardstick, whatever the engine), the measured batch-1
  decode as a share of it, and the same for the bytes the engine really reads (int8: about half);
- batch-1 decode of every CPU engine (APPRENTICE_ENGINE) on the same prompts.

Why the 1k/10k collections are synthetic: embedding 10k real chunks with MiniLM takes minutes on two
shared cores (about 11 chunks/s was measured under load). The synthetic chunks are the KB's real
chunks with their sentences shuffled (so BM25 sees real vocabulary, in 10k documents) and their real
embeddings plus a little noise (so the vector index holds 10k distinct, realistically clustered
vectors). Queries are real sentences, embedded at query time, exactly as serving does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    bench_settings,
    latency_pair,
    loadavg,
    percentiles,
    pyplot,
    save_chart,
    write_json,
)
from learning.prompt import answer_messages

if TYPE_CHECKING:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.settings import Settings
    from learning.batching import LocalRuntime

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 8)
CPU_ENGINES = ("onnx", "transformers")
RETRIEVAL_SIZES = {"1k": 1_000, "10k": 10_000}


# --- the roofline -----------------------------------------------------------------------------------


def measure_bandwidth(threads: int, mib_per_thread: int = 256, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: `threads` numpy sums over arrays far larger than the caches.

    numpy releases the GIL inside the reduction, so the threads read in parallel. The best of
    `repeats` is kept (the machine's capability, not its worst moment).
    """
    import numpy as np

    n = mib_per_thread * 2**20 // 4
    arrays = [np.ones(n, dtype=np.float32) for _ in range(threads)]
    best = math.inf

    def read(a: Any, barrier: threading.Barrier) -> None:
        barrier.wait()
        a.sum()

    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)
        workers = [threading.Thread(target=read, args=(a, barrier)) for a in arrays]
        for w in workers:
            w.start()
        t = time.perf_counter()
        barrier.wait()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    return threads * n * 4 / best / 1e9


def weights_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decoding step reads: every parameter once (a tied embedding is read once,
    as the output layer); an untied input embedding only contributes one row, so it is left out."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is not None and outp is not None and inp.weight is not outp.weight:
        total -= inp.weight.numel() * inp.weight.element_size()
    return int(total)


# --- generation ----------------------------------------------------------------------------------


def _rag_prompts(
    settings: Settings, kb: KnowledgeBase, questions: Sequence[str]
) -> list[list[dict[str, str]]]:
    return [answer_messages(settings, q, kb.search(q, settings.top_k)) for q in questions]


def _decode_batch1(runtime: LocalRuntime, prompts: Sequence[Any], max_new: int) -> dict[str, Any]:
    """Batch-1 decode tokens/s (after the first token) and time to first token, one prompt at a time."""
    decode_tokens = 0
    decode_s = 0.0
    ttfts: list[float] = []
    prompt_tokens: list[int] = []
    wall, cpu = time.perf_counter(), time.process_time()
    for p in prompts:
        [gen] = runtime.generate_batch([p], max_new)
        record = runtime.stats.recent[-1]
        if record.prefill_s is not None and record.new_tokens > 1:
            decode_tokens += record.new_tokens - 1
            decode_s += record.seconds - record.prefill_s
        if gen.ttft_s is not None:
            ttfts.append(gen.ttft_s)
        prompt_tokens.append(gen.prompt_tokens)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "cpu_share": round(cpu / wall, 3) if wall else None,
        "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s else 0.0,
        # what an idle core would do: decode tokens per CPU second this process got (1 model thread)
        "decode_tok_per_cpu_s": round(decode_tokens / decode_s * wall / cpu, 2) if decode_s and cpu else None,
        "ttft_s": round(statistics.median(ttfts), 4) if ttfts else None,
        "prompt_tokens": round(statistics.mean(prompt_tokens), 1),
        "decoded_tokens": decode_tokens,
    }


async def _concurrent(
    runtime: LocalRuntime, prompts: Sequence[Any], conversations: int, rounds: int, max_new: int
) -> dict[str, float]:
    """`conversations` asyncio tasks, each asking `rounds` questions in turn through runtime.generate."""

    async def customer(k: int) -> int:
        made = 0
        for r in range(rounds):
            gen = await runtime.generate(prompts[(k * rounds + r) % len(prompts)], max_new)
            made += gen.new_tokens
        return made

    batches_before = runtime.stats.batches
    t, cpu = time.perf_counter(), time.process_time()
    made = await asyncio.gather(*(customer(k) for k in range(conversations)))
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    recent = list(runtime.stats.recent)[-(runtime.stats.batches - batches_before) :]
    sizes = [b.size for b in recent]
    # Where the model's time went: prefill (the prompts, compute-bound, not shared by batching) and
    # decoding (weights read once per step for the whole batch).
    prefill = sum(b.prefill_s or 0.0 for b in recent)
    decode = sum(b.seconds - (b.prefill_s or 0.0) for b in recent)
    decoded = sum(max(0, b.new_tokens - b.size) for b in recent)  # tokens after each row's first
    return {
        "tok_s": round(sum(made) / wall, 2),
        "wall_s": round(wall, 2),
        "tokens": sum(made),
        "prefill_s": round(prefill, 2),
        "decode_s": round(decode, 2),
        "decode_tok_s": round(decoded / decode, 2) if decode else 0.0,
        "prompt_tokens": sum(b.prompt_tokens for b in recent),
        "padded_prompt_tokens": sum(b.padded_length * b.size for b in recent),
        "mean_batch": round(statistics.mean(sizes), 2) if sizes else 0.0,
        "cpu_share": round(cpu / wall, 3),
        "tok_per_cpu_s": round(sum(made) / cpu, 2) if cpu else 0.0,
    }


# --- retrieval at scale ----------------------------------------------------------------------------


def _synthetic_collection(root: Path, chunks: Sequence[Any], n: int, seed: int) -> None:
    """Write n synthetic chunks (see the module docstring) into a fresh embedded Chroma at `root`."""
    import numpy as np

    from knowledge import vectors
    from knowledge.retrieve import DOCUMENTS

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    ids: list[str] = []
    texts: list[str] = []
    metas: list[dict[str, str | int | float | bool]] = []
    embs: list[list[float]] = []
    for i in range(n):
        src = chunks[i % len(chunks)]
        sentences = [s for s in src.text.replace("\n", " ").split(". ") if s.strip()]
        rng.shuffle(sentences)
        vec = np.asarray(src.embedding, dtype=np.float32)
        vec = vec + noise.normal(0.0, 0.35 / math.sqrt(vec.size), vec.size).astype(np.float32)
        vec /= np.linalg.norm(vec)
        ids.append(f"synthetic-{i}")
        texts.append(". ".join(sentences))
        metas.append(
            {
                "doc": f"synthetic/{i // 5}.md",
                "source": f"synthetic/{i // 5}.md",
                "title": str(src.metadata.get("title", "")),
                "chunk": i % 5,
                "hash": "synthetic",
            }
        )
        embs.append(vec.tolist())
    client = vectors.open_client(root)
    try:
        vectors.upsert(vectors.collection(client, DOCUMENTS), ids, texts, metas, embs)
    finally:
        vectors.close_client(client)


def _retrieval_latency(root: Path, chunks: Sequence[Any], queries: Sequence[str], n: int) -> dict[str, float]:
    from knowledge.retrieve import KnowledgeBase

    _synthetic_collection(root, chunks, n, seed=n)
    kb = KnowledgeBase(root)
    try:
        if kb.count() != n:
            raise RuntimeError(f"the synthetic collection holds {kb.count()} chunks, not {n}")
        kb.search("warm up the index", 4)  # builds BM25 over the n chunks outside the timings
        times = []
        for q in queries:
            t = time.perf_counter()
            kb.search(q, 4)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        kb.close()
    return percentiles(times, digits=2)


def _query_sentences(chunks: Sequence[Any], count: int, seed: int) -> list[str]:
    """Distinct real sentences from the KB, used as queries (never embedded before: no cache hits)."""
    rng = random.Random(seed)
    found: list[str] = []
    for c in chunks:
        for s in c.text.replace("\n", " ").split(". "):
            words = s.split()
            if 6 <= len(words) <= 25:
                found.append(" ".join(words))
    found = sorted(set(found))
    rng.shuffle(found)
    return found[:count]


# --- training ------------------------------------------------------------------------------------


def _train_tokens_per_s(
    settings: Settings, prompts: Sequence[Any], answers: Sequence[str], work: Path, steps: int
) -> dict[str, Any]:
    """A few SFT steps of the nightly job's training subprocess; tokens/s from its own log."""
    from learning.modelfiles import resolve_model
    from learning.train import LOG_FILE, JobSpec, TrainConfig, build_command, run_subprocess

    dataset = work / "dataset"
    dataset.mkdir(parents=True)
    with (dataset / "sft.jsonl").open("w", encoding="utf-8") as fh:
        for p, a in zip(prompts, answers, strict=True):
            fh.write(json.dumps({"prompt": p, "completion": [{"role": "assistant", "content": a}]}) + "\n")
    cfg = TrainConfig(max_steps=steps, dpo=False)
    spec = JobSpec(
        str(dataset),
        str(work / "adapter"),
        resolve_model(settings.model, settings.models_dir),
        settings.model,
        None,
        cfg,
    )
    t = time.perf_counter()
    code = run_subprocess(build_command(spec), work / "train.out")
    wall = time.perf_counter() - t
    log_file = work / "adapter" / LOG_FILE
    if code != 0 or not log_file.is_file():
        tail = (work / "train.out").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"the training steps failed (exit {code}):\n{tail}")
    rows = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokens = max((r.get("num_tokens", 0.0) for r in rows), default=0.0)
    seconds = max((r.get("train_runtime", 0.0) for r in rows), default=0.0)
    return {
        "tokens_per_s": round(tokens / seconds, 1) if tokens and seconds else None,
        "tokens": int(tokens),
        "trainer_s": round(seconds, 1),
        "wall_s": round(wall, 1),
        "steps": steps,
        "batch_size": cfg.batch_size,
    }


# --- the report ----------------------------------------------------------------------------------


def _chart(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    ax = axes[0]
    bars = ax.bar(
        ["batch-1\ndecode", "roofline\n(bf16)", f"roofline\n({report['dtype']})"],
        [report["decode_tok_s_batch1"], report["roofline_tok_s"], report["engine_roofline_tok_s"]],
        color=["#2f80ed", "#9aa5b1", "#c9d1d9"],
    )
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title(
        f"Decode: {report['roofline_ratio']:.0%} of bf16 roofline ({report['bandwidth_gb_s']:.1f} GB/s)",
        fontsize=9,
    )
    ax = axes[1]
    keys = list(report["throughput_tok_s"])
    bars = ax.bar(
        [f"{k} conv." for k in keys], [report["throughput_tok_s"][k] for k in keys], color="#2f80ed"
    )
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Concurrent conversations (micro-batching)", fontsize=9)
    ax = axes[2]
    lat = report["latency_s"]
    xs = range(2)
    for off, q, color in ((-0.2, "p50", "#2f80ed"), (0.2, "p95", "#9aa5b1")):
        bars = ax.bar(
            [x + off for x in xs], [lat["rag"][q], lat["no_retrieval"][q]], 0.4, label=q, color=color
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(xs), ["with retrieval", "without"])
    ax.set_ylabel("seconds per answer")
    ax.set_title("Answer latency (batch 1)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[3]
    ret = report["retrieval_ms"]
    xs = range(len(ret))
    for off, q, color in ((-0.2, "p50", "#2f80ed"), (0.2, "p95", "#9aa5b1")):
        bars = ax.bar([x + off for x in xs], [ret[k][q] for k in ret], 0.4, label=q, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(xs), [f"{k} chunks" for k in ret])
    ax.set_ylabel("ms per hybrid search")
    ax.set_title("Retrieval", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"{report['model']} ({report['dtype']}) on {report['conditions']['cpus']} CPUs; "
        f"ingest {report['ingest_docs_per_s']:.1f} docs/s, "
        f"training {report['train_tokens_per_s'] or 0:.0f} tok/s",
        fontsize=10,
    )
    save_chart(fig, path, dpi=110)


def run_speed_bench(
    settings: Settings,
    out_dir: Path,
    *,
    kb_dir: Path | None = None,
    model: str | None = None,
    max_new_tokens: int = 64,
    samples: int = 6,
    rounds: int = 2,
    retrieval_queries: int = 50,
    train_steps: int = 4,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Measure everything (module docstring) and write speed.json and speed.png into `out_dir`."""
    from knowledge import embed, vectors
    from knowledge.retrieve import DOCUMENTS, KnowledgeBase
    from learning.cpus import cpu_budget

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = loadavg()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="apprentice-speed-") as tmp:
        root = Path(tmp)
        s = bench_settings(settings, root / "data", kb_dir or settings.kb_path, model)
        s.data_dir.mkdir(parents=True)
        embed.embed(["load the embedding model before the clock starts"])
        kb = KnowledgeBase.from_settings(s)
        runtime: Any = None
        try:
            t = time.perf_counter()
            ingested = kb.ingest([s.kb_path])
            ingest_s = time.perf_counter() - t
            docs = len(ingested.added) + len(ingested.updated)
            kb.close()
            client = vectors.open_client(s.data_dir)  # the stored chunks with their embeddings
            try:
                chunks = vectors.get(
                    vectors.collection(client, DOCUMENTS), with_text=True, with_embeddings=True
                )
            finally:
                vectors.close_client(client)
            kb = KnowledgeBase.from_settings(s)
            if not chunks:
                raise ValueError(f"{s.kb_path} holds no documents to benchmark with.")
            questions = _query_sentences(chunks, samples * 8 + 2 * retrieval_queries, seed=0)
            gen_questions = questions[: samples * 8]
            prompts = _rag_prompts(s, kb, gen_questions)

            runtime = _runtime(s)
            runtime.generate_batch([prompts[0]], 8)  # warm-up: first-call allocations
            batch1 = _decode_batch1(runtime, prompts[:samples], max_new_tokens)
            throughput: dict[str, Any] = {}
            for c in CONCURRENCY:
                throughput[str(c)] = asyncio.run(_concurrent(runtime, prompts, c, rounds, max_new_tokens))
            latency = latency_pair(s, kb, runtime, gen_questions[samples : samples * 2])
            label = _path_label(runtime)
            dtype = label.split()[-1]
            engine_bytes = _engine_bytes_per_token(runtime)
            decode_path = runtime.engine.description
            model_threads = runtime.engine.threads  # None: OMP_NUM_THREADS decided
            runtime_device = runtime.engine.device
            model_path = runtime.model_path
            engine_used = runtime.engine.name
            runtime.close()
            runtime = None

            # The other CPU decoding paths on the same prompts, so they compare in one run.
            keys = ("decode_tok_s", "decode_tok_per_cpu_s", "ttft_s", "cpu_share")
            paths: dict[str, dict[str, Any]] = {label: {k: batch1[k] for k in keys}}
            if runtime_device == "cpu":
                for engine in CPU_ENGINES:
                    if engine == engine_used:
                        continue  # the headline runtime above, on the same prompts
                    runtime = _runtime(s, engine=engine)
                    runtime.generate_batch([prompts[0]], 8)
                    alt = _decode_batch1(runtime, prompts[:samples], max_new_tokens)
                    paths[_path_label(runtime)] = {k: alt[k] for k in keys}
                    runtime.close()
                    runtime = None
            # The README's yardstick is the bf16 roofline, whatever the engine reads: bf16 weight bytes.
            bytes_per_token, params = _bf16_weights(model_path)

            threads = cpu_budget()
            bandwidth = measure_bandwidth(threads)
            roofline = bandwidth * 1e9 / bytes_per_token

            retrieval: dict[str, Any] = {}
            queries = questions[samples * 8 :]
            for i, (label, n) in enumerate((sizes or RETRIEVAL_SIZES).items()):
                part = queries[i * retrieval_queries : (i + 1) * retrieval_queries] or queries
                retrieval[label] = _retrieval_latency(root / f"chroma-{label}", chunks, part, n)

            answers = [c.text[:400] for c in chunks[: len(prompts)]]
            train = _train_tokens_per_s(s, prompts[: len(answers)], answers, root / "train", train_steps)
        finally:
            if runtime is not None:
                runtime.close()
            kb.close()

    engine_roofline = bandwidth * 1e9 / engine_bytes
    report = {
        "model": s.model,
        "dtype": dtype,
        "decode_tok_s_batch1": batch1["decode_tok_s"],
        "ttft_s": batch1["ttft_s"],
        "bandwidth_gb_s": round(bandwidth, 2),
        "roofline_tok_s": round(roofline, 1),
        "roofline_ratio": round(batch1["decode_tok_s"] / roofline, 4),
        # beyond the headline figures: the bound for the bytes this engine really reads per token
        "engine_weights_bytes_per_token": engine_bytes,
        "engine_roofline_tok_s": round(engine_roofline, 1),
        "engine_roofline_ratio": round(batch1["decode_tok_s"] / engine_roofline, 4),
        "throughput_tok_s": {k: v["tok_s"] for k, v in throughput.items()},
        "latency_s": latency,
        "retrieval_ms": retrieval,
        "ingest_docs_per_s": round(docs / ingest_s, 2) if ingest_s else None,
        "train_tokens_per_s": train["tokens_per_s"],
        # beyond the headline figures: how the figures were taken
        "decode_path": decode_path,
        "decode_paths": paths,  # every APPRENTICE_ENGINE, batch 1, same prompts
        "params": int(params),
        "weights_bytes_per_token": bytes_per_token,
        "max_new_tokens": max_new_tokens,
        "prompt_tokens_mean": batch1["prompt_tokens"],
        "throughput_detail": throughput,
        "scaling_8_vs_1": round(throughput["8"]["tok_s"] / throughput["1"]["tok_s"], 2)
        if throughput.get("1", {}).get("tok_s")
        else None,
        "ingest": {"documents": docs, "chunks": ingested.chunks, "seconds": round(ingest_s, 2)},
        "train": train,
        "kb": str(s.kb_path),
        "conditions": {
            "cpus": cpu_budget(),
            # CPU seconds this process got per wall second while decoding at batch 1: on a busy machine
            # below the model's thread count, and decode_tok_s_batch1 / cpu_share estimates an idle one.
            "cpu_share_batch1": batch1["cpu_share"],
            "model_threads": model_threads,
            "bandwidth_threads": threads,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(out_dir / "speed.json", report)
    _chart(report, out_dir / "speed.png")
    return report


def _runtime(settings: Settings, **overrides: Any) -> LocalRuntime:
    from learning.runtime import build_local

    return build_local(settings, max_batch=max(CONCURRENCY), max_queue=256, timeout_s=3600.0, **overrides)


def _path_label(runtime: LocalRuntime) -> str:
    """ "onnx int8" or "transformers bfloat16": the engine and the weights it reads."""
    from learning.hf_engine import HfEngine

    if isinstance(runtime.engine, HfEngine):
        return f"transformers {str(runtime.engine.dtype).replace('torch.', '')}"
    return "onnx int8"


def _engine_bytes_per_token(runtime: LocalRuntime) -> int:
    from learning.hf_engine import HfEngine
    from learning.onnx_engine import OnnxEngine
    from learning.onnx_engine import weights_bytes_per_token as onnx_weights_bytes_per_token

    if isinstance(runtime.engine, OnnxEngine):
        return onnx_weights_bytes_per_token(runtime.engine.base.folder)
    assert isinstance(runtime.engine, HfEngine)
    return weights_bytes_per_token(runtime.engine.base_model)


def _bf16_weights(model_path: str) -> tuple[int, int]:
    """Bytes one decoding step reads in bf16, and the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    return weights_bytes_per_token(model), sum(p.numel() for p in model.parameters())
