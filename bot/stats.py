"""Resolution figures: what `/apprentice stats` (Slack), `apprentice stats` (CLI) and the weekly
post on APPRENTICE_REPORT_CRON show. The numbers come from `Store.stats` (their definitions are on
`knowledge.store.Stats`); this module only renders them: text, JSON and a PNG chart.

It also holds the satisfaction sweep: every replica calls `ConversationService.ask_satisfaction`
once a minute; the database claim inside makes sure each conversation is asked once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from knowledge.models import utcnow
from knowledge.store import Stats, Store

if TYPE_CHECKING:
    from bot.conversation import ConversationService

log = logging.getLogger(__name__)

SWEEP_S = 60.0


def parse_days(text: str, default: int = 7) -> int | None:
    """ "7d", "7", "" (the default) -> days; None when it is not a period (1 to 366 days)."""
    text = text.strip().lower()
    if not text:
        return default
    m = re.fullmatch(r"(\d{1,3})\s*d?", text)
    if m is None or not 1 <= int(m.group(1)) <= 366:
        return None
    return int(m.group(1))


def compute(store: Store, days: int, now: dt.datetime | None = None) -> Stats:
    """The figures of the last `days` days up to `now` (UTC)."""
    now = now or utcnow()
    return store.stats(now - dt.timedelta(days=days), now)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_stats(stats: Stats) -> str:
    """The figures in a few lines (plain text: the CLI prints it, Slack shows it)."""
    days = max(1, round((stats.until - stats.since).total_seconds() / 86400))
    return "\n".join(
        [
            f"Resolution figures, last {days} days ({stats.since:%Y-%m-%d %H:%M} to "
            f"{stats.until:%Y-%m-%d %H:%M} UTC)",
            f"Conversations: {stats.conversations}",
            f"Answered by the bot alone: {stats.answered_alone} (answered: {stats.answered})",
            f"Handed to staff: {stats.handed_to_staff}",
            f"Corrected: {stats.corrected}",
            f"Resolution rate: {_pct(stats.resolution_rate)} ({stats.resolved} resolved by the bot)",
            f"CSAT: {_pct(stats.csat)} ({stats.csat_yes} yes of {stats.csat_answered} answers, "
            f"{stats.csat_asked} asked)",
            f"Median time to first answer: {_duration(stats.median_first_answer_s)}",
        ]
    )


def write_chart(stats: Stats, path: Path) -> Path:
    """A bar chart of the figures (matplotlib, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["conversations", "bot alone", "to staff", "corrected", "resolved", "CSAT yes", "CSAT no"]
    values = [
        stats.conversations, stats.answered_alone, stats.handed_to_staff, stats.corrected, stats.resolved,
        stats.csat_yes, stats.csat_answered - stats.csat_yes,
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(labels, values, color=["#777", "#2a7", "#d83", "#c55", "#27a", "#2a7", "#c55"])
    ax.bar_label(bars)
    ax.set_ylabel("conversations")
    ax.set_title(
        f"Resolution rate {_pct(stats.resolution_rate)} · CSAT {_pct(stats.csat)} · "
        f"median first answer {_duration(stats.median_first_answer_s)}"
    )
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(stats: Stats, out: Path) -> tuple[Path, Path]:
    """stats.json and stats.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "stats.json"
    data.write_text(json.dumps(stats.as_dict(), indent=1) + "\n", encoding="utf-8")
    return data, write_chart(stats, out / "stats.png")


async def sweep_forever(service: ConversationService, every_s: float = SWEEP_S) -> None:
    """Ask the satisfaction question where it is due, every `every_s` (a task of the app)."""
    while True:
        try:
            asked = await service.ask_satisfaction()
            if asked:
                log.info("asked %d customers whether their problem was solved", asked)
        except Exception:
            log.exception("satisfaction sweep failed")
        await asyncio.sleep(every_s)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
