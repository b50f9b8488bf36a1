"""A scripted generator for conversation mechanics tests (like simonw/llm's MockModel)."""

from __future__ import annotations

from learning.generation import Generation


class ScriptedModel:
    """A scripted generator (like simonw/llm's MockModel): replies queued with `enqueue`, records prompts."""

    model_name = "scripted"
    adapter_version: str | None = None

    def __init__(self) -> None:
        self.replies: list[str | BaseException] = []
        self.prompts: list[list[dict[str, str]]] = []

    def enqueue(self, *replies: str | BaseException) -> None:
        self.replies.extend(replies)

    async def generate(self, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> Generation:
        self.prompts.append(messages)
        reply = self.replies.pop(0) if self.replies else "scripted answer"
        if isinstance(reply, BaseException):
            raise reply
        return Generation(reply, "scripted", self.adapter_version, 10, 3, 0.01, 0.01)

    def set_adapter(self, path: str | None, version: str | None) -> None:
        self.adapter_version = version

    async def aclose(self) -> None:
        return None
