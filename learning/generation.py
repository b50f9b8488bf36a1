"""The contract between the conversation flow and a language model.

`Generator` is the one boundary the bot talks to. Two kinds of backend keep it: the batching runtime
in this process (learning/batching.py, with an engine from learning/hf_engine.py or
learning/onnx_engine.py) and an OpenAI-compatible server (learning/llm_http.py). learning/runtime.py
picks one from the settings. The errors and the statistics are the same whichever answers, so the
bot, /metrics and the benchmarks never ask which one it is.

This module imports nothing heavy and nothing else of the project: every backend imports it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Messages = list[dict[str, str]]


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
    """The model failed on this request (the backend itself keeps serving others)."""


@runtime_checkable
class Generator(Protocol):
    """What the bot calls to answer: `learning.batching.LocalRuntime` or `learning.llm_http.HttpGenerator`.

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


@runtime_checkable
class Scorer(Protocol):
    """A backend that can also read: how likely `continuation` is as the answer to each prompt.

    `learning.rerank` asks it how likely the customer's question is after each retrieved passage, so
    the model itself picks the passage that answers (docs/answers.md). The in-process runtime keeps
    it, and so does the vLLM client (`prompt_logprobs`); a backend without it leaves passages in
    retrieval order. Raises what `generate` raises.
    """

    @property
    def device(self) -> str:
        """Where the prefill runs: "cpu", "cuda", or "server" (a model server's, vLLM's GPU): a
        prefill per passage is cheap only on a GPU."""
        ...

    async def likelihoods(self, prompts: list[Messages], continuation: str) -> list[float]: ...


# --- statistics (for /metrics and `apprentice bench speed`) ---------------------------------------


@dataclass(frozen=True)
class BatchRecord:
    """One batch decoded by an in-process engine."""

    size: int
    prompt_tokens: int  # real prompt tokens, summed over the batch (padding excluded)
    padded_length: int
    new_tokens: int  # summed over the batch
    seconds: float
    prefill_s: float | None  # batch start to first generated token
    adapter_version: str | None


@dataclass
class RuntimeStats:
    """Counters kept by a backend. Read them; only the backend writes."""

    requests: int = 0  # answered
    batches: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    new_tokens: int = 0
    generate_s: float = 0.0  # time inside the engine's decoding
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
