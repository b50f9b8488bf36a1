"""Training and evaluation data from what staff did: corrections, approved answers, staff replies.

`build_datasets` writes four files into one folder, in TRL's standard formats:

- `sft.jsonl`: prompt-completion conversational rows, `{"prompt": [messages], "completion":
  [{"role": "assistant", ...}]}`. TRL puts the loss on the completion only.
- `dpo.jsonl`: `{"prompt", "chosen", "rejected"}`: the staff correction against the bot's answer.
- `eval.jsonl`: `{"set", "question", "reference", "history", "ids", "wording"}` rows for the gate:
  `heldout` (corrections kept out of training, original and paraphrased wording), `regression`
  (every past correction) and `control` (approved answers kept out of training, plus the golden file).
- `manifest.json`: counts, lineage (the store IDs behind every row), file hashes, the redaction report,
  and the rows the two-person rule held back (`held_back`: store IDs and reason; `counts.held_back`:
  how many per reason).

Every candidate row passes `hold_back` first, the one place the two-person rule is enforced for
training (docs/security.md, LLM04): a correction no second person approved is reviewed again
(`learning.trust.review_for_training`), an approved answer must not carry a pending, revoked or
held-back correction nor be approved only by that correction's author, an answer the customer
steered needs two approvers, and a staff reply after a take-over needs a second staff member's
approval. `APPRENTICE_TWO_PERSON_RULE=off` turns this off, as it turns off the rule itself.

Prompts are rendered with `learning.prompt.answer_messages` and the knowledge base's own `retrieve`,
so training sees the layout serving uses. A 135M model learns little from one phrasing of a lesson
(docs/learning.md, Views), so every lesson is written in several *views*: the question with the
retrieved documents, with the correction memory as serving shows it, in a simple rephrasing (with
its own retrieved documents), and in the wording of later customers whose questions the memory
answered (their paraphrases). `learning/lessons.py` cleans the lessons' text and rephrases them.

Every default view is *grounded*: its prompt carries retrieved passages. Ungrounded views ("bare",
and rephrasings without documents) teach the model to answer from its weights; on the emanual
benchmark (N=40) they raised held-out answers by 47% but made it invent menu paths for unrelated
questions, and the control questions fell 9.8%. The grounded views teach it to find the answer in
the passages instead, which carries over to questions nobody corrected: with these defaults the
same benchmark gave held-out +50% and controls +3.4% (README, Benchmarks). The ungrounded views stay
available through `BuildOptions.views`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowledge.models import Correction, Message
from learning.lessons import Lesson, collapse_duplicates, normalized, redact_lessons, rephrasings
from learning.prompt import answer_messages, defang, prompt_turns
from learning.redact import redact
from learning.trust import (
    Review,
    review_approved_answer,
    review_for_training,
    review_staff_reply,
)

if TYPE_CHECKING:
    from knowledge.retrieve import KnowledgeBase
    from knowledge.settings import Settings
    from knowledge.store import Store

log = logging.getLogger(__name__)

VIEWS = ("context", "memory", "bare", "rephrase", "paraphrase")  # every view there is
DEFAULT_VIEWS = ("context", "memory", "rephrase", "paraphrase")  # the grounded ones (see above)
FILES = ("sft.jsonl", "dpo.jsonl", "eval.jsonl")


@dataclass
class BuildOptions:
    """How a dataset is cut. The defaults suit a nightly run on a CPU."""

    since: dt.datetime | None = None  # "new" examples: since this time; None = since the last promotion
    heldout_fraction: float = 0.2  # share of new corrections' conversations kept out of training
    replay_ratio: float = 1.0  # older lessons mixed in per new lesson
    replay_max: int = 200
    views: tuple[str, ...] = DEFAULT_VIEWS
    rephrasings: int = 1  # templated rephrasings per lesson ("rephrase" view)
    rephrase_context: bool = True  # render rephrasings with their retrieved documents (grounded)
    dpo_views: tuple[str, ...] = ("context",)
    near_duplicate: float = 0.85  # question similarity at which two lessons collapse into one
    max_regression: int | None = None  # cap on the regression set (None: every past correction)
    seed: int = 0
    extra_eval: list[dict[str, Any]] = field(default_factory=list)  # benchmark rows added to eval.jsonl


# --- collecting -------------------------------------------------------------------------------


def known_names(store: Store) -> dict[int, list[str]]:
    """Conversation id -> what the channel profile told us about its customer (the display name:
    Telegram's first and last name; the @username; the phone of a contact they shared of
    themselves), redacted from that conversation's lessons."""
    profiles = store.conversation_profiles()
    known = {cid: [v for v in profile if v and v.strip()] for cid, profile in profiles.items()}
    return {cid: values for cid, values in known.items() if values}


