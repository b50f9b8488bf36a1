"""Answering customers: every channel hands messages here and sends back what it returns.

Order matters and is the contract: the inbound message is persisted first, then knowledge
is retrieved, the model generates, the answer is persisted with its sources, versions and
latency, and only then is it returned for sending. `ConversationService` is the one object
channels and staff tooling hold; its other method groups live in bot/notices.py (the
customer's ratings and the satisfaction question) and bot/staff.py (corrections, approval,
take-over), all on the shared state of bot/service_base.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from bot import handoff
from bot.courtesy import courtesy
from bot.envelope import Answer, Inbound, Outbound, clean_text
from bot.guard import BLOCKED, Verdict
from bot.metrics import METRICS
from bot.notices import EMPTY, CustomerFeedback
from bot.query import EARLIER, same_text, says_again, search_text, without_courtesies
from bot.ratelimit import CUSTOMER_WINDOW_S
from bot.ratelimit import verdict as rate_verdict
from bot.staff import StaffActions
from knowledge import embed
from knowledge.models import Conversation, Message, utcnow
from knowledge.passages import Passage, Retrieval
from learning.answer import cite, finish, ground, similar_corrections
from learning.generation import GenerationError, GenerationTimeout, ModelBusy
from learning.prompt import answer_messages, prompt_turns
from learning.rerank import model_writes, rerank, wanted

log = logging.getLogger(__name__)


class ConversationService(StaffActions, CustomerFeedback):
    """The flow shared by every channel. Safe for many chats at once; one chat is served in order."""

    # --- customers -------------------------------------------------------------------
    async def handle(self, inbound: Inbound) -> list[Outbound]:
        """Answer one customer message. Never raises for bad input; returns what to send."""
        inbound = _safe_ids(inbound)
        key = (inbound.channel, inbound.chat_id)
        lock = self._chat_locks.get(key)
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
        lock = self._chat_locks.get((inbound.channel, inbound.chat_id))
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
        # "hi", "thanks!", "bye", 👍: a courtesy back, no search, no page to staff (bot/courtesy.py)
        polite = courtesy(text)
        if polite is not None:
            # the channel's language first, as for every notice; else the phrase's ("gracias" is too
            # short to detect)
            lang = await self._language(inbound, text, polite.lang)
            return [await self._notice(conv, self.messages.text(polite.key, lang), q, status="courtesy")]
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
        msg = await asyncio.to_thread(
            self.store.add_message_once, conv.id, "customer", text, inbound.external_id, **fields
        )
        return msg.id

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
        # courtesies out, a follow-up after the question it follows (bot/query.py); the same messages
        # tell below whether the answer repeats one the bot sent
        earlier = await asyncio.to_thread(self.store.messages_before, conv.id, question_id, EARLIER)
        query = search_text(text, earlier, utcnow())
        if query != text:  # the datasets train the message under what it was searched as
            await asyncio.to_thread(self.store.update_message, question_id, search_text=query)
        retrieval = await asyncio.to_thread(  # corrections scoped to another conversation stay out
            self.kb.retrieve, query, self.settings.top_k, self.settings.memory_threshold, conv.id
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
        elif retrieval.memory is None and not await self._relevant(query, retrieval):
            reply, status, flagged = await self._unsure(inbound, text), "unsure", True
        else:
            # a correction that won here was not sent verbatim: memory_mode=prompt gives it to the model
            given = retrieval.memory is not None
            writes = not retrieval.passages or model_writes(self.settings.answer_mode, self.generator, given)
            retrieval = await self._reranked(query, retrieval, writes)
            if not writes:  # the best passage's relevant sentences, no model writing (learning/answer.py)
                reply = await asyncio.to_thread(cite, query, retrieval.passages[0])
                model, grounding = "extract", "extract"
            else:
                lessons = await asyncio.to_thread(
                    similar_corrections, self.kb, self.settings.answer_mode, text, retrieval.all, conv.id
                )
                history = await asyncio.to_thread(self._history, conv.id, question_id)
                try:
                    prompt = (self.settings, text, retrieval.all, history)
                    messages = await asyncio.to_thread(answer_messages, *prompt)
                    gen = await self.generator.generate(messages, self.settings.max_new_tokens)
                    # model text is untrusted too: no control characters or lone surrogates into the store
                    generated, model, adapter = clean_text(gen.text), gen.model, gen.adapter_version
                    cut = gen.new_tokens >= self.settings.max_new_tokens  # stopped by the token cap
                    reply, grounding = await asyncio.to_thread(
                        self._ground, text, generated, retrieval.all, cut, lessons
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
        # an extract the customer was just sent, again: only what this message asks about (bot/query.py;
        # a model that writes has the conversation's last turns in its prompt)
        if grounding == "extract" and says_again(reply, text, earlier, utcnow()):
            # the message's own words pick the units, not the search it was joined into
            narrow = await asyncio.to_thread(cite, without_courtesies(text), retrieval.passages[0], True)
            if not same_text(narrow, reply):
                reply, grounding = narrow, "pinpoint"
            else:  # nothing narrower to send: the same text twice answers nothing, staff do
                log.info("conversation %s: the answer repeats the last one; handed to staff", conv.id)
                reply, status, flagged = await self._unsure(inbound, text), "unsure", True
                grounding = "repeat"
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

    async def _relevant(self, query: str, retrieval: Retrieval) -> bool:
        """Whether the documents may answer: the best passage close enough in meaning, and below
        the confident similarity also holding the question's rarer words (KnowledgeBase.overlap,
        read only then). "Does this tv have vudu?" finds the manual's limits on media files (just
        under 0.40) without the one word that matters; sending that would look like an answer and
        be none."""
        s, best = self.settings, retrieval.best_score
        if best < s.relevance_threshold:
            return False
        if best >= s.confident_threshold:
            return True
        overlap = await asyncio.to_thread(self.kb.overlap, query, retrieval.passages)
        return overlap >= s.overlap_threshold

    async def _reranked(self, question: str, retrieval: Retrieval, writes: bool) -> Retrieval:
        """The documents in the model's order (learning/rerank.py); as retrieved when reranking is
        off, the backend cannot score, or the model is busy or fails (the answer still goes out).
        `writes`: the model also writes the answer (APPRENTICE_RERANK=auto then reads on a GPU only)."""
        if len(retrieval.passages) < 2 or not wanted(self.generator, self.settings.rerank, writes):
            return retrieval
        try:
            passages = await rerank(self.generator, question, retrieval.passages)
        except (ModelBusy, GenerationTimeout, GenerationError) as exc:
            log.warning("passages left in retrieval order: %s", type(exc).__name__)
            return retrieval
        return dataclasses.replace(retrieval, passages=passages)

    def _ground(
        self, question: str, reply: str, passages: list[Passage], cut: bool, lessons: list[Passage]
    ) -> tuple[str, str]:
        """The reply as the answer mode sends it, and what grounding did ("", "grounded", "fallback:why").

        `cut`: the token cap stopped the model, so its last sentence may be unfinished. `lessons`
        (staff corrections of similar questions) count as evidence beside the passages.
        """
        if self.settings.answer_mode == "model":
            return (finish(reply) if cut else reply), ""
        g = ground(question, reply, [*passages, *lessons])
        return g.text, (f"fallback:{g.reason}" if g.fallback else "grounded")

    def _guard(self, conv: Conversation, reply: str, passages: list[Passage]) -> Verdict:
        own = [m.text for m in self.store.history(conv.id, 200)]
        # corrections written for this customer hold their own details
        own += self.store.correction_texts(conv.id)
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


def _cosine(a: str, b: str) -> float:
    """MiniLM cosine of two texts (knowledge/embed.py caches each text's embedding)."""
    x, y = embed.embed_query(a), embed.embed_query(b)
    return float(sum(p * q for p, q in zip(x, y, strict=True)))


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


__all__ = ["ConversationService"]
