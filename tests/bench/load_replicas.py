"""Load test of the scaled-out topology: two `apprentice serve` replicas, many concurrent customers.

    .venv/bin/python tests/bench/load_replicas.py --customers 50 --messages 4 --out bench-out/replicas

Starts a private PostgreSQL and Chroma server, the fake Telegram Bot API and a fake vLLM server
(`--model echo`: deterministic text, so the numbers measure the bot itself: webhook, de-dup,
retrieval, storage, outbox; `--model smollm2`: the fake server runs SmolLM2 in-process, batched).
Each customer sends its messages one after another (the next once the answer arrived); updates go
to the replicas round-robin and a share of them is delivered a second time to the OTHER replica
(`--duplicates`), as Telegram retries behind a load balancer do. Latency is measured from the POST
of the update to the moment the fake Bot API received the reply. Writes replicas.json and
replicas.png into --out, and fails (exit 1) unless every update was answered exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # the fakes and servers
sys.path.insert(0, str(ROOT))

from demo_questions import QUESTIONS  # noqa: E402

from bench.common import percentiles  # noqa: E402

SECRET = "load-test-secret"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import sqlalchemy as sa
    from chroma_server import ChromaServer
    from fakes.openai_api import FakeOpenAIServer, RuntimeBackend
    from fakes.telegram_api import TOKEN, FakeTelegramApi
    from pg import PostgresServer, free_port
    from replicas import Replica, metric_value, serve_env

    from knowledge.store import Store

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="apprentice-load-"))
    backend = None
    model_name = "shop-model"
    if args.model == "smollm2":
        from learning.modelfiles import convert_bundled

        folder = convert_bundled(ROOT / ".cache" / "models")
        model_name = "SmolLM2-135M-Instruct"
        backend = RuntimeBackend(folder, name=model_name, max_batch=8, max_new_tokens=args.max_new_tokens)
    with PostgresServer() as pg, ChromaServer() as chroma:
        db = pg.create_database("apprentice")
        async with FakeTelegramApi() as telegram, FakeOpenAIServer(model_name, backend) as llm:
            replicas = []
            for name in ("a", "b"):
                port = free_port()
                env = serve_env(
                    tmp / name / "data", port, db=db, chroma=chroma.url, llm=llm.base_url,
                    telegram=telegram.base_url, token=TOKEN, secret=SECRET, model=model_name,
                    APPRENTICE_RATE_LIMIT_PER_MINUTE="0",
                    APPRENTICE_MAX_NEW_TOKENS=str(args.max_new_tokens),
                    APPRENTICE_LLM_TIMEOUT_S="300",
                )
                replicas.append(Replica(name, tmp / name, port, env))
            started = time.monotonic()
            for r in replicas:
                r.start()
            try:
                async with aiohttp.ClientSession() as http:
                    await asyncio.gather(*(r.wait_ready(http, timeout_s=600) for r in replicas))
                    ready_s = time.monotonic() - started
                    print(f"replicas ready in {ready_s:.1f}s; {args.customers} customers start", flush=True)
                    result = await _load(args, rng, replicas, telegram, http)
                    # quiescence: the shared outbox is empty, so no late duplicate is still on its way
                    store = Store(db)
                    try:
                        for _ in range(1200):
                            if store.outbox_depth() == 0:
                                break
                            await asyncio.sleep(0.1)
                        with store.engine.connect() as conn:
                            claimed = conn.scalar(sa.text("SELECT count(*) FROM processed_updates"))
                            stored_answers = conn.scalar(
                                sa.text("SELECT count(*) FROM messages WHERE role = 'bot'")
                            )
                    finally:
                        store.close()
                    metrics = [await r.metrics(http) for r in replicas]
            finally:
                codes = [r.stop() for r in replicas]
            sent = telegram.sent()
    if backend is not None:
        backend.close()
    per_replica = {
        r.name: int(metric_value(m, "apprentice_messages_in_total", channel="telegram"))
        for r, m in zip(replicas, metrics, strict=True)
    }
    updates = result["updates"]
    per_chat: dict[str, int] = {}
    per_tag: dict[str, int] = {}
    for call in sent:
        chat = str(call.params.get("chat_id"))
        per_chat[chat] = per_chat.get(chat, 0) + 1
        for tag in result["tags"]:
            if tag in str(call.params.get("text", "")):
                per_tag[tag] = per_tag.get(tag, 0) + 1
    # every update answered exactly once: one reply per update in total, per customer, and per question
    exactly_once = (
        len(sent) == updates == claimed == stored_answers
        and len(per_chat) == args.customers
        and set(per_chat.values()) == {args.messages}
        and all(n == 1 for n in per_tag.values())
    )
    lat = result["latencies_s"]
    return {
        "benchmark": "two replicas, Telegram webhook mode, one PostgreSQL, one Chroma server",
        "model": args.model,
        "customers": args.customers,
        "messages_per_customer": args.messages,
        "updates": updates,
        "deliveries": result["deliveries"],
        "duplicate_deliveries": result["deliveries"] - updates,
        "replies_sent": len(sent),
        "updates_claimed_in_db": claimed,
        "answers_stored": stored_answers,
        "answered_exactly_once": exactly_once,
        "handled_per_replica": per_replica,
        "latency_p50_s": percentiles(lat, 3)["p50"],
        "latency_p95_s": percentiles(lat, 3)["p95"],
        "latency_max_s": round(max(lat), 3),
        "latency_mean_s": round(statistics.fmean(lat), 3),
        "wall_s": round(result["wall_s"], 2),
        "answers_per_minute": round(updates / result["wall_s"] * 60, 1),
        "replica_start_s": round(ready_s, 1),
        "replica_exit_codes": codes,
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()
        },
        "latencies_s": [round(x, 4) for x in lat],
    }


async def _load(
    args: argparse.Namespace, rng: random.Random, replicas: list[Any], telegram: Any, http: Any
) -> dict[str, Any]:
    turn = 0
    deliveries = 0
    latencies: list[float] = []
    tags: list[str] = []

    async def customer(c: int) -> None:
        nonlocal turn, deliveries
        chat = 70_000 + c
        for m in range(args.messages):
            tag = f"[c{c}m{m}]"
            tags.append(tag)
            update = telegram.message_update(chat, f"{rng.choice(QUESTIONS)} {tag}")
            first = replicas[turn % 2]
            other = replicas[(turn + 1) % 2]
            turn += 1
            since = telegram.mark()
            t0 = time.monotonic()
            posts = [first.post_update(http, update, SECRET)]
            if rng.random() < args.duplicates:
                posts.append(other.post_update(http, update, SECRET))
            statuses = await asyncio.gather(*posts)
            deliveries += len(posts)
            if set(statuses) != {200}:
                raise RuntimeError(f"webhook answered {statuses}")
            [call] = await telegram.wait_for(
                "sendMessage", lambda call, chat=chat: str(call.params.get("chat_id")) == str(chat),
                since=since, timeout=args.timeout,
            )
            latencies.append(call.at - t0)

    started = time.monotonic()
    await asyncio.gather(*(customer(c) for c in range(args.customers)))
    wall = time.monotonic() - started
    return {
        "updates": len(tags), "deliveries": deliveries, "latencies_s": latencies, "wall_s": wall, "tags": tags
    }


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = sorted(report["latencies_s"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(lat, bins=30, color="#4c72b0")
    for q, style in (("latency_p50_s", "--"), ("latency_p95_s", ":")):
        left.axvline(report[q], color="black", linestyle=style, label=f"{q[8:11]} {report[q]:.2f}s")
    left.set_xlabel("seconds from webhook POST to reply at the Bot API")
    left.set_ylabel("answers")
    left.legend()
    left.set_title(f"{report['customers']} customers, {report['updates']} updates, model={report['model']}")
    names = list(report["handled_per_replica"])
    right.bar(names, [report["handled_per_replica"][n] for n in names], color="#55a868")
    right.set_title(
        f"{report['answers_per_minute']:.0f} answers/min; exactly once: {report['answered_exactly_once']}"
    )
    right.set_ylabel("updates handled")
    right.set_xlabel("replica")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--customers", type=int, default=50, help="Concurrent customers (50).")
    add("--messages", type=int, default=4, help="Messages each customer sends in turn (4).")
    add("--duplicates", type=float, default=0.1, help="Share of updates delivered twice (0.1).")
    add("--model", choices=["echo", "smollm2"], default="echo", help="Model behind the fake vLLM.")
    add("--max-new-tokens", type=int, default=48, help="Answer length with --model smollm2.")
    add("--timeout", type=float, default=600.0, help="Seconds to wait for one answer.")
    add("--seed", type=int, default=7)
    add("--out", default="bench-out/replicas", help="Folder for replicas.json and replicas.png.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, out / "replicas.png")
    summary = {k: v for k, v in report.items() if k != "latencies_s"}
    print(json.dumps(summary, indent=2))
    return 0 if report["answered_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