def _asked(question: Message) -> str:
    """A customer message as it was searched (a follow-up after the question it follows, without
    courtesies: bot/query.py, `Message.search_text`), else as written. A staff correction's question
    is stored that way already; on its own, "do they expire?" would teach the gift cards' answer to
    any question about expiry."""
    return question.search_text or question.text


def _history(store: Store, question: Message | None, turns: int) -> list[tuple[str, str]]:
    """The earlier turns serving put into the prompt, by the same rule (`learning.prompt.prompt_turns`)."""
    if question is None:
        return []
    return prompt_turns(store.messages_before(question.conversation_id, question.id, turns), turns)


def collect_lessons(store: Store, history_turns: int = 2) -> tuple[list[Lesson], Counter[str]]:
    """Every usable lesson in the store, unredacted, and what was excluded (and why)."""
    excluded: Counter[str] = Counter()
    erased = store.erased_conversations()
    rows = store.training_candidates()
    lessons: list[Lesson] = []
    corrected_messages = {c.message_id for c in rows.corrections if c.message_id is not None}

    for c in rows.corrections:
        if c.status != "active":
            excluded[c.status] += 1  # revoked, or pending a second approval
            continue
        if c.conversation_id in erased:
            excluded["erased"] += 1
            continue
        if not c.question.strip() or not c.corrected.strip():
            excluded["empty"] += 1
            continue
        answer_msg = store.message(c.message_id) if c.message_id else None
        question_msg = (
            store.message(answer_msg.reply_to_id) if answer_msg and answer_msg.reply_to_id else None
        )
        lessons.append(
            Lesson(
                kind="correction",
                ids=[f"correction:{c.id}"],
                question=c.question,
                answer=c.corrected,
                rejected=c.original,
                history=_history(store, question_msg, history_turns),
                conversation_id=c.conversation_id,
                created_at=c.created_at,
            )
        )

    for m in rows.approved:
        if m.id in corrected_messages or m.reply_to_id is None:
            continue
        if m.conversation_id in erased:
            excluded["erased"] += 1
            continue
        q = store.message(m.reply_to_id)
        if q is None or not q.text.strip():
            continue
        lessons.append(_reply_lesson(store, "approved", m, q, history_turns))

    lessons.extend(_staff_lessons(store, rows.staff_replies, erased, excluded, history_turns))

    # Later customers whose question the correction memory answered: the same lesson in their words.
    by_correction = {
        int(i.split(":")[1]): les for les in lessons for i in les.ids if i.startswith("correction:")
    }
    for m in rows.answers:
        if m.conversation_id in erased or m.reply_to_id is None:
            continue
        for src in m.sources or []:
            cid = src.get("correction_id") if isinstance(src, dict) else None
            if src.get("kind") != "correction" or cid not in by_correction:
                continue
            q = store.message(m.reply_to_id)
            lesson = by_correction[cid]
            if (
                q is not None
                and normalized(_asked(q)) != normalized(lesson.question)
                and _asked(q) not in lesson.paraphrases
            ):
                lesson.paraphrases.append(_asked(q))
                lesson.sources.add(m.conversation_id)
    return lessons, excluded


def _staff_lessons(
    store: Store, staff: Sequence[Message], erased: set[int], excluded: Counter[str], turns: int
) -> Iterable[Lesson]:
    """Staff replies in taken-over conversations, paired with the customer message they answer."""
    seen: set[int] = set()
    for m in staff:
        if m.conversation_id in erased:
            excluded["erased"] += 1
            continue
        q = store.last_customer_message_before(m.conversation_id, m.id)
        if q is None or q.id in seen or q.status != "relayed" or not q.text.strip():
            continue
        seen.add(q.id)
        yield _reply_lesson(store, "staff", m, q, turns)


def _reply_lesson(store: Store, kind: str, reply: Message, question: Message, turns: int) -> Lesson:
    """A lesson from a reply staff stand behind (an approved answer, a staff reply) and the
    customer message it answers."""
    return Lesson(
        kind=kind,
        ids=[f"message:{reply.id}"],
        question=_asked(question),
        answer=reply.text,
        history=_history(store, question, turns),
        conversation_id=reply.conversation_id,
        created_at=reply.created_at,
    )


