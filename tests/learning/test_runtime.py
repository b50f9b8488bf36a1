"""The in-process runtime: batching, back-pressure, timeouts, failures and adapter hot-swap.

Mechanics run on a tiny random Llama (tests/conftest.py); behaviour on the real SmolLM2 (slow). Tests
marked with ENGINES run on both in-process engines: PyTorch (transformers) and ONNX Runtime GenAI.
Requests are queued before the worker starts (`start=False`) where a test needs a known batch shape,
so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Any

import pytest

from knowledge.passages import Passage
from knowledge.settings import DEFAULT_SYSTEM_PROMPT, Settings
from learning.batching import LocalRuntime
from learning.generation import GenerationError, GenerationTimeout, ModelBusy
from learning.hf_engine import HfEngine
from learning.onnx_engine import OnnxEngine, export_key
from learning.prompt import build_messages
from learning.runtime import build_runtime, load_local

ENGINES = pytest.mark.parametrize("engine", ["transformers", "onnx"])

QUESTIONS = [
    "Where is my order?",
    "Can I pay with PayPal?",
    "Do you ship to Norway?",
    "How do I reset my password?",
    "Is the kettle dishwasher safe?",
    "What is your phone number?",
    "Can I change my delivery address?",
]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a support bot."}, {"role": "user", "content": question}]


def tiny(model_dir: Path, **kwargs: object) -> LocalRuntime:
    options: dict[str, object] = {"name": "tiny", "dtype": "float32", "max_new_tokens": 6, "timeout_s": 120.0}
    options.update(kwargs)
    return load_local(str(model_dir), **options)  # type: ignore[arg-type]


def hf_model(rt: LocalRuntime) -> Any:
    """The transformers model under a runtime on the transformers engine."""
    assert isinstance(rt.engine, HfEngine)
    return rt.engine.base_model


@pytest.fixture(scope="module")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter for the tiny model with large non-zero B weights, so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("tiny-adapter")
    model.save_pretrained(str(out))
    return out


@ENGINES
def test_waiting_requests_are_generated_together_up_to_max_batch(tiny_model_dir: Path, engine: str) -> None:
    with tiny(tiny_model_dir, max_batch=3, start=False, engine=engine) as rt:
        futures = [rt.submit(chat(q)) for q in QUESTIONS]  # all waiting before the worker starts
        rt.start()
        answers = [f.result(timeout=120) for f in futures]
    assert rt.stats.batch_sizes == {3: 2, 1: 1}
    assert rt.stats.batches == 3 and rt.stats.requests == len(QUESTIONS)
    for answer in answers:
        assert answer.model == "tiny" and answer.adapter_version is None
        assert answer.new_tokens == 6 and answer.text  # a random model never stops early
        assert answer.prompt_tokens > 10
        assert answer.ttft_s is not None and 0 < answer.ttft_s <= answer.latency_s


@ENGINES
def test_padding_gives_each_row_the_answer_it_gets_alone(tiny_model_dir: Path, engine: str) -> None:
    """transformers pads on the left, ONNX Runtime GenAI on the right; prompts of unequal length."""
    asks = [QUESTIONS[0], "Please tell me, in detail: " * 6 + QUESTIONS[1], QUESTIONS[4]]
    with tiny(tiny_model_dir, max_batch=8, max_new_tokens=12, engine=engine) as rt:
        alone = [rt.generate_batch([chat(q)])[0] for q in asks]
        together = rt.generate_batch([chat(q) for q in asks])
    assert len({a.prompt_tokens for a in alone}) == 3
    assert max(rt.stats.batch_sizes) == 3
    assert [g.text for g in together] == [a.text for a in alone]


@ENGINES
def test_each_row_of_a_batch_keeps_its_own_budget(tiny_model_dir: Path, engine: str) -> None:
    with tiny(tiny_model_dir, max_batch=8, start=False, engine=engine) as rt:
        futures = [rt.submit(chat(q), n) for q, n in zip(QUESTIONS, (2, 9, 5), strict=False)]
        rt.start()
        answers = [f.result(timeout=120) for f in futures]
    assert rt.stats.batch_sizes == {3: 1}
    assert [a.new_tokens for a in answers] == [2, 9, 5]  # a random model never stops early


async def test_concurrent_customers_share_batches_and_the_event_loop_keeps_running(
    tiny_model_dir: Path,
) -> None:
    rt = tiny(tiny_model_dir, max_batch=8, max_new_tokens=12)
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    try:
        answers = await asyncio.gather(*(rt.generate(chat(q)) for q in QUESTIONS))
        ticks_while_generating = ticks
    finally:
        running = False
        await ticking
        await rt.aclose()
    assert [a.new_tokens for a in answers] == [12] * len(QUESTIONS)
    assert rt.stats.requests == len(QUESTIONS)
    assert rt.stats.batches < len(QUESTIONS)  # several customers per model.generate
    assert ticks_while_generating > 50  # a blocking generate() would leave the ticker at 0


async def test_a_full_queue_answers_busy_at_once(tiny_model_dir: Path) -> None:
    rt = tiny(tiny_model_dir, max_queue=2, start=False)
    try:
        waiting = [asyncio.wrap_future(rt.submit(chat(q))) for q in QUESTIONS[:2]]
        assert rt.queue_depth == 2
        with pytest.raises(ModelBusy):
            await rt.generate(chat(QUESTIONS[2]))
        assert rt.stats.busy == 1
        rt.start()
        answers = await asyncio.gather(*waiting)
        assert all(a.text for a in answers)
    finally:
        await rt.aclose()


async def test_timeout_raises_and_the_abandoned_request_is_skipped(tiny_model_dir: Path) -> None:
    rt = tiny(tiny_model_dir, timeout_s=0.05, start=False)  # no worker yet: it cannot answer in time
    try:
        with pytest.raises(GenerationTimeout):
            await rt.generate(chat(QUESTIONS[0]))
        assert rt.stats.timeouts == 1
        rt.timeout_s = 120.0
        rt.start()
        answer = await rt.generate(chat(QUESTIONS[1]))
        assert answer.text
        assert rt.stats.abandoned == 1 and rt.stats.requests == 1  # the timed-out one was never generated
    finally:
        await rt.aclose()


async def test_a_failing_request_fails_alone_and_the_worker_keeps_serving(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = tiny(tiny_model_dir, start=False)
    try:
        broken = [{"role": "user", "content": None}]  # the chat template cannot render it
        bad = asyncio.wrap_future(rt.submit(broken))  # type: ignore[arg-type]
        good = asyncio.wrap_future(rt.submit(chat(QUESTIONS[0])))
        rt.start()  # both in one batch
        with pytest.raises(GenerationError):
            await bad
        assert (await good).text

        # The model itself raising (e.g. out of memory) fails that request with GenerationError only.
        real_generate = hf_model(rt).generate
        failures = iter([RuntimeError("CUDA out of memory (simulated)")])

        def fail_once(*args: object, **kwargs: object) -> object:
            error = next(failures, None)
            if error is not None:
                raise error
            return real_generate(*args, **kwargs)

        monkeypatch.setattr(hf_model(rt), "generate", fail_once)
        with pytest.raises(GenerationError, match="out of memory"):
            await rt.generate(chat(QUESTIONS[1]))
        assert (await rt.generate(chat(QUESTIONS[2]))).text
        assert rt.stats.errors == 2
    finally:
        await rt.aclose()


async def test_adapter_swap_waits_for_answers_in_flight_and_switches_back(
    tiny_model_dir: Path, tiny_adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = tiny(tiny_model_dir)
    # Hold the first forward pass until the adapter has been requested: a known "in flight" moment.
    entered, release = threading.Event(), threading.Event()
    forward = hf_model(rt).forward

    @functools.wraps(forward)
    def gated(*args: object, **kwargs: object) -> object:
        entered.set()
        release.wait(60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(hf_model(rt), "forward", gated)
    question = chat(QUESTIONS[0])
    try:
        in_flight = asyncio.ensure_future(rt.generate(question))
        assert await asyncio.to_thread(entered.wait, 60)
        rt.set_adapter(str(tiny_adapter_dir), "2026-11-29.1")
        assert rt.adapter_version == "2026-11-29.1"
        after = asyncio.ensure_future(rt.generate(question))
        release.set()
        base, adapted = await in_flight, await after
        assert base.adapter_version is None
        assert adapted.adapter_version == "2026-11-29.1"
        assert adapted.text != base.text

        rt.set_adapter(str(tiny_adapter_dir), "2026-11-30.1")  # a newer version replaces the old one
        newer = await rt.generate(question)
        assert newer.adapter_version == "2026-11-30.1" and newer.text == adapted.text
        assert len(rt.loaded_adapters) == 1

        rt.set_adapter(None, None)
        again = await rt.generate(question)
        assert again.adapter_version is None
        assert again.text == base.text
        assert rt.stats.adapter_switches == 3 and rt.stats.adapter_errors == 0
    finally:
        release.set()
        await rt.aclose()


def test_set_adapter_refuses_a_folder_without_an_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    with tiny(tiny_model_dir, start=False) as rt, pytest.raises(FileNotFoundError, match="adapter_config"):
        rt.set_adapter(str(tmp_path), "v1")
    assert rt.adapter_version is None


@ENGINES
def test_overlong_prompts_keep_the_system_prompt_and_their_end(tiny_model_dir: Path, engine: str) -> None:
    """A prompt over the window loses the middle of its last message, never its start (the system prompt
    and, in a real prompt, the passage fence) as it did when only its last tokens were kept."""
    with tiny(tiny_model_dir, max_input_tokens=40, engine=engine) as rt:
        long_history = chat("word " * 500 + "Where is my order?")
        [answer] = rt.generate_batch([long_history])
        ids = rt._encode(long_history, rt.max_new_tokens)
    assert answer.prompt_tokens == len(ids) <= 40
    assert rt.stats.truncated == 2  # the answer, and the _encode above
    text = rt.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a support bot.<|im_end|>")
    assert "word […] " in text and text.endswith("Where is my order?<|im_end|>\n<|im_start|>assistant\n")


async def test_build_runtime_applies_the_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    options: dict[str, Any] = {"model": str(tiny_model_dir), "dtype": "float32", "max_new_tokens": 3}
    settings = Settings(data_dir=tmp_path, max_batch=2, max_queue=5, threads=3, **options)
    rt = build_runtime(settings)
    try:
        assert isinstance(rt, LocalRuntime)
        assert isinstance(rt.engine, OnnxEngine)  # APPRENTICE_ENGINE=auto on a CPU
        assert (tmp_path / "models" / "onnx").is_dir()  # exported into the models cache
        assert (rt.max_batch, rt.max_queue, rt.timeout_s) == (2, 5, settings.llm_timeout_s)
        assert rt.engine.threads == 3  # APPRENTICE_THREADS wins over the default and OMP_NUM_THREADS
        answer = await rt.generate(chat(QUESTIONS[0]))
        assert answer.model == str(tiny_model_dir) and answer.new_tokens == 3
    finally:
        await rt.aclose()


@pytest.mark.slow
@ENGINES
async def test_smollm2_answers_from_the_passage(smollm2_dir: Path, engine: str) -> None:
    """The real model (bf16 or int8 ONNX, as served) grounds two concurrent answers in their own passages."""
    rt = load_local(
        str(smollm2_dir), name="SmolLM2-135M-Instruct", max_new_tokens=48, timeout_s=600, engine=engine
    )
    returns = Passage(
        text="You can return any unused item within 30 days of delivery for a full refund. "
        "Start a return from the Orders page; we email a prepaid label.",
        title="Returns",
        source="kb/returns.md",
        score=0.8,
    )
    warranty = Passage(
        text="All Acme kettles have a 2-year warranty covering manufacturing defects. "
        "The warranty does not cover limescale damage.",
        title="Warranty",
        source="kb/warranty.md",
        score=0.8,
    )
    asks = [
        build_messages(DEFAULT_SYSTEM_PROMPT, [returns], "How long do I have to return something?"),
        build_messages(DEFAULT_SYSTEM_PROMPT, [warranty], "Is limescale damage covered?"),
    ]
    try:
        answers = await asyncio.gather(*(rt.generate(m) for m in asks))
    finally:
        await rt.aclose()
    assert "30 days" in answers[0].text
    assert "limescale" in answers[1].text.lower() and "not" in answers[1].text.lower()
    assert all(a.model == "SmolLM2-135M-Instruct" and a.new_tokens > 3 for a in answers)
    assert rt.stats.requests == 2


# --- the ONNX engine's own mechanics ----------------------------------------------------------------


async def test_onnx_serves_the_adapter_merged_in_and_switches_back(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "onnx"
    rt = tiny(tiny_model_dir, engine="onnx", onnx_cache=cache)
    question = chat(QUESTIONS[0])
    try:
        base = await rt.generate(question)
        rt.set_adapter(str(tiny_adapter_dir), "2026-11-29.1")
        adapted = await rt.generate(question)
        assert (base.adapter_version, adapted.adapter_version) == (None, "2026-11-29.1")
        assert adapted.text != base.text

        rt.set_adapter(str(tiny_adapter_dir), "2026-11-30.1")  # same files: the export is reused
        newer = await rt.generate(question)
        assert newer.adapter_version == "2026-11-30.1" and newer.text == adapted.text
        exports = sorted(p.name for p in cache.iterdir() if p.is_dir())
        assert len(exports) == 2 and not [n for n in exports if n.startswith(".exporting")]
        assert isinstance(rt.engine, OnnxEngine)
        pad = rt.engine.base.pad
        assert any(n.endswith(export_key(str(tiny_model_dir), str(tiny_adapter_dir), pad)) for n in exports)
        assert len(rt.loaded_adapters) == 1

        rt.set_adapter(None, None)
        again = await rt.generate(question)
        assert again.adapter_version is None and again.text == base.text
        assert rt.stats.adapter_switches == 3 and rt.stats.adapter_errors == 0
    finally:
        await rt.aclose()


async def test_onnx_a_broken_adapter_keeps_the_current_one_serving(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}', encoding="utf-8")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    rt = tiny(tiny_model_dir, engine="onnx", onnx_cache=tmp_path / "onnx")
    try:
        rt.set_adapter(str(broken), "v-broken")
        answer = await rt.generate(chat(QUESTIONS[0]))
        assert answer.text and answer.adapter_version is None  # still the base model
        assert rt.stats.adapter_errors == 1 and rt.adapter_version is None
        assert not [p for p in (tmp_path / "onnx").iterdir() if p.name.startswith(".exporting")]
    finally:
        await rt.aclose()


def test_onnx_refuses_a_gpu_and_unknown_engines_by_name(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="engine=onnx is the CPU decoding path"):
        load_local(str(tiny_model_dir), engine="onnx", device="cuda", start=False)
    with pytest.raises(ValueError, match="engine 'vllm' is not one of auto, transformers, onnx"):
        load_local(str(tiny_model_dir), engine="vllm", start=False)
