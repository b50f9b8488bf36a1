"""A fake OpenAI-compatible server with vLLM's shapes: a small real aiohttp server on 127.0.0.1.

Endpoints, as vLLM serves them with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`:
`GET /v1/models` (base model plus loaded adapters with `parent`), `POST /v1/chat/completions`
(`model` = base or adapter name; 404 `{"error": {"message": "The model `x` does not exist.", "type":
"NotFoundError", "param": "model", "code": 404}}` otherwise), `POST /v1/load_lora_adapter` (400 when
the name is taken, 404 when the folder holds no adapter) and `POST /v1/unload_lora_adapter` (404 for
an unknown name); both answer plain text on success, like vLLM.

With `prompt_logprobs` in a chat request (the passage reading of learning/rerank.py), the answer
also carries vLLM's `prompt_logprobs` (and `prompt_token_ids` with `return_token_ids`), from the
fake's word-overlap "model" (`prompt_logprobs()` below); `prompt_logprobs=False` makes a server that
ignores the field, as OpenAI-compatible servers other than vLLM do.

Text comes from `backend`: by default an echo (`"<model> says: <last user message>"`), or
`RuntimeBackend`, which runs the project's in-process runtime on the same weights, so the HTTP path
can be compared with the in-process one. `fail()` injects errors, `hold()` keeps answers waiting
until `release()`, `forget_adapters()` acts like a server restart. Every call is recorded.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from aiohttp import web


@dataclass
class Call:
    path: str
    body: dict[str, Any]
    status: int = 200
    at: float = field(default_factory=time.monotonic)


class Backend(Protocol):
    async def complete(
        self, model: str, adapter_path: str | None, messages: list[dict[str, str]], max_tokens: int
    ) -> tuple[str, int, int]: ...


class EchoBackend:
    """Deterministic text from the request: which model answered and what the customer said."""

    async def complete(
        self, model: str, adapter_path: str | None, messages: list[dict[str, str]], max_tokens: int
    ) -> tuple[str, int, int]:
        last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        words = f"{model} says: {last.splitlines()[-1] if last else ''}".split()
        text = " ".join(words[:max_tokens])
        return text, sum(len(m.get("content", "").split()) for m in messages), len(text.split())


class RuntimeBackend:
    """The project's LocalRuntime on the same weights: what vLLM would compute, minus the GPU."""

    def __init__(self, model_dir: Path, name: str, **options: Any) -> None:
        from learning.runtime import load_local

        self.runtime = load_local(str(model_dir), name=name, **options)
        self._lock = asyncio.Lock()
        self._adapter: tuple[str | None, str | None] = (None, None)

    async def complete(
        self, model: str, adapter_path: str | None, messages: list[dict[str, str]], max_tokens: int
    ) -> tuple[str, int, int]:
        async with self._lock:  # one adapter at a time: switch, then answer
            wanted = (adapter_path, model if adapter_path else None)
            if wanted != self._adapter:
                self.runtime.set_adapter(*wanted)
                self._adapter = wanted
            gen = await self.runtime.generate(messages, max_tokens)
        return gen.text, gen.prompt_tokens, gen.new_tokens

    def close(self) -> None:
        self.runtime.close()


_TOKEN = re.compile(r"\s*\S+")


def prompt_logprobs(
    messages: list[dict[str, str]], continue_final: bool
) -> tuple[list[dict[str, dict[str, Any]] | None], list[int]]:
    """vLLM's `prompt_logprobs` for the rendered prompt, one entry per prompt token (None for the
    first), each {token id: {"logprob", "rank", "decoded_token"}}, and the prompt's token ids.

    The fake's template is "<|role|>\ncontent\n" per message (the last one left open with
    `continue_final_message`) and its tokens are words with their leading space. Its "model" finds a
    word likely (-0.5) when an earlier message holds it, else unlikely (-4.0): a passage that shares
    the question's words makes the question more likely, as a real model's reading does.
    """
    parts = []
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        end = "" if last and continue_final else "\n"
        parts.append(f"<|{m.get('role')}|>\n{m.get('content', '')}{end}")
    tokens = _TOKEN.findall("".join(parts))
    rows: list[dict[str, dict[str, Any]] | None] = []
    ids: list[int] = []
    seen: set[str] = set()
    for n, tok in enumerate(tokens):
        word = tok.strip().strip("?!.,").casefold()
        tid = zlib.crc32(tok.encode()) % 49_152
        ids.append(tid)
        logprob = -0.5 if word in seen else -4.0
        rows.append(None if n == 0 else {str(tid): {"logprob": logprob, "rank": 1, "decoded_token": tok}})
        seen.add(word)
    return rows, ids


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status=status
    )


@dataclass
class _Failure:
    status: int
    times: int
    message: str