# --- the two-person rule ---------------------------------------------------------------------


def hold_back(
    settings: Settings, store: Store, kb: KnowledgeBase, lessons: list[Lesson]
) -> tuple[list[Lesson], list[dict[str, Any]]]:
    """Split the candidate lessons into those training may use and those the two-person rule
    holds back; one record per held-back lesson: its store IDs, kind and reason code.

    Runs on the unredacted lessons, before paraphrases are merged, so every row is judged on what
    staff and customers actually wrote.
    """
    if settings.two_person_rule == "off":
        return lessons, []
    threshold = settings.memory_threshold
    reviews: dict[int, Review] = {}

    def correction_ok(corr: Correction) -> bool:
        if corr.id not in reviews:
            reviews[corr.id] = review_for_training(kb, store, corr, threshold)
        return corr.status == "active" and not reviews[corr.id].needs_second

    approved_by = store.message_approvers(
        [_store_id(les, "message") for les in lessons if les.kind in ("approved", "staff")]
    )
    kept: list[Lesson] = []
    held: list[dict[str, Any]] = []
    for les in lessons:
        review: Review | None = None
        if les.kind == "correction":
            corr = store.correction(_store_id(les, "correction"))
            if corr is None or not correction_ok(corr):
                review = reviews.get(corr.id) if corr is not None else None
                review = review or Review(True, "missing", code="missing")
        else:
            msg = store.message(_store_id(les, "message"))
            who = approved_by.get(msg.id, set()) if msg is not None else set()
            if msg is None:
                review = Review(True, "missing", code="missing")
            elif les.kind == "approved":
                # what the customer wrote up to the answer: the steering may come turns earlier
                said = store.customer_texts_before(msg.conversation_id, msg.id, 5)
                review = review_approved_answer(kb, store, msg, les.question, said, who, correction_ok)
            else:
                review = review_staff_reply(store, msg, who)
        if review is not None and review.needs_second:
            held.append({"ids": list(les.ids), "kind": les.kind, "reason": review.code or "other"})
        else:
            kept.append(les)
    if held:
        log.info(
            "two-person rule: %d candidate rows held back %s",
            len(held),
            dict(Counter(h["reason"] for h in held)),
        )
    return kept, held


def _store_id(les: Lesson, table: str) -> int:
    return next(int(i.split(":", 1)[1]) for i in les.ids if i.startswith(f"{table}:"))


def count_new_examples(store: Store, since: dt.datetime | None) -> int:
    """How many new lessons exist since `since` (cheap: no redaction, no retrieval)."""
    lessons, _ = collect_lessons(store, history_turns=0)
    if since is None:
        return len(lessons)
    return sum(1 for les in lessons if les.created_at >= since)


# --- views ------------------------------------------------------------------------------------

class _Renderer:
    """Prompts as serving builds them, with one retrieval per distinct question (retrieval is costly)."""

    def __init__(self, settings: Settings, kb: KnowledgeBase, names: Sequence[str] = ()) -> None:
        self.settings = settings
        self.kb = kb
        self.names = list(names)  # every customer's profile values (known_names), for memory passages
        self._cache: dict[str, Any] = {}

    def retrieval(self, question: str) -> Any:
        if question not in self._cache:
            s = self.settings
            self._cache[question] = self.kb.retrieve(question, s.top_k, s.memory_threshold)
        return self._cache[question]

    def messages(
        self, question: str, context: str, history: Sequence[tuple[str, str]] = ()
    ) -> list[dict[str, str]]:
        """context: "documents" (memory off), "memory" (exactly as served) or "none"."""
        if context == "none":
            passages = []
        else:
            r = self.retrieval(question)
            passages = r.all if context == "memory" else r.passages
            # a recalled correction is a staff text about some customer: redacted like the lessons
            # (documents are the business's own words and stay as serving shows them)
            passages = [
                replace(p, text=redact(p.text, self.names)[0]) if p.kind == "correction" else p
                for p in passages
            ]
        return answer_messages(self.settings, question, passages, history)


