"""A fake Telegram Bot API: a small real aiohttp server on 127.0.0.1 that records every call.

Point python-telegram-bot (or any client) at `fake.base_url` (`http://127.0.0.1:PORT/bot`; PTB
appends the token). Updates are pushed with `push_message`/`push_callback`/`push_update` and
served by `getUpdates` long polls, which wake at once when an update arrives or the server stops.
`fail(method, times, status)` makes the next calls of a method fail like Telegram does
(429 with `retry_after`, 5xx, 403 "bot was blocked"). Tests wait on calls with
`await fake.wait_for("sendMessage", predicate)` instead of sleeping.

PTB form-encodes parameters: strings raw, everything else as JSON. The fake JSON-decodes every
form parameter except free-text ones (`text`, `caption`, ...), and also accepts JSON bodies.

Usable outside pytest too (tests/bench/load_telegram.py): `async with FakeTelegramApi() as fake: ...`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pytest
from aiohttp import web

TOKEN = "123456:TEST-token"
BOT = {
    "id": 123456,
    "is_bot": True,
    "first_name": "Apprentice",
    "username": "apprentice_test_bot",
    "can_join_groups": True,
    "can_read_all_group_messages": False,
    "supports_inline_queries": False,
}
# parameters that carry free text and must not be JSON-decoded ("123" stays a string)
TEXT_PARAMS = frozenset(
    {
        "text",
        "caption",
        "url",
        "secret_token",
        "callback_query_id",
        "inline_message_id",
        "description",
        "short_description",
        "title",
        "name",
        "question",
        "action",
        "emoji",
        "query",
    }
)


@dataclass
class Call:
    """One request the fake received."""

    method: str
    params: dict[str, Any]
    status: int = 200
    at: float = field(default_factory=time.monotonic)
    token: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class _Failure:
    status: int
    times: int
    retry_after: int | None
    description: str


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in TEXT_PARAMS:
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


class FakeTelegramApi:
    """The Bot API methods a support bot uses, with call recording and failure injection."""

    def __init__(self, token: str = TOKEN, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token, self.host, self.port = token, host, port
        self.calls: list[Call] = []
        self.webhook: dict[str, Any] = {"url": ""}
        self._pending: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1000)
        self._message_ids = itertools.count(1)
        self._callback_ids = itertools.count(1)
        self._failures: dict[str, list[_Failure]] = {}
        self._changed = asyncio.Condition()
        self._closing = False
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._app = app

    # --- lifecycle -------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """What PTB's `base_url` wants (no trailing slash; PTB appends the token)."""
        return f"http://{self.host}:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://{self.host}:{self.port}/file/bot"

    async def start(self) -> FakeTelegramApi:
        self._closing = False
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._closing = True
        await self._notify()  # wake long polls so shutdown does not wait out their timeout
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegramApi:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- what the test does -----------------------------------------------------------
    def fail(
        self,
        method: str,
        times: int = 1,
        status: int = 500,
        retry_after: int | None = None,
        description: str = "",
    ) -> None:
        """Make the next `times` calls of `method` fail with `status` (429 gets `retry_after`)."""
        if status == 429 and retry_after is None:
            retry_after = 1
        if not description:
            description = {
                429: f"Too Many Requests: retry after {retry_after}",
                403: "Forbidden: bot was blocked by the user",
                400: "Bad Request: chat not found",
            }.get(status, "Internal Server Error" if status < 502 else "Bad Gateway")
        self._failures.setdefault(method, []).append(_Failure(status, times, retry_after, description))

    def clear_failures(self) -> None:
        """Forget every failure still planned (the outage is over)."""
        self._failures.clear()

    def next_update_id(self) -> int:
        return next(self._update_ids)

    async def push_update(self, update: dict[str, Any]) -> int:
        """Queue a raw update for getUpdates (an `update_id` is added if missing)."""
        update = dict(update)
        update.setdefault("update_id", self.next_update_id())
        self._pending.append(update)
        await self._notify()
        return int(update["update_id"])

    def message_update(
        self,
        chat_id: int,
        text: str | None = "hello",
        *,
        user_id: int | None = None,
        first_name: str = "Ada",
        chat_type: str = "private",
        kind: str = "message",
        extra: dict[str, Any] | None = None,
        update_id: int | None = None,
    ) -> dict[str, Any]:
        """A `message` update (or `edited_message` with kind="edited_message"), not yet queued."""
        user_id = chat_id if user_id is None else user_id
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
        else:
            chat["title"] = "Support group"
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": first_name},
        }
        if text is not None:
            message["text"] = text
            if text.startswith("/"):
                command = text.split()[0]
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        if kind == "edited_message":
            message["edit_date"] = int(time.time())
        message.update(extra or {})
        return {"update_id": update_id if update_id is not None else self.next_update_id(), kind: message}

    async def push_message(self, chat_id: int, text: str | None = "hello", **kw: Any) -> int:
        """Queue a customer message; returns its update_id."""
        return await self.push_update(self.message_update(chat_id, text, **kw))

    def callback_update(
        self, chat_id: int, data: str, *, user_id: int | None = None, message_id: int = 1
    ) -> dict[str, Any]:
        user_id = chat_id if user_id is None else user_id
        return {
            "update_id": self.next_update_id(),
            "callback_query": {
                "id": f"cbq-{next(self._callback_ids)}",
                "from": {"id": user_id, "is_bot": False, "first_name": "Ada"},
                "chat_instance": f"ci-{chat_id}",
                "data": data,
                "message": {
                    "message_id": message_id,
                    "date": int(time.time()),
                    "chat": {"id": chat_id, "type": "private", "first_name": "Ada"},
                    "from": BOT,
                    "text": "an earlier answer",
                },
            },
        }

    async def push_callback(self, chat_id: int, data: str, **kw: Any) -> int:
        """Queue a button press (callback query); returns its update_id."""
        return await self.push_update(self.callback_update(chat_id, data, **kw))

    def mark(self) -> int:
        """A position in the call log; pass it as `since` to look only at later calls."""
        return len(self.calls)

    def find(
        self,
        method: str,
        predicate: Callable[[Call], bool] | None = None,
        since: int = 0,
        ok: bool | None = True,
    ) -> list[Call]:
        """Calls of `method` matching `predicate`: successful (ok=True), failed (False) or all (None)."""
        return [
            c
            for c in self.calls[since:]
            if c.method == method and (ok is None or c.ok == ok) and (predicate is None or predicate(c))
        ]

    def sent(self, chat_id: int | str | None = None, since: int = 0) -> list[Call]:
        """Successful sendMessage calls, optionally to one chat."""
        return self.find(
            "sendMessage",
            None if chat_id is None else lambda c: str(c.params.get("chat_id")) == str(chat_id),
            since,
        )

    def texts(self, chat_id: int | str, since: int = 0) -> list[str]:
        return [str(c.params.get("text", "")) for c in self.sent(chat_id, since)]

    async def wait_for(
        self,
        method: str,
        predicate: Callable[[Call], bool] | None = None,
        *,
        count: int = 1,
        since: int = 0,
        ok: bool | None = True,
        timeout: float = 20.0,
    ) -> list[Call]:
        """Wait until `count` matching calls were recorded and return them; TimeoutError says what came."""

        def done() -> bool:
            return len(self.find(method, predicate, since, ok)) >= count

        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(done)
        except TimeoutError:
            seen = [(c.method, c.status, c.params) for c in self.calls[since:]][-20:]
            raise TimeoutError(
                f"no {count}x {method} matching within {timeout}s; last calls: {seen}"
            ) from None
        return self.find(method, predicate, since, ok)[:count]

    async def wait_for_text(
        self, chat_id: int | str, needle: str, since: int = 0, timeout: float = 20.0
    ) -> Call:
        """Wait for a successful sendMessage to `chat_id` whose text contains `needle`."""
        calls = await self.wait_for(
            "sendMessage",
            lambda c: (
                str(c.params.get("chat_id")) == str(chat_id) and needle in str(c.params.get("text", ""))
            ),
            since=since,
            timeout=timeout,
        )
        return calls[0]

    # --- the server -----------------------------------------------------------------
    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            body = await request.json()
            return dict(body) if isinstance(body, dict) else {}
        if request.method == "POST":
            form = await request.post()
            raw = {k: str(v) for k, v in form.items()}
        else:
            raw = dict(request.query)
        return _decode(raw)

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        token = request.match_info["token"]
        params = await self._params(request)
        if token != self.token:
            return await self._reply(Call(method, params, 401, token=token), {"description": "Unauthorized"})
        failures = self._failures.get(method)
        if failures:
            failure = failures[0]
            failure.times -= 1
            if failure.times <= 0:
                failures.pop(0)
            body: dict[str, Any] = {"description": failure.description}
            if failure.retry_after is not None:
                body["parameters"] = {"retry_after": failure.retry_after}
            return await self._reply(Call(method, params, failure.status, token=token), body)
        if method == "getUpdates":
            return await self._get_updates(params, token)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return await self._reply(Call(method, params, 404, token=token), {"description": "Not Found"})
        result = handler(params)
        return await self._reply(Call(method, params, token=token), {"result": result})

    async def _reply(self, call: Call, body: dict[str, Any]) -> web.Response:
        self.calls.append(call)
        await self._notify()
        if call.status == 200:
            return web.json_response({"ok": True, **body})
        return web.json_response({"ok": False, "error_code": call.status, **body}, status=call.status)

    async def _get_updates(self, params: dict[str, Any], token: str) -> web.Response:
        offset = int(params.get("offset") or 0)
        if offset:  # Telegram forgets updates below the offset: they are confirmed
            self._pending = [u for u in self._pending if u["update_id"] >= offset]
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        call = Call("getUpdates", params, token=token)
        self.calls.append(call)
        await self._notify()

        def ready() -> bool:
            return bool(self._pending) or self._closing

        if not ready() and timeout > 0:
            try:
                async with asyncio.timeout(timeout):
                    async with self._changed:
                        await self._changed.wait_for(ready)
            except TimeoutError:
                pass
        updates = [] if self._closing else self._pending[:limit]
        return web.json_response({"ok": True, "result": updates})

    # --- methods (each returns the `result`) ----------------------------------------
    def _m_getMe(self, p: dict[str, Any]) -> dict[str, Any]:
        return BOT

    def _m_logOut(self, p: dict[str, Any]) -> bool:
        return True

    def _m_close(self, p: dict[str, Any]) -> bool:
        return True

    def _m_setWebhook(self, p: dict[str, Any]) -> bool:
        self.webhook = {"url": p.get("url", ""), "secret_token": p.get("secret_token", "")}
        return True

    def _m_deleteWebhook(self, p: dict[str, Any]) -> bool:
        self.webhook = {"url": ""}
        if p.get("drop_pending_updates"):
            self._pending.clear()
        return True

    def _m_getWebhookInfo(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": self.webhook.get("url", ""),
            "has_custom_certificate": False,
            "pending_update_count": len(self._pending),
        }

    def _message(self, p: dict[str, Any]) -> dict[str, Any]:
        chat_id = p.get("chat_id", 0)
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if int(chat_id) > 0 else "group"},
            "from": BOT,
        }
        if "text" in p:
            msg["text"] = p["text"]
        if p.get("reply_markup"):
            msg["reply_markup"] = p["reply_markup"]
        return msg

    def _m_sendMessage(self, p: dict[str, Any]) -> dict[str, Any]:
        return self._message(p)

    def _m_editMessageText(self, p: dict[str, Any]) -> dict[str, Any]:
        return self._message(p)

    def _m_editMessageReplyMarkup(self, p: dict[str, Any]) -> dict[str, Any]:
        return self._message(p)

    def _m_sendChatAction(self, p: dict[str, Any]) -> bool:
        return True

    def _m_answerCallbackQuery(self, p: dict[str, Any]) -> bool:
        return True

    def _m_deleteMessage(self, p: dict[str, Any]) -> bool:
        return True

    def _m_setMyCommands(self, p: dict[str, Any]) -> bool:
        return True


@pytest.fixture
async def fake_telegram() -> AsyncIterator[FakeTelegramApi]:
    """A running fake Bot API for one test."""
    async with FakeTelegramApi() as fake:
        yield fake
