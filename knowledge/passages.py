"""Plain records that cross the layers: what retrieval found."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Passage:
    """One retrieved piece of text.

    `score` is the dense cosine similarity to the query (0..1, comparable to the
    relevance and memory thresholds); `kind` is "document" or "correction".
    """

    text: str
    title: str
    source: str
    score: float
    kind: str = "document"
    chunk_id: str = ""
    correction_id: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "title": self.title,
            "source": self.source,
            "score": round(self.score, 4),
            "kind": self.kind,
            "chunk_id": self.chunk_id,
            "correction_id": self.correction_id,
        }


@dataclass
class Retrieval:
    """What the conversation flow gets back for one question."""

    passages: list[Passage] = field(default_factory=list)
    memory: Passage | None = None  # the correction that won, if any

    @property
    def best_score(self) -> float:
        scores = [p.score for p in self.passages]
        if self.memory is not None:
            scores.append(self.memory.score)
        return max(scores, default=0.0)

    @property
    def all(self) -> list[Passage]:
        return ([self.memory] if self.memory else []) + self.passages
