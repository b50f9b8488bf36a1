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

log = logging.getLogger(__name__)


def _settings() -> Settings:
    from knowledge.settings import Settings

    return Settings()


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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


# --- benchmarks --------------------------------------------------------------------
def cmd_bench_retrieval(args: argparse.Namespace) -> int:
    from knowledge.bench_retrieval import run_retrieval_bench

    report = run_retrieval_bench(Path(args.kb), Path(args.questions), Path(args.out))
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apprentice",
        description="A customer-support bot that learns from the people who correct it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_: str,
        parent: argparse._SubParsersAction | None = None,
    ) -> argparse.ArgumentParser:  # type: ignore[type-arg]
        p = (parent or sub).add_parser(name, help=help_, description=help_)
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

    bench = sub.add_parser("bench", help="Benchmarks that write JSON and a PNG chart.").add_subparsers(
        dest="bench_command", required=True
    )
    p = add("retrieval", cmd_bench_retrieval, "Retrieval recall@1/@5 and latency on a QA set.", bench)
    p.add_argument("--kb", required=True, help="Folder of markdown documents.")
    p.add_argument("--questions", required=True, help="questions.jsonl with gold_docs.")
    p.add_argument("--out", required=True, help="Output folder for retrieval.json and retrieval.png.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from knowledge.settings import Settings

    try:
        settings = Settings()
    except Exception as exc:  # pydantic ValidationError: say which variable is wrong
        print(
            f"Configuration error: {exc}\nCheck your APPRENTICE_* environment variables or .env.",
            file=sys.stderr,
        )
        return 2
    _setup_logging(settings.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
