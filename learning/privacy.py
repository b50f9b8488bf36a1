"""`apprentice forget CUSTOMER`: erase one customer's data and say which adapters learned from it.

What erasure does, and why each step is there:

- **What they sent**: every customer message they sent (`messages.sender_id`, migration 0004), in
  their own chats and in group chats where another member spoke first and owns the conversation,
  and every reply to those messages (the bot's answer, notices, the staff follow-up), lose their
  text and sources; the rows stay so feedback, corrections and answer counts keep their shape.
  Their sender id becomes `erased[:<customer row>]`. Messages stored before 0004 have no sender:
  they count as the conversation customer's.
- **Their conversations**: a conversation they own where nobody else spoke (a private chat) is
  emptied whole (theirs, the bot's, staff's messages). A group conversation they own where others
  spoke keeps the others' messages. Flag reasons staff typed about erased answers are cleared.
- **The customer**: name cleared, channel id replaced by `erased:<id>`, `erased_at` set. Their
  conversations' chat ids are replaced the same way, so if they write again they start afresh
  instead of landing in the erased record. A group member who never wrote to the bot alone has
  no customer record; they are found by their sender id (`telegram:ID`).
- **Feedback** they gave (`feedback.actor` = `telegram:ID`) keeps its kind, so ratings still
  count, but its actor becomes `erased:f<feedback id>`.
- **Corrections** made on their messages or in their private conversations are revoked, emptied
  and removed from the correction memory (their question is the memory's key). Copies of such a
  correction served from the memory to other customers are answers that cite it in `sources`:
  their text becomes `[erased]` (the rows stay, so other customers' counts and ratings stay
  right); a later correction whose `original` was that copy loses it too. Embedded Chroma's
  write-ahead queue and free pages are purged of them (`KnowledgeBase.purge_forgotten`). Dataset
  building already skips erased customers, revoked corrections and paraphrases from erased
  conversations.
- **Outbox, inbox, rate limits, audit log**: queued and sent items for their messages and
  private conversations are deleted (they hold reply texts), and so are Telegram updates not yet
  handled that they sent, and their rate-limit windows (keyed by their id); audit entries about
  their records keep who did what, but not the text.
- **Lineage and datasets**: each dataset manifest records, row by row, the store ids and the
  conversations a row came from. An adapter trained on a dataset with one of this customer's
  rows (or started from such an adapter) is listed. Weights cannot be un-trained: roll back or
  retrain without them (`apprentice retrain --force` now builds datasets without the customer).
  Every dataset folder (the adapters', `<data_dir>/runs/*/dataset`, `<data_dir>/datasets/**`)
  is searched: a row whose lineage holds their ids or private conversations, or whose text holds
  one of their (redacted) messages, is removed from sft/dpo/eval.jsonl and the manifest's
  lineage, counts and hashes are rewritten (`manifest.erasures` records what was removed); rows
  of `eval.json` reports in `runs/` and `evals/` get `[erased]` texts. The datasets hold
  redacted text and store ids (`message:40`, conversation numbers), never channel ids.

Slack keeps its own copy of the review threads; their ids are listed so they can be deleted there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowledge.store.erasure import ERASED
from learning.redact import redact
from learning.registry import pointer

if TYPE_CHECKING:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.store import Store

log = logging.getLogger(__name__)

DATASET_FILES = ("sft.jsonl", "dpo.jsonl", "eval.jsonl")
MIN_MATCH = 16  # shorter texts of theirs are not searched for in datasets (too many false hits)


class CustomerNotFound(LookupError):
    """No customer matches the given reference."""


@dataclass
class ForgetReport:
    """What `forget` found and did (printed by the CLI, also as JSON)."""

    customers: list[str]
    conversations: list[int]
    messages_erased: int = 0
    corrections_revoked: list[int] = field(default_factory=list)
    outbox_items_deleted: int = 0
    audit_entries_scrubbed: int = 0
    adapters_trained_on_them: list[str] = field(default_factory=list)
    active_adapter_affected: bool = False
    datasets_with_their_data: list[str] = field(default_factory=list)
    manifests_unreadable: list[str] = field(default_factory=list)
    slack_threads: list[str] = field(default_factory=list)
    dry_run: bool = False
    # group chats owned by someone else where they wrote (their messages are erased there)
    group_conversations: list[int] = field(default_factory=list)
    copies_erased: int = 0  # other customers' answers that were copies of their corrections
    feedback_scrubbed: int = 0
    dataset_rows_removed: int = 0
    eval_reports_scrubbed: list[str] = field(default_factory=list)
    # rows removed from embedded Chroma's write-ahead queue; None: a Chroma server (purge there)
    chroma_queue_purged: int | None = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lineage_hits(manifest: dict[str, Any], ids: set[str], conversations: set[int]) -> bool:
    lineage = manifest.get("lineage", {})
    for entry in [*lineage.get("sft", []), *lineage.get("dpo", [])]:
        if ids.intersection(entry.get("ids", [])):
            return True
        if conversations.intersection(entry.get("conversations", [])):
            return True
    return False


def trained_on(
    store: Store, ids: set[str], conversations: set[int], texts: Iterable[str] = ()
) -> tuple[list[str], list[str], list[str]]:
    """(adapter versions, dataset folders, unreadable manifests) touching these store ids/conversations
    (or, with `texts`, holding one of these redacted texts).

    An adapter counts when its own dataset has such a row, or when it was trained on top of
    (`init_adapter`) an adapter that counts.
    """
    texts = list(texts)
    adapters = store.adapters()
    hit_paths: set[str] = set()
    versions: list[str] = []
    datasets: list[str] = []
    unreadable: list[str] = []
    for adapter in adapters:  # oldest first: a parent is decided before its children
        meta = adapter.meta or {}
        folder = str(meta.get("dataset") or "")
        hit = False
        if folder:
            try:
                manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                unreadable.append(folder)
            else:
                if _lineage_hits(manifest, ids, conversations) or _dataset_rows(
                    Path(folder), manifest, ids, conversations, texts
                ):
                    hit = True
                    if folder not in datasets:
                        datasets.append(folder)
        if meta.get("init_adapter") and str(meta["init_adapter"]) in hit_paths:
            hit = True
        if hit:
            versions.append(adapter.version)
            hit_paths.add(str(adapter.path))
    return versions, datasets, unreadable


def forget_customer(
    store: Store,
    kb: KnowledgeBase | None,
    ref: str,
    actor: str = "cli",
    dry_run: bool = False,
    data_dir: Path | None = None,
) -> ForgetReport:
    """Erase the customer(s) matching `ref` (see the module docstring). Raises CustomerNotFound.

    `data_dir`: where `runs/*/dataset`, `datasets/` and eval reports are searched (default: the
    knowledge base's); adapters' dataset folders are searched wherever they are.
    """
    customers = store.customers_matching(ref)
    senders = {(c.channel, c.external_id) for c in customers if not c.external_id.startswith("erased:")}
    senders |= store.senders_matching(ref)
    if not customers and not senders:
        raise CustomerNotFound(
            f"No customer matches {ref!r}. Use CHANNEL:ID as the bot sees it (for example telegram:12345), "
            "or #ROW from the customers table."
        )
    plan = store.erasure_plan(customers, senders)
    private_ids = [c.id for c in plan.private]
    corr_ids = plan.corrections
    lineage_ids = {f"message:{m}" for m in plan.messages} | {f"correction:{c}" for c in corr_ids}
    texts = _searchable(plan.own_texts)
    versions, datasets, unreadable = trained_on(store, lineage_ids, set(private_ids), texts)
    if data_dir is None and kb is not None:
        data_dir = Path(kb.data_dir)
    folders = _dataset_folders(data_dir, datasets)
    for folder in folders:
        if folder not in datasets and _dataset_rows(Path(folder), None, lineage_ids, set(private_ids), texts):
            datasets.append(folder)
    report = ForgetReport(
        customers=[f"{c.channel}:{c.external_id}" for c in customers]
        + sorted(f"{ch}:{x}" for ch, x in senders - {(c.channel, c.external_id) for c in customers}),
        conversations=[c.id for c in plan.owned],
        messages_erased=len(plan.messages),
        corrections_revoked=corr_ids,
        adapters_trained_on_them=versions,
        active_adapter_affected=pointer(store).active in versions,
        datasets_with_their_data=datasets,
        manifests_unreadable=unreadable,
        slack_threads=[c.review_thread for c in plan.owned if c.review_thread],
        dry_run=dry_run,
        group_conversations=plan.groups,
        copies_erased=len(plan.copies),
    )
    if dry_run:
        return report
    counts = store.erase(plan, actor=actor, adapters=versions)
    report.feedback_scrubbed = counts.feedback_scrubbed
    report.outbox_items_deleted = counts.outbox_items_deleted
    report.audit_entries_scrubbed = counts.audit_entries_scrubbed
    if kb is not None:
        for cid in corr_ids:
            kb.forget(cid)
        report.chroma_queue_purged = kb.purge_forgotten(corr_ids) if corr_ids else 0
    for folder in datasets:
        report.dataset_rows_removed += _erase_dataset_rows(Path(folder), lineage_ids, set(private_ids), texts)
    report.eval_reports_scrubbed = _scrub_eval_reports(data_dir, lineage_ids, texts)
    log.warning(
        "erased %d customer record(s) and %d sender(s): %d conversations, %d messages, %d corrections",
        len(customers), len(senders), len(plan.owned), len(plan.messages), len(corr_ids),
    )  # fmt: skip
    return report


# --- datasets on disk ---------------------------------------------------------------------------


def _searchable(texts: Iterable[str]) -> list[str]:
    """Their texts as a dataset holds them (redacted), long enough to search for."""
    out: set[str] = set()
    for t in texts:
        for form in (t.strip(), redact(t)[0].strip()):
            if len(form) >= MIN_MATCH:
                out.add(form)
    return sorted(out)


def _dataset_folders(data_dir: Path | None, known: Iterable[str]) -> list[str]:
    """Dataset folders (with a manifest.json) under `data_dir`: runs/*/dataset, datasets/**."""
    found = list(known)
    if data_dir is None:
        return found
    root = Path(data_dir)
    manifests = [*root.glob("runs/*/dataset/manifest.json"), *root.glob("datasets/**/manifest.json")]
    for m in sorted(manifests):
        if str(m.parent) not in found:
            found.append(str(m.parent))
    return found


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _holds(row: Any, texts: list[str]) -> bool:
    return any(t in v for v in _strings(row) for t in texts)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _doomed(
    folder: Path, manifest: dict[str, Any] | None, ids: set[str], conversations: set[int], texts: list[str]
) -> dict[str, list[int]]:
    """Per dataset file, the indexes of the rows that hold this customer's data."""
    if manifest is None:
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    lineage = manifest.get("lineage", {})
    hit_lessons: set[tuple[str, ...]] = set()
    out: dict[str, list[int]] = {}
    for name, key in (("sft.jsonl", "sft"), ("dpo.jsonl", "dpo")):
        entries = lineage.get(key, [])
        rows = _read_rows(folder / name)
        doomed = []
        for i, row in enumerate(rows):
            entry = entries[i] if i < len(entries) else {}
            if (
                ids.intersection(entry.get("ids", []))
                or conversations.intersection(entry.get("conversations", []))
                or _holds(row, texts)
            ):
                doomed.append(i)
                hit_lessons.add(tuple(entry.get("ids", [])))
        out[name] = doomed
    rows = _read_rows(folder / "eval.jsonl")
    out["eval.jsonl"] = [
        i
        for i, row in enumerate(rows)
        if ids.intersection(row.get("ids", []))
        or tuple(row.get("ids", [])) in hit_lessons
        or _holds(row, texts)
    ]
    return out


def _dataset_rows(
    folder: Path, manifest: dict[str, Any] | None, ids: set[str], conversations: set[int], texts: list[str]
) -> int:
    return sum(len(v) for v in _doomed(folder, manifest, ids, conversations, texts).values())


def _erase_dataset_rows(folder: Path, ids: set[str], conversations: set[int], texts: list[str]) -> int:
    """Remove their rows from a dataset folder; the manifest's lineage, counts and hashes follow."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    doomed = _doomed(folder, manifest, ids, conversations, texts)
    removed = {name: len(v) for name, v in doomed.items()}
    if not sum(removed.values()):
        return 0
    lineage = manifest.setdefault("lineage", {})
    for name in DATASET_FILES:
        path = folder / name
        if not path.exists():
            continue
        drop = set(doomed.get(name, []))
        rows = [r for i, r in enumerate(_read_rows(path)) if i not in drop]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        key = name.split(".")[0]
        if key in ("sft", "dpo"):
            lineage[key] = [e for i, e in enumerate(lineage.get(key, [])) if i not in drop]
            manifest.setdefault("counts", {})[key] = len(rows)
        else:
            manifest.setdefault("counts", {})["eval_rows"] = len(rows)
        manifest.setdefault("files", {})[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest.setdefault("erasures", []).append(
        {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "removed": removed}
    )
    text = json.dumps(manifest, indent=1, ensure_ascii=False)
    (folder / "manifest.json").write_text(text, encoding="utf-8")
    return sum(removed.values())


def _scrub_eval_reports(data_dir: Path | None, ids: set[str], texts: list[str]) -> list[str]:
    """eval.json reports (runs/*/, evals/*/): rows about them keep their scores, not their texts."""
    if data_dir is None:
        return []
    scrubbed = []
    for path in sorted([*Path(data_dir).glob("runs/*/eval.json"), *Path(data_dir).glob("evals/*/eval.json")]):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        n = 0
        for row in report.get("rows", []) if isinstance(report, dict) else []:
            if isinstance(row, dict) and (ids.intersection(row.get("ids", [])) or _holds(row, texts)):
                for k in ("question", "reference", "candidate", "baseline"):
                    if k in row:
                        row[k] = ERASED
                n += 1
        if n:
            path.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
            scrubbed.append(str(path))
    return scrubbed


__all__ = [
    "ERASED",
    "CustomerNotFound",
    "ForgetReport",
    "forget_customer",
    "trained_on",
]
