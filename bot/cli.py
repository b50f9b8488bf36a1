"""`apprentice …`: the command line. Each command imports what it needs inside its function,
so `apprentice --help` starts fast (no torch, transformers or chromadb at import time)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from knowledge.settings import Settings
    from knowledge.store import Store
    from learning.nightly import NightlyReport

log = logging.getLogger(__name__)


def _settings() -> Settings:
    from knowledge.settings import Settings

    return Settings()


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":  # one JSON object a line, for log shippers (Loki, Elasticsearch, CloudWatch)
        from pythonjsonlogger.json import JsonFormatter

        renamed = {"levelname": "level", "name": "logger"}
        handler.setFormatter(JsonFormatter(LOG_FORMAT, rename_fields=renamed))
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING), handlers=[handler])


def _settings_problems(exc: Exception) -> str:
    """A pydantic ValidationError as lines naming the environment variable, not the field."""
    from pydantic import ValidationError

    from knowledge.settings import Settings, env_name

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        if field in Settings.model_fields:
            secret = "token" in field or "secret" in field or "key" in field
            shown = "" if secret else f" (got {error.get('input')!r})"
            lines.append(f"{env_name(field)}: {error['msg']}{shown}")
        else:
            lines.append(str(error["msg"]))
    return "\n".join(lines)


# --- serve -------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from bot.app import serve

    return asyncio.run(serve(_settings()))


# --- knowledge base ----------------------------------------------------------------
def cmd_kb_ingest(args: argparse.Namespace) -> int:
    from knowledge.retrieve import KnowledgeBase

    kb = KnowledgeBase.from_settings(_settings())
    try:
        report = kb.ingest([Path(p) for p in args.paths], prune=args.prune, progress=True)
    finally:
        kb.close()
    print(report.summary() if hasattr(report, "summary") else report)
    return 0


def cmd_kb_search(args: argparse.Namespace) -> int:
    from knowledge.retrieve import KnowledgeBase

    kb = KnowledgeBase.from_settings(_settings())
    try:
        passages = kb.search(args.query, args.k)
    finally:
        kb.close()
    if not passages:
        print("No passages found. Ingest documents first: apprentice kb ingest PATH")
    for p in passages:
        snippet = " ".join(p.text.split())[:160]
        print(f"{p.score:.3f}  {p.title}  [{p.source}]\n       {snippet}")
    return 0


def cmd_kb_list(args: argparse.Namespace) -> int:
    from knowledge.retrieve import KnowledgeBase

    kb = KnowledgeBase.from_settings(_settings())
    try:
        docs = kb.documents()
    finally:
        kb.close()
    if not docs:
        print("The knowledge base is empty. Add documents: apprentice kb ingest PATH")
    for d in docs:
        unit = "chunk " if d.chunks == 1 else "chunks"
        print(f"{d.chunks:5d} {unit}  {d.source}  ({d.title})")
    return 0


def cmd_kb_rm(args: argparse.Namespace) -> int:
    from knowledge.retrieve import KnowledgeBase

    kb = KnowledgeBase.from_settings(_settings())
    try:
        gone = kb.remove(args.names)
    finally:
        kb.close()
    for d in gone:
        print(f"removed {d.source} ({d.chunks} chunks)")
    if not gone:
        print("No document matched; `apprentice kb list` shows their names.", file=sys.stderr)
        return 1
    return 0


# --- benchmarks --------------------------------------------------------------------
def cmd_bench_retrieval(args: argparse.Namespace) -> int:
    from bench.retrieval import run_retrieval_bench

    report = run_retrieval_bench(Path(args.kb), Path(args.questions), Path(args.out))
    print(json.dumps(report, indent=2))
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from bench.speed import run_speed_bench

    kb = Path(args.kb) if args.kb else None
    report = run_speed_bench(
        _settings(), Path(args.out), kb_dir=kb, model=args.model, max_new_tokens=args.max_new_tokens
    )
    print(json.dumps(report, indent=2))
    return 0


def cmd_bench_loop(args: argparse.Namespace) -> int:
    from bench.loop import LoopOptions, run_loop_bench
    from learning.commands import train_config

    options = LoopOptions(
        groups=args.groups, controls=args.controls, seed=args.seed, model=args.model,
        train=train_config(args), data_dir=Path(args.data_dir) if args.data_dir else None,
    )  # fmt: skip
    report = run_loop_bench(
        _settings(), Path(args.kb), Path(args.questions), Path(args.out), options,
    )  # fmt: skip
    print(json.dumps({k: report[k] for k in ("scores", "uplift_vs_baseline", "control_change")}, indent=2))
    print(f"Report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_bench_answers(args: argparse.Namespace) -> int:
    from bench.answers import AnswersOptions, run_answers_bench

    options = AnswersOptions(
        limit=args.limit, seed=args.seed, model=args.model, adapter=args.adapter,
        concurrency=args.concurrency, courteous=args.courteous,
    )  # fmt: skip
    if not Path(args.kb).is_dir():
        print(f"No folder {args.kb}: --kb takes a folder of documents.", file=sys.stderr)
        return 2
    try:
        report = run_answers_bench(
            _settings(), Path(args.kb), Path(args.questions), Path(args.out), options,
        )  # fmt: skip
    except (OSError, ValueError) as exc:  # a missing or malformed questions file, an unknown adapter
        print(f"bench answers: {exc}", file=sys.stderr)
        return 2
    keys = ("questions", "answer_mode", "score", "reference_scores", "ratio_vs_passage", "truncated",
            "off_role", "unsupported", "abstained", "fallback", "words_p50", "latency_s")  # fmt: skip
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(f"Report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_bench_cards(args: argparse.Namespace) -> int:
    from bench.cards import CardsOptions, run_cards_bench

    try:
        rates = tuple(int(r) for r in args.rates.split(",") if r.strip())
    except ValueError:
        rates = ()
    if not rates or min(rates) <= 0 or args.minutes <= 0 or args.scale <= 0:
        print("bench cards: --rates (e.g. 60,600), --minutes and --scale must be > 0", file=sys.stderr)
        return 2
    options = CardsOptions(rates=rates, minutes=args.minutes, scale=args.scale, flagged=args.flagged)
    report = run_cards_bench(Path(args.out), options, _settings().slack_digest_after_s)
    for rate, run in report["rates"].items():
        lag, flagged = run["lag_s"], run["flagged_lag_s"]
        print(
            f"{rate} answers/min: card lag p50 {lag['p50']} s, p95 {lag['p95']} s, max {lag['max']} s "
            f"(flagged max {flagged['max']} s); {run['cards_posted']} cards, {run['digests_posted']} "
            f"digests; {run['answers_covered']}/{run['answers']} answers shown, "
            f"flagged dropped {run['flagged_dropped']}"
        )
    print(f"Report: {Path(args.out) / 'report.json'}")
    return 0 if report["ok"] else 1


def cmd_bench_redaction(args: argparse.Namespace) -> int:
    from learning.redact import measure

    path = Path(args.labelled)
    if not path.is_file():
        print(f"No labelled file at {path}; pass --labelled PATH (JSONL, text + spans).", file=sys.stderr)
        return 2
    report = measure(path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"labelled": str(path), **report}
    (out / "redaction.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(
        f"PII redaction on {report['examples']} examples ({report['gold_spans']} labelled spans): "
        f"precision {report['precision']:.4f}, recall {report['recall']:.4f}\n"
        f"Report: {out / 'redaction.json'}"
    )
    return 0


# --- privacy -------------------------------------------------------------------------
def cmd_forget(args: argparse.Namespace) -> int:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store
    from learning.privacy import CustomerNotFound, forget_customer

    settings = _settings()
    store = Store(settings.database)
    kb = None if args.dry_run else KnowledgeBase.from_settings(settings)
    try:
        report = forget_customer(
            store, kb, args.customer, actor=args.actor, dry_run=args.dry_run, data_dir=settings.data_dir
        )
    except CustomerNotFound as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        if kb is not None:
            kb.close()
        store.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
        return 0
    verb = "Would erase" if report.dry_run else "Erased"
    groups = len(report.group_conversations)
    print(
        f"{verb} {', '.join(report.customers)}: {len(report.conversations)} conversation(s), "
        f"{report.messages_erased} message(s), {len(report.corrections_revoked)} correction(s)"
        + (f", their messages in {groups} group chat(s)" if groups else "")
        + (f", {report.copies_erased} copied answer(s) of other customers" if report.copies_erased else "")
        + "."
    )
    if report.adapters_trained_on_them:
        active = " (including the ACTIVE one)" if report.active_adapter_affected else ""
        print(
            f"Adapters trained on their data{active}: {', '.join(report.adapters_trained_on_them)}.\n"
            "Weights cannot forget: roll back past them (apprentice adapters promote VERSION) or retrain "
            "(apprentice retrain --force); new datasets leave this customer out."
        )
    else:
        print("No adapter was trained on their data.")
    if report.datasets_with_their_data:
        done = "" if report.dry_run else f" ({report.dataset_rows_removed} row(s) removed)"
        folders = ", ".join(report.datasets_with_their_data)
        print(f"Dataset folders holding their (redacted) text{done}: {folders}")
    if report.chroma_queue_purged is None and report.corrections_revoked and not report.dry_run:
        print(
            "Chroma server: its write-ahead log may still hold their corrections until it is purged; "
            "see docs/security.md (erasure)."
        )
    if report.manifests_unreadable:
        print("Lineage unknown (manifest missing) for: " + ", ".join(report.manifests_unreadable))
    if report.slack_threads:
        print("Slack review threads to delete in Slack: " + ", ".join(report.slack_threads))
    return 0


# --- resolution figures ------------------------------------------------------------------
def cmd_stats(args: argparse.Namespace) -> int:
    from bot import stats
    from knowledge.store import Store

    if not 1 <= args.days <= 366:
        print("--days must be 1 to 366", file=sys.stderr)
        return 2
    store = Store(_settings().database)
    try:
        figures = stats.compute(store, args.days)
    finally:
        store.close()
    print(stats.format_stats(figures))
    if args.out:
        data, chart = stats.write(figures, Path(args.out))
        print(f"Wrote {data} and {chart}")
    return 0


# --- learning (learning/commands.py does the work) -------------------------------------
def cmd_datasets_build(args: argparse.Namespace) -> int:
    from learning.commands import datasets_build

    return datasets_build(_settings(), args)


def cmd_train(args: argparse.Namespace) -> int:
    from learning.commands import train

    return train(_settings(), args)


def cmd_eval(args: argparse.Namespace) -> int:
    from learning.commands import evaluate

    return evaluate(_settings(), args)


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from learning.commands import adapters_list

    return adapters_list(_settings(), args)


def cmd_adapters_promote(args: argparse.Namespace) -> int:
    from learning.commands import adapters_promote

    return adapters_promote(_settings(), args)


def cmd_adapters_rollback(args: argparse.Namespace) -> int:
    from learning.commands import adapters_rollback

    return adapters_rollback(_settings(), args)


def cmd_retrain(args: argparse.Namespace) -> int:
    from learning.commands import retrain

    settings = _settings()
    if not (settings.slack_bot_token.get_secret_value() and settings.slack_channel):
        return retrain(settings, args)

    def to_slack(store: Store, report: NightlyReport) -> None:
        from bot.channels.slack import queue_report

        if queue_report(store, report):  # a running bot replica posts it from the outbox
            print("The report is queued for the Slack review channel.")

    return retrain(settings, args, on_report=to_slack)


def cmd_export_base(args: argparse.Namespace) -> int:
    from learning.modelfiles import export_base

    settings = _settings()
    out, digest = export_base(settings.model, settings.models_dir, Path(args.out))
    print(f"{out}  (base hash {digest[:12]})")
    print(
        f"Serve it: vllm serve {out} --served-model-name {settings.model} --enable-lora "
        "--max-lora-rank 64 --api-key $APPRENTICE_LLM_API_KEY"
    )
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apprentice")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apprentice",
        description="A customer-support bot that learns from the people who correct it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_: str,
        parent: argparse._SubParsersAction | None = None,
        add_help: bool = True,  # False: add_train_arguments brings a -h/--help that lists the training flags
    ) -> argparse.ArgumentParser:  # type: ignore[type-arg]
        p = (parent or sub).add_parser(name, help=help_, description=help_, add_help=add_help)
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "Run the bot: Telegram/Slack when configured, else the terminal chat.")

    kb = sub.add_parser("kb", help="Manage the knowledge base.").add_subparsers(
        dest="kb_command", required=True
    )
    p = add("ingest", cmd_kb_ingest, "Ingest documents (markdown, text, HTML, PDF).", kb)
    p.add_argument("paths", nargs="+", help="Files or folders.")
    p.add_argument("--prune", action="store_true", help="Remove documents whose files are gone.")
    p = add("search", cmd_kb_search, "Show the passages retrieved for a query.", kb)
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5, help="How many passages (default 5).")
    add("list", cmd_kb_list, "List the ingested documents and their chunk counts.", kb)
    p = add("rm", cmd_kb_rm, "Remove documents by the name `kb list` shows, or a whole folder.", kb)
    p.add_argument("names", nargs="+", help="Document names (as in `kb list`) or folder names.")

    bench = sub.add_parser("bench", help="Benchmarks that write JSON and a PNG chart.").add_subparsers(
        dest="bench_command", required=True
    )
    p = add("retrieval", cmd_bench_retrieval, "Retrieval recall@1/@5 and latency on a QA set.", bench)
    p.add_argument("--kb", required=True, help="Folder of markdown documents.")
    p.add_argument("--questions", required=True, help="questions.jsonl with gold_docs.")
    p.add_argument("--out", required=True, help="Output folder for retrieval.json and retrieval.png.")
    p = add("speed", cmd_bench_speed, "Decode, batching, latency, retrieval, ingest, training speed.", bench)
    p.add_argument("--out", required=True, help="Output folder for speed.json and speed.png.")
    p.add_argument("--model", help="Base model (default: APPRENTICE_MODEL).")
    p.add_argument("--kb", help="Folder of documents to retrieve from (default: the configured KB).")
    p.add_argument("--max-new-tokens", type=int, default=64, help="Tokens per answer when timing (64).")
    p = add("loop", cmd_bench_loop, "Baseline, correction memory and retraining on a QA set.", bench, False)
    p.add_argument("--kb", required=True, help="Folder of markdown documents.")
    p.add_argument("--questions", required=True, help="questions.jsonl with id, question, answer, group.")
    p.add_argument("--out", required=True, help="Output folder for report.json, answers.jsonl, report.png.")
    p.add_argument("--groups", type=int, default=40, help="Question groups to correct (40).")
    p.add_argument("--controls", type=int, default=40, help="Untouched control questions (40).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the choice of groups and controls (0).")
    p.add_argument("--model", help="Base model (default: APPRENTICE_MODEL).")
    p.add_argument("--data-dir", help="Keep the run's data here (default: a temporary folder).")
    from learning.commands import add_train_arguments as _train_flags

    _train_flags(p)
    p = add("answers", cmd_bench_answers, "Answer quality vs pasting the retrieved passage.", bench)
    p.add_argument("--kb", required=True, help="Folder of markdown documents.")
    p.add_argument("--questions", required=True, help="questions.jsonl with id, question, answer, group.")
    p.add_argument("--out", required=True, help="Output folder for answers.jsonl, report.json, report.png.")
    p.add_argument("--limit", type=int, help="Questions from a seeded shuffle (default: all).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the shuffle (0).")
    p.add_argument("--model", help="Base model (default: APPRENTICE_MODEL).")
    p.add_argument("--adapter", help="Answer with this adapter version from `apprentice adapters list`.")
    p.add_argument(
        "--concurrency",
        type=int,
        help="Customers asking at once (default: APPRENTICE_MAX_BATCH); 1 times one answer at a time.",
    )
    p.add_argument(
        "--courteous",
        action="store_true",
        help="Ask each question as customers write one: after a greeting, before thanks (seeded).",
    )
    p = add("cards", cmd_bench_cards, "Review-card lag at Slack's posting limit (fake Slack).", bench)
    p.add_argument("--out", required=True, help="Output folder for report.json and report.png.")
    p.add_argument("--rates", default="60,600", help="Answers a minute, comma-separated (60,600).")
    p.add_argument("--minutes", type=float, default=4.0, help="Simulated minutes at each rate (4).")
    p.add_argument("--scale", type=float, default=10.0, help="How many times faster the clock runs (10).")
    p.add_argument("--flagged", type=float, default=0.05, help="Share of flagged answers (0.05).")
    p = add("redaction", cmd_bench_redaction, "PII redaction precision and recall on a labelled file.", bench)
    p.add_argument("--out", required=True, help="Output folder for redaction.json.")
    p.add_argument(
        "--labelled", default="tests/data/pii_labelled.jsonl", help="Labelled JSONL (text + spans)."
    )

    p = add(
        "forget", cmd_forget,
        "Erase a customer's conversations and list the adapters trained on their data.",
    )  # fmt: skip
    p.add_argument("customer", help="CHANNEL:ID as the bot sees it (e.g. telegram:12345), or #ROW.")
    p.add_argument("--dry-run", action="store_true", help="Only report what would be erased.")
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.add_argument("--actor", default="cli", help="Who asked (recorded in the audit log).")

    p = add("stats", cmd_stats, "Resolution figures: resolution rate, CSAT, hand-offs, time to answer.")
    p.add_argument("--days", type=int, default=7, help="The last N days (7).")
    p.add_argument("--out", help="Also write stats.json and stats.png to this folder.")

    from learning.commands import add_train_arguments

    ds = sub.add_parser("datasets", help="Training data from corrections.").add_subparsers(
        dest="datasets_command", required=True
    )
    p = add("build", cmd_datasets_build, "Write sft.jsonl, dpo.jsonl, eval.jsonl and manifest.json.", ds)
    p.add_argument("--out", required=True, help="Output folder.")
    p.add_argument("--since", help="New examples since this date (default: since the last promotion).")
    p.add_argument("--heldout", type=float, help="Share of new corrections held out for evaluation (0.2).")
    about = "Train a new LoRA adapter version (SFT, then DPO) in a subprocess."
    p = add("train", cmd_train, about, add_help=False)
    p.add_argument("--dataset", help="A folder from `apprentice datasets build` (default: build one now).")
    p.add_argument(
        "--continue", dest="continue_active", action="store_true", help="Start from the active adapter."
    )
    add_train_arguments(p)
    p = add("eval", cmd_eval, "Score a candidate adapter against the active one (eval.json + PNG).")
    p.add_argument("--candidate", required=True, help="Adapter version to evaluate.")
    p.add_argument("--baseline", help="Version to compare with: active (default), base, or a version.")
    p.add_argument("--dataset", help="Dataset folder (default: the one the candidate was trained on).")
    p.add_argument("--memory", action="store_true", help="Evaluate with the correction memory on.")
    p.add_argument("--margin", type=float, default=0.02, help="Relative gain needed on held-out (0.02).")
    p.add_argument("--tolerance", type=float, default=0.02, help="Relative loss allowed elsewhere (0.02).")
    p.add_argument("--out", help="Output folder (default: <data_dir>/evals/<version>).")
    p.add_argument("--promote", action="store_true", help="Promote the candidate if the gate passes.")
    ad = sub.add_parser("adapters", help="List, promote and roll back adapter versions.").add_subparsers(
        dest="adapters_command", required=True
    )
    add("list", cmd_adapters_list, "List adapter versions; * marks the active one.", ad)
    p = add("promote", cmd_adapters_promote, "Make an adapter version active (atomic).", ad)
    p.add_argument("version")
    add("rollback", cmd_adapters_rollback, "Go back to the previously active adapter.", ad)
    p = add("export-base", cmd_export_base, "Copy the base model adapters are trained on, for vLLM to serve.")
    p.add_argument("out", help="Folder to create on the volume vLLM reads: /data/base/<model>.")
    p = add("retrain", cmd_retrain, "Run the nightly learning job now.", add_help=False)
    p.add_argument("--force", action="store_true", help="Run even with few new examples.")
    p.add_argument("--json", action="store_true", help="Also print the full report as JSON.")
    add_train_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only training commands take more: TrainConfig's flags (learning/commands.py)
        if "train_args" not in vars(args):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.train_args = extra
    from knowledge.settings import ConfigError, Settings

    try:
        settings = Settings()
    except Exception as exc:  # pydantic ValidationError: say which variable is wrong
        print(
            f"Configuration error:\n{_settings_problems(exc)}\n"
            "Fix these environment variables (or the .env file in this folder).",
            file=sys.stderr,
        )
        return 2
    _setup_logging(settings.log_level, settings.log_format)
    from bot.logsafe import install

    install(settings)  # no tokens in request logs or exception text
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # a setting stops this command: one line, no traceback
        print(f"apprentice: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
