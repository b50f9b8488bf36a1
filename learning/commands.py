"""What the `apprentice` learning commands do; bot/cli.py parses the arguments and calls these.

Each returns a process exit status and prints for a person: what happened and what to do next.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learning import registry
from learning.train import TrainConfig

if TYPE_CHECKING:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.settings import Settings
    from knowledge.store import Store


@contextmanager
def _open(settings: Settings, kb: bool = False) -> Iterator[tuple[Store, KnowledgeBase | None]]:
    from knowledge.store import Store

    store = Store(settings.database)
    base = None
    try:
        if kb:
            from knowledge.retrieve import KnowledgeBase

            base = KnowledgeBase.from_settings(settings)
        yield store, base
    finally:
        if base is not None:
            base.close()
        store.close()


def _date(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        ) from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Hyperparameter flags shared by `apprentice train` and `apprentice retrain`."""
    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=d.epochs, help=f"SFT epochs (default {d.epochs:g}).")
    g.add_argument("--lr", type=float, default=d.lr, help=f"SFT learning rate (default {d.lr:g}).")
    g.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank}).")
    g.add_argument("--alpha", type=int, default=d.alpha, help=f"LoRA alpha (default {d.alpha}).")
    g.add_argument("--targets", default=",".join(d.targets), help="LoRA target modules, comma-separated.")
    g.add_argument("--beta", type=float, default=d.beta, help=f"DPO beta (default {d.beta:g}).")
    g.add_argument("--dpo-epochs", type=float, default=d.dpo_epochs, help="DPO epochs (0 skips DPO).")
    g.add_argument(
        "--dpo-lr", type=float, default=d.dpo_lr, help=f"DPO learning rate (default {d.dpo_lr:g})."
    )
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"Batch size (default {d.batch_size})."
    )
    g.add_argument(
        "--max-steps", type=int, default=d.max_steps, help="Cap the steps of each stage (testing)."
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        epochs=args.epochs,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(t for t in args.targets.split(",") if t),
        beta=args.beta,
        dpo_epochs=args.dpo_epochs,
        dpo_lr=args.dpo_lr,
        dpo=args.dpo_epochs > 0,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
    )


def datasets_build(settings: Settings, args: argparse.Namespace) -> int:
    from learning.datasets import BuildOptions, build_datasets

    opts = BuildOptions(since=_date(args.since) if args.since else None)
    if args.heldout is not None:
        opts.heldout_fraction = args.heldout
    with _open(settings, kb=True) as (store, kb):
        assert kb is not None
        manifest = build_datasets(settings, store, kb, Path(args.out), opts)
    counts = manifest["counts"]
    print(
        f"Wrote {args.out}: {counts['sft']} SFT rows, {counts['dpo']} DPO pairs, "
        f"{counts['eval_rows']} eval rows ({counts['new']} new lessons, {counts['replay']} replayed; "
        f"excluded {counts['excluded'] or 'none'}; "
        f"held back for a second staff member {counts['held_back'] or 'none'}; "
        f"redacted {manifest['redaction'] or 'nothing'})."
    )
    return 0


def train(settings: Settings, args: argparse.Namespace) -> int:
    from learning.datasets import build_datasets
    from learning.train import TrainingFailed, run_training

    with _open(settings, kb=args.dataset is None) as (store, kb):
        if args.dataset is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            dataset = settings.data_dir / "runs" / f"manual-{stamp}" / "dataset"
            assert kb is not None
            build_datasets(settings, store, kb, dataset)
        else:
            dataset = Path(args.dataset)
        active = registry.active_adapter(store)
        init = active.version if active is not None and args.continue_active else None
        try:
            adapter = run_training(settings, store, dataset, train_config(args), init_version=init)
        except TrainingFailed as exc:
            print(f"Training failed: {exc}", file=sys.stderr)
            return 1
    print(
        f"Trained adapter {adapter.version} in {adapter.meta.get('wall_time_s')} s -> {adapter.path}\n"
        f"Final loss: {adapter.meta.get('final_loss')}\n"
        f"Next: apprentice eval --candidate {adapter.version}"
    )
    return 0


def evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from learning.evaluate import EvaluationError, Gate
    from learning.evaluate import evaluate as run_eval

    with _open(settings, kb=True) as (store, kb):
        assert kb is not None
        cand = registry.get_adapter(store, args.candidate)
        if cand is None:
            print(f"No adapter {args.candidate!r}; see apprentice adapters list.", file=sys.stderr)
            return 2
        dataset = Path(args.dataset or cand.meta.get("dataset", ""))
        if args.baseline in (None, "active"):
            base = registry.active_adapter(store)
        elif args.baseline == "base":
            base = None
        else:
            base = registry.get_adapter(store, args.baseline)
            if base is None:
                print(f"No adapter {args.baseline!r}; see apprentice adapters list.", file=sys.stderr)
                return 2
        out = Path(args.out) if args.out else Path(cand.path).parent.parent / "evals" / cand.version
        gate = Gate(args.margin, args.tolerance)
        try:
            report = run_eval(
                settings, kb, dataset, (cand.path, cand.version),
                (base.path, base.version) if base is not None else None, out, memory=args.memory, gate=gate,
            )  # fmt: skip
        except EvaluationError as exc:
            print(f"Evaluation failed: {exc}", file=sys.stderr)
            return 1
        for name, c in report["sets"]["candidate"].items():
            b = report["sets"]["baseline"][name]
            if c and b:
                print(f"{name:<11} baseline {b['score']:.3f}  candidate {c['score']:.3f}  (n={c['n']})")
        print(f"{'PROMOTE' if report['promote'] else 'KEEP CURRENT'}: {report['reason']}")
        print(f"Report: {out / 'eval.json'}  Chart: {report['chart']}")
        if args.promote and report["promote"]:
            registry.promote(store, cand.version, registry.running_base_hash(settings), actor="cli")
            print(f"Adapter {cand.version} is now active.")
    return 0


def adapters_list(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (store, _):
        state = registry.pointer(store)
        rows = registry.list_adapters(store)
    if not rows:
        print("No adapters yet. Train one with: apprentice retrain")
        return 0
    for a in rows:
        mark = "*" if a.version == state.active else " "
        loss = a.meta.get("final_loss", {}) or {}
        print(
            f"{mark} {a.version}  {a.created_at:%Y-%m-%d %H:%M}  base {a.base_model} ({a.base_hash[:10]})  "
            f"sft loss {loss.get('sft')}  {a.path}"
        )
    print(f"active: {state.active or 'none (base model)'}; previous: {state.previous or 'none'}")
    return 0


def adapters_promote(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (store, _):
        try:
            state = registry.promote(store, args.version, registry.running_base_hash(settings), actor="cli")
        except registry.RegistryError as exc:
            print(str(exc), file=sys.stderr)
            return 1
    was = state.previous or "the base model"
    print(f"Active adapter: {state.active} (was {was}). A running bot switches within 30 s.")
    return 0


def adapters_rollback(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (store, _):
        try:
            state = registry.rollback(store, registry.running_base_hash(settings), actor="cli")
        except registry.RegistryError as exc:
            print(str(exc), file=sys.stderr)
            return 1
    print(f"Rolled back: active is now {state.active or 'the base model'} (was {state.previous}).")
    return 0


def retrain(
    settings: Settings,
    args: argparse.Namespace,
    on_report: Callable[[Store, dict[str, Any]], None] | None = None,
) -> int:
    """`apprentice retrain`: the nightly job now; `on_report` also gets the report (for Slack)."""
    from learning.nightly import format_report, run_nightly

    with _open(settings, kb=True) as (store, kb):
        report = run_nightly(settings, store, kb, force=args.force, train_config=train_config(args))
        if on_report is not None:
            on_report(store, report)
    print(format_report(report))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    return 0 if report["status"] in ("promoted", "rejected", "skipped") else 1
