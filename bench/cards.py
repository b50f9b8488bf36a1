"""`apprentice bench cards`: how far behind the review channel runs at Slack's posting limit.

Slack posts about one message a second per channel. This benchmark feeds answers at a steady
rate (60 and 600 a minute by default) into the real `SlackChannel` and its outbox, exactly as the
conversation service does after an answer (`answer_posted`), against the fake Slack Web API of
tests/support/fakes/slack_api.py started in this process on 127.0.0.1, which enforces that limit with a
token bucket and answers HTTP 429 with Retry-After beyond it. No model is involved: the
conversations and answers are written to the database before the clock starts.

Time is scaled so that minutes take seconds: with `scale` 10 the fake is Slack at ten times the
speed (10 posts a second, Retry-After in tenths), answers arrive ten times faster and the digest
threshold (APPRENTICE_SLACK_DIGEST_AFTER_S) and how long the channel counts as behind after a
digest are divided by ten. Every figure in the report is in
simulated seconds (measured × scale). The bot's own costs (database, HTTP) are not scaled, so
they weigh `scale` times more than they would in real time: the lags are conservative.

The lag of an answer is the time from its card being put into the outbox to Slack accepting the
message that shows it: its own card, or the digest that lists it.

Needs a source checkout (the fake Slack lives in tests/, outside the installed packages).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from bench.common import percentiles, pyplot, save_chart, write_json
from bot.channels.slack import DIGEST_SIZE, SlackChannel
from bot.conversation import ConversationService
from bot.envelope import Answer
from bot.http import HttpServer
from knowledge.models import Conversation
from knowledge.settings import Settings
from knowledge.store import Store

log = logging.getLogger(__name__)

REVIEW = "CBENCH"
MAX_LAG_S = 120.0  # the promise: no answer waits longer than this for Slack
SLACK_POSTS_PER_S, SLACK_BURST = 1.0, 5  # the fake's limit per channel (Slack's documented rule)


@dataclass
class CardsOptions:
    rates: Sequence[int] = (60, 600)  # answers a minute
    minutes: float = 4.0  # simulated minutes of answers at each rate
    scale: float = 10.0  # the fake's clock (and the answer stream) runs this many times faster
    flagged: float = 0.05  # share of flagged answers (unsure, fallback, model error, guard)
    per_conversation: int = 4  # answers per conversation; the first opens its thread
    seed: int = 0


def fake_slack_class() -> Any:
    """tests/support/fakes/slack_api.py's FakeSlack, from the checkout this module runs from."""
    tests = Path(__file__).resolve().parents[1] / "tests" / "support"
    if not (tests / "fakes" / "slack_api.py").is_file():
        raise RuntimeError(f"bench cards runs the fake Slack in {tests}/fakes: run it from a source checkout")
    if str(tests) not in sys.path:
        sys.path.append(str(tests))  # appended: the real packages stay first
    return importlib.import_module("fakes.slack_api").FakeSlack


