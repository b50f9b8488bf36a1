"""The batching runtime on its own: a scripted engine and a character tokenizer, no model at all.

What is tested here is what learning/batching.py does around any engine (the queue, batch shapes,
cutting answers, adapter switches between batches, failures, shutdown); tests/learning/test_runtime.py
runs the same runtime on the real engines.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from learning.batching import Engine, LocalRuntime, Vocabulary, check_limits
from learning.generation import GenerationError, Generator, ModelBusy

EOS, PAD = 0, 1


class CharTokenizer:
    """One token per character; the chat template marks each role."""

    chat_template = "roles"

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return "".join(chr(i) for i in ids if i not in (EOS, PAD))


class ScriptedEngine:
    """Answers "<adapter>:<prompt length>" then its end-of-turn token; records every call."""

    name = "scripted"
    description = "scripted answers"
    device = "cpu"
    threads: int | None = None

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.calls: list[str] = []  # decode:N and score:N, in the order the worker made them
        self.adapter: str | None = None
        self.attached_on: str | None = None
        self.poison = ord("☠")

    def attach(self) -> None:
        self.attached_on = threading.current_thread().name

    def decode(
        self, rows: Sequence[list[int]], budgets: Sequence[int], stop: Callable[[int], bool]
    ) -> tuple[list[list[int]], float | None]:
        self.batches.append(len(rows))
        self.calls.append(f"decode:{len(rows)}")
        if any(self.poison in row for row in rows):
            raise RuntimeError("this row breaks the model")
        out = []
        for ids, budget in zip(rows, budgets, strict=True):
            text = f"{self.adapter or 'base'}:{len(ids)}"
            out.append(([ord(c) for c in text] + [EOS, PAD, PAD])[:budget])
        return out, 0.0

    def score(self, prefixes: Sequence[list[int]], continuation: list[int]) -> list[float]:
        """Shorter prompts score higher: -(prompt length) / (continuation length)."""
        self.calls.append(f"score:{len(prefixes)}")
        if any(self.poison in row for row in prefixes):
            raise RuntimeError("this row breaks the model")
        return [-len(ids) / len(continuation) for ids in prefixes]

    def use_adapter(self, path: str | None, version: str | None) -> None:
        if path is not None and Path(path).name == "broken":
            raise OSError("unreadable adapter")
        self.adapter = version

    @property
    def loaded_adapters(self) -> list[str]:
        return [self.adapter] if self.adapter else []


def runtime(engine: ScriptedEngine, **options: object) -> LocalRuntime:
    vocabulary = Vocabulary(CharTokenizer(), frozenset({EOS}), PAD, context_tokens=4096)
    return LocalRuntime(engine, vocabulary, model_path="/models/scripted", **options)  # type: ignore[arg-type]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def adapter_dir(tmp_path: Path, name: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    return str(folder)


def test_the_scripted_engine_and_the_runtime_keep_their_contracts() -> None:
    engine = ScriptedEngine()
    assert isinstance(engine, Engine)
    with runtime(engine, start=False) as rt:
        assert isinstance(rt, Generator)
        assert rt.model_name == "scripted" and rt.model_path == "/models/scripted"


def test_waiting_requests_are_decoded_in_batches_of_at_most_max_batch() -> None:
    engine = ScriptedEngine()
    with runtime(engine, max_batch=3, start=False) as rt:
        futures = [rt.submit(chat(f"question {i}")) for i in range(7)]
        assert rt.queue_depth == 7
        rt.start()
        answers = [f.result(timeout=10) for f in futures]
    assert engine.batches == [3, 3, 1]
    assert engine.attached_on == "apprentice-model"  # the worker thread prepared itself before decoding
    assert rt.stats.batch_sizes == {3: 2, 1: 1} and rt.stats.requests == 7
    for answer in answers:
        assert answer.text == f"base:{answer.prompt_tokens}"  # cut at the end-of-turn token
        assert answer.new_tokens == len(answer.text) + 1  # the end-of-turn token counts, the padding not
        assert answer.adapter_version is None and answer.model == "scripted"


def test_each_row_keeps_its_own_budget() -> None:
    engine = ScriptedEngine()
    with runtime(engine, start=False) as rt:
        short, full = rt.submit(chat("a"), 2), rt.submit(chat("b"))
        rt.start()
        assert short.result(timeout=10).text == "ba"  # "base:..." cut to 2 tokens
        assert full.result(timeout=10).text.startswith("base:")
    assert engine.batches == [2]


async def test_adapters_switch_between_batches_and_answers_record_theirs(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    rt = runtime(engine)
    try:
        assert (await rt.generate(chat("hi"))).adapter_version is None
        rt.set_adapter(adapter_dir(tmp_path, "v1"), "v1")
        assert rt.adapter_version == "v1"  # at once: what new requests will be answered with
        adapted = await rt.generate(chat("hi"))
        assert adapted.adapter_version == "v1" and adapted.text.startswith("v1:")
        assert rt.loaded_adapters == ["v1"]
        rt.set_adapter(None, None)
        back = await rt.generate(chat("hi"))
        assert back.adapter_version is None and back.text.startswith("base:")
        assert rt.stats.adapter_switches == 2 and rt.stats.adapter_errors == 0
    finally:
        await rt.aclose()


async def test_a_failed_adapter_load_keeps_the_current_adapter(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    rt = runtime(engine)
    try:
        rt.set_adapter(adapter_dir(tmp_path, "v1"), "v1")
        await rt.generate(chat("hi"))
        rt.set_adapter(adapter_dir(tmp_path, "broken"), "v2")
        answer = await rt.generate(chat("hi"))
        assert answer.adapter_version == "v1" and answer.text.startswith("v1:")
        assert rt.adapter_version == "v1"  # the request for v2 is forgotten, v1 is what answers
        assert rt.stats.adapter_errors == 1 and rt.stats.adapter_switches == 1
    finally:
        await rt.aclose()


def test_a_failing_batch_is_retried_row_by_row_and_only_the_bad_row_fails() -> None:
    engine = ScriptedEngine()
    with runtime(engine, start=False) as rt:
        good = [rt.submit(chat("fine")) for _ in range(2)]
        bad = rt.submit(chat("☠"))
        rt.start()
        assert all(f.result(timeout=10).text for f in good)
        with pytest.raises(GenerationError, match="breaks the model"):
            bad.result(timeout=10)
    assert engine.batches == [3, 1, 1, 1]  # the batch, then each row alone
    assert rt.stats.errors == 1 and rt.stats.requests == 2


async def test_a_full_queue_is_busy_and_a_closed_runtime_fails_what_waits() -> None:
    rt = runtime(ScriptedEngine(), max_queue=2, start=False)
    waiting = [rt.submit(chat(q)) for q in ("a", "b")]
    with pytest.raises(ModelBusy):
        await rt.generate(chat("c"))
    assert rt.stats.busy == 1
    await rt.aclose()  # never started: nothing was answered
    for future in waiting:
        with pytest.raises(GenerationError, match="shut down"):
            future.result(timeout=1)
    with pytest.raises(GenerationError, match="shut down"):
        rt.submit(chat("d"))


async def test_a_scoring_request_is_its_own_batch_between_answers() -> None:
    """`likelihoods` (the reranker) waits in the same queue, is never mixed into a batch of answers,
    and scores each prompt with the continuation after it."""
    engine = ScriptedEngine()
    rt = runtime(engine, max_batch=8, start=False)
    try:
        before = [rt.submit(chat(q)) for q in ("a", "b")]
        scoring = asyncio.create_task(rt.likelihoods([chat("short"), chat("a longer prompt")], "question?"))
        while rt.queue_depth < 3:  # the task enqueues on its first step
            await asyncio.sleep(0)
        after = [rt.submit(chat(q)) for q in ("c", "d")]
        rt.start()
        scores = await scoring
        assert all(f.result(timeout=10).text for f in [*before, *after])
    finally:
        await rt.aclose()
    assert engine.calls == ["decode:2", "score:2", "decode:2"]
    # "<user>short<assistant>" is 22 characters, the other 32; "question?" is 9
    assert scores == pytest.approx([-22 / 9, -32 / 9])


async def test_scoring_fails_like_answering_busy_broken_or_empty() -> None:
    rt = runtime(ScriptedEngine(), max_queue=1, start=False)
    try:
        waiting = rt.submit(chat("a"))
        with pytest.raises(ModelBusy):
            await rt.likelihoods([chat("b")], "q")
        rt.start()
        waiting.result(timeout=10)
        with pytest.raises(GenerationError, match="failed to score"):
            await rt.likelihoods([chat("☠")], "q")
        with pytest.raises(ValueError, match="non-empty continuation"):
            await rt.likelihoods([chat("b")], "  ")
        assert await rt.likelihoods([chat("b")], "q") == [-len("<user>b<assistant>")]
    finally:
        await rt.aclose()
    assert rt.stats.errors == 1


def test_queue_numbers_below_one_are_refused() -> None:
    check_limits(1, 1, 1)
    for numbers in ((0, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ValueError, match="at least 1"):
            check_limits(*numbers)
    with pytest.raises(ValueError, match="at least 1"):
        runtime(ScriptedEngine(), max_batch=0, start=False)


async def test_the_event_loop_only_awaits(tmp_path: Path) -> None:
    """generate() hands the request to the worker thread; the loop never decodes itself."""
    engine = ScriptedEngine()
    seen: list[str] = []
    decode = engine.decode

    def on_worker(*args: object, **kwargs: object) -> tuple[list[list[int]], float | None]:
        seen.append(threading.current_thread().name)
        return decode(*args, **kwargs)  # type: ignore[arg-type]

    engine.decode = on_worker  # type: ignore[method-assign]
    rt = runtime(engine)
    try:
        answers = await asyncio.gather(*(rt.generate(chat(str(i))) for i in range(5)))
    finally:
        await rt.aclose()
    assert len(answers) == 5 and set(seen) == {"apprentice-model"}
