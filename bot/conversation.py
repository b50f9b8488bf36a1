"""The conversation flow: every channel hands messages here and sends back what it returns.

Order matters and is the contract: the inbound message is persisted first, then knowledge
is retrieved, the model generates, the answer is persisted with its sources, versions and
latency, and only then is it returned for sending. Staff actions (corrections, feedback,
take-over) come in through the methods below, from Slack or the terminal alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from bot import handoff, hours
from bot.guard import BLOCKED, OutputGuard, Verdict
from bot.messages import CATALOG, Messages
from bot.metrics import METRICS
from bot.ratelimit import CUSTOMER_WINDOW_S, ONCALL_WINDOW_S, RateLimiter
from bot.ratelimit import verdict as rate_verdict
from knowledge import embed
from knowledge.invisible import strip_invisible
from knowledge.models import Conversation, Correction, Message, utcnow
from knowledge.passages import Passage, Retrieval
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.answer import cite, finish, ground
from learning.prompt import answer_messages, prompt_turns
from learning.runtime import GenerationTimeout, Generator, ModelBusy
from learning.secrets_scan import secret_kinds
from learning.trust import review_correction

log = logging.getLogger(__name__)

# What customers read. Short, polite, and never a stack trace. Every language's text is in the
# catalog (bot/messages.py); these are the English ones.
UNSURE = CATALOG["unsure"]["en"]
APOLOGY = CATALOG["apology"]["en"]
BUSY = CATALOG["busy"]["en"]
TOO_LONG = CATALOG["too_long"]["en"]
EMPTY = CATALOG["empty"]["en"]
NON_TEXT = CATALOG["non_text"]["en"]
SLOW_DOWN = CATALOG["slow_down"]["en"]
HUMAN = CATALOG["human"]["en"]
THANKS_DOWN = CATALOG["thanks_down"]["en"]
THANKS_UP = CATALOG["thanks_up"]["en"]
# The satisfaction question (CSAT), asked once when a conversation goes quiet after an answer.
CSAT_QUESTION = "Did this solve your problem?"
CSAT_THANKS_YES = "Great, glad I could help!"
CSAT_THANKS_NO = "Sorry about that. I've asked a colleague to look at your conversation."
# Staff corrections of questions at least this close count as evidence for a model reply.
EVIDENCE = 0.5


@dataclass(frozen=True)
class Inbound:
    """A customer's message, translated from the channel's own update type."""

    channel: str
    chat_id: str
    customer_id: str
    text: str | None
    external_id: str = ""
    name: str = ""
    kind: str = "text"  # text | photo | voice | sticker | document | location | edited | other
    # the sender's language as the channel reports it (Telegram's language_code), "" when unknown
    language: str = ""
    # the channel profile, redacted from the customer's lessons: Telegram's @username, and the phone
    # number of a contact the customer shared of themselves
    username: str = ""
    phone: str = ""


@dataclass
class Outbound:
    """Something to send to the customer. `message_id` is the stored message (for feedback buttons)."""

    text: str
    conversation_id: int
    message_id: int | None = None
    kind: str = "answer"  # answer | notice | correction | staff | csat (the Yes/No question)
    feedback_buttons: bool = False
    # The stored reply to a message seen before (a redelivery, or a retry after a crash): a channel
    # with a durable outbox sends it only if it has not queued it already.
    repeat: bool = False


@dataclass
class Answer:
    """The record of one bot answer, as staff see it."""

    conversation_id: int
    question_id: int
    message_id: int
    question: str
    text: str
    sources: list[dict[str, Any]]
    status: str
    model: str | None
    adapter_version: str | None
    latency_ms: float
    flagged: bool = False
    repeat: bool = False  # posted before (see Outbound.repeat): reviewers skip what they already have
    # what the answer mode did to the model's reply: "extract", "grounded", "fallback:REASON"
    grounding: str = ""


class Reviewer(Protocol):
    """Where staff watch (Slack). Each method is called after the store is updated; none may raise."""

    async def answer_posted(self, conv: Conversation, answer: Answer) -> None: ...

    async def customer_flag(self, conv: Conversation, message_id: int | None, why: str) -> None: ...

    async def relay(self, conv: Conversation, text: str) -> None: ...

    async def correction_stored(self, conv: Conversation | None, correction: Correction) -> None: ...


Deliver = Callable[[Conversation, Outbound], Awaitable[None]]


@dataclass
class CorrectionResult:
    correction: Correction
    created: bool
    delivered: bool = False
    # the personal data found in it ("EMAIL", "SSN", "NAME", ...): when any, the memory recalls the
    # correction only in the conversation it was written for (`scoped`), never for other customers
    personal: list[str] = field(default_factory=list)
    scoped: bool = False


class CorrectionRefused(ValueError):
    """A staff correction that holds a secret: nothing was stored, remembered or delivered.

    `kinds` says what was found ("Stripe key", "password"), never the value; `str(exc)` is the
    message for the staff member (the same text `correction_problem` returns).
    """

    def __init__(self, kinds: list[str]) -> None:
        self.kinds = kinds
        super().__init__(_secret_message(kinds))


def _secret_message(kinds: list[str]) -> str:
    return (
        f"It contains what looks like a secret ({', '.join(kinds)}). Remove it and save again: "
        "secrets are never sent to customers, remembered or trained on."
    )


def correction_problem(text: str) -> str | None:
    """Why a correction text cannot be saved, for the staff member; None when it can.

    Cheap and synchronous, so a form can call it before acknowledging (Slack: `ack(
    response_action="errors", errors={"corrected": problem})` keeps the form open). `correct`
    checks the same and raises `CorrectionRefused`.
    """
    kinds = secret_kinds(clean_text(text))
    return _secret_message(kinds) if kinds else None


class ConversationService:
    """The flow shared by every channel. Safe for many chats at once; one chat is served in order."""

    def __init__(self, settings: Settings, store: Store, kb: KnowledgeBase, generator: Generator) -> None:
        self.settings = settings
        self.store = store
        self.kb = kb
        self.generator = generator
        self.reviewers: list[Reviewer] = []
        # channel name -> how to send to a customer on that channel (a dict is enough)
        self.deliverers: dict[str, Deliver] = {}
        # channels whose deliverer drops an Outbound(repeat=True) it has queued before (a durable
        # outbox): a correction retried after a crash is delivered through them, never twice
        self.dedup_channels: set[str] = set()
        # a chat's lock lives while a message of that chat is in hand, not for every chat ever seen
        self._chat_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # Customers' rate limit and the on-call pings, counted in the database: every replica agrees.
        self.limiter = RateLimiter(store)
        # Every reply passes the output guard (prompt, secrets, other customers' data): bot/guard.py.
        self.guard = OutputGuard(settings, store)
        # What customers read, in their language (bot/messages.py), and when staff are in (bot/hours.py)
        self.messages = Messages.from_settings(settings)
        self.hours = hours.from_settings(settings)
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)  # tests pin it

    # --- customers -------------------------------------------------------------------
    async def handle(self, inbound: Inbound) -> list[Outbound]:
        """Answer one customer message. Never raises for bad input; returns what to send."""
        inbound = _safe_ids(inbound)
        key = (inbound.channel, inbound.chat_id)
        lock = self._chat_locks.setdefault(key, asyncio.Lock())
        METRICS.messages_in.labels(channel=inbound.channel).inc()
        async with lock:
            outs = await self._handle(inbound)
        for out in outs:
            METRICS.messages_out.labels(channel=inbound.channel, kind=out.kind).inc()
        return outs

    async def give_up(self, inbound: Inbound, why: str) -> list[Outbound]:
        """A message whose handling failed again and again (a poison message, or crashes landing on
        it): the customer gets an apology and staff a note, so nothing is dropped silently. If it
        was answered after all, that answer is returned (as a repeat) instead."""
        inbound = _safe_ids(inbound)
        lock = self._chat_locks.setdefault((inbound.channel, inbound.chat_id), asyncio.Lock())
        async with lock:
            conv, seen = await self._conversation(inbound)
            if seen is not None:
                again = await self._again(conv, seen)
                if again is not None:
                    return again
            text = clean_text(inbound.text or "")[: self.settings.max_input_chars * 5]
            q = await self._question(conv, inbound, seen, text or f"[{inbound.kind}]"[:64], status="error")
            if seen is not None:  # stored by an attempt that died before answering
                await asyncio.to_thread(self.store.update_message, q, status="error")
            out = await self._notice(conv, await self._say("apology", inbound, text), q)
            await asyncio.to_thread(self.store.set_flagged, conv.id, True)
            await self._ping(conv, None, why)
            METRICS.messages_out.labels(channel=inbound.channel, kind=out.kind).inc()
            return [out]

    async def _conversation(self, inbound: Inbound) -> tuple[Conversation, Message | None]:
        """The customer's conversation, and the stored copy of this message if it came before."""
        conv = await asyncio.to_thread(
            self.store.conversation_for, inbound.channel, inbound.chat_id, inbound.customer_id, inbound.name,
            inbound.username, inbound.phone,
        )
        return conv, await asyncio.to_thread(self._seen, conv.id, inbound.external_id)

    async def _handle(self, inbound: Inbound) -> list[Outbound]:
        # The same channel message again (a redelivery, or a retry after a crash mid-answer): never a
        # second answer. Its stored reply is returned for the channel to send if it has not yet.
        conv, seen = await self._conversation(inbound)
        if seen is not None:
            again = await self._again(conv, seen)
            if again is not None:
                return again
        text = clean_text(inbound.text or "")
        if seen is None:
            # The one gate every customer message passes (text, stickers, oversize, relays to staff):
            # over the limit, the customer hears "slow down" once per window, then nothing.
            textual = inbound.kind == "text" and inbound.text is not None
            shown = text[: self.settings.max_input_chars * 5] if textual else f"[{inbound.kind}]"[:64]
            over = await self._over_limit(conv, inbound, shown)
            if over is not None:
                return over
        if inbound.kind != "text" or inbound.text is None:
            q = await self._question(conv, inbound, seen, f"[{inbound.kind}]"[:64], status="refused")
            return [await self._notice(conv, await self._say("non_text", inbound), q)]
        if not text:
            q = await self._question(conv, inbound, seen, "", status="refused")
            return [await self._notice(conv, await self._say("empty", inbound), q)]
        if len(text) > self.settings.max_input_chars:
            stored = text[: self.settings.max_input_chars * 5]
            q = await self._question(conv, inbound, seen, stored, status="refused")
            lang = await self._language(inbound, stored)
            group = "," if lang == "en" else ""  # "4,000" is four in German
            n, limit = f"{len(text):{group}}", f"{self.settings.max_input_chars:{group}}"
            return [await self._notice(conv, self.messages.text("too_long", lang, n=n, limit=limit), q)]
        q = await self._question(conv, inbound, seen, text)
        if conv.mode == "human":
            if seen is None or seen.status != "relayed":
                await asyncio.to_thread(self.store.update_message, q, status="relayed")
                await self._each_reviewer("relay", conv, text)
            return []
        # "can I talk to a person?" in any words, or the same question a third time: as /human
        why = await asyncio.to_thread(self._wants_human, conv.id, q, text)
        if why:
            await asyncio.to_thread(self.store.update_message, q, status="refused")
            return [await self._hand_off(conv, q, why, await self._language(inbound, text))]
        answer = await self._answer(conv, q, text, inbound)
        if answer is None:
            return []
        await self._each_reviewer("answer_posted", conv, answer)
        return [
            Outbound(
                answer.text, conv.id, answer.message_id, kind="answer", feedback_buttons=answer.status == "ok"
            )
        ]

    def _seen(self, conversation_id: int, external_id: str) -> Message | None:
        if not external_id:
            return None
        return self.store.message_by_external(conversation_id, external_id)

    async def _question(
        self, conv: Conversation, inbound: Inbound, seen: Message | None, text: str, **fields: Any
    ) -> int:
        """The stored customer message: the one seen before, else a new row (a racing insert is reused)."""
        if seen is not None:
            return seen.id
        # who sent it (the channel's user id): in a group chat not always the conversation's customer
        fields.setdefault("sender_id", inbound.customer_id or None)
        try:
            return await self._save(conv.id, "customer", text, inbound.external_id, **fields)
        except IntegrityError:  # the same message stored a moment ago by another replica
            again = await asyncio.to_thread(self._seen, conv.id, inbound.external_id)
            if again is None:
                raise
            return again.id

    async def _again(self, conv: Conversation, seen: Message) -> list[Outbound] | None:
        """The stored reply to a message seen before, as a repeat; None when it was never answered."""
        if seen.role != "customer":
            return [await self._notice(conv, EMPTY, seen.id)]  # an id clash with a reply; nothing to do
        if seen.status == "relayed":
            return []
        reply = await asyncio.to_thread(self.store.first_reply, seen.id)
        if reply is None and seen.status == "limited":
            return []  # over the rate limit, and told so once already
        if reply is None:
            return None  # stored, then the process died before the answer: answer it now
        if reply.role == "bot":
            answer = Answer(
                conv.id, seen.id, reply.id, seen.text, reply.text, list(reply.sources or []), reply.status,
                reply.model, reply.adapter_version, reply.latency_ms or 0.0, reply.flagged, repeat=True,
            )  # fmt: skip
            await self._each_reviewer("answer_posted", conv, answer)
        ok = reply.role == "bot" and reply.status == "ok"
        kind = "answer" if reply.role == "bot" else "notice"
        return [Outbound(reply.text, conv.id, reply.id, kind=kind, feedback_buttons=ok, repeat=True)]

    async def _answer(
        self, conv: Conversation, question_id: int, text: str, inbound: Inbound | None = None
    ) -> Answer | None:
        started = time.perf_counter()
        retrieval = await asyncio.to_thread(  # corrections scoped to another conversation stay out
            self.kb.retrieve, text, self.settings.top_k, self.settings.memory_threshold, conv.id
        )
        METRICS.retrieval_latency.observe(time.perf_counter() - started)
        status, flagged = "ok", False
        model: str | None = None
        adapter: str | None = None
        grounding = ""
        generated = ""  # the model's own text, checked by the guard even when grounding replaced it
        if retrieval.memory is not None and self.settings.memory_mode == "verbatim":
            # A staff-verified answer to a near-identical question: reuse it word for word.
            # A small model paraphrases (and garbles) context, so the verified text is safer.
            reply, model = retrieval.memory.text, "correction-memory"
        elif retrieval.memory is None and retrieval.best_score < self.settings.relevance_threshold:
            reply, status, flagged = await self._unsure(inbound, text), "unsure", True
        elif self.settings.answer_mode == "extract" and retrieval.passages:
            # the extract answer mode: the best passage's relevant sentences, no model
            reply = await asyncio.to_thread(cite, text, retrieval.passages[0])
            model, grounding = "extract", "extract"
        else:
            history = await asyncio.to_thread(self._history, conv.id, question_id)
            try:
                prompt = (self.settings, text, retrieval.all, history)
                messages = await asyncio.to_thread(answer_messages, *prompt)
                gen = await self.generator.generate(messages, self.settings.max_new_tokens)
                # model text is untrusted too: no control characters or lone surrogates into the store
                generated, model, adapter = clean_text(gen.text), gen.model, gen.adapter_version
                cut = gen.new_tokens >= self.settings.max_new_tokens  # stopped by the token cap
                reply, grounding = await asyncio.to_thread(
                    self._ground, text, generated, retrieval.all, cut, conv.id
                )
                if grounding.startswith("fallback"):
                    flagged = True  # staff see that the model's own reply could not be used
                if not reply:
                    reply, status, flagged = await self._unsure(inbound, text), "unsure", True
            except ModelBusy:
                reply, status = await self._say("busy", inbound, text), "busy"
            except (GenerationTimeout, Exception) as exc:  # the customer gets an apology, staff a flag
                log.warning("generation failed for conversation %s: %s", conv.id, type(exc).__name__)
                reply, status, flagged = await self._say("apology", inbound, text), "error", True
        if status == "ok":
            # a leak attempt is blocked and shown to staff even when grounding would have dropped it
            checked = reply if generated in ("", reply) else f"{generated}\n\n{reply}"
            verdict = await asyncio.to_thread(self._guard, conv, checked, retrieval.all)
            if not verdict.ok:  # never stored or logged: it may hold the very secret it leaked
                log.warning("output guard blocked a reply in conversation %s: %s", conv.id, verdict.reason)
                blocked = await self._say("blocked", inbound, text) if inbound is not None else BLOCKED
                reply, status, flagged = blocked, "blocked", True
        latency_ms = (time.perf_counter() - started) * 1000
        METRICS.answer_latency.labels(status=status).observe(latency_ms / 1000)
        sources = [p.as_dict() for p in retrieval.all]
        mid = await self._save(
            conv.id,
            "bot",
            reply,
            None,
            reply_to_id=question_id,
            sources=sources,
            model=model,
            adapter_version=adapter,
            latency_ms=latency_ms,
            status=status,
            flagged=flagged,
        )
        if flagged:
            await asyncio.to_thread(self.store.set_flagged, conv.id, True)
        return Answer(
            conv.id, question_id, mid, text, reply, sources, status, model, adapter, latency_ms, flagged,
            grounding=grounding,
        )  # fmt: skip

    def _ground(
        self,
        question: str,
        reply: str,
        passages: list[Passage],
        cut: bool,
        conversation_id: int | None = None,
    ) -> tuple[str, str]:
        """The reply as the answer mode sends it, and what grounding did ("", "grounded", "fallback:why").

        `cut`: the token cap stopped the model, so its last sentence may be unfinished. Staff
        corrections of similar questions count as evidence even below the memory threshold: they
        are what a retrained adapter learned from.
        """
        if self.settings.answer_mode == "model":
            return (finish(reply) if cut else reply), ""
        known = {p.correction_id for p in passages if p.kind == "correction"}
        lessons = [
            p
            for p in self.kb.recall(question, 3, conversation_id)
            if p.score >= EVIDENCE and p.correction_id not in known
        ]
        g = ground(question, reply, [*passages, *lessons])
        return g.text, (f"fallback:{g.reason}" if g.fallback else "grounded")

    def _guard(self, conv: Conversation, reply: str, passages: list[Passage]) -> Verdict:
        own = [m.text for m in self.store.history(conv.id, 200)]
        with self.store.session() as s:  # corrections written for this customer hold their own details
            own += s.scalars(
                select(Correction.corrected).where(
                    Correction.conversation_id == conv.id, Correction.status != "revoked"
                )
            ).all()
        return self.guard.check(reply, own, passages, conv.customer_id)

    def _history(self, conversation_id: int, question_id: int) -> list[tuple[str, str]]:
        turns = self.settings.history_turns
        return prompt_turns(self.store.messages_before(conversation_id, question_id, turns), turns)

    async def _rate(self, inbound: Inbound) -> str:
        """Count one customer message: "ok", "notice" (first over the limit) or "drop" (bot/ratelimit.py)."""
        limit = self.settings.rate_limit_per_minute
        if limit <= 0:
            return "ok"
        count = await self.limiter.hit(f"customer:{inbound.channel}:{inbound.customer_id}", CUSTOMER_WINDOW_S)
        return rate_verdict(count, limit)

    async def _over_limit(self, conv: Conversation, inbound: Inbound, text: str) -> list[Outbound] | None:
        """None within the limit; else the message is stored as "limited", with one notice per window."""
        verdict = await self._rate(inbound)
        if verdict == "ok":
            return None
        q = await self._question(conv, inbound, None, text, status="limited")
        if verdict != "notice":
            return []
        return [await self._notice(conv, await self._say("slow_down", inbound, text), q)]

    async def admit(self, inbound: Inbound) -> list[Outbound] | None:
        """For a reply a channel makes itself (/start, /help): counted like any message. None: go
        ahead; else what to send instead (the one "slow down" notice of the window, or nothing)."""
        verdict = await self._rate(_safe_ids(inbound))
        if verdict == "ok":
            return None
        if verdict != "notice":
            return []
        return [Outbound(await self._say("slow_down", inbound), 0, kind="notice")]

    async def _ping(self, conv: Conversation, message_id: int | None, why: str) -> None:
        """Tell staff (and the on-call group) about this conversation: once per ONCALL_WINDOW_S."""
        if await self.limiter.hit(f"oncall:{conv.id}", ONCALL_WINDOW_S) == 1:
            await self._each_reviewer("customer_flag", conv, message_id, why)

    async def ask_human(self, inbound: Inbound) -> list[Outbound]:
        """The customer asked for a person (/human): flag the conversation and tell staff (the
        on-call ping at most once per conversation in ONCALL_WINDOW_S). Returns what to send."""
        inbound = _safe_ids(inbound)
        conv = await asyncio.to_thread(
            self.store.conversation_for, inbound.channel, inbound.chat_id, inbound.customer_id, inbound.name,
            inbound.username, inbound.phone,
        )
        seen = await asyncio.to_thread(self._seen, conv.id, inbound.external_id)
        if seen is not None:
            again = await self._again(conv, seen)
            if again is not None:
                return again
        else:
            over = await self._over_limit(conv, inbound, "/human")
            if over is not None:
                return over
        q = await self._question(conv, inbound, seen, "/human", status="refused")
        return [await self._hand_off(conv, q, "asked for a human", await self._language(inbound))]

    async def _hand_off(self, conv: Conversation, reply_to: int, why: str, lang: str = "") -> Outbound:
        """What /human does, whatever triggered it: the conversation is flagged, staff get a note with
        Take over (`why` completes "The customer …"), and the customer the HUMAN notice (in `lang`;
        outside business hours it says when a colleague will reply)."""
        await asyncio.to_thread(self.store.set_flagged, conv.id, True)
        await self._ping(conv, None, why)
        return await self._notice(conv, self._later("human", lang), reply_to, status="handoff")

    # --- what customers read, in their language -------------------------------------------
    async def _language(self, inbound: Inbound | None, text: str | None = None) -> str:
        """The reply language: the channel's (Telegram's language_code), else the message's, else
        APPRENTICE_LANGUAGE (bot/messages.py). Detection runs in a thread: lingua is CPU work."""
        if inbound is None:
            return self.messages.default
        if text is None and inbound.kind == "text":
            text = inbound.text
        return await asyncio.to_thread(self.messages.choose, inbound.language, text)

    async def _say(self, key: str, inbound: Inbound | None, text: str | None = None, **values: Any) -> str:
        return self.messages.text(key, await self._language(inbound, text), **values)

    def _later(self, key: str, lang: str) -> str:
        """The `key` notice ("unsure", "human"), or outside business hours its `_later` form: "… A
        colleague will reply on Monday at 09:00." (the time in the business's zone)."""
        if self.hours is not None:
            now = self.clock()
            opening = self.hours.closed_until(now)
            if opening is not None:
                when = self.messages.when(lang, opening, now)
                return self.messages.text(f"{key}_later", lang, when=when)
        return self.messages.text(key, lang)

    async def _unsure(self, inbound: Inbound | None, text: str) -> str:
        return self._later("unsure", await self._language(inbound, text))

    def _wants_human(self, conversation_id: int, question_id: int, text: str) -> str:
        """Why this message hands the conversation to staff, "" when it does not (bot/handoff.py)."""
        if handoff.asks_for_human(text):
            return "asked for a human"
        if handoff.countable(text):
            recent = self._since_handoff(conversation_id)
            answered = {m.reply_to_id for m in recent if m.role == "bot" and m.status != "busy"}
            asked = [
                m.text
                for m in recent
                if m.role == "customer" and m.id != question_id and m.status == "ok" and m.id in answered
            ]
            if handoff.repeated(text, asked, _cosine):
                return "asked the same question three times"
        return ""

    def _since_handoff(self, conversation_id: int) -> list[Message]:
        """The recent messages (oldest first) after the last hand-off notice: frustration is counted
        afresh after each hand-off. From the store, so every replica counts the same."""
        rows = self.store.history(conversation_id, handoff.REPEAT_WINDOW)
        for i in range(len(rows) - 1, -1, -1):
            if rows[i].role == "system" and (
                rows[i].status == "handoff" or self.messages.is_text(rows[i].text, "human", "human_later")
            ):
                return rows[i + 1 :]
        return rows

    def _two_downs(self, conversation_id: int) -> bool:
        """The customer's last two ratings were both 👎, on answers given since the last hand-off."""
        answers = {m.id for m in self._since_handoff(conversation_id) if m.role == "bot"}
        last = self.store.customer_ratings(conversation_id, 2)
        return len(last) == 2 and all(kind == "down" and mid in answers for mid, kind in last)

    async def customer_feedback(
        self, message_id: int, actor: str, up: bool, language: str = ""
    ) -> str | None:
        """A customer's thumbs up/down on an answer. Returns the thanks to show (in `language`, the
        channel's language code of the customer; else APPRENTICE_LANGUAGE), None if a duplicate."""
        lang = self.messages.choose(language)
        msg = await asyncio.to_thread(self.store.message, message_id)
        if msg is None or msg.role != "bot":
            return None
        created = await asyncio.to_thread(self.store.add_feedback, message_id, "up" if up else "down", actor)
        if not created:
            return None
        METRICS.feedback.labels(kind="up" if up else "down").inc()
        if not up:
            conv = await asyncio.to_thread(self.store.conversation, msg.conversation_id)
            await asyncio.to_thread(self.store.set_flagged, msg.conversation_id, True)
            if conv is not None:
                await self._each_reviewer("customer_flag", conv, message_id, "customer 👎")
                if conv.mode != "human" and await asyncio.to_thread(self._two_downs, conv.id):
                    why = "disliked two answers in a row"
                    await self._deliver(conv, await self._hand_off(conv, message_id, why, lang))
            return self.messages.text("thanks_down", lang)
        return self.messages.text("thanks_up", lang)

    async def ask_satisfaction(self, now: dt.datetime | None = None) -> int:
        """Ask "Did this solve your problem?" in every conversation quiet for APPRENTICE_CSAT_AFTER
        minutes since a bot answer, once per conversation ever; returns how many were asked.

        Called periodically by every replica (App's sweep): each conversation is claimed in the
        database (`store.claim_csat`) before the question goes out, so restarts and replicas never
        ask twice. Only conversations of channels connected here are considered.
        """
        minutes = self.settings.csat_after
        channels = sorted(self.deliverers)
        if minutes <= 0 or not channels:
            return 0
        now = now or utcnow()
        due = await asyncio.to_thread(self.store.csat_due, minutes * 60.0, now, channels)
        asked = 0
        for cid, answer_id in due:
            if not await asyncio.to_thread(self.store.claim_csat, cid, answer_id, now):
                continue  # another replica (or an earlier sweep) asked
            conv = await asyncio.to_thread(self.store.conversation, cid)
            if conv is None:
                continue
            mid = await self._save(cid, "system", CSAT_QUESTION, None, reply_to_id=answer_id, status="csat")
            asked += await self._deliver(conv, Outbound(CSAT_QUESTION, cid, mid, kind="csat"))
        return asked

    async def satisfaction(
        self, conversation_id: int, yes: bool, now: dt.datetime | None = None
    ) -> str | None:
        """The customer's Yes/No to the satisfaction question. No flags the conversation for staff,
        as a 👎 does. Returns the thanks to show; None when it was not asked or answered already."""
        if not await asyncio.to_thread(self.store.record_csat, conversation_id, yes, now):
            return None
        METRICS.feedback.labels(kind="csat_yes" if yes else "csat_no").inc()
        if yes:
            return CSAT_THANKS_YES
        await asyncio.to_thread(self.store.set_flagged, conversation_id, True)
        conv = await asyncio.to_thread(self.store.conversation, conversation_id)
        ask = await asyncio.to_thread(self.store.csat, conversation_id)
        if conv is not None:
            why = "said the answer did not solve their problem"
            await self._each_reviewer("customer_flag", conv, ask.message_id if ask else None, why)
        return CSAT_THANKS_NO

    # --- staff -----------------------------------------------------------------------
    async def correct(
        self,
        message_id: int,
        corrected: str,
        staff: str,
        reason: str = "other",
        send: bool = True,
        remember: bool = True,
        request_key: str | None = None,
    ) -> CorrectionResult:
        """Store a staff correction of a bot answer, remember it, and send it to the customer.

        Idempotent on `request_key`: a retried submit returns the first correction untouched.
        A correction holding a secret raises `CorrectionRefused` and nothing is stored or sent; one
        holding personal data is remembered for its own conversation only (`result.scoped`).
        """
        corrected = clean_text(corrected)
        if not corrected:
            raise ValueError("The corrected answer is empty; type the answer the customer should get.")
        kinds = secret_kinds(corrected)
        if kinds:  # the kinds only: the value must not reach a log either
            log.warning("correction of message %s refused: a secret (%s)", message_id, ", ".join(kinds))
            raise CorrectionRefused(kinds)
        answer = await asyncio.to_thread(self.store.message, message_id)
        if answer is None or answer.role != "bot":
            raise LookupError(f"No bot answer with id {message_id}.")
        question = await asyncio.to_thread(self._question_of, answer)
        personal = await asyncio.to_thread(self._personal_data, answer.conversation_id, question, corrected)
        status, review = "active", ""
        if self.settings.two_person_rule != "off":
            verdict = await asyncio.to_thread(
                review_correction, self.kb, self.store, question, corrected, self.settings.memory_threshold
            )
            status, review = ("pending" if verdict.needs_second else "active"), verdict.reason
        corr, created = await asyncio.to_thread(
            self.store.add_correction,
            audit={"reason": reason, "status": status, "review": review, "personal": personal},
            message_id=message_id,
            conversation_id=answer.conversation_id,
            request_key=request_key,
            question=question,
            original=answer.text,
            corrected=corrected,
            staff=staff,
            reason=reason,
            remember=remember,
            status=status,
        )
        scope = corr.conversation_id if personal else None
        result = CorrectionResult(corr, created, personal=personal, scoped=bool(personal))
        if corr.remember and question and self._memory_may_use(corr) and (scope is not None or not personal):
            # idempotent (an upsert): a retry after a crash between storing and remembering completes it
            await asyncio.to_thread(self.kb.remember, corr.id, question, corr.corrected, scope)
        if not created:
            if send:
                result.delivered = await self._resume_followup(answer, corr)
            return result
        METRICS.corrections.inc()
        conv = await asyncio.to_thread(self.store.conversation, answer.conversation_id)
        if send and conv is not None:
            mid = await self._save(
                conv.id, "staff", corrected, None, reply_to_id=answer.reply_to_id, status="correction"
            )
            result.delivered = await self._deliver(conv, Outbound(corrected, conv.id, mid, kind="correction"))
        await self._each_reviewer("correction_stored", conv, corr)
        return result

    def _personal_data(self, conversation_id: int | None, question: str, corrected: str) -> list[str]:
        """Personal data in a correction that the shop's documents do not print (see OutputGuard)."""
        name = ""
        conv = self.store.conversation(conversation_id) if conversation_id is not None else None
        if conv is not None:
            customer = self.store.customer(conv.customer_id)
            name = customer.display_name if customer is not None else ""
        k = self.settings.top_k
        public = [p.text for q in (question, corrected) if q for p in self.kb.search(q, k)]
        return self.guard.personal_data(corrected, "\n".join(public), name)

    def _memory_may_use(self, corr: Correction) -> bool:
        """Staff corrections teach the memory at once ("a correction is knowledge from the next
        message on"); with `two_person_rule=all` a pending one waits for its second approval."""
        rule = self.settings.two_person_rule
        return corr.status == "active" or (corr.status == "pending" and rule == "training")

    async def _resume_followup(self, answer: Message, corr: Correction) -> bool:
        """A retried correction: send the customer's follow-up if a crash stopped it (never twice)."""
        conv = await asyncio.to_thread(self.store.conversation, answer.conversation_id)
        if conv is None or conv.channel not in self.dedup_channels:
            return False  # no way to know whether it went out: do not risk a duplicate
        sent = await asyncio.to_thread(self.store.followup_of, answer, corr.corrected)
        mid = sent.id if sent is not None else None
        if mid is None:
            mid = await self._save(
                conv.id, "staff", corr.corrected, None, reply_to_id=answer.reply_to_id, status="correction"
            )
        out = Outbound(corr.corrected, conv.id, mid, kind="correction", repeat=True)
        return await self._deliver(conv, out)

    def _question_of(self, answer: Message) -> str:
        if answer.reply_to_id is None:
            return ""
        q = self.store.message(answer.reply_to_id)
        return q.text if q is not None else ""

    async def staff_feedback(self, message_id: int, kind: str, staff: str, reason: str = "") -> bool:
        """Approve (a good example for training) or flag (needs review) an answer."""
        if kind not in ("approve", "flag"):
            raise ValueError("kind must be approve or flag")
        created = await asyncio.to_thread(self.store.add_feedback, message_id, kind, staff, reason)
        if created:
            METRICS.feedback.labels(kind=kind).inc()
            await asyncio.to_thread(
                self.store.audit, staff, kind, f"message:{message_id}", {}, {"reason": reason}
            )
        return created

    async def approve_correction(self, correction_id: int, staff: str) -> tuple[Correction | None, str]:
        """The second approval of a pending correction; then memory and training may use it.

        Returns the correction and "approved", "missing", "not pending" or "same person".
        """
        corr, outcome = await asyncio.to_thread(self.store.approve_correction, correction_id, staff)
        if outcome == "approved" and corr is not None and corr.remember and corr.question:
            personal = await asyncio.to_thread(
                self._personal_data, corr.conversation_id, corr.question, corr.corrected
            )
            if not personal or corr.conversation_id is not None:
                scope = corr.conversation_id if personal else None
                await asyncio.to_thread(self.kb.remember, corr.id, corr.question, corr.corrected, scope)
        return corr, outcome

    async def revoke(self, correction_id: int, staff: str) -> Correction | None:
        """Stop using a correction for memory and training."""
        corr = await asyncio.to_thread(self.store.revoke_correction, correction_id)
        if corr is not None:
            await asyncio.to_thread(self.kb.forget, correction_id)
            await asyncio.to_thread(self.store.audit, staff, "revoke", f"correction:{correction_id}", {}, {})
        return corr

    async def take_over(self, conversation_id: int, staff: str) -> None:
        await asyncio.to_thread(self.store.set_mode, conversation_id, "human")
        await asyncio.to_thread(self.store.audit, staff, "take_over", f"conversation:{conversation_id}")

    async def hand_back(self, conversation_id: int, staff: str) -> None:
        await asyncio.to_thread(self.store.set_mode, conversation_id, "bot")
        await asyncio.to_thread(self.store.audit, staff, "hand_back", f"conversation:{conversation_id}")

    async def staff_reply(self, conversation_id: int, text: str, staff: str, external_id: str = "") -> bool:
        """A staff member writes to the customer (taken-over conversation). Stored as a staff answer."""
        text = clean_text(text)
        conv = await asyncio.to_thread(self.store.conversation, conversation_id)
        if conv is None or not text:
            return False
        mid = await self._save(conv.id, "staff", text, external_id or None, status="ok")
        await asyncio.to_thread(self.store.audit, staff, "staff_reply", f"conversation:{conversation_id}")
        return await self._deliver(conv, Outbound(text, conv.id, mid, kind="staff"))

    # --- helpers ---------------------------------------------------------------------
    async def _save(
        self, conversation_id: int, role: str, text: str, external_id: str | None, **fields: Any
    ) -> int:
        msg = await asyncio.to_thread(
            self.store.add_message, conversation_id, role, text, external_id=external_id or None, **fields
        )
        return msg.id

    async def _notice(
        self, conv: Conversation, text: str, question_id: int, status: str = "notice"
    ) -> Outbound:
        mid = await self._save(conv.id, "system", text, None, reply_to_id=question_id, status=status)
        return Outbound(text, conv.id, mid, kind="notice")

    async def _deliver(self, conv: Conversation, out: Outbound) -> bool:
        send = self.deliverers.get(conv.channel)
        if send is None:
            log.warning("no channel %r connected; message %s kept in the store", conv.channel, out.message_id)
            return False
        try:
            await send(conv, out)
            METRICS.messages_out.labels(channel=conv.channel, kind=out.kind).inc()
            return True
        except Exception:
            log.exception("delivery to %s failed; message %s kept in the store", conv.channel, out.message_id)
            return False

    async def _each_reviewer(self, method: str, *args: Any) -> None:
        for reviewer in self.reviewers:
            try:
                await getattr(reviewer, method)(*args)
            except Exception:  # staff tooling must never break the customer's answer
                log.exception("reviewer %s.%s failed", type(reviewer).__name__, method)