def run_cards_bench(out_dir: Path, options: CardsOptions, digest_after_s: float) -> dict[str, Any]:
    """Run every rate, write report.json and report.png into `out_dir`, return the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cards-") as tmp:
        for rate in options.rates:
            runs[str(rate)] = asyncio.run(
                _run_rate(Path(tmp) / f"rate-{rate}", rate, options, digest_after_s)
            )
    report = {
        "benchmark": "review-card lag at Slack's posting limit (real SlackChannel + outbox, fake Slack)",
        "method": f"time scaled ×{options.scale:g}; figures in simulated seconds; bot overheads unscaled",
        "slack_posts_per_s": SLACK_POSTS_PER_S,
        "slack_burst": SLACK_BURST,
        "digest_after_s": digest_after_s,
        "digest_size": DIGEST_SIZE,
        "minutes": options.minutes,
        "time_scale": options.scale,
        "flagged_share": options.flagged,
        "answers_per_conversation": options.per_conversation,
        "max_lag_allowed_s": MAX_LAG_S,
        "rates": {k: {key: v for key, v in run.items() if key != "points"} for k, run in runs.items()},
        "ok": all(run["ok"] for run in runs.values()),
        "wall_s": round(time.monotonic() - started, 1),
    }
    write_json(out_dir / "report.json", report)
    _chart(report, {k: run["points"] for k, run in runs.items()}, out_dir / "report.png")
    return report


def _plan(rate: int, options: CardsOptions) -> list[tuple[int, bool]]:
    """(conversation number, flagged) of each answer, in arrival order: customers take turns, 20 at
    a time, each asking `per_conversation` questions; a seeded share of the answers is flagged."""
    rng = random.Random(options.seed)
    count = max(1, round(rate * options.minutes))
    per, at_once = max(1, options.per_conversation), 20
    return [
        ((n // (at_once * per)) * at_once + n % at_once, rng.random() < options.flagged) for n in range(count)
    ]


def _seed(store: Store, plan: list[tuple[int, bool]]) -> tuple[dict[int, Conversation], list[Answer]]:
    """Customers, conversations, questions and answers, written before the clock starts."""
    convs: dict[int, Conversation] = {}
    answers = []
    for n, (conv_no, flagged) in enumerate(plan):
        if conv_no not in convs:
            convs[conv_no] = store.conversation_for("bench", f"chat-{conv_no}", f"cust-{conv_no}", "Ada")
        conv = convs[conv_no]
        question = store.add_message(conv.id, "customer", f"Question {n}: how long does delivery {n} take?")
        status = "unsure" if flagged else "ok"
        text = f"Answer {n}: delivery takes two to four working days."
        reply = store.add_message(
            conv.id, "bot", text, reply_to_id=question.id, status=status, flagged=flagged, latency_ms=1.0
        )
        answers.append(
            Answer(
                conv.id, question.id, reply.id, question.text, text, [], status, "bench", None, 1.0, flagged
            )
        )
    return convs, answers


async def _run_rate(
    data_dir: Path, rate: int, options: CardsOptions, digest_after_s: float
) -> dict[str, Any]:
    scale = options.scale
    fake = fake_slack_class()(post_rate=SLACK_POSTS_PER_S, post_burst=SLACK_BURST, time_scale=scale)
    async with fake as slack:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            data_dir=data_dir,
            database_url="",
            slack_bot_token="xoxb-bench",
            slack_signing_secret="bench-signing-secret",
            slack_channel=REVIEW,
            slack_api_url=slack.api_url,
            slack_app_token="",
            review="all",
            slack_digest_after_s=digest_after_s / scale,
        )
        store = Store(settings.database)
        plan = _plan(rate, options)
        convs, answers = await asyncio.to_thread(_seed, store, plan)
        # the service only lends the channel its reviewer list: no model, no knowledge base
        service = ConversationService(settings, store, cast(Any, None), cast(Any, None))
        http = HttpServer("127.0.0.1", 0)
        channel = SlackChannel(settings, service, store, http, poll_s=1 / scale, behind_s=120 / scale)
        await channel.start()
        put_at: dict[int, float] = {}
        interval = 60.0 / rate / scale
        began = time.monotonic()
        try:
            for i, answer in enumerate(answers):
                delay = began + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # the answer stream's own pace
                put_at[answer.message_id] = time.monotonic()
                await channel.answer_posted(convs[plan[i][0]], answer)
            fed = time.monotonic()
            # wait for Slack to show every answer (bounded: a bug must not hang the benchmark)
            deadline = fed + 30 * MAX_LAG_S / scale
            while store.outbox_depth("slack") and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            drained = time.monotonic()
        finally:
            await channel.stop()
            store.close()
        calls = list(slack.calls)
    flagged = {a.message_id for a in answers if a.flagged}
    return _measure(rate, calls, put_at, flagged, began, scale, (drained - fed) * scale)


def _measure(
    rate: int,
    calls: list[Any],
    put_at: dict[int, float],
    flagged: set[int],
    began: float,
    scale: float,
    drain_s: float,
) -> dict[str, Any]:
    """Which Slack message showed each answer, and when."""
    shown: dict[int, list[tuple[str, float]]] = {}  # answer -> [(how, accepted at)]
    cards = digests = parents = 0
    for call in calls:
        if call.method != "chat.postMessage" or not call.ok:
            continue
        meta = call.params.get("metadata") or {}
        value = _card_value(call.params.get("blocks") or [])
        if meta.get("event_type") == "apprentice_digest":
            digests += 1
            for entry in meta["event_payload"]["answers"]:
                shown.setdefault(int(entry["answer"]), []).append(("digest", call.at))
        elif value:
            cards += 1
            shown.setdefault(int(value.split(":")[1]), []).append(("card", call.at))
        else:
            parents += 1
    lags, flagged_lags, points = [], [], []
    for mid, put in put_at.items():
        if mid not in shown:
            continue
        how, at = min(shown[mid], key=lambda x: x[1])
        lag = (at - put) * scale
        lags.append(lag)
        if mid in flagged:
            flagged_lags.append(lag)
        points.append(((put - began) * scale, lag, "flagged" if mid in flagged else how))
    in_cards = sum(1 for m in put_at if any(h == "card" for h, _ in shown.get(m, [])))
    in_digests = sum(1 for m in put_at if any(h == "digest" for h, _ in shown.get(m, [])))
    flagged_carded = sum(1 for m in flagged if any(h == "card" for h, _ in shown.get(m, [])))
    result = {
        "answers_per_minute": rate,
        "answers": len(put_at),
        "flagged": len(flagged),
        "slack_messages": cards + digests + parents,
        "rate_limited_429": sum(1 for c in calls if c.method == "chat.postMessage" and c.status == 429),
        "cards_posted": cards,
        "digests_posted": digests,
        "thread_parents": parents,
        "answers_covered": sum(1 for m in put_at if m in shown),
        "answers_in_own_card": in_cards,
        "answers_in_digest": in_digests,
        "answers_shown_twice": sum(1 for m in put_at if len(shown.get(m, [])) > 1),
        "flagged_posted": flagged_carded,
        "flagged_dropped": len(flagged) - flagged_carded,
        "lag_s": _stats(lags),
        "flagged_lag_s": _stats(flagged_lags),
        "drain_after_last_answer_s": round(drain_s, 1),
        "points": points,
    }
    result["ok"] = bool(
        result["answers_covered"] == len(put_at)
        and result["flagged_dropped"] == 0
        and (not lags or max(lags) <= MAX_LAG_S)
    )
    return result


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {**percentiles(values, 1), "max": round(max(values), 1)}


def _card_value(blocks: list[dict[str, Any]]) -> str:
    """The "conversation:answer" of a review card's buttons ("" for other messages)."""
    for block in blocks:
        if block.get("type") == "actions":
            for element in block.get("elements", []):
                if element.get("action_id") == "apprentice_correct":
                    return str(element.get("value", ""))
    return ""