def _views(les: Lesson, opts: BuildOptions, render: _Renderer) -> list[tuple[str, list[dict[str, str]]]]:
    """(view name, prompt messages) for each way this lesson is shown to the model."""
    out: list[tuple[str, list[dict[str, str]]]] = []
    v = set(opts.views)
    if "context" in v:
        out.append(("context", render.messages(les.question, "documents", les.history)))
    if "memory" in v and les.kind == "correction":
        memory = render.retrieval(les.question).memory
        if memory is not None and memory.correction_id is not None:
            out.append(("memory", render.messages(les.question, "memory", les.history)))
    if "bare" in v:
        out.append(("bare", render.messages(les.question, "none")))
    if "rephrase" in v:
        ctx = "documents" if opts.rephrase_context else "none"
        for q in rephrasings(les.question, opts.rephrasings, seed=f"{opts.seed}:{les.ids[0]}"):
            out.append(("rephrase", render.messages(q, ctx)))
    if "paraphrase" in v:
        for q in les.paraphrases:
            out.append(("paraphrase", render.messages(q, "documents")))
    return out


# --- splitting --------------------------------------------------------------------------------


def _unit(key: str) -> float:
    """A stable number in [0, 1) for a key (the split must not change between nights)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(16**12)


def _group_key(les: Lesson) -> str:
    return f"conversation:{les.conversation_id}" if les.conversation_id is not None else les.ids[0]


def _heldout_groups(lessons: Sequence[Lesson], fraction: float) -> set[str]:
    """Conversations held out of training: a stable hash slice, at least one when there are two."""
    groups = sorted({_group_key(les) for les in lessons}, key=lambda g: _unit(f"heldout:{g}"))
    if fraction <= 0 or not groups:
        return set()
    chosen = {g for g in groups if _unit(f"heldout:{g}") < fraction}
    if not chosen and len(groups) >= 2:
        chosen = {groups[0]}
    if len(chosen) == len(groups) and len(groups) >= 2:
        chosen.discard(groups[-1])  # never hold out everything
    return chosen


# --- writing ----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def load_golden(path: str | Path) -> list[dict[str, Any]]:
    """Golden control questions: JSONL with `question` and `answer` (or `reference`)."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        obj = json.loads(line)
        ref = obj.get("answer", obj.get("reference"))
        if not obj.get("question") or not ref:
            raise ValueError(f"{path}:{i + 1}: each golden line needs a question and an answer.")
        rows.append({"question": obj["question"], "reference": ref, "id": str(obj.get("id", i + 1))})
    return rows


