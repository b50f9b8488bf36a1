"""Load test of the Telegram channel: many customers writing at once, answered by the real SmolLM2.

    .venv/bin/python tests/bench/load_telegram.py --customers 20 --messages 2 --out bench-out/telegram

One `App` (as `apprentice serve` runs it: SQLite, embedded Chroma with the demo KB, the in-process
SmolLM2 runtime with its micro-batching) with the Telegram channel long-polling the fake Bot API.
Every customer sends its first message at the same moment and the next one once the answer
arrived. Latency is measured from the update being handed to the fake Bot API's getUpdates queue
to the moment the fake received the bot's sendMessage, so it includes polling, the exactly-once
claim, retrieval, generation, storage and the outbox. Writes telegram.json and telegram.png into
--out and exits 1 unless every message got exactly one answer.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # the fakes and servers
sys.path.insert(0, str(ROOT))

from demo_questions import QUESTIONS  # noqa: E402

from bench.common import percentiles  # noqa: E402


def _to_chat(chat: int, call: Any) -> bool:
    return str(call.params.get("chat_id")) == str(chat)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from fakes.telegram_api import TOKEN, FakeTelegramApi

    from bot.app import App
    from bot.channels.telegram import TelegramChannel
    from knowledge.models import Message
    from knowledge.settings import Settings

    data = Path(tempfile.mkdtemp(prefix="apprentice-tg-load-"))
    async with FakeTelegramApi() as fake:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            data_dir=data,
            model_cache=ROOT / ".cache" / "models",  # the converted SmolLM2, shared with the tests
            telegram_bot_token=TOKEN,
            telegram_api_url=fake.base_url,
            http_port=0,
            rate_limit_per_minute=0,
            max_new_tokens=args.max_new_tokens,
            llm_timeout_s=args.timeout,
        )
        started = time.monotonic()
        async with App(settings) as app:
            channel = TelegramChannel(settings, app.service, app.store, app.http)
            await app.add_channel(channel)
            await app.start_http()
            await fake.wait_for("getUpdates")
            ready_s = time.monotonic() - started
            print(f"bot ready in {ready_s:.1f}s; {args.customers} customers start", flush=True)
            latencies: list[float] = []
            per_chat: dict[int, list[str]] = collections.defaultdict(list)

            async def customer(c: int) -> None:
                chat = 90_000 + c
                for m in range(args.messages):
                    question = f"{QUESTIONS[(c + m) % len(QUESTIONS)]} [c{c}m{m}]"
                    since = fake.mark()
                    t0 = time.monotonic()
                    await fake.push_message(chat, question)
                    [call] = await fake.wait_for(
                        "sendMessage",
                        partial(_to_chat, chat),
                        since=since,
                        timeout=args.timeout + 60,
                    )
                    latencies.append(call.at - t0)
                    per_chat[chat].append(str(call.params.get("text", "")))

            t_start = time.monotonic()
            await asyncio.gather(*(customer(c) for c in range(args.customers)))
            wall = time.monotonic() - t_start
            with app.store.session() as s:
                answers = s.query(Message).filter(Message.role == "bot").all()
                statuses = collections.Counter(m.status for m in answers)
            stats = getattr(app.generator, "stats", None)
            runtime: dict[str, Any] = {}
            if stats is not None:
                runtime = {
                    "batches": stats.batches,
                    "batch_sizes": dict(sorted(stats.batch_sizes.items())),
                    "new_tokens": stats.new_tokens,
                    "decode_tok_s": round(stats.decode_tok_s, 1),
                    "busy": stats.busy,
                    "timeouts": stats.timeouts,
                    "device": str(getattr(app.generator, "device", "")),
                    "dtype": str(getattr(app.generator, "dtype", "")),
                }
        sent = fake.sent()
    updates = args.customers * args.messages
    exactly_once = (
        len(sent) == updates
        and len(per_chat) == args.customers
        and all(len(v) == args.messages for v in per_chat.values())
    )
    return {
        "benchmark": "Telegram long polling against the fake Bot API, one App, real SmolLM2",
        "customers": args.customers,
        "messages_per_customer": args.messages,
        "updates": updates,
        "replies_sent": len(sent),
        "answered_exactly_once": exactly_once,
        "answer_status": dict(statuses),
        "max_new_tokens": args.max_new_tokens,
        "latency_p50_s": percentiles(latencies, 2)["p50"],
        "latency_p95_s": percentiles(latencies, 2)["p95"],
        "latency_max_s": round(max(latencies), 2),
        "latency_mean_s": round(statistics.fmean(latencies), 2),
        "wall_s": round(wall, 1),
        "answers_per_minute": round(updates / wall * 60, 1),
        "bot_start_s": round(ready_s, 1),
        "runtime": runtime,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "latencies_s": [round(x, 3) for x in latencies],
        "sample_answers": [texts[0][:300] for texts in list(per_chat.values())[:3]],
    }


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = sorted(report["latencies_s"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(lat, bins=20, color="#4c72b0")
    for q, style in (("latency_p50_s", "--"), ("latency_p95_s", ":")):
        left.axvline(report[q], color="black", linestyle=style, label=f"{q[8:11]} {report[q]:.1f}s")
    left.set_xlabel("seconds from update to sendMessage")
    left.set_ylabel("answers")
    left.legend()
    left.set_title(f"{report['customers']} customers at once, {report['updates']} messages")
    right.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], color="#55a868")
    right.set_xlabel("seconds")
    right.set_ylabel("share of answers sent")
    right.set_title(f"{report['answers_per_minute']:.0f} answers/min (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--customers", type=int, default=20, help="Customers writing at once (20).")
    add("--messages", type=int, default=2, help="Messages each customer sends in turn (2).")
    add("--max-new-tokens", type=int, default=160, help="Answer length budget (the serving default, 160).")
    add("--timeout", type=float, default=600.0, help="Model timeout and wait for one answer, seconds.")
    add("--out", default="bench-out/telegram", help="Folder for telegram.json and telegram.png.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    report = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "telegram.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    chart(report, out / "telegram.png")
    print(json.dumps({k: v for k, v in report.items() if k != "latencies_s"}, indent=2, ensure_ascii=False))
    return 0 if report["answered_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