def _chart(report: dict[str, Any], points: dict[str, list[tuple[float, float, str]]], path: Path) -> None:
    """Lag of every answer against when it arrived, one panel per rate."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points), 3.6), dpi=100, squeeze=False)
    colours = {"card": "#2f80ed", "digest": "#9aa5b1", "flagged": "#eb5757"}
    labels = {"card": "own card", "digest": "in a digest", "flagged": "flagged (own card)"}
    for ax, (rate, pts) in zip(axes[0], points.items(), strict=True):
        for how in ("digest", "card", "flagged"):
            xs = [x / 60 for x, _, h in pts if h == how]
            ys = [y for _, y, h in pts if h == how]
            if xs:
                ax.scatter(xs, ys, s=6, color=colours[how], label=labels[how])
        ax.axhline(MAX_LAG_S, color="#333333", linestyle="--", linewidth=1)
        lag = report["rates"][rate]["lag_s"]
        ax.set_title(f"{rate} answers/min: lag p50 {lag['p50']} s, max {lag['max']} s", fontsize=9)
        ax.set_xlabel("answer arrived (simulated minutes)")
        ax.set_ylabel("card lag (s)")
        ax.set_ylim(0, max(MAX_LAG_S * 1.1, max((y for _, y, _ in pts), default=0) * 1.1))
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Review cards at Slack's 1 message/s per channel (dashed: 2 minutes)", fontsize=10)
    save_chart(fig, path)