def build_datasets(
    settings: Settings,
    store: Store,
    kb: KnowledgeBase,
    out: str | Path,
    options: BuildOptions | None = None,
) -> dict[str, Any]:
    """Write sft.jsonl, dpo.jsonl, eval.jsonl and manifest.json into `out`; return the manifest."""
    opts = options or BuildOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    since = opts.since if opts.since is not None else store.last_promotion()
    lessons, excluded = collect_lessons(store, settings.history_turns)
    lessons, held = hold_back(settings, store, kb, lessons)  # the two-person rule, on the raw text
    # before anything is compared, retrieved or written; the customers' own names too
    known = known_names(store)
    redaction = redact_lessons(lessons, known)
    lessons, merged = collapse_duplicates(lessons, opts.near_duplicate)
    if merged:
        excluded["duplicates"] = merged

    def is_new(les: Lesson) -> bool:
        return since is None or les.created_at >= since

    new = [les for les in lessons if is_new(les)]
    old = [les for les in lessons if not is_new(les)]
    heldout_groups = _heldout_groups([les for les in new if les.kind == "correction"], opts.heldout_fraction)
    # Approved answers and staff replies of a stable conversation slice are never trained: the control set.
    control_groups = {
        _group_key(les)
        for les in lessons
        if les.kind != "correction" and _unit(f"control:{_group_key(les)}") < opts.heldout_fraction
    }
    heldout = [les for les in new if les.kind == "correction" and _group_key(les) in heldout_groups]
    control = [les for les in lessons if les.kind != "correction" and _group_key(les) in control_groups]
    blocked = heldout_groups | control_groups
    train_new = [les for les in new if _group_key(les) not in blocked]
    pool = [les for les in old if _group_key(les) not in control_groups]
    rng = random.Random(opts.seed)
    n_replay = min(len(pool), opts.replay_max, math.ceil(opts.replay_ratio * max(1, len(train_new))))
    replay = rng.sample(pool, n_replay) if n_replay else []

    render = _Renderer(settings, kb, sorted({n for names in known.values() for n in names}))
    sft_rows, sft_lineage = [], []
    dpo_rows, dpo_lineage = [], []
    for origin, group in (("new", train_new), ("replay", replay)):
        for les in group:
            for view, prompt in _views(les, opts, render):
                sft_rows.append(
                    {"prompt": prompt, "completion": [{"role": "assistant", "content": defang(les.answer)}]}
                )
                sft_lineage.append(
                    {"ids": les.ids, "view": view, "origin": origin, "conversations": les.conversations()}
                )
            if (
                les.kind != "correction"
                or not les.rejected.strip()
                or normalized(les.rejected) == normalized(les.answer)
            ):
                continue
            for view in opts.dpo_views:
                context = {"context": "documents", "memory": "memory", "bare": "none"}.get(view)
                if context is None:
                    continue
                dpo_rows.append(
                    {
                        "prompt": render.messages(
                            les.question, context, les.history if view != "bare" else ()
                        ),
                        # a staff member's `<|im_end|>` must not teach the model to end a turn early
                        "chosen": [{"role": "assistant", "content": defang(les.answer)}],
                        "rejected": [{"role": "assistant", "content": defang(les.rejected)}],
                    }
                )
                dpo_lineage.append(
                    {"ids": les.ids, "view": view, "origin": origin, "conversations": les.conversations()}
                )

    eval_rows = _eval_rows(lessons, heldout, control, settings, opts, rng)
    n_sft = _write_jsonl(out / "sft.jsonl", sft_rows)
    n_dpo = _write_jsonl(out / "dpo.jsonl", dpo_rows)
    n_eval = _write_jsonl(out / "eval.jsonl", eval_rows)
    manifest: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "since": since.isoformat() if since else None,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("since", "extra_eval")},
        "counts": {
            "lessons": len(lessons),
            "new": len(new),
            "trained_new": len(train_new),
            "replay": len(replay),
            "sft": n_sft,
            "dpo": n_dpo,
            "eval": dict(Counter(r["set"] for r in eval_rows)),
            "eval_rows": n_eval,
            "views": dict(Counter(x["view"] for x in sft_lineage)),
            "excluded": dict(excluded),
            "held_back": dict(Counter(h["reason"] for h in held)),
        },
        # rows the two-person rule kept out of every file until a second staff member approves them
        "held_back": held,
        "redaction": dict(redaction),
        "prompt": {
            "system_prompt_sha256": hashlib.sha256(settings.system_prompt_text.encode()).hexdigest(),
            "top_k": settings.top_k,
            "memory_threshold": settings.memory_threshold,
            "history_turns": settings.history_turns,
            "kb_chunks": kb.count(),
        },
        "files": {name: _sha256(out / name) for name in FILES},
        "lineage": {"sft": sft_lineage, "dpo": dpo_lineage},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    log.info("dataset in %s: %d SFT rows, %d DPO rows, %d eval rows", out, n_sft, n_dpo, n_eval)
    return manifest


def _eval_rows(
    lessons: Sequence[Lesson],
    heldout: Sequence[Lesson],
    control: Sequence[Lesson],
    settings: Settings,
    opts: BuildOptions,
    rng: random.Random,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(set_: str, les: Lesson, question: str, wording: str, history: bool = True) -> dict[str, Any]:
        return {
            "set": set_,
            "question": question,
            "reference": les.answer,
            "history": [list(t) for t in les.history] if history else [],
            "ids": les.ids,
            "wording": wording,
        }

    for les in heldout:
        rows.append(row("heldout", les, les.question, "original"))
        rows.extend(row("heldout", les, p, "paraphrase", history=False) for p in les.paraphrases)
    held = {id(les) for les in heldout}
    past = [les for les in lessons if les.kind == "correction" and id(les) not in held]
    if opts.max_regression is not None and len(past) > opts.max_regression:
        past = rng.sample(past, opts.max_regression)
    rows.extend(row("regression", les, les.question, "original") for les in past)
    rows.extend(row("control", les, les.question, "original") for les in control)
    if settings.golden_path is not None:
        for g in load_golden(settings.golden_path):
            rows.append(
                {
                    "set": "control",
                    "question": redact(g["question"])[0],
                    "reference": redact(g["reference"])[0],
                    "history": [],
                    "ids": [f"golden:{g['id']}"],
                    "wording": "original",
                }
            )
    for extra in opts.extra_eval:
        rows.append({"history": [], "ids": [], "wording": "original", **extra})
    return rows