class FakeOpenAIServer:
    """`async with FakeOpenAIServer("base") as fake:` then point the client at `fake.base_url`."""

    def __init__(
        self,
        base_model: str = "base-model",
        backend: Backend | None = None,
        *,
        root: str = "",
        api_key: str = "",
        prompt_logprobs: bool = True,
    ) -> None:
        self.base_model = base_model
        # vLLM answers `prompt_logprobs`; other OpenAI-compatible servers ignore the field
        self.prompt_logprobs = prompt_logprobs
        self.root = root or base_model  # what vLLM was started with: a folder or a hub id
        self.api_key = api_key  # vLLM's --api-key: every /v1 request needs "Authorization: Bearer <key>"
        self.backend: Backend = backend or EchoBackend()
        self.adapters: dict[str, str] = {}  # served name -> path (loaded now)
        self.ever_loaded: list[str] = []
        self.calls: list[Call] = []
        self._failures: dict[str, _Failure] = {}
        self._gate: asyncio.Event | None = None
        self.waiting = 0  # chat requests held by hold()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        self.app = app

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control -----------------------------------------------------------------------------------
    def fail(self, path: str, times: int = 1, status: int = 503, message: str = "Unavailable") -> None:
        """The next `times` calls of `path` answer `status` with vLLM's error body."""
        self._failures[path] = _Failure(status, times, message)

    def hold(self) -> None:
        """Chat answers wait until `release()` (to test answers in flight)."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def wait_waiting(self, n: int) -> None:
        """Wait until `n` chat requests are held."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.waiting >= n)

    def forget_adapters(self) -> None:
        """What a server restart does to adapters loaded at runtime."""
        self.adapters.clear()

    def paths(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> FakeOpenAIServer:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = getattr(site, "_server", None)
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAIServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- handlers ----------------------------------------------------------------------------------
    async def _record(self, request: web.Request) -> tuple[Call, web.Response | None]:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            call = Call(request.path, {}, 401)
            self.calls.append(call)
            return call, web.json_response({"error": "Unauthorized"}, status=401)  # vLLM's own answer
        body: dict[str, Any] = {}
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                call = Call(request.path, {}, 400)
                self.calls.append(call)
                return call, _error(400, "Invalid JSON body", "BadRequestError")
        call = Call(request.path, body)
        self.calls.append(call)
        failure = self._failures.get(request.path)
        if failure is not None and failure.times > 0:
            failure.times -= 1
            call.status = failure.status
            kind = "InternalServerError" if failure.status >= 500 else "BadRequestError"
            return call, _error(failure.status, failure.message, kind)
        return call, None

    async def _models(self, request: web.Request) -> web.Response:
        _call, failed = await self._record(request)
        if failed is not None:
            return failed
        created = int(time.time())
        perm = [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created}]
        cards = [{"id": self.base_model, "object": "model", "created": created, "owned_by": "vllm",
                  "root": self.root, "parent": None, "max_model_len": 2048, "permission": perm}]
        cards += [{"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": path,
                   "parent": self.base_model, "max_model_len": None, "permission": perm}
                  for name, path in self.adapters.items()]
        return web.json_response({"object": "list", "data": cards})

    async def _chat(self, request: web.Request) -> web.Response:
        call, failed = await self._record(request)
        if failed is not None:
            return failed
        body = call.body
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            call.status = 400
            return _error(400, "messages: Field required", "BadRequestError", "messages")
        if body.get("stream"):
            call.status = 400
            return _error(400, "this fake answers stream=false only", "BadRequestError", "stream")
        if model != self.base_model and model not in self.adapters:
            call.status = 404
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        if self._gate is not None:
            gate = self._gate
            async with self._arrived:
                self.waiting += 1
                self._arrived.notify_all()
            try:
                await gate.wait()
            finally:
                self.waiting -= 1
        max_tokens = int(body.get("max_tokens") or 16)
        text, prompt_tokens, completion_tokens = await self.backend.complete(
            str(model), self.adapters.get(str(model)), messages, max_tokens
        )
        extra: dict[str, Any] = {}
        if self.prompt_logprobs and body.get("prompt_logprobs") is not None:
            rows, ids = prompt_logprobs(messages, bool(body.get("continue_final_message")))
            extra["prompt_logprobs"] = rows
            if body.get("return_token_ids"):
                extra["prompt_token_ids"] = ids
        return web.json_response({
            **extra,
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                         "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def _load(self, request: web.Request) -> web.Response:
        call, failed = await self._record(request)
        if failed is not None:
            return failed
        name, path = call.body.get("lora_name"), call.body.get("lora_path")
        if not name or not path:
            call.status = 400
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.adapters:
            call.status = 400
            return _error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        if not (Path(path) / "adapter_config.json").is_file():
            call.status = 404
            return _error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        self.adapters[name] = path
        self.ever_loaded.append(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        call, failed = await self._record(request)
        if failed is not None:
            return failed
        name = call.body.get("lora_name")
        if name not in self.adapters:
            call.status = 404
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
