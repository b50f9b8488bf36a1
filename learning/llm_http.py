"""Generation through an OpenAI-compatible server (vLLM started with `--enable-lora`).

`HttpGenerator` implements the `Generator` contract (learning/generation.py) over
`POST /v1/chat/completions`: greedy (temperature 0), streaming off, one overall deadline per answer
with retries inside it. It also reads (`Scorer`, learning/rerank.py) through vLLM's
`prompt_logprobs` on the same endpoint. The server does the batching; this side only bounds how
many requests may wait (`max_queue`).
The server tokenizes, so prompts arrive here within their token budget already
(`learning.prompt.answer_messages`: the context window, APPRENTICE_CONTEXT_TOKENS = the server's
--max-model-len, less `max_tokens`), counted in UTF-8 bytes when the model is not on this machine.

Adapters are loaded at runtime with `POST /v1/load_lora_adapter` under a NEW name for every load
(`<version>-<random>`): vLLM caches adapters by name, and loading new weights under a reused name
can serve the stale ones. After the switch, the old name is unloaded once the answers still using
it have finished. If the server forgets an adapter (it was restarted), the adapter is loaded again
under a fresh name and the request retried once. The adapter folder must be readable by the server
at the same path (a shared volume); see README "Scaling out".

httpx is imported here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from learning.generation import (
    Generation,
    GenerationError,
    GenerationTimeout,
    Messages,
    ModelBusy,
    RuntimeStats,
)

if TYPE_CHECKING:
    from knowledge.settings import Settings

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BUSY_STATUSES = frozenset({429, 503})


class ServerError(Exception):
    """An HTTP error answer from the server, with vLLM's error body decoded."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(f"{status} {kind}: {message}".strip())
        self.status, self.message, self.kind = status, message, kind


def adapter_name(version: str) -> str:
    """A fresh, never-reused served name for one load of `version` (vLLM keys its cache by name)."""
    safe = re.sub(r"[^0-9A-Za-z._-]", "-", version)[:48] or "adapter"
    return f"{safe}-{uuid.uuid4().hex[:10]}"


def _error_of(resp: httpx.Response) -> ServerError:
    """vLLM's error bodies: {"error": {"message", "type", "code"}} (new) or flat {"message", ...} (old)."""
    message, kind = resp.text[:500], ""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message", message))
            kind = str(err.get("type", ""))
        elif isinstance(err, str):
            message = err
    return ServerError(resp.status_code, message, kind)


