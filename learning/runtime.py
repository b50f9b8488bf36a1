"""The model runtime: the contract the bot talks to, and the in-process implementation.

`Generator` is the one boundary between the conversation flow and a language model. `LocalRuntime`
serves it in this process, with one of two engines: ONNX Runtime GenAI (the default on a CPU: the
model exported once with int8 weights, learning/onnx_engine.py) or transformers (GPUs, or
APPRENTICE_ENGINE=transformers). One worker thread owns the model, requests wait on a
bounded queue, and whatever is waiting when the model becomes free is generated as ONE batch
(dynamic micro-batching): a decoding step reads the weights once for every row of the batch (prompt
prefill is compute and is not shared; README, Benchmarks). The event loop only ever enqueues and
awaits, so one slow answer never stalls Telegram or Slack.

LoRA adapters are hot-swapped between batches (peft on transformers; on ONNX an export with the
adapter merged in): answers in flight finish on the adapter they started with, and every
`Generation` records the adapter version that produced it.

torch, transformers and peft are imported lazily (inside the functions that load the model).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from learning.modelfiles import export_dirs, offline_by_default, resolve_model
from learning.prompt import PromptBudget, fit_messages

if TYPE_CHECKING:
    from knowledge.settings import Settings

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

# Measured on SmolLM2-135M with retrieval prompts: 1.0 loops ("... ... ..."), a penalty over the
# whole prompt (HF's own) also punishes quoting the passages and the end-of-turn token, so the
# penalty here only looks at the tokens the model generated itself.
DEFAULT_REPETITION_PENALTY = 1.1


# --- the contract ---------------------------------------------------------------------------------


@dataclass
class Generation:
    """One answer and how it was made (stored with the message, shown to staff, used by benchmarks)."""

    text: str
    model: str
    adapter_version: str | None
    prompt_tokens: int
    new_tokens: int
    latency_s: float  # from the request entering the queue to the answer being ready
    ttft_s: float | None = None  # from the request entering the queue to its first generated token


class ModelBusy(Exception):
    """Too many requests are already waiting for the model; ask the customer to try again shortly."""


class GenerationTimeout(Exception):
    """The answer did not arrive within the configured timeout (APPRENTICE_LLM_TIMEOUT_S)."""


class GenerationError(Exception):
    """The model failed on this request (the runtime itself keeps serving others)."""


@runtime_checkable
class Generator(Protocol):
    """What the bot calls to answer: `LocalRuntime` here, `learning.llm_http.HttpGenerator` for vLLM.

    `generate` is called from the event loop by many conversations at once and must never block it.
    It raises `ModelBusy` when the queue is full, `GenerationTimeout` and `GenerationError`.
    `set_adapter` may be called from any thread (the nightly job's promotion, a CLI rollback).
    """

    @property
    def model_name(self) -> str: ...

    @property
    def adapter_version(self) -> str | None: ...

    async def generate(self, messages: Messages, max_new_tokens: int | None = None) -> Generation: ...

    def set_adapter(self, path: str | None, version: str | None) -> None: ...

    async def aclose(self) -> None: ...


# --- statistics (for /metrics and `apprentice bench speed`) ---------------------------------------


@dataclass(frozen=True)
class BatchRecord:
    """One `model.generate` call."""

    size: int
    prompt_tokens: int  # real prompt tokens, summed over the batch (padding excluded)
    padded_length: int
    new_tokens: int  # summed over the batch
    seconds: float
    prefill_s: float | None  # batch start to first generated token
    adapter_version: str | None


@dataclass
class RuntimeStats:
    """Counters kept by the runtime. Read them; only the runtime writes."""

    requests: int = 0  # answered
    batches: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    new_tokens: int = 0
    generate_s: float = 0.0  # time inside model.generate
    busy: int = 0  # rejected with ModelBusy
    timeouts: int = 0
    errors: int = 0
    abandoned: int = 0  # the caller gave up before the answer was finished
    truncated: int = 0  # prompts cut to fit the context window
    adapter_switches: int = 0
    adapter_errors: int = 0
    recent: collections.deque[BatchRecord] = field(default_factory=lambda: collections.deque(maxlen=512))

    @property
    def decode_tok_s(self) -> float:
        """Aggregate generated tokens per second of model time."""
        return self.new_tokens / self.generate_s if self.generate_s else 0.0


# --- the in-process runtime -----------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    messages: Messages
    max_new_tokens: int
    future: concurrent.futures.Future[Generation]
    submitted: float
    abandoned: bool = False  # set by the caller on timeout or cancellation; read by the worker

    def gone(self) -> bool:
        return self.abandoned or self.future.cancelled()


def cpu_budget() -> int:
    """CPUs this process may really use (affinity and cgroup quota), so torch does not oversubscribe."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    return max(1, n)


def default_threads() -> int:
    """Intra-op threads for the model on CPU: one core fewer than the process may use.

    Decoding is memory-bound (1 thread is within 5% of 2 on an idle 2-core box, notes.md), but when
    the cores are oversubscribed (embeddings, Chroma, the event loop, other processes) OpenMP threads
    spin at every barrier: measured on 2 busy cores, 2 threads fell to 0.5-1.8 tok/s while 1 thread
    kept 7.5-8.7 tok/s. OMP_NUM_THREADS, when set, wins.
    """
    return max(1, cpu_budget() - 1)


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        # bf16 on CUDA, and on CPU too: measured faster there with the same answer quality (notes.md).
        return torch.bfloat16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16.")
    return table[dtype]


def _adapter_name(counter: int, version: str) -> str:
    """peft adapter names become module keys (no dots); a counter keeps every load's name unique."""
    return f"v{counter}_{re.sub(r'[^0-9A-Za-z_]', '_', version)[:48]}"


class LocalRuntime:
    """transformers in this process, with dynamic micro-batching and adapter hot-swap.

    Build it in a thread (loading takes about a second); use it from the event loop.
    """

    def __init__(
        self,
        model_path: str,
        *,
        name: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_new_tokens: int = 160,
        timeout_s: float = 60.0,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        max_input_tokens: int | None = None,
        num_threads: int | None = None,
        start: bool = True,
        weights: str = "native",
        engine: str = "transformers",
        onnx_cache: str | Path | None = None,
        onnx_prebuilt: Sequence[Path] = (),
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_new_tokens < 1:
            raise ValueError("max_batch, max_queue and max_new_tokens must all be at least 1.")
        if weights not in WEIGHTS:
            raise ValueError(f"weights {weights!r} is not one of {', '.join(WEIGHTS)}.")
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}.")
        offline_by_default()
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self._name = name or Path(model_path).name or model_path
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.repetition_penalty = repetition_penalty
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _resolve_dtype(dtype, self.device)
        if weights == "int8" and self.device != "cpu":
            raise ValueError("weights=int8 is a CPU decoding path; use weights=native on a GPU.")
        if engine == "auto":
            engine = "onnx" if self.device == "cpu" else "transformers"
        if engine == "onnx" and self.device != "cpu":
            raise ValueError("engine=onnx is the CPU decoding path; use engine=transformers on a GPU.")
        self.engine = engine
        self.weights = weights
        self._threads: int | None = None
        if self.device == "cpu" and (num_threads or "OMP_NUM_THREADS" not in os.environ):
            self._threads = num_threads or default_threads()
            torch.set_num_threads(self._threads)

        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        tokenizer.padding_side = "left"  # generated tokens must line up at the right edge of the batch
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError(f"{self._name} has no chat template; use an instruct/chat model.")
        model: Any = None
        if engine == "onnx":
            config: Any = AutoConfig.from_pretrained(model_path)
            try:
                model_generation = GenerationConfig.from_pretrained(model_path)
            except OSError:  # no generation_config.json: the tokenizer's eos is all there is
                model_generation = GenerationConfig()
            self.decode_path = "onnxruntime-genai, int8 weight-only (MatMulNBits)"
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
            model.to(self.device)
            model.eval()
            model.requires_grad_(False)
            if weights == "int8":
                quantize_int8(model)
            config, model_generation = model.config, model.generation_config
            self.decode_path = "transformers generate" + (", int8 weight-only" if weights == "int8" else "")
        self.tokenizer: Any = tokenizer
        self.model_path = model_path
        self._base = model
        self._model: Any = model  # becomes a PeftModel at the first adapter

        eos: set[int] = set()
        for value in (model_generation.eos_token_id, tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif value:
                eos.update(int(v) for v in value)
        self._eos = eos
        self._pad = int(tokenizer.pad_token_id)
        if model is not None:
            # A clean config replaces the model's own (which may ask for sampling): greedy, our stop tokens.
            model.generation_config = GenerationConfig(
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=self._pad,
                eos_token_id=sorted(eos),
                bos_token_id=model_generation.bos_token_id,
            )
        self.context_tokens = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self._onnx: Any = None  # the ONNX model answering now (base or an adapter merged in)
        self._onnx_base: Any = None
        if engine == "onnx":
            from learning.onnx_engine import OnnxModel, choose_pad, ensure_export

            self._onnx_cache = Path(onnx_cache) if onnx_cache else Path(model_path).parent / "onnx"
            self._onnx_prebuilt = list(onnx_prebuilt)
            pad = choose_pad(tokenizer, eos)
            folder = ensure_export(
                model_path, self._onnx_cache, pad_token_id=pad, prebuilt=self._onnx_prebuilt
            )
            self._onnx = self._onnx_base = OnnxModel(folder, threads=self._threads, pad_token_id=pad)
        seconds = time.perf_counter() - started
        log.info("loaded %s (%s, %s) in %.1f s", self._name, self.decode_path, self.device, seconds)
        self.max_input_tokens = max_input_tokens  # None: whatever the context window leaves

        # the queue and the worker
        self.stats = RuntimeStats()
        self._cond = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._closing = False
        self._pending_adapter: tuple[str | None, str | None] | None = None
        self._requested_version: str | None = None
        self._applied: tuple[str | None, str | None] = (None, None)  # (path, version) in use
        self._adapter_counter = 0
        self._adapter_key: str | None = None  # peft name of the active adapter; None = base model
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LocalRuntime:
        """The runtime the settings describe (blocking: loads the model). Evaluation and the benchmarks
        override the queue and the timeout: they wait, they never tell a customer to come back later."""
        options: dict[str, Any] = {
            "name": settings.model,
            "dtype": settings.dtype,
            "max_batch": settings.max_batch,
            "max_queue": settings.max_queue,
            "max_new_tokens": settings.max_new_tokens,
            "timeout_s": settings.llm_timeout_s,
            "weights": settings.weights,
            "engine": settings.engine,
            "num_threads": settings.threads or None,
        }
        options["onnx_cache"], options["onnx_prebuilt"] = export_dirs(settings.models_dir, settings.data_dir)
        options.update(overrides)
        return cls(resolve_model(settings.model, settings.models_dir), **options)

    # --- Generator --------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._name

    @property
    def adapter_version(self) -> str | None:
        """The version new requests will be answered with (the latest `set_adapter`)."""
        return self._requested_version

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def base_model(self) -> Any:
        """The transformers model without adapters (read-only use: weight sizes for the roofline)."""
        return self._base

    async def generate(self, messages: Messages, max_new_tokens: int | None = None) -> Generation:
        """Answer one conversation. Raises ModelBusy at once when the queue is full."""
        request = self._enqueue(messages, max_new_tokens, wait_for_room=False)
        # wrap_future hands the worker's result to this loop with call_soon_threadsafe.
        waiter = asyncio.wrap_future(request.future)
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
        return request

    def _take(self) -> tuple[tuple[str | None, str | None] | None, list[_Request]] | None:
        """Block until there is work: an adapter change (always first) or a batch. None: shut down."""
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
                request = self._queue.popleft()
                if request.gone():
                    self.stats.abandoned += 1
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
        if self._threads:
            import torch

            torch.set_num_threads(self._threads)  # OpenMP settings are per thread; this one does the work
        while True:
            work = self._take()
            if work is None:
                return
            change, batch = work
            try:
                if change is not None:
                    self._apply_adapter(*change)
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

    def _count_error(self) -> None:
        with self._cond:
            self.stats.errors += 1

    def _generate(self, prepared: list[tuple[_Request, list[int]]]) -> None:
        version = self._applied[1]
        started = time.perf_counter()
        if self.engine == "onnx":
            new, first = self._decode_onnx(prepared)
        else:
            new, first = self._decode_transformers(prepared)
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

    def _decode_onnx(
        self, prepared: list[tuple[_Request, list[int]]]
    ) -> tuple[list[list[int]], float | None]:
        """Each row's generated tokens and when the first token of the batch was there."""
        requests = [r for r, _ in prepared]
        first: list[float] = []

        def on_step(step: int) -> None:
            if step == 0 and not first:
                first.append(time.perf_counter())

        new = self._onnx.generate(
            [ids for _, ids in prepared],
            [r.max_new_tokens for r in requests],
            eos=self._eos,
            repetition_penalty=self.repetition_penalty,
            stop=lambda row: requests[row].gone(),
            on_step=on_step,
        )
        return new, (first[0] if first else None)

    def _decode_transformers(
        self, prepared: list[tuple[_Request, list[int]]]
    ) -> tuple[list[list[int]], float | None]:
        import torch

        requests = [r for r, _ in prepared]
        width = max(len(ids) for _, ids in prepared)
        input_ids = torch.full((len(prepared), width), self._pad, dtype=torch.long)
        attention = torch.zeros((len(prepared), width), dtype=torch.long)
        for row, (_, ids) in enumerate(prepared):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        hooks = _hooks()
        stops = hooks.RowStops(requests, width)
        penalty = hooks.GeneratedRepetitionPenalty(self.repetition_penalty, width)
        adapter_off = (
            self._model.disable_adapter() if self._model is not self._base and self._adapter_key is None
            else contextlib.nullcontext()
        )
        processors = [penalty] if self.repetition_penalty != 1.0 else []
        with torch.inference_mode(), adapter_off:
            output = self._model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max(r.max_new_tokens for r in requests),
                stopping_criteria=hooks.StoppingCriteriaList([stops]),
                logits_processor=hooks.LogitsProcessorList(processors),
            )
        new: list[list[int]] = output[:, width:].tolist()
        return new, stops.first_token_at

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
        """Runs on the worker between batches. Loads first, then drops the old adapter: no gap in service."""
        if (path, version) == self._applied:
            return
        try:
            if path is None:
                # The base model: generation runs under disable_adapter(). The last adapter stays parked
                # (peft cannot disable adapters once the last one is deleted); the next load drops it.
                self._adapter_key = None
                if self.weights == "int8":
                    self._model = self._base  # merged copies are plain models: drop it
                self._onnx = self._onnx_base
            else:
                self._adapter_key = self._load_adapter(path, version or "adapter")
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

    def _load_adapter(self, path: str, version: str) -> str:
        from peft import PeftModel

        if self.engine == "onnx":
            return self._load_onnx(path, version)
        if self.weights == "int8":
            return self._load_merged(path, version)
        self._adapter_counter += 1
        key = _adapter_name(self._adapter_counter, version)  # never reused, even for the same version
        if self._model is self._base:
            self._model = PeftModel.from_pretrained(self._base, path, adapter_name=key)
        else:
            try:
                self._model.load_adapter(path, adapter_name=key)
                self._model.set_adapter(key)
            except Exception:
                if key in self._model.peft_config:
                    with contextlib.suppress(Exception):
                        self._model.delete_adapter(key)
                if self._adapter_key is not None:
                    self._model.set_adapter(self._adapter_key)
                raise
        self._model.eval()
        for old in [name for name in self._model.peft_config if name != key]:
            self._model.delete_adapter(old)
        return key

    def _load_merged(self, path: str, version: str) -> str:
        """int8 weights: peft cannot wrap quantised layers, so the adapter is merged into a fresh copy
        of the base in the model dtype, which is then quantised. A switch takes a second or two longer;
        answers cost what the base model's cost (no LoRA matmuls at all)."""
        from learning.modelfiles import merged_with_adapter

        self._adapter_counter += 1
        key = _adapter_name(self._adapter_counter, version)
        merged = merged_with_adapter(self.model_path, path, self.dtype)
        merged.to(self.device)
        merged.eval()
        merged.requires_grad_(False)
        quantize_int8(merged)
        merged.generation_config = self._base.generation_config
        self._model = merged  # the previous merged copy (if any) is freed
        return key

    def _load_onnx(self, path: str, version: str) -> str:
        """The ONNX engine serves the base with the adapter merged in, exported once (cached: the gate
        exported the candidate while evaluating it, so a promotion only loads it)."""
        from learning.onnx_engine import OnnxModel, ensure_export

        self._adapter_counter += 1
        key = _adapter_name(self._adapter_counter, version)
        pad = self._onnx_base.pad
        folder = ensure_export(
            self.model_path, self._onnx_cache, pad_token_id=pad, adapter=path, prebuilt=self._onnx_prebuilt
        )
        self._onnx = OnnxModel(folder, threads=self._threads, pad_token_id=pad)
        return key

    @property
    def loaded_adapters(self) -> list[str]:
        """peft names of the adapters held in memory (one at most between switches)."""
        if self.weights == "int8" or self.engine == "onnx":
            return [self._adapter_key] if self._adapter_key else []
        if self._model is self._base:
            return []
        return list(self._model.peft_config)


def _settle(
    request: _Request, result: Generation | None = None, error: BaseException | None = None
) -> None:
    """Resolve a request's future exactly once (the caller may have cancelled it meanwhile)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)  # type: ignore[arg-type]


class _Hooks:
    """transformers subclasses, built on first use so importing this module stays light."""

    def __init__(self) -> None:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        self.LogitsProcessorList = LogitsProcessorList
        self.StoppingCriteriaList = StoppingCriteriaList

        class RowStops(StoppingCriteria):  # type: ignore[misc]
            """Per-row limits in a shared batch: each request's own max_new_tokens, or its caller gone.

            Called after every decoding step, so its first call also timestamps the first token.
            """

            def __init__(self, requests: list[_Request], prompt_width: int) -> None:
                self.requests = requests
                self.prompt_width = prompt_width
                self.first_token_at: float | None = None

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                made = input_ids.shape[1] - self.prompt_width
                done = [made >= r.max_new_tokens or r.gone() for r in self.requests]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        class GeneratedRepetitionPenalty(LogitsProcessor):  # type: ignore[misc]
            """HF's repetition penalty, but only over generated tokens: quoting the passages is wanted."""

            def __init__(self, penalty: float, prompt_width: int) -> None:
                self.penalty = penalty
                self.prompt_width = prompt_width

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                generated = input_ids[:, self.prompt_width :]
                if generated.shape[1] == 0:
                    return scores
                picked = torch.gather(scores, 1, generated)
                picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
                return scores.scatter(1, generated, picked)

        self.RowStops = RowStops
        self.GeneratedRepetitionPenalty = GeneratedRepetitionPenalty


_HOOKS: _Hooks | None = None


def _hooks() -> _Hooks:
    global _HOOKS
    if _HOOKS is None:
        _HOOKS = _Hooks()
    return _HOOKS


# --- int8 weight-only linears (opt-in CPU decoding path) -------------------------------------------

WEIGHTS = ("native", "int8")
ENGINES = ("auto", "transformers", "onnx")  # auto: onnx on a CPU, transformers on a GPU
_INT8_GEMV_ROWS = 8  # up to this many rows (decoding) the int8 kernel wins; prefill dequantises instead


@functools.cache
def _int8_linear() -> type:
    """The module class, built on first use so importing this module stays light."""
    import torch

    class Int8Linear(torch.nn.Module):  # type: ignore[misc]
        """A Linear layer holding int8 weights with one scale per output row; activations keep the dtype.

        Why: batch-1 decoding on a CPU reads every weight once per token and PyTorch's matrix-vector
        kernel is the bottleneck (notes.md). Half the bytes through `_weight_int8pack_mm` decoded 1.4x
        faster per CPU second than bf16 on SmolLM2-135M, and the loss on emanual reference answers
        moved from 1.365 (bf16) to 1.371 nats per token: per-row weight-only scales keep the quality that
        dynamic activation quantisation lost. Many rows at once (prefill) are faster dequantised.
        """

        def __init__(self, linear: Any) -> None:
            super().__init__()
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            dtype = linear.weight.dtype
            self.in_features = linear.in_features
            self.out_features = linear.out_features
            self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.to(dtype))
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

        qweight: Any
        scale: Any
        bias: Any

        def forward(self, x: Any) -> Any:
            shape = x.shape
            rows = x.reshape(-1, shape[-1])
            if rows.shape[0] <= _INT8_GEMV_ROWS:
                y = torch.ops.aten._weight_int8pack_mm(rows.to(self.scale.dtype).contiguous(), self.qweight,
                                                       self.scale)  # fmt: skip
            else:
                weight = self.qweight.to(self.scale.dtype) * self.scale[:, None]
                y = torch.nn.functional.linear(rows.to(self.scale.dtype), weight)
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    return Int8Linear


def quantize_int8(model: Any) -> int:
    """Replace every torch Linear of `model` (the output layer too) by an int8 weight-only one, in place.

    A tied output layer gets its own int8 copy; the input embedding keeps its dtype. Returns the count.
    """
    import torch

    cls = _int8_linear()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, cls(module))
    return len(targets)


# --- choosing a backend ---------------------------------------------------------------------------


def build_runtime(settings: Settings) -> Generator:
    """The generator the settings ask for. Blocking (loads the model): call it in a thread."""
    if settings.llm_url:
        # An OpenAI-compatible server (vLLM with --enable-lora) does the batching; httpx stays lazy.
        from learning.llm_http import build_http_generator

        return build_http_generator(settings)
    return LocalRuntime.from_settings(settings)
