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
than the answer's own prompt. APPRENTICE_RERANK=auto therefore reads on a GPU only: the in-process
model on CUDA, or a model server (vLLM's `prompt_logprobs`, learning/llm_http.py). A server that
cannot score (an OpenAI-compatible server other than vLLM) leaves retrieval's order.
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
# question token per rank. 0.05 was best on 120 emanual questions (seed 0) and held on another 120.
PRIOR = 0.05


def wanted(generator: object, mode: str) -> TypeGuard[Scorer]:
    """Whether to rerank with `generator` under APPRENTICE_RERANK=`mode` ("auto": where prefill is
    cheap, a GPU in this process or a model server such as vLLM)."""
    if mode == "off" or not isinstance(generator, Scorer):
        return False
    return mode == "on" or generator.device in ("cuda", "server")


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
