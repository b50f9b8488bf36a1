"""The in-process runtime: a bounded queue in front of one engine, answered in dynamic micro-batches.

`LocalRuntime` keeps the `Generator` contract (learning/generation.py) with any `Engine`: the engine
decodes token ids (learning/hf_engine.py: transformers + peft; learning/onnx_engine.py: ONNX Runtime
GenAI), this module does everything around it. One worker thread owns the engine, requests wait on
a bounded queue, and whatever is waiting when the engine becomes free is decoded as ONE batch: a
decoding step reads the weights once for every row of the batch (prompt prefill is compute and is
not shared; README, Benchmarks). The event loop only ever enqueues and awaits, so one slow answer
never stalls Telegram or Slack.

LoRA adapters are switched between batches: answers in flight finish on the adapter they started
with, and every `Generation` records the adapter version that produced it. learning/runtime.py
builds a runtime from the settings.

transformers is imported lazily (`load_vocabulary`), so importing this module stays light.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from learning.generation import (
    BatchRecord,
    Generation,
    GenerationError,
    GenerationTimeout,
    Messages,
    ModelBusy,
    RuntimeStats,
)
from learning.prompt import PromptBudget, fit_messages

log = logging.getLogger(__name__)


@runtime_checkable
class Engine(Protocol):
    """A model that decodes batches of token ids in this process; `LocalRuntime` calls it.

    Every call comes from the runtime's one worker thread, never two at a time, so an engine needs no
    locks. `decode` returns each row's generated tokens (at most its budget; the runtime cuts them at
    the first end-of-turn token) and when the batch's first token was there (perf_counter, or None).
    `stop(row)` says the row's caller has gone: the engine may stop decoding that row.
    `use_adapter(None, None)` serves the base model; a failed load raises and leaves the current
    adapter serving.
    """

    name: str  # APPRENTICE_ENGINE: "transformers" or "onnx"
    description: str  # how it decodes, for the log and the speed benchmark
    device: str  # "cpu" or "cuda"
    threads: int | None  # intra-op CPU threads; None: the device or OMP_NUM_THREADS decides

    def attach(self) -> None:
        """Prepare the calling thread for decoding (per-thread settings such as torch's thread count)."""
        ...

    def decode(
        self, rows: Sequence[list[int]], budgets: Sequence[int], stop: Callable[[int], bool]
    ) -> tuple[list[list[int]], float | None]: ...

    def score(self, prefixes: Sequence[list[int]], continuation: list[int]) -> list[float]:
        """Mean log-probability per token of `continuation` after each prefix (one batch)."""
        ...

    def use_adapter(self, path: str | None, version: str | None) -> None: ...

    @property
    def loaded_adapters(self) -> list[str]: ...


@dataclass(frozen=True)
class Vocabulary:
    """The model's tokenizer and the tokens the runtime needs to render prompts and cut answers."""

    tokenizer: Any
    eos: frozenset[int]  # any of these ends an answer
    pad: int  # the tokenizer's padding token (its eos when it has none)
    context_tokens: int  # the model's context window


def load_vocabulary(model_path: str) -> Vocabulary:
    """The tokenizer of a chat model folder, its stop tokens and its context window."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        name = Path(model_path).name or model_path
        raise GenerationError(f"{name} has no chat template; use an instruct/chat model.")
    config = AutoConfig.from_pretrained(model_path)
    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: what transformers itself falls back to
        generation = GenerationConfig.from_model_config(config)
    eos: set[int] = set()
    for value in (generation.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif value:
            eos.update(int(v) for v in value)
    context = int(getattr(config, "max_position_embeddings", 0) or 2048)
    return Vocabulary(tokenizer, frozenset(eos), int(tokenizer.pad_token_id), context)


@dataclass(eq=False)
class _Request:
    messages: Messages
    max_new_tokens: int
    future: concurrent.futures.Future[Generation]
    submitted: float
    abandoned: bool = False  # set by the caller on timeout or cancellation; read by the worker

    def gone(self) -> bool:
        return self.abandoned or self.future.cancelled()


@dataclass(eq=False)
class _Scoring:
    """One `likelihoods` call: scored alone, as one batch of its prompts."""

    prompts: list[Messages]
    continuation: str
    future: concurrent.futures.Future[list[float]]
    submitted: float
    abandoned: bool = False

    def gone(self) -> bool:
        return self.abandoned or self.future.cancelled()


def _settle(request: _Request | _Scoring, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a request's future exactly once (the caller may have cancelled it meanwhile)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)


class LocalRuntime:
    """An engine in this process behind a bounded queue, with dynamic micro-batching and adapter swaps.

    Build it in a thread (the engine loads the model first); use it from the event loop.
    """

    def __init__(
        self,
        engine: Engine,
        vocabulary: Vocabulary,
        *,
        model_path: str,
        name: str | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_new_tokens: int = 160,
        timeout_s: float = 60.0,
        max_input_tokens: int | None = None,
        start: bool = True,
    ) -> None:
        check_limits(max_batch, max_queue, max_new_tokens)
        self.engine = engine
        self.tokenizer: Any = vocabulary.tokenizer
        self.model_path = model_path  # the adapter watcher checks adapters against its hash
        self._name = name or Path(model_path).name or model_path
        self._eos = vocabulary.eos
        self._pad = vocabulary.pad
        self.context_tokens = vocabulary.context_tokens
        self.max_input_tokens = max_input_tokens  # None: whatever the context window leaves
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s

        self.stats = RuntimeStats()
        self._cond = threading.Condition()
        self._queue: collections.deque[_Request | _Scoring] = collections.deque()
        self._closing = False
        self._pending_adapter: tuple[str | None, str | None] | None = None
        self._requested_version: str | None = None
        self._applied: tuple[str | None, str | None] = (None, None)  # (path, version) in use
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # --- Generator --------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._name

    @property
    def adapter_version(self) -> str | None:
        """The version new requests will be answered with (the latest `set_adapter`)."""
        return self._requested_version

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def loaded_adapters(self) -> list[str]:
        """The adapters the engine holds in memory (one at most between switches)."""
        return self.engine.loaded_adapters

    async def generate(self, messages: Messages, max_new_tokens: int | None = None) -> Generation:
        """Answer one conversation. Raises ModelBusy at once when the queue is full."""
        return await self._wait(self._enqueue(messages, max_new_tokens, wait_for_room=False))

    async def likelihoods(self, prompts: list[Messages], continuation: str) -> list[float]:
        """`Scorer`: the mean log-probability per token of `continuation` as the reply to each prompt.

        All prompts go to the engine as one batch, queued with the answers (ModelBusy when full).
        """
        if not prompts or not continuation.strip():
            raise ValueError("likelihoods needs at least one prompt and a non-empty continuation.")
        request = _Scoring([list(m) for m in prompts], continuation, concurrent.futures.Future(), 0.0)
        self._put(request, wait_for_room=False)
        return await self._wait(request)

    async def _wait(self, request: _Request | _Scoring) -> Any:
        # wrap_future hands the worker's result to this loop with call_soon_threadsafe.
        future: concurrent.futures.Future[Any] = request.future
        waiter = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(waiter, self.timeout_s)
        except TimeoutError:
            request.abandoned = True
            with self._cond:
                self.stats.timeouts += 1
            raise GenerationTimeout(
                f"{self._name} gave no answer within {self.timeout_s:g} s; the machine may be overloaded "
                "(lower APPRENTICE_MAX_BATCH or raise APPRENTICE_LLM_TIMEOUT_S)."
            ) from None
        except asyncio.CancelledError:
            request.abandoned = True
            raise

    def generate_batch(
        self, conversations: Sequence[Messages], max_new_tokens: int | None = None
    ) -> list[Generation]:
        """Synchronous answers for many conversations (evaluation, benchmarks); waits for queue room.

        Call it from a plain thread, never from the worker or inside the event loop.
        """
        requests = [self._enqueue(m, max_new_tokens, wait_for_room=True) for m in conversations]
        return [r.future.result() for r in requests]

    def submit(
        self, messages: Messages, max_new_tokens: int | None = None
    ) -> concurrent.futures.Future[Generation]:
        """Queue one conversation without waiting (raises ModelBusy when full); cancel the future to give up.

        For callers outside asyncio that want many answers in flight, such as the speed benchmark.
        """
        return self._enqueue(messages, max_new_tokens, wait_for_room=False).future

    def set_adapter(self, path: str | None, version: str | None) -> None:
        """Serve `path` (a peft LoRA folder) as `version` from the next batch on; None = the base model.

        Returns at once; the worker loads the adapter between batches. A load failure is logged and
        counted in `stats.adapter_errors`, and the previous adapter stays in use.
        """
        if path is not None:
            folder = Path(path)
            if not (folder / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"{folder} is not a LoRA adapter folder (no adapter_config.json); pass a folder written "
                    "by the training job, or None for the base model."
                )
            if not version:
                raise ValueError("an adapter needs a version name (it is recorded with every answer).")
        with self._cond:
            self._pending_adapter = (path, version)
            self._requested_version = version
            self._cond.notify_all()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (done by the constructor unless start=False)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="apprentice-model", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Finish the batch in flight, fail whatever still waits, and stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._fail_waiting()

    def __enter__(self) -> LocalRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- queue ------------------------------------------------------------------------------------
    def _enqueue(self, messages: Messages, max_new_tokens: int | None, wait_for_room: bool) -> _Request:
        if not messages:
            raise ValueError("messages must hold at least one chat message.")
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if budget < 1:
            raise ValueError("max_new_tokens must be at least 1.")
        request = _Request(list(messages), budget, concurrent.futures.Future(), time.perf_counter())
        self._put(request, wait_for_room)
        return request

    def _put(self, request: _Request | _Scoring, wait_for_room: bool) -> None:
        with self._cond:
            if wait_for_room:
                self._cond.wait_for(lambda: self._closing or len(self._queue) < self.max_queue)
            if self._closing:
                raise GenerationError("the model runtime is shut down.")
            if len(self._queue) >= self.max_queue:
                self.stats.busy += 1
                raise ModelBusy(f"{len(self._queue)} requests are already waiting for the model.")
            request.submitted = time.perf_counter()
            self._queue.append(request)
            self._cond.notify_all()

    def _take(self) -> tuple[tuple[str | None, str | None] | None, list[_Request] | _Scoring] | None:
        """Block until there is work: an adapter change (always first), a batch of answers or one
        scoring request (never mixed: a batch stops at the first scoring request). None: shut down."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._closing or self._pending_adapter is not None or bool(self._queue)
            )
            if self._closing:
                return None
            if self._pending_adapter is not None:
                change, self._pending_adapter = self._pending_adapter, None
                return change, []
            batch: list[_Request] = []
            while self._queue and len(batch) < self.max_batch:
                if isinstance(self._queue[0], _Scoring) and batch:
                    break
                request = self._queue.popleft()
                if request.gone():
                    self.stats.abandoned += 1
                elif isinstance(request, _Scoring):
                    self._cond.notify_all()
                    return None, request
                else:
                    batch.append(request)
            self._cond.notify_all()  # room in the queue for generate_batch callers
            return None, batch

    def _fail_waiting(self) -> None:
        with self._cond:
            waiting, self._queue = list(self._queue), collections.deque()
        for request in waiting:
            _settle(request, error=GenerationError("the model runtime shut down before answering."))

    def _work(self) -> None:
        self.engine.attach()
        while True:
            work = self._take()
            if work is None:
                return
            change, batch = work
            try:
                if change is not None:
                    self._apply_adapter(*change)
                elif isinstance(batch, _Scoring):
                    self._score(batch)
                elif batch:
                    self._run_batch(batch)
            except Exception:  # the worker must survive anything; the requests were settled already
                log.exception("model worker error")

    # --- generation -------------------------------------------------------------------------------
    def _encode(self, messages: Messages, budget: int) -> list[int]:
        """The prompt's token ids, within the context window less the answer's `budget`.

        Prompts from `learning.prompt.answer_messages` fit already. Any other is cut the same way
        (`learning.prompt.fit_messages`): the system prompt and the end stay, never just the last
        tokens, which cut away the system prompt and the passage fence.
        """
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = max(1, self.context_tokens - budget)
        if self.max_input_tokens:
            room = min(room, self.max_input_tokens)
        if len(ids) > room:
            fitted = fit_messages(messages, PromptBudget(room, self.tokenizer))
            text = self.tokenizer.apply_chat_template(fitted, tokenize=False, add_generation_prompt=True)
            log.warning("prompt of %d tokens cut to fit the context window (%d)", len(ids), room)
            with self._cond:
                self.stats.truncated += 1
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _run_batch(self, batch: list[_Request]) -> None:
        prepared: list[tuple[_Request, list[int]]] = []
        for request in batch:
            try:
                prepared.append((request, self._encode(request.messages, request.max_new_tokens)))
            except Exception as exc:
                self._count_error()
                _settle(request, error=GenerationError(f"could not render the conversation: {exc}"))
        if not prepared:
            return
        try:
            self._generate(prepared)
        except Exception as exc:
            if len(prepared) == 1:
                log.exception("generation failed")
                self._count_error()
                _settle(prepared[0][0], error=GenerationError(f"the model failed: {exc}"))
                return
            # Fail only the requests that fail on their own (and survive e.g. out-of-memory on a batch).
            log.warning("a batch of %d failed (%s); retrying one by one", len(prepared), exc)
            for item in prepared:
                try:
                    self._generate([item])
                except Exception as single:
                    log.exception("generation failed")
                    self._count_error()
                    _settle(item[0], error=GenerationError(f"the model failed: {single}"))

    def _score(self, request: _Scoring) -> None:
        try:
            prefixes = [self._encode(m, 1) for m in request.prompts]
            continuation: list[int] = self.tokenizer(request.continuation, add_special_tokens=False)[
                "input_ids"
            ]
            scores = self.engine.score(prefixes, continuation)
        except Exception as exc:
            log.exception("scoring failed")
            self._count_error()
            _settle(request, error=GenerationError(f"the model failed to score: {exc}"))
            return
        _settle(request, result=scores)

    def _count_error(self) -> None:
        with self._cond:
            self.stats.errors += 1

    def _generate(self, prepared: list[tuple[_Request, list[int]]]) -> None:
        version = self._applied[1]
        requests = [r for r, _ in prepared]
        started = time.perf_counter()
        new, first = self.engine.decode(
            [ids for _, ids in prepared],
            [r.max_new_tokens for r in requests],
            lambda row: requests[row].gone(),
        )
        finished = time.perf_counter()
        answers: list[tuple[_Request, Generation]] = []
        gone = total_new = 0
        for row, (request, ids) in enumerate(prepared):
            tokens = self._answer_tokens(new[row], request.max_new_tokens)
            total_new += len(tokens)
            if request.gone():
                gone += 1
                continue
            generation = Generation(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                model=self._name,
                adapter_version=version,
                prompt_tokens=len(ids),
                new_tokens=len(tokens),
                latency_s=finished - request.submitted,
                ttft_s=(first - request.submitted) if first else None,
            )
            answers.append((request, generation))
        record = BatchRecord(
            size=len(prepared),
            prompt_tokens=sum(len(ids) for _, ids in prepared),
            padded_length=max(len(ids) for _, ids in prepared),
            new_tokens=total_new,
            seconds=finished - started,
            prefill_s=(first - started) if first else None,
            adapter_version=version,
        )
        with self._cond:  # counted before the callers wake up, so they see their own batch in the stats
            s = self.stats
            s.batches += 1
            s.batch_sizes[record.size] += 1
            s.requests += len(answers)
            s.abandoned += gone
            s.prompt_tokens += record.prompt_tokens
            s.new_tokens += total_new
            s.generate_s += record.seconds
            s.recent.append(record)
        for request, generation in answers:
            _settle(request, result=generation)
        log.debug("batch of %d: %d new tokens in %.2f s", record.size, total_new, record.seconds)

    def _answer_tokens(self, generated: list[int], budget: int) -> list[int]:
        """The row's own tokens: up to and including its end-of-turn token, never the padding after it."""
        for i, token in enumerate(generated[:budget]):
            if token in self._eos:
                return generated[: i + 1]
            if token == self._pad:
                return generated[:i]
        return generated[:budget]

    # --- adapters ---------------------------------------------------------------------------------
    def _apply_adapter(self, path: str | None, version: str | None) -> None:
        """Runs on the worker between batches. The engine loads first, then drops the old adapter."""
        if (path, version) == self._applied:
            return
        try:
            self.engine.use_adapter(path, version)
        except Exception:
            log.exception("could not load adapter %s (%s); still serving %s", version, path, self._applied[1])
            with self._cond:
                self.stats.adapter_errors += 1
                if self._pending_adapter is None:
                    self._requested_version = self._applied[1]
            return
        self._applied = (path, version)
        with self._cond:
            self.stats.adapter_switches += 1
        log.info("now serving adapter %s", version or "none (base model)")


def check_limits(max_batch: int, max_queue: int, max_new_tokens: int) -> None:
    """The queue's numbers, checked before a model is loaded for them."""
    if max_batch < 1 or max_queue < 1 or max_new_tokens < 1:
        raise ValueError("max_batch, max_queue and max_new_tokens must all be at least 1.")
