"""The nightly learning job, top to bottom, and its schedule.

    lock -> count new examples -> build datasets -> train (subprocess) -> evaluate -> promote or not
         -> record the TrainingRun -> report

`run_nightly` is the whole job (also `apprentice retrain`). It holds a database lease while it
runs, so several replicas sharing one database never train twice at once. `start_scheduler` runs
it on `APPRENTICE_RETRAIN_CRON` inside `apprentice serve` with APScheduler (the only module that
imports it): missed runs are coalesced into one and never two run at once.

Every run leaves a folder `<data_dir>/runs/<id>/` with the dataset, the training log, eval.json
and the chart; its `NightlyReport` says what happened in words and numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from knowledge.models import utcnow
from knowledge.settings import ConfigError
from learning import registry
from learning.datasets import BuildOptions, build_datasets, count_new_examples
from learning.evaluate import Gate, evaluate
from learning.train import TrainConfig, TrainingFailed, run_training

if TYPE_CHECKING:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.settings import Settings
    from knowledge.store import Store
    from learning.batching import LocalRuntime

log = logging.getLogger(__name__)

LOCK = "nightly"
LOCK_TTL_S = 3 * 3600.0  # renewed while training prints progress; a dead holder frees it after this
RENEW_EVERY_S = 60.0

# Fields of an evaluated run that are in its JSON even when None (no baseline, no warm start).
_EVALUATED = ("baseline", "warm_start", "losses", "chart")


@dataclass(kw_only=True)
class NightlyReport:
    """What one nightly run did: returned by `run_nightly`, rendered by `render` for the terminal and
    the staff channel, stored with its TrainingRun as `as_dict()`.

    A field is None when the run did not get that far; `as_dict` leaves such fields out, so the JSON
    names only what the run reached (docs/learning.md, The nightly report).
    """

    run: int | None = None  # the TrainingRun id and run folder; None when the lock was taken
    status: str  # running | promoted | rejected | skipped | failed | locked
    started_at: str | None = None
    reason: str | None = None
    candidate: str | None = None  # the adapter version this run trained
    baseline: str | None = None  # the adapter it was compared with (None: the base model)
    warm_start: str | None = None  # the adapter training started from
    examples: dict[str, Any] | None = None  # new, sft, dpo, replay, eval, redacted, held_back
    scores: dict[str, Any] | None = None  # per model ("candidate", "baseline"), per evaluation set
    losses: Any = None  # the trainer's final losses
    chart: str | None = None
    run_dir: str | None = None
    timings: dict[str, float] | None = None
    wall_time_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: the form stored with the TrainingRun and printed by --json."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or (f.name in _EVALUATED and self.candidate is not None):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NightlyReport:
        """A report from its `as_dict` form (unknown keys are ignored; no status reads as "?")."""
        known = {f.name for f in fields(cls)} - {"status"}
        return cls(status=str(data.get("status", "?")), **{k: v for k, v in data.items() if k in known})

    def render(self) -> str:
        """The report in a few lines, for the terminal or the staff channel."""
        status = self.status
        head = {
            "promoted": f"Nightly learning: adapter {self.candidate} promoted.",
            "rejected": f"Nightly learning: adapter {self.candidate} NOT promoted; "
            f"still serving {self.baseline or 'the base model'}.",
            "skipped": "Nightly learning: skipped.",
            "failed": "Nightly learning: FAILED; the active adapter is unchanged.",
            "locked": "Nightly learning: already running elsewhere.",
        }.get(status, f"Nightly learning: {status}.")
        lines = [head]
        ex = self.examples or {}
        if ex:
            lines.append(
                f"Examples: {ex.get('new', 0)} new"
                + (
                    f", {ex['sft']} SFT rows, {ex['dpo']} DPO pairs, {ex['replay']} replayed"
                    if "sft" in ex
                    else ""
                )
            )
        if ex.get("held_back"):
            held = ", ".join(f"{n} {reason}" for reason, n in sorted(ex["held_back"].items()))
            lines.append(f"Held back until a second staff member approves (two-person rule): {held}")
        scores = self.scores
        if scores:
            for name in ("heldout", "regression", "control"):
                c, b = scores["candidate"].get(name), scores["baseline"].get(name)
                if c and b:
                    lines.append(f"  {name:<10} {b['score']:.3f} -> {c['score']:.3f} (n={c['n']})")
        if self.reason:
            lines.append(f"Why: {self.reason}")
        if self.wall_time_s is not None:
            lines.append(f"Wall time: {self.wall_time_s:.0f} s")
        if self.chart:
            lines.append(f"Chart: {self.chart}")
        return "\n".join(lines)


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _finish_run(store: Store, run_id: int, report: NightlyReport) -> None:
    store.finish_training_run(
        run_id,
        status=report.status,
        reason=report.reason or "",
        candidate=report.candidate,
        examples=int((report.examples or {}).get("new", 0)),
        report=report.as_dict(),
    )


def run_nightly(
    settings: Settings,
    store: Store,
    kb: KnowledgeBase | None = None,
    *,
    force: bool = False,
    since: dt.datetime | None = None,
    options: BuildOptions | None = None,
    train_config: TrainConfig | None = None,
    gate: Gate | None = None,
    memory: bool = False,
    runtime: LocalRuntime | None = None,
    on_line: Callable[[str, subprocess.Popen[str]], None] | None = None,
) -> NightlyReport:
    """Run the learning job once and return its report. Never raises for an expected failure.

    `force` ignores APPRENTICE_MIN_NEW_EXAMPLES. `kb` is the serving knowledge base (opened from the
    settings when None). `runtime` lends an evaluation runtime (tests, benchmarks).
    """
    holder = _holder()
    if not store.acquire_lock(LOCK, holder, LOCK_TTL_S):
        return NightlyReport(status="locked", reason="another replica or process is running the nightly job")
    own_kb = kb is None
    if kb is None:
        from knowledge.retrieve import KnowledgeBase

        kb = KnowledgeBase.from_settings(settings)
    started = time.perf_counter()
    run_id = store.start_training_run()
    report = NightlyReport(run=run_id, status="running", started_at=utcnow().isoformat(timespec="seconds"))
    try:
        outcome = _run(
            settings, store, kb, run_id, holder, force, since, options, train_config, gate, memory,
            runtime, on_line,
        )  # fmt: skip
        report = dataclasses.replace(outcome, run=report.run, started_at=report.started_at)
    except Exception as exc:  # the job must report and release the lock whatever happens
        log.exception("nightly run %s failed", run_id)
        report.status, report.reason = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        report.wall_time_s = round(time.perf_counter() - started, 1)
        _finish_run(store, run_id, report)
        store.set_kv("nightly:last_run", utcnow().isoformat(timespec="seconds"))
        store.release_lock(LOCK, holder)
        if own_kb:
            kb.close()
    log.warning("nightly run %s: %s (%s)", run_id, report.status, report.reason or "")
    return report


def _run(
    settings: Settings,
    store: Store,
    kb: KnowledgeBase,
    run_id: int,
    holder: str,
    force: bool,
    since: dt.datetime | None,
    options: BuildOptions | None,
    train_config: TrainConfig | None,
    gate: Gate | None,
    memory: bool,
    runtime: LocalRuntime | None,
    on_line: Callable[[str, subprocess.Popen[str]], None] | None,
) -> NightlyReport:
    """The job's steps; the report it returns lacks only the run's id, start and wall time."""
    timings: dict[str, float] = {}
    since = since if since is not None else store.last_promotion()
    new = count_new_examples(store, since)
    if new < settings.min_new_examples and not force:
        return NightlyReport(
            status="skipped",
            reason=f"{new} new examples since the last promotion; APPRENTICE_MIN_NEW_EXAMPLES is "
            f"{settings.min_new_examples}",
            examples={"new": new},
        )
    run_dir = settings.data_dir / "runs" / f"{run_id:05d}"
    t = time.perf_counter()
    opts = dataclasses.replace(options or BuildOptions(), since=since)
    manifest = build_datasets(settings, store, kb, run_dir / "dataset", opts)
    timings["datasets_s"] = round(time.perf_counter() - t, 1)
    counts = manifest["counts"]
    examples = {
        "new": new,
        "sft": counts["sft"],
        "dpo": counts["dpo"],
        "replay": counts["replay"],
        "eval": counts["eval"],
        "redacted": sum(manifest["redaction"].values()),
        "held_back": dict(counts["held_back"]),  # waiting for a second staff member (two-person rule)
    }
    if counts["sft"] == 0:
        reason = "no trainable examples after filtering"
        return NightlyReport(status="skipped", reason=reason, examples=examples)

    base_hash = registry.running_base_hash(settings)
    active = registry.active_adapter(store)
    warm = active if active is not None and active.base_hash == base_hash else None
    renewed = [time.monotonic()]

    def progress(line: str, proc: subprocess.Popen[str]) -> None:
        if time.monotonic() - renewed[0] > RENEW_EVERY_S:
            store.acquire_lock(LOCK, holder, LOCK_TTL_S)
            renewed[0] = time.monotonic()
        if on_line:
            on_line(line, proc)

    t = time.perf_counter()
    try:
        adapter = run_training(
            settings, store, run_dir / "dataset", train_config,
            init_version=warm.version if warm else None, log_path=run_dir / "train.log", on_line=progress,
        )  # fmt: skip
    except TrainingFailed as exc:
        return NightlyReport(status="failed", reason=str(exc), examples=examples, timings=timings)
    timings["train_s"] = round(time.perf_counter() - t, 1)
    store.acquire_lock(LOCK, holder, LOCK_TTL_S)

    t = time.perf_counter()
    baseline = (active.path, active.version) if active is not None else None
    result = evaluate(
        settings, kb, run_dir / "dataset", (adapter.path, adapter.version), baseline, run_dir,
        memory=memory, gate=gate, runtime=runtime,
    )  # fmt: skip
    timings["eval_s"] = round(time.perf_counter() - t, 1)
    status = "rejected"
    if result["promote"]:
        registry.promote(store, adapter.version, base_hash, actor="nightly")
        status = "promoted"
    return NightlyReport(
        status=status,
        reason=result["reason"],
        candidate=adapter.version,
        baseline=result["baseline"],
        warm_start=warm.version if warm else None,
        examples=examples,
        scores=result["sets"],
        losses=adapter.meta.get("final_loss"),
        chart=result["chart"],
        run_dir=str(run_dir),
        timings=timings,
    )


_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def crontab_weekdays(field: str) -> str:
    """A crontab weekday field in APScheduler 3's terms: crontab counts from Sunday (0 or 7),
    APScheduler 3 from Monday (docs/learning.md, Schedules), so numbers become day names."""
    out: list[str] = []
    for part in field.split(","):
        body, _, step = part.partition("/")
        if not any(ch.isdigit() for ch in body) and not (step and body == "*"):
            out.append(part)  # "*", names, or name ranges mean the same in both
            continue
        if body == "*":
            first, last = 0, 6
        elif "-" in body:
            a, b = body.split("-", 1)
            first, last = int(a), int(b)
        else:
            first = last = int(body)
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last):
            raise ValueError(f"weekday {part!r} is out of range 0-7")
        out.extend(_DAYS[d] for d in range(first, last + 1, int(step) if step else 1))
    return ",".join(dict.fromkeys(out))


def scheduled_slot(trigger: Any, now: dt.datetime | None = None) -> str:
    """The fire time this run belongs to (the latest one not after `now`), the same on every replica."""
    now = now or dt.datetime.now(trigger.timezone)
    fire = trigger.get_next_fire_time(None, now - dt.timedelta(hours=7))  # beyond the 6 h misfire grace
    last = fire
    while fire is not None and fire <= now:
        last = fire
        fire = trigger.get_next_fire_time(fire, fire + dt.timedelta(seconds=1))
    return (last or now).isoformat(timespec="minutes")


# crontab's nicknames, as cron(8) reads them
NICKNAMES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}  # fmt: skip


def nightly_trigger(settings: Settings) -> Any:
    """The APScheduler trigger of APPRENTICE_RETRAIN_CRON in APPRENTICE_TIMEZONE; None when it is off.

    The expression is read as crontab reads it (weekday 0 and 7 are Sunday, @daily and friends).
    """
    return cron_trigger(
        settings.retrain_cron, settings.timezone, "APPRENTICE_RETRAIN_CRON", "'0 3 * * *'", "no nightly job"
    )


def report_trigger(settings: Settings) -> Any:
    """The trigger of APPRENTICE_REPORT_CRON (the weekly resolution figures); None when it is off."""
    return cron_trigger(
        settings.report_cron, settings.timezone, "APPRENTICE_REPORT_CRON", "'0 9 * * 1'", "no weekly figures"
    )


def cron_trigger(expression: str, timezone: str, variable: str, example: str, off: str) -> Any:
    """A crontab expression as an APScheduler trigger in `timezone`; None for "" or "off"."""
    from apscheduler.triggers.cron import CronTrigger

    given = expression
    expression = expression.strip()
    if expression.lower() in ("", "off"):
        return None
    try:
        minute, hour, day, month, weekday = NICKNAMES.get(expression.lower(), expression).split()
        return CronTrigger(
            minute=minute, hour=hour, day=day, month=month, day_of_week=crontab_weekdays(weekday),
            timezone=timezone,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(
            f"{variable}={given!r} is not a crontab expression "
            f"(minute hour day month weekday, e.g. {example}, or @daily; empty or off: {off}): "
            f"{exc}"
        ) from None


def _start_claimed(
    trigger: Any, timezone: str, store: Store, job_id: str, name: str, work: Callable[[], Awaitable[None]]
) -> Any:
    """Start an APScheduler that runs `work` on `trigger` once per slot across replicas.

    Every replica's scheduler fires for the same slot; the first to claim it in the database runs
    the work (a lock alone would let a replica that fires a moment later run a quick job again).
    Missed runs coalesce into one and two never overlap.
    """
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    async def job() -> None:
        slot = scheduled_slot(trigger)
        if not await asyncio.to_thread(store.claim_update, job_id, slot):
            log.info("%s for %s already taken by another replica", name, slot)
            return
        await work()

    scheduler = AsyncIOScheduler(timezone=timezone)
    scheduler.add_job(
        job, trigger, id=job_id, name=name, coalesce=True, max_instances=1,
        misfire_grace_time=6 * 3600, replace_existing=True,
    )  # fmt: skip
    scheduler.start()
    log.info("%s scheduled (next %s)", name, scheduler.get_job(job_id).next_run_time)
    return scheduler


def start_scheduler(
    settings: Settings,
    store: Store,
    kb: KnowledgeBase | None = None,
    on_report: Callable[[NightlyReport], Awaitable[None]] | None = None,
) -> Any:
    """Schedule `run_nightly` on APPRENTICE_RETRAIN_CRON; call inside the event loop.

    Returns the started APScheduler (stop it with `scheduler.shutdown(wait=False)`), or None when
    the nightly job is off in this process. The job runs in a worker thread (training itself is a
    subprocess), then `on_report(report)` is awaited; without one, the report is printed.
    """
    trigger = nightly_trigger(settings)
    if trigger is None:
        log.info("nightly learning is off here (APPRENTICE_RETRAIN_CRON=%r)", settings.retrain_cron)
        return None

    async def learn() -> None:
        report = await asyncio.to_thread(run_nightly, settings, store, kb)
        if on_report is not None:
            try:
                await on_report(report)
            except Exception:
                log.exception("posting the nightly report failed")
        elif report.status != "skipped":
            print(report.render(), flush=True)

    return _start_claimed(trigger, settings.timezone, store, LOCK, "nightly learning", learn)


REPORT_JOB = "weekly-report"


def start_report_scheduler(settings: Settings, store: Store, post: Callable[[], Awaitable[None]]) -> Any:
    """Run `post` (the weekly resolution figures) on APPRENTICE_REPORT_CRON; call inside the loop.

    Every replica schedules it; the first to claim the slot in the database posts, the others skip.
    Returns the started APScheduler, or None when APPRENTICE_REPORT_CRON is off.
    """
    trigger = report_trigger(settings)
    if trigger is None:
        log.info("weekly figures are off (APPRENTICE_REPORT_CRON=%r)", settings.report_cron)
        return None

    async def report() -> None:
        try:
            await post()
        except Exception:
            log.exception("posting the weekly figures failed")

    return _start_claimed(trigger, settings.timezone, store, REPORT_JOB, "weekly figures", report)
