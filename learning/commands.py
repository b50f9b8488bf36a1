"""What the `apprentice` learning commands do; bot/cli.py parses the arguments and calls these.

Each returns a process exit status and prints for a person: what happened and what to do next.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learning import registry
from learning.train import TrainConfig, parse_train_config, train_flags_help

if TYPE_CHECKING:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.settings import Settings
    from knowledge.store import Store
    from learning.nightly import NightlyReport


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


class _TrainHelp(argparse.Action):
    """-h/--help of a command that takes TrainConfig's flags: the command's help, then those flags."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.print_help()
        print()
        print(train_flags_help(parser.prog))
        parser.exit()


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Let the command `p` take TrainConfig's flags (`apprentice train`, `retrain`, `bench loop`).

    argparse leaves them over (bot/cli.py hands them to `args.train_args`) and `train_config`
    parses them with transformers' HfArgumentParser when the command runs, so `apprentice --help`
    never imports transformers; the command's own --help lists them. Make `p` with add_help=False:
    this -h/--help takes the place of argparse's own.
    """
    p.add_argument("-h", "--help", action=_TrainHelp, help="show this help and the training flags, then exit")
    p.set_defaults(train_args=[], train_prog=p.prog)
    p.epilog = "Training flags such as --epochs 2 --lr 1e-3 --targets q_proj,v_proj: see --help."


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a command's leftover flags (exits 2 on an unknown flag or a bad value)."""
    return parse_train_config(args.train_args, args.train_prog)


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
    on_report: Callable[[Store, NightlyReport], None] | None = None,
) -> int:
    """`apprentice retrain`: the nightly job now; `on_report` also gets the report (for Slack)."""
    from learning.nightly import run_nightly

    with _open(settings, kb=True) as (store, kb):
        report = run_nightly(settings, store, kb, force=args.force, train_config=train_config(args))
        if on_report is not None:
            on_report(store, report)
    print(report.render())
    if args.json:
        print(json.dumps(report.as_dict(), indent=1, default=str))
    return 0 if report.status in ("promoted", "rejected", "skipped") else 1
