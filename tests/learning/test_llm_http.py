"""The vLLM (OpenAI-compatible) backend against a fake server with vLLM's request and error shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fakes.openai_api import FakeOpenAIServer

from bot.conversation import ConversationService
from bot.envelope import Inbound
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.generation import GenerationError, GenerationTimeout, ModelBusy
from learning.llm_http import HttpGenerator, continuation_logprob
from learning.rerank import order, prompts, wanted

BASE = "shop-model"
# a question whose words the fake's model finds in a passage retrieval ranks below its first
READ_QUESTION = "Can you ship the Voltline to Hawaii?"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my parcel?"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer(BASE) as server:
        yield server


@pytest.fixture
def adapter(tmp_path: Path) -> str:
    """An adapter folder as the training job writes it (the fake only checks adapter_config.json)."""
    folder = tmp_path / "adapters" / "v1"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return str(folder)


def client(fake: FakeOpenAIServer, **kwargs: object) -> HttpGenerator:
    options: dict[str, object] = {"model": BASE, "timeout_s": 30.0, "retries": 2, "backoff_s": 0.01}
    options.update(kwargs)
    return HttpGenerator(fake.base_url + "/v1", **options)  # type: ignore[arg-type]


def chat_models(fake: FakeOpenAIServer) -> list[str]:
    return [c.body["model"] for c in fake.paths("/v1/chat/completions")]


async def test_chat_request_is_greedy_unstreamed_and_recorded(fake: FakeOpenAIServer) -> None:
    gen = client(fake, max_new_tokens=32)
    try:
        out = await gen.generate(CHAT)
    finally:
        await gen.aclose()
    assert out.text == f"{BASE} says: Where is my parcel?"
    assert (out.model, out.adapter_version) == (BASE, None)
    assert out.new_tokens == 6 and out.prompt_tokens == 6  # the server's usage counts
    [call] = fake.paths("/v1/chat/completions")
    assert call.body == {"model": BASE, "messages": CHAT, "max_tokens": 32, "temperature": 0, "stream": False}


async def test_each_adapter_load_gets_a_fresh_name_and_the_old_one_is_unloaded(
    fake: FakeOpenAIServer, adapter: str
) -> None:
    gen = client(fake)
    try:
        gen.set_adapter(adapter, "v1")
        first = await gen.generate(CHAT)
        gen.set_adapter(adapter, "v2")
        second = await gen.generate(CHAT)
        gen.set_adapter(adapter, "v1")  # a rollback loads v1 again, under a new name
        third = await gen.generate(CHAT)
        gen.set_adapter(None, None)
        base = await gen.generate(CHAT)
        await gen.wait_idle()
    finally:
        await gen.aclose()
    assert [g.adapter_version for g in (first, second, third, base)] == ["v1", "v2", "v1", None]
    loads = [c.body for c in fake.paths("/v1/load_lora_adapter")]
    names = [b["lora_name"] for b in loads]
    assert len(names) == len(set(names)) == 3
    assert names[0].startswith("v1-") and names[1].startswith("v2-") and names[2].startswith("v1-")
    assert all(b["lora_path"] == adapter for b in loads)
    assert chat_models(fake) == [*names, BASE]
    assert [c.body["lora_name"] for c in fake.paths("/v1/unload_lora_adapter")] == names
    assert fake.adapters == {}


async def test_the_old_adapter_is_unloaded_only_after_answers_in_flight(
    fake: FakeOpenAIServer, adapter: str
) -> None:
    gen = client(fake)
    try:
        gen.set_adapter(adapter, "v1")
        await gen.sync_adapter()
        fake.hold()
        in_flight = asyncio.create_task(gen.generate(CHAT))
        await fake.wait_waiting(1)
        gen.set_adapter(adapter, "v2")
        await gen.sync_adapter()
        [old, new] = fake.ever_loaded
        assert old in fake.adapters and new in fake.adapters  # v1 still answering
        fake.release()
        answer = await in_flight
        await gen.wait_idle()
    finally:
        await gen.aclose()
    assert answer.adapter_version == "v1" and answer.text.startswith(old)
    order = [(c.path, c.body.get("lora_name") or c.body.get("model")) for c in fake.calls]
    assert order.index(("/v1/unload_lora_adapter", old)) > order.index(("/v1/chat/completions", old))


async def test_unknown_model_is_a_404_in_vllm_shape_and_a_generation_error(fake: FakeOpenAIServer) -> None:
    async with httpx.AsyncClient(base_url=fake.base_url) as http:
        resp = await http.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT})
        unload = await http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                                     "param": "model", "code": 404}}
    assert unload.status_code == 404 and unload.json()["error"]["type"] == "NotFoundError"
    gen = client(fake)
    gen._served_base = "nope"  # as if the server had been replaced by one serving another model
    try:
        with pytest.raises(GenerationError, match="does not exist"):
            await gen.generate(CHAT)
    finally:
        await gen.aclose()
    assert len(fake.paths("/v1/chat/completions")) == 2  # a 404 is not retried


async def test_an_adapter_the_server_forgot_is_loaded_again_under_a_new_name(
    fake: FakeOpenAIServer, adapter: str
) -> None:
    gen = client(fake)
    try:
        gen.set_adapter(adapter, "v1")
        await gen.generate(CHAT)
        fake.forget_adapters()  # vLLM restarted: runtime-loaded adapters are gone
        again = await gen.generate(CHAT)
    finally:
        await gen.aclose()
    first, second = fake.ever_loaded
    assert first != second and again.adapter_version == "v1"
    assert chat_models(fake) == [first, first, second]


async def test_a_failed_load_keeps_the_previous_adapter(
    fake: FakeOpenAIServer, adapter: str, tmp_path: Path
) -> None:
    gen = client(fake)
    try:
        gen.set_adapter(adapter, "v1")
        await gen.generate(CHAT)
        gen.set_adapter(str(tmp_path / "missing"), "v2")
        out = await gen.generate(CHAT)
    finally:
        await gen.aclose()
    assert out.adapter_version == "v1" and gen.adapter_version == "v1"
    assert gen.stats.adapter_errors == 1
    assert [c.status for c in fake.paths("/v1/load_lora_adapter")] == [200, 404]


async def test_transient_errors_are_retried_within_the_budget(fake: FakeOpenAIServer) -> None:
    gen = client(fake, retries=2)
    try:
        fake.fail("/v1/chat/completions", times=2, status=503)
        ok = await gen.generate(CHAT)
        assert ok.text.startswith(BASE)
        fake.fail("/v1/chat/completions", times=3, status=503)
        with pytest.raises(ModelBusy):
            await gen.generate(CHAT)
        fake.fail("/v1/chat/completions", times=3, status=500, message="engine dead")
        with pytest.raises(GenerationError, match="engine dead"):
            await gen.generate(CHAT)
        fake.fail("/v1/chat/completions", times=1, status=400, message="prompt too long")
        with pytest.raises(GenerationError, match="prompt too long"):
            await gen.generate(CHAT)
    finally:
        await gen.aclose()
    statuses = [c.status for c in fake.paths("/v1/chat/completions")]
    assert statuses == [503, 503, 200] + [503] * 3 + [500] * 3 + [400]


async def test_timeout_and_back_pressure(fake: FakeOpenAIServer) -> None:
    gen = client(fake, timeout_s=0.3, max_queue=2, retries=0)
    try:
        await gen.generate(CHAT)  # learn the base model name first
        fake.hold()  # the server never answers these
        with pytest.raises(GenerationTimeout):
            await gen.generate(CHAT)
        gen.timeout_s = 30.0
        waiting = [asyncio.create_task(gen.generate(CHAT)) for _ in range(2)]
        await fake.wait_waiting(2)
        with pytest.raises(ModelBusy):
            await gen.generate(CHAT)
        fake.release()
        assert all(r.text for r in await asyncio.gather(*waiting))
    finally:
        await gen.aclose()
    assert gen.stats.timeouts == 1 and gen.stats.busy == 1


async def test_unreachable_server_is_a_generation_error_after_retries() -> None:
    from pg import free_port

    gen = HttpGenerator(f"http://127.0.0.1:{free_port()}", model=BASE, retries=1, backoff_s=0.01)
    try:
        assert await gen.ready() is False
        with pytest.raises(GenerationError, match="failed"):
            await gen.generate(CHAT)
    finally:
        await gen.aclose()


async def test_the_api_key_is_sent_and_a_wrong_one_says_which_setting_to_fix() -> None:
    async with FakeOpenAIServer(BASE, api_key="k-123") as server:
        good = client(server, api_key="k-123")
        bad = client(server, api_key="wrong", retries=0)
        try:
            assert (await good.generate(CHAT)).text.endswith("Where is my parcel?")
            with pytest.raises(GenerationError, match="APPRENTICE_LLM_API_KEY"):
                await bad.generate(CHAT)
        finally:
            await good.aclose()
            await bad.aclose()


async def test_adapters_are_checked_against_the_weights_the_server_loaded(
    tmp_path: Path, adapter: str, smollm2_dir: Path
) -> None:
    """vLLM names the folder it serves as `root`; an adapter trained on other weights is refused."""
    from knowledge.store import Store
    from learning import registry
    from learning.modelfiles import base_model_hash, export_base

    served, digest = export_base("SmolLM2-135M-Instruct", smollm2_dir.parent, tmp_path / "base" / "smol")
    assert digest == base_model_hash(smollm2_dir)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        registry.register(store, "v0001", Path(adapter), {"base_model": "smol", "base_hash": digest})
        registry.register(store, "v0002", Path(adapter), {"base_model": "other", "base_hash": "e" * 64})
        for root, fits in ((str(served), True), ("HuggingFaceTB/SmolLM2-135M-Instruct", False)):
            async with FakeOpenAIServer(BASE, root=root) as server:
                gen = client(server)
                try:
                    watcher = registry.AdapterWatcher(store, gen)
                    registry.promote(store, "v0001")
                    assert await watcher.check() is fits, root
                    assert gen.adapter_version == ("v0001" if fits else None)
                    if fits:
                        registry.promote(store, "v0002")  # trained on other weights: refused
                        assert not await watcher.check() and gen.adapter_version == "v0001"
                finally:
                    await gen.aclose()
    finally:
        store.close()


# --- reading the passages: vLLM's prompt_logprobs ---------------------------------------------------


async def test_likelihoods_read_the_questions_tokens_from_prompt_logprobs(fake: FakeOpenAIServer) -> None:
    gen = client(fake)
    prompts = [[{"role": "user", "content": "hours"}], [{"role": "user", "content": "parcel"}]]
    try:
        scores = await gen.likelihoods(prompts, "Where is my parcel?")
    finally:
        await gen.aclose()
    # the fake's model: -4.0 a word, -0.5 one the prompt already holds ("parcel"); only the
    # question's four tokens count, not the prompt's
    assert scores == [-4.0, (-4.0 * 3 - 0.5) / 4]
    calls = fake.paths("/v1/chat/completions")
    assert len(calls) == 2
    for call, prompt in zip(calls, prompts, strict=True):
        assert call.body["messages"] == [*prompt, {"role": "assistant", "content": "Where is my parcel?"}]
        assert (call.body["continue_final_message"], call.body["add_generation_prompt"]) == (True, False)
        assert (call.body["prompt_logprobs"], call.body["max_tokens"]) == (0, 1)


async def test_a_server_without_prompt_logprobs_stops_being_asked() -> None:
    async with FakeOpenAIServer(BASE, prompt_logprobs=False) as plain:
        gen = client(plain)
        try:
            assert gen.device == "server" and wanted(gen, "auto")
            with pytest.raises(GenerationError, match="prompt_logprobs"):
                await gen.likelihoods([[{"role": "user", "content": "parcel"}]], "Where is my parcel?")
            assert gen.device == "cpu" and not wanted(gen, "auto")
            with pytest.raises(GenerationError, match="prompt_logprobs"):
                await gen.likelihoods([[{"role": "user", "content": "parcel"}]], "Where is my parcel?")
            assert len(plain.paths("/v1/chat/completions")) == 1  # the second call asked nothing
            assert (await gen.generate(CHAT)).text == f"{BASE} says: Where is my parcel?"  # still answers
        finally:
            await gen.aclose()


def test_continuation_logprob_takes_the_prompt_token_and_refuses_a_foreign_tail() -> None:
    rows = [
        None,
        {"7": {"logprob": -1.0, "decoded_token": "Hi"}},
        {"9": {"logprob": -2.0, "decoded_token": " there"}, "3": {"logprob": -0.1, "decoded_token": " you"}},
    ]
    assert continuation_logprob({"prompt_logprobs": rows, "prompt_token_ids": [1, 7, 9]}, "there") == -2.0
    assert continuation_logprob({"prompt_logprobs": rows, "prompt_token_ids": [1, 7, 9]}, "Hi there") == -1.5
    with pytest.raises(LookupError):  # two entries and no token ids: which one is the prompt's?
        continuation_logprob({"prompt_logprobs": rows}, "there")
    with pytest.raises(LookupError):  # the template closed the turn after the question
        continuation_logprob({"prompt_logprobs": rows[:2], "prompt_token_ids": [1, 7]}, "there")
    with pytest.raises(LookupError):
        continuation_logprob({"choices": []}, "there")


async def test_conversation_over_http_answers_from_the_passage_the_model_read_best(
    fake: FakeOpenAIServer, tmp_path: Path, demo_kb: KnowledgeBase
) -> None:
    settings = Settings(
        data_dir=tmp_path, llm_url=fake.base_url, model=BASE, answer_mode="extract", rate_limit_per_minute=0
    )
    question = READ_QUESTION
    retrieved = demo_kb.retrieve(question, settings.top_k, settings.memory_threshold).passages
    gen = client(fake)
    store = Store(settings.database)
    try:
        service = ConversationService(settings, store, demo_kb, gen)
        [out] = await service.handle(Inbound("telegram", "1", "1", question, name="Ada"))
        scores = await gen.likelihoods(prompts(retrieved), question)
        titles = [s["title"] for s in store.message(out.message_id).sources]
    finally:
        await gen.aclose()
        store.close()
    chosen = retrieved[order(scores)[0]]
    assert chosen.title != retrieved[0].title  # the reading moved the answer off retrieval's first
    assert out.text.endswith(f"(From: {chosen.title})")
    assert titles[0] == chosen.title


async def test_a_server_that_refuses_the_scoring_fields_stops_being_asked(fake: FakeOpenAIServer) -> None:
    fake.fail("/v1/chat/completions", times=1, status=400, message="Extra inputs are not permitted")
    gen = client(fake)
    try:
        with pytest.raises(GenerationError):
            await gen.likelihoods([[{"role": "user", "content": "parcel"}]], "Where is my parcel?")
        assert gen.device == "cpu" and not wanted(gen, "auto")
    finally:
        await gen.aclose()
