"""The opt-in int8 weight-only CPU decoding path (LocalRuntime(weights="int8")): every linear layer is
quantised, logits stay close to the full-precision model's, batches still match single answers, and
adapters still hot-swap (merged into a quantised copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from learning.runtime import LocalRuntime, quantize_int8

PROMPTS = ["Where is my order?", "Can I pay with PayPal?", "Do you ship to Norway?"]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a support bot."}, {"role": "user", "content": question}]


def int8(model_dir: Path) -> LocalRuntime:
    return LocalRuntime(
        str(model_dir), name="tiny", dtype="float32", max_new_tokens=6, timeout_s=120.0, weights="int8"
    )


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with large B weights, so that it visibly changes the tiny model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("int8-adapter")
    model.save_pretrained(str(out))
    return out


def test_every_linear_is_quantised_and_logits_stay_close(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    quant = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in full.modules())
    assert quantize_int8(quant) == n_linear > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in quant.modules())
    ids = torch.randint(0, 1000, (2, 12))
    with torch.inference_mode():
        for rows in (ids[:1, :1], ids):  # one row (the int8 kernel) and many (dequantised)
            a, b = full(input_ids=rows).logits, quant(input_ids=rows).logits
            assert torch.allclose(a, b, atol=0.05 * a.abs().max().item()), (a - b).abs().max()


def test_batched_answers_match_single_answers(tiny_model_dir: Path) -> None:
    rt = int8(tiny_model_dir)
    try:
        alone = [rt.generate_batch([chat(q)])[0].text for q in PROMPTS]
        together = [g.text for g in rt.generate_batch([chat(q) for q in PROMPTS])]
        assert rt.decode_path.endswith("int8 weight-only")
    finally:
        rt.close()
    assert together == alone


async def test_adapters_hot_swap_on_quantised_weights(tiny_model_dir: Path, adapter_dir: Path) -> None:
    rt = int8(tiny_model_dir)
    question = chat(PROMPTS[0])
    try:
        base = await rt.generate(question)
        rt.set_adapter(str(adapter_dir), "v0001")
        adapted = await rt.generate(question)
        assert adapted.adapter_version == "v0001" and adapted.text != base.text
        assert len(rt.loaded_adapters) == 1
        rt.set_adapter(None, None)
        again = await rt.generate(question)
        assert again.adapter_version is None and again.text == base.text
        assert rt.stats.adapter_switches == 2 and rt.stats.adapter_errors == 0
    finally:
        await rt.aclose()


def test_unknown_weight_modes_are_refused_by_name(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="one of native, int8"):
        LocalRuntime(str(tiny_model_dir), weights="int4", start=False)
