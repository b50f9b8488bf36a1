"""The transformers engine: PyTorch decoding, peft LoRA adapters (GPUs, or APPRENTICE_ENGINE=transformers).

It keeps the `Engine` interface of learning/batching.py. Rows of a batch are padded on the left, so
the generated tokens line up at the right edge; each row stops at its own budget or when its caller
has gone. Adapters are wrapped by peft and hot-swapped: a new one is loaded under a never-reused
name before the old one is deleted, so there is no gap in service, and the base model answers
under `disable_adapter()`.

torch, transformers and peft are imported lazily (inside the functions that use them).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from typing import Any


def resolve_dtype(dtype: str) -> Any:
    """The torch dtype APPRENTICE_DTYPE names; auto is bf16."""
    import torch

    if dtype == "auto":
        # bf16 on CUDA, and on CPU too: measured faster there with the same answer quality.
        return torch.bfloat16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16.")
    return table[dtype]


def _adapter_name(counter: int, version: str) -> str:
    """peft adapter names become module keys (no dots); a counter keeps every load's name unique."""
    return f"v{counter}_{re.sub(r'[^0-9A-Za-z_]', '_', version)[:48]}"


class HfEngine:
    """A causal LM loaded by transformers, decoding greedily; LoRA adapters through peft."""

    name = "transformers"
    description = "transformers generate"

    def __init__(
        self,
        model_path: str,
        *,
        pad: int,
        eos: frozenset[int],
        repetition_penalty: float,
        dtype: str = "auto",
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device = device
        self.threads = threads
        self.dtype = resolve_dtype(dtype)
        self.repetition_penalty = repetition_penalty
        if threads:
            torch.set_num_threads(threads)
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        model.to(device)
        model.eval()
        model.requires_grad_(False)
        # A clean config replaces the model's own (which may ask for sampling): greedy, our stop tokens.
        model.generation_config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=sorted(eos),
            bos_token_id=model.generation_config.bos_token_id,
        )
        self._pad = pad
        self._base: Any = model
        self._model: Any = model  # becomes a PeftModel at the first adapter
        self._adapter_counter = 0
        self._adapter_key: str | None = None  # peft name of the active adapter; None = base model

    @property
    def base_model(self) -> Any:
        """The transformers model without adapters (read-only use: weight sizes for the roofline)."""
        return self._base

    def attach(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # OpenMP settings are per thread

    def decode(
        self, rows: Sequence[list[int]], budgets: Sequence[int], stop: Callable[[int], bool]
    ) -> tuple[list[list[int]], float | None]:
        import torch

        input_ids, attention = self._left_padded(rows)
        width = input_ids.shape[1]
        hooks = _hooks()
        stops = hooks.RowStops(budgets, stop, width)
        penalty = hooks.GeneratedRepetitionPenalty(self.repetition_penalty, width)
        processors = [penalty] if self.repetition_penalty != 1.0 else []
        with torch.inference_mode(), self._adapter_context():
            output = self._model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max(budgets),
                stopping_criteria=hooks.StoppingCriteriaList([stops]),
                logits_processor=hooks.LogitsProcessorList(processors),
            )
        new: list[list[int]] = output[:, width:].tolist()
        return new, stops.first_token_at

    def score(self, prefixes: Sequence[list[int]], continuation: list[int]) -> list[float]:
        """One forward pass over every prefix + continuation, left-padded so the continuations line up."""
        import torch

        n = len(continuation)
        input_ids, attention = self._left_padded([[*ids, *continuation] for ids in prefixes])
        width = input_ids.shape[1]
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode(), self._adapter_context():
            logits = self._model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.to(self.device),
            ).logits[:, width - n - 1 : width - 1].float()
        picked = torch.log_softmax(logits, -1).gather(-1, input_ids[:, width - n :, None].to(self.device))
        return [float(v) for v in picked[..., 0].mean(-1).tolist()]

    def _left_padded(self, rows: Sequence[list[int]]) -> tuple[Any, Any]:
        """(input_ids, attention_mask) with every row padded on the left to the longest."""
        import torch

        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        return input_ids, attention

    # --- adapters ---------------------------------------------------------------------------------
    def _adapter_context(self) -> Any:
        """Where a PeftModel serves the base model, its adapters are switched off for the call."""
        if self._model is not self._base and self._adapter_key is None:
            return self._model.disable_adapter()
        return contextlib.nullcontext()

    def use_adapter(self, path: str | None, version: str | None) -> None:
        if path is None:
            # The base model: generation runs under disable_adapter(). The last adapter stays parked
            # (peft cannot disable adapters once the last one is deleted); the next load drops it.
            self._adapter_key = None
            return
        self._adapter_key = self._load(path, version or "adapter")

    def _load(self, path: str, version: str) -> str:
        """Loads first, then drops the old adapter: no gap in service; a failed load changes nothing."""
        from peft import PeftModel

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

    @property
    def loaded_adapters(self) -> list[str]:
        """peft names of the adapters held in memory (one at most between switches)."""
        if self._model is self._base:
            return []
        return list(self._model.peft_config)


class _Hooks:
    """transformers subclasses, built on first use so importing this module stays light."""

    def __init__(self) -> None:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        self.LogitsProcessorList = LogitsProcessorList
        self.StoppingCriteriaList = StoppingCriteriaList

        class RowStops(StoppingCriteria):  # type: ignore[misc]
            """Per-row limits in a shared batch: each row's own budget, or its caller gone.

            Called after every decoding step, so its first call also timestamps the first token.
            """

            def __init__(
                self, budgets: Sequence[int], stop: Callable[[int], bool], prompt_width: int
            ) -> None:
                self.budgets = budgets
                self.stop = stop
                self.prompt_width = prompt_width
                self.first_token_at: float | None = None

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                made = input_ids.shape[1] - self.prompt_width
                done = [made >= budget or self.stop(row) for row, budget in enumerate(self.budgets)]
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