class HttpGenerator:
    """The `Generator` contract over an OpenAI-compatible HTTP server. Use it from one event loop."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        timeout_s: float = 60.0,
        retries: int = 2,
        max_queue: int = 64,
        max_new_tokens: int = 160,
        backoff_s: float = 0.25,
        api_key: str = "",
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"APPRENTICE_LLM_URL must look like http://host:8000, got {base_url!r}.")
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self._name = model
        self.timeout_s = timeout_s
        self.retries = max(0, retries)
        self.max_queue = max_queue
        self.max_new_tokens = max_new_tokens
        self.backoff_s = backoff_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.stats = RuntimeStats()
        self._served_base: str | None = None  # the server's id of the base model, learned from /v1/models
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard = threading.Lock()  # set_adapter may come from any thread
        self._pending: tuple[str | None, str | None] | None = None
        self._requested_version: str | None = None
        # the adapter in use: (served name, path, version); name None = the base model
        self._current: tuple[str | None, str | None, str | None] = (None, None, None)
        self._switch_lock: asyncio.Lock | None = None
        self._inflight: dict[str | None, int] = {}
        self._drained: asyncio.Condition | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._cannot_score = False  # the server answered without prompt_logprobs (not vLLM)

    # --- Generator --------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._name

    @property
    def adapter_version(self) -> str | None:
        """The version new requests will be answered with (the latest `set_adapter`)."""
        return self._requested_version

    @property
    def queue_depth(self) -> int:
        return sum(self._inflight.values())

    def set_adapter(self, path: str | None, version: str | None) -> None:
        """Serve `path` as `version` from the next request on (None: the base model). Returns at once.

        The load happens on the event loop before the next answer. A failed load is logged and
        counted in `stats.adapter_errors`; the previous adapter stays in use.
        """
        if path is not None and not version:
            raise ValueError("an adapter needs a version name (it is recorded with every answer).")
        with self._guard:
            self._pending = (path, version)
            self._requested_version = version
            loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing: the next start applies it
                asyncio.run_coroutine_threadsafe(self.sync_adapter(), loop)

    async def generate(self, messages: Messages, max_new_tokens: int | None = None) -> Generation:
        """Answer one conversation. Raises ModelBusy, GenerationTimeout or GenerationError."""
        submitted = time.perf_counter()
        max_tokens = max_new_tokens or self.max_new_tokens
        body, version = await self._send(lambda name, until: self._chat(name, messages, max_tokens, until))
        choice = (body.get("choices") or [{}])[0]
        text = str((choice.get("message") or {}).get("content") or "")
        usage = body.get("usage") or {}
        self.stats.requests += 1
        self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.stats.new_tokens += int(usage.get("completion_tokens") or 0)
        return Generation(
            text=text,
            model=self._name,
            adapter_version=version,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            new_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=time.perf_counter() - submitted,
        )

    # --- Scorer -------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """ "server": the model server does the prefill (a GPU, with vLLM), so reading the passages is
        cheap and APPRENTICE_RERANK=auto reads; "cpu" once the server has shown it cannot score."""
        return "cpu" if self._cannot_score else "server"

    async def likelihoods(self, prompts: list[Messages], continuation: str) -> list[float]:
        """Mean log-probability per token of `continuation` as the assistant's reply to each prompt.

        One request per prompt, all at once: the conversation with `continuation` as an unfinished
        assistant turn (`continue_final_message`), one new token, and vLLM's `prompt_logprobs` of
        the prompt's own tokens. The continuation's tokens are the last ones whose decoded text
        spells it. A server that answers without `prompt_logprobs` (not vLLM) cannot score: that is
        remembered, and `device` stops asking for reading.
        """
        if not prompts or not continuation.strip():
            raise ValueError("likelihoods needs at least one prompt and a non-empty continuation.")
        if self._cannot_score:
            raise GenerationError(f"the model server at {self.base_url} does not return prompt_logprobs.")

        async def one(prompt: Messages) -> float:
            turns = [*prompt, {"role": "assistant", "content": continuation}]
            body, _version = await self._send(lambda served, deadline: self._score(served, turns, deadline))
            try:
                return continuation_logprob(body, continuation)
            except LookupError as exc:
                if "prompt_logprobs" not in body:
                    self._stop_scoring("returns no prompt_logprobs")
                raise GenerationError(f"the model server's prompt_logprobs cannot be read: {exc}") from None

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    def _stop_scoring(self, why: str) -> None:
        if not self._cannot_score:
            self._cannot_score = True
            log.warning(
                "the model server at %s %s, so the passages stay in retrieval's order (vLLM reads "
                "them; APPRENTICE_RERANK=off stops asking)", self.base_url, why,
            )

    async def _send(
        self, request: Callable[[str, float], Awaitable[dict[str, Any]]]
    ) -> tuple[dict[str, Any], str | None]:
        """`request(served model name, deadline)` as every request to the model goes: after a pending
        adapter switch, within `max_queue`, on the adapter in use, which is loaded again once if the
        server lost it. Returns the body and the adapter version that answered."""
        await self._ensure_started()
        assert self._switch_lock is not None
        if self._pending is not None or self._switch_lock.locked():
            # also when another request is loading the adapter right now: answers wait for the
            # switch instead of slipping out on the previous adapter (the base, after a restart)
            await self.sync_adapter()
        if self.queue_depth >= self.max_queue:
            self.stats.busy += 1
            raise ModelBusy(f"{self.max_queue} requests are already waiting for {self.base_url}.")
        deadline = time.perf_counter() + self.timeout_s
        reloaded = False
        while True:
            name, _path, version = self._current
            self._inflight[name] = self._inflight.get(name, 0) + 1
            try:
                served = name or await self._base_name(deadline)
                return await request(served, deadline), version
            except (ServerError, httpx.HTTPError, TimeoutError) as exc:
                if isinstance(exc, ServerError) and exc.status == 404 and name is not None and not reloaded:
                    # The server lost the adapter (restarted?): load it again under a new name, once.
                    log.warning("server does not know adapter %s; loading %s again", name, version)
                    reloaded = True
                    await self._reload_current(name)
                    continue
                self._count_failure(exc)
                raise self._translate(exc) from None
            finally:
                await self._release(name)

    async def aclose(self) -> None:
        """Unload what this process loaded, and close the connections."""
        for task in list(self._background):
            task.cancel()
        name = self._current[0]
        if self._client is not None:
            if name is not None:
                with contextlib.suppress(Exception):
                    await self._post("/v1/unload_lora_adapter", {"lora_name": name}, time.perf_counter() + 5)
            await self._client.aclose()
            self._client = None
        self._current = (None, None, None)

    # --- readiness ---------------------------------------------------------------------------------
    async def ready(self) -> bool:
        """True when the server answers /v1/models (for /readyz)."""
        await self._ensure_started()
        try:
            await self._models(time.perf_counter() + min(5.0, self.timeout_s))
        except (ServerError, httpx.HTTPError, TimeoutError):
            return False
        return True

    # --- adapters -----------------------------------------------------------------------------------
    async def sync_adapter(self) -> None:
        """Apply the latest `set_adapter` now (load, switch, then unload the old name)."""
        await self._ensure_started()
        assert self._switch_lock is not None
        async with self._switch_lock:
            with self._guard:
                pending, self._pending = self._pending, None
            if pending is None:
                return
            path, version = pending
            old_name, old_path, old_version = self._current
            if (path, version) == (old_path, old_version) and (path is None or old_name is not None):
                return
            new_name: str | None = None
            if path is not None:
                assert version is not None
                new_name = adapter_name(version)
                try:
                    await self._post(
                        "/v1/load_lora_adapter",
                        {"lora_name": new_name, "lora_path": path},
                        time.perf_counter() + self.timeout_s,
                    )
                except (ServerError, httpx.HTTPError, TimeoutError) as exc:
                    self.stats.adapter_errors += 1
                    log.error(
                        "the model server could not load adapter %s from %s (%s); still serving %s. "
                        "The folder must be readable by the server at that same path.",
                        version, path, exc, old_version or "the base model",
                    )
                    with self._guard:
                        if self._pending is None:
                            self._requested_version = old_version
                    return
            self._current = (new_name, path, version)
            self.stats.adapter_switches += 1
            log.info("serving adapter %s as %s", version or "(base model)", new_name or self._served_base)
            if old_name is not None:
                self._spawn(self._unload_when_idle(old_name))

    async def _reload_current(self, lost: str) -> None:
        _name, path, version = self._current
        with self._guard:
            if self._pending is None:
                self._pending = (path, version)
        assert self._switch_lock is not None
        async with self._switch_lock:
            if self._current[0] == lost:
                self._current = (None, None, None)  # forget the lost name so the load happens
        await self.sync_adapter()
        if self._current[1] != path:
            raise GenerationError(f"the model server lost adapter {version} and could not load it again.")

    async def _unload_when_idle(self, name: str) -> None:
        assert self._drained is not None
        async with self._drained:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._drained.wait_for(lambda: not self._inflight.get(name)), self.timeout_s
                )
        try:
            deadline = time.perf_counter() + self.timeout_s
            await self._post("/v1/unload_lora_adapter", {"lora_name": name}, deadline)
        except ServerError as exc:
            if exc.status != 404:  # 404: already gone (server restarted)
                log.warning("could not unload adapter %s: %s", name, exc)
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning("could not unload adapter %s: %s", name, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_idle(self) -> None:
        """Wait for background unloads (tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # --- HTTP ---------------------------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return
        if self._client is not None:  # a new event loop (tests): connections belong to the old one
            with contextlib.suppress(Exception):
                await self._client.aclose()
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=max(8, self.max_queue), max_keepalive_connections=32),
            trust_env=False,
        )
        self._switch_lock = asyncio.Lock()
        self._drained = asyncio.Condition()
        with self._guard:
            self._loop = loop  # a loaded adapter belongs to the server, not the loop: it stays in use

    async def _release(self, name: str | None) -> None:
        self._inflight[name] = self._inflight.get(name, 1) - 1
        if self._drained is not None and not self._inflight[name]:
            async with self._drained:
                self._drained.notify_all()

    async def _base_name(self, deadline: float) -> str:
        if self._served_base is None:
            models = await self._models(deadline)
            bases = [str(m["id"]) for m in models if not m.get("parent")]
            if not bases:
                raise GenerationError(f"{self.base_url}/v1/models lists no base model.")
            if self._name in bases:
                self._served_base = self._name
            else:
                log.warning(
                    "the model server serves %s, not APPRENTICE_MODEL=%s; using %s "
                    "(start vLLM with --served-model-name %s to match)",
                    bases, self._name, bases[0], self._name,
                )
                self._served_base = bases[0]
        return self._served_base

    async def base_hash(self) -> str:
        """The hash of the weights the server answers with, so adapters are checked against them.

        vLLM's /v1/models names the folder it loaded as the base's `root`. On the shared data volume
        (the same path here and in vLLM) it is hashed as the in-process runtime hashes its own base;
        a hub id cannot be checked, and adapters trained on the bundled model do not fit it.
        """
        from learning.modelfiles import ModelUnavailable, base_model_hash

        await self._ensure_started()
        models = await self._models(time.perf_counter() + self.timeout_s)
        roots = [str(m.get("root") or m["id"]) for m in models if not m.get("parent")]
        if not roots:
            raise GenerationError(f"{self.base_url}/v1/models lists no base model.")
        folder = Path(roots[0])
        if not (folder.is_dir() and any(folder.glob("*.safetensors"))):
            raise ModelUnavailable(
                f"the model server serves {roots[0]!r}, not a model folder this process can read, so "
                "adapters cannot be checked against it (a hub copy differs from the weights they were "
                "trained on). Run `apprentice export-base /data/base/MODEL` and serve that folder from the "
                "shared volume (README: Deploy, vLLM); until then the base model answers."
            )
        return await asyncio.to_thread(base_model_hash, folder)

    async def _models(self, deadline: float) -> list[dict[str, Any]]:
        body = await self._request("GET", "/v1/models", None, deadline)
        return list(body.get("data") or [])

    async def _chat(self, model: str, messages: Messages, max_tokens: int, deadline: float) -> dict[str, Any]:
        payload = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": False,
        }
        return await self._request("POST", "/v1/chat/completions", payload, deadline)

    async def _score(self, model: str, messages: Messages, deadline: float) -> dict[str, Any]:
        payload = {
            "model": model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0,
            "stream": False,
            "add_generation_prompt": False,
            "continue_final_message": True,
            "prompt_logprobs": 0,  # the prompt token's own log-probability only
            "return_token_ids": True,
        }
        try:
            return await self._request("POST", "/v1/chat/completions", payload, deadline)
        except ServerError as exc:
            if exc.status == 400:  # a server that does not take these fields will not later
                self._stop_scoring(f"refuses a scoring request ({exc.message[:200]})")
            raise

    async def _post(self, path: str, payload: dict[str, Any], deadline: float) -> dict[str, Any]:
        return await self._request("POST", path, payload, deadline)

    async def _request(
        self, method: str, path: str, payload: dict[str, Any] | None, deadline: float
    ) -> dict[str, Any]:
        """One call with retries on connection errors and 429/5xx, all within `deadline`."""
        assert self._client is not None
        attempt = 0
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"{method} {path}: no answer within {self.timeout_s:g} s")
            try:
                resp = await self._client.request(method, path, json=payload, timeout=left)
            except httpx.TimeoutException:
                raise TimeoutError(f"{method} {path}: no answer within {self.timeout_s:g} s") from None
            except httpx.TransportError as exc:
                error: Exception = exc
            else:
                if resp.status_code < 400:
                    try:
                        body = resp.json()
                    except ValueError:  # load/unload answer in plain text ("Success: ...")
                        return {"text": resp.text}
                    return body if isinstance(body, dict) else {"data": body}
                error = _error_of(resp)
                if resp.status_code not in RETRY_STATUSES:
                    raise error
            if attempt >= self.retries:
                raise error
            attempt += 1
            delay = min(self.backoff_s * 2 ** (attempt - 1), max(0.0, deadline - time.perf_counter()))
            log.info("%s %s failed (%s); retry %d/%d in %.2fs", method, path, error, attempt, self.retries,
                     delay)
            await asyncio.sleep(delay)

    # --- errors -------------------------------------------------------------------------------------
    def _count_failure(self, exc: Exception) -> None:
        if isinstance(exc, ServerError) and exc.status in BUSY_STATUSES:
            self.stats.busy += 1
        elif isinstance(exc, TimeoutError):
            self.stats.timeouts += 1
        else:
            self.stats.errors += 1

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, ServerError) and exc.status in BUSY_STATUSES:
            return ModelBusy(f"the model server at {self.base_url} is overloaded ({exc.status}).")
        if isinstance(exc, TimeoutError):
            return GenerationTimeout(
                f"{self.base_url} gave no answer within {self.timeout_s:g} s "
                "(raise APPRENTICE_LLM_TIMEOUT_S or add model servers)."
            )
        if isinstance(exc, ServerError) and exc.status == 401:
            return GenerationError(
                f"the model server at {self.base_url} refused the API key: set APPRENTICE_LLM_API_KEY "
                "to the key vLLM was started with (--api-key)."
            )
        if isinstance(exc, ServerError) and exc.status == 404:
            return GenerationError(
                f"the model server does not serve that model: {exc.message} "
                "(check APPRENTICE_MODEL and the server's --served-model-name)."
            )
        return GenerationError(f"the model server at {self.base_url} failed: {exc}")