_CONTROL = {c: " " for c in range(32) if c not in (9, 10)}
_CONTROL[127] = " "


def _cosine(a: str, b: str) -> float:
    """MiniLM cosine of two texts (knowledge/embed.py caches each text's embedding)."""
    x, y = embed.embed_query(a), embed.embed_query(b)
    return float(sum(p * q for p, q in zip(x, y, strict=True)))


def clean_text(text: str) -> str:
    """Text safe to store and prompt with: control characters, lone surrogates and invisible format
    characters (Unicode tags, zero-width, bidi: knowledge/invisible.py) removed, trimmed."""
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")
    return strip_invisible(text.translate(_CONTROL).replace("\x00", "")).strip()


def _safe_ids(inbound: Inbound) -> Inbound:
    """Names and ids as the store can hold them: clean text, cut to the column sizes."""
    return dataclasses.replace(
        inbound,
        channel=clean_text(str(inbound.channel or ""))[:32],
        chat_id=clean_text(str(inbound.chat_id or ""))[:128],
        customer_id=clean_text(str(inbound.customer_id or ""))[:128],
        external_id=clean_text(str(inbound.external_id or ""))[:128],
        name=clean_text(str(inbound.name or ""))[:256],
        text=inbound.text if isinstance(inbound.text, str) else None,
    )


def passages_from_sources(sources: list[dict[str, Any]]) -> list[Passage]:
    """Rebuild light Passage records from a stored message's `sources` (for display)."""
    return [
        Passage(
            text="",
            title=str(s.get("title", "")),
            source=str(s.get("source", "")),
            score=float(s.get("score", 0.0)),
            kind=str(s.get("kind", "document")),
        )
        for s in sources
    ]


__all__ = [
    "Answer",
    "ConversationService",
    "CorrectionRefused",
    "CorrectionResult",
    "Inbound",
    "Outbound",
    "Retrieval",
    "clean_text",
    "correction_problem",
]
