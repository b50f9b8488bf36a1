"""The model picks the passage: retrieved passages reordered by how likely the question is after each.

Retrieval ranks passages by MiniLM and BM25; its first passage is the best of the four for about 63%
of the emanual questions (docs/answers.md). The small model cannot write a reliable answer, but it
can read: the mean log-probability of the customer's question given a passage ("write a question
this text answers"), query likelihood as in Sachan et al. 2022 ("Improving Passage Retrieval with
Zero-Shot Question Generation"), finds the passage that answers more often than retrieval's order
does. What the customer is sent (the model's reply when it passes the grounding check, else the
extract) then comes from that passage. Measured with `apprentice bench answers`; docs/answers.md
has the figures and the alternatives that did not help (MiniLM cosine to the passage or its title).

It costs a prefill of every passage: nothing on a GPU, 2.4–2.6 s an answer on one CPU core, more
than the answer's own prompt. APPRENTICE_RERANK=auto therefore reads where that is cheap (the
in-process model on CUDA, or a model server: vLLM's `prompt_logprobs`, learning/llm_http.py) and,
on a CPU, only for an answer the model does not also write (the extract, `model_writes` below):
there the reading takes the writing's place in the answer's time. A server that cannot score (an
OpenAI-compatible server other than vLLM) leaves retrieval's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeGuard

from learning.generation import Scorer
from learning.prompt import defang

if TYPE_CHECKING:
    from knowledge.passages import Passage
    from learning.generation import Messages

INSTRUCTION = "Write a question a customer could ask that this text answers."
# Each passage is read up to this many characters: the part an answer is sent from, at about a
# third of the prefill of the whole chunk.
PASSAGE_CHARS = 600
# The question is scored up to this many characters (a pasted log must not cost a long forced decode).
QUESTION_CHARS = 300
# Retrieval's order still counts: a passage must beat the one ranked above it by this many nats per
# question token per rank. Swept for the extract the customer gets (docs/answers.md): from 0.1 to 0.3
# the two emanual sets of 120 gain alike (1.021-1.036x the pasted passage against 0.982-1.002x
# unread); the demo shop's 56, where retrieval's first passage is nearly always right, lose least
# at 0.3 (0.972x against 0.990x unread; 0.930x at 0.05, the first choice, tuned on pasted passages).
PRIOR = 0.3


def cheap_prefill(generator: object) -> bool:
    """Whether `generator` prefills on a GPU (in this process, or a model server such as vLLM), where
    a prefill per passage, or a reply the grounding check may throw away, costs next to nothing."""
    return isinstance(generator, Scorer) and generator.device in ("cuda", "server")


def wanted(generator: object, mode: str, writes: bool = True) -> TypeGuard[Scorer]:
    """Whether to rerank with `generator` under APPRENTICE_RERANK=`mode` ("auto": where prefill is
    cheap, or where the model does not also write the answer, `writes` false: then the reading is the
    model's only work for the answer, 2.7 s against the 3.7 s of writing one on a CPU core)."""
    if mode == "off" or not isinstance(generator, Scorer):
        return False
    return mode == "on" or not writes or cheap_prefill(generator)


def model_writes(mode: str, generator: object, given_correction: bool) -> bool:
    """Whether the model writes this answer (else the extract, `learning.answer.cite`, is sent) under
    APPRENTICE_ANSWER_MODE=`mode`.

    "auto" writes where writing is cheap (`cheap_prefill`: a GPU in this process, or a model
    server), and where APPRENTICE_MEMORY_MODE=prompt gives the model a winning staff correction to
    word (`given_correction`). Elsewhere, on a CPU, the bundled SmolLM2-135M's replies were replaced
    by the extract for 97.5% of 120 emanual questions, the few that passed scored below the extract
    they replaced, and writing took 3.7 s an answer; near a staff correction a retrained adapter's
    replies scored below the extract too (docs/answers.md). The extract, from the passage the model
    reads as the best, is sent instead.
    """
    if mode == "extract":
        return False
    if mode != "auto":
        return True
    return given_correction or cheap_prefill(generator)


def prompts(passages: Sequence[Passage]) -> list[Messages]:
    """One chat prompt per passage: its title, its first PASSAGE_CHARS characters, the instruction."""
    # documents and questions are data: no chat-template token in them may fake a turn (prompt.defang)
    texts = [f"{defang(p.title)}\n{defang(p.text[:PASSAGE_CHARS])}\n\n{INSTRUCTION}" for p in passages]
    return [[{"role": "user", "content": text}] for text in texts]


def order(scores: Sequence[float], prior: float = PRIOR) -> list[int]:
    """Indices best first: each passage's score less `prior` per place below the first."""
    return sorted(range(len(scores)), key=lambda i: -(scores[i] - prior * i))


async def rerank(scorer: Scorer, question: str, passages: Sequence[Passage]) -> list[Passage]:
    """`passages` (documents, retrieval's order) reordered by the model; one batch of forward passes."""
    if len(passages) < 2 or not question.strip():
        return list(passages)
    scores = await scorer.likelihoods(prompts(passages), defang(question.strip()[:QUESTION_CHARS]))
    return [passages[i] for i in order(scores)]