def continuation_logprob(body: dict[str, Any], continuation: str) -> float:
    """The mean log-probability of `continuation`'s tokens in a vLLM answer with `prompt_logprobs`.

    vLLM lists, for every prompt token but the first, {token id: {"logprob", "rank",
    "decoded_token"}}: with `prompt_logprobs: 0` the prompt token alone (`prompt_token_ids`, when
    returned, names it where there are more). The continuation is the prompt's end, so its tokens
    are the last ones, taken back to front until their decoded text holds it. Raises LookupError
    when the answer has no such list or its tokens do not end with `continuation`.
    """
    rows = body.get("prompt_logprobs")
    if not isinstance(rows, list) or not rows:
        raise LookupError("no prompt_logprobs in the answer")
    ids = body.get("prompt_token_ids")
    want = " ".join(continuation.split())
    text, logprobs = "", []
    for i in range(len(rows) - 1, -1, -1):
        row = rows[i]
        if not isinstance(row, dict) or not row:
            break
        key = str(ids[i]) if isinstance(ids, list) and len(ids) == len(rows) else ""
        entry = row.get(key) or (next(iter(row.values())) if len(row) == 1 else None)
        if not isinstance(entry, dict):
            raise LookupError(f"prompt token {i} has {len(row)} log-probabilities and no token id")
        text = str(entry.get("decoded_token") or "") + text
        logprobs.append(float(entry.get("logprob", -9999.0)))
        if len(" ".join(text.split())) >= len(want):
            break
    if not " ".join(text.split()).endswith(want):
        raise LookupError("the prompt's last tokens are not the continuation")
    return sum(logprobs) / len(logprobs)


def build_http_generator(settings: Settings) -> HttpGenerator:
    """The HTTP backend the settings describe (APPRENTICE_LLM_URL and friends)."""
    return HttpGenerator(
        settings.llm_url,
        model=settings.model,
        timeout_s=settings.llm_timeout_s,
        retries=settings.llm_retries,
        max_queue=settings.max_queue,
        max_new_tokens=settings.max_new_tokens,
        api_key=settings.llm_api_key.get_secret_value(),
    )


__all__ = ["HttpGenerator", "ServerError", "adapter_name", "build_http_generator", "continuation_logprob"]
