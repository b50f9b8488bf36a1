"""A small, real Slack Web API + Socket Mode server on 127.0.0.1 that records every call.

It accepts what slack_sdk sends: JSON and form-encoded POSTs, and GETs with query parameters.

Point the app's `AsyncWebClient(base_url=fake.api_url)` at it. It keeps the messages it was
sent (with their threads and later edits), can be told to fail the next calls of a method
(429 with Retry-After, 500, or `ok: false`), and lets tests wait for calls without sleeping.
Like Slack, it lets chat.postMessage post about one message a second per channel after a short
burst, and answers beyond that with HTTP 429, `Retry-After: <seconds>` and `"error": "ratelimited"`
(a token bucket per channel: `post_rate`, `post_burst`; `post_rate=None` lifts the limit).
`time_scale` runs that clock faster: at 10 the fake is Slack at ten times the speed (10 messages a
second, Retry-After in tenths of a second), for benchmarks that simulate minutes in seconds.
Files arrive through Slack's upload flow: `files.getUploadURLExternal` hands out an upload URL
on this server, the bytes are POSTed there, and `files.completeUploadExternal` shares them into
a channel (`uploaded` holds them, with the channel and title).
The Socket Mode endpoint answers `apps.connections.open` with a ws:// URL, says hello,
forwards envelopes that tests push and records the app's acks.

`signed_post` sends Events API / interactivity requests the way Slack signs them (v0 HMAC).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import math
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

JSON_FIELDS = {"blocks", "view", "attachments", "metadata", "unfurl_links", "reply_broadcast", "files"}


@dataclass
class Call:
    """One Web API request as the fake saw it."""

    method: str
    params: dict[str, Any]
    token: str
    ok: bool
    status: int = 200
    at: float = field(default_factory=time.monotonic)  # when the fake answered (time.monotonic())


@dataclass
class Failure:
    status: int = 500
    retry_after: int | None = None
    error: str = "internal_error"


@dataclass
class Posted:
    """A message in the fake workspace (kept current by chat.update)."""

    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str | None
    edits: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def all_text(self) -> str:
        """The text and every text field in the blocks, for assertions."""
        parts = [self.text]

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "text" and isinstance(value, str):
                        parts.append(value)
                    else:
                        walk(value)
            elif isinstance(node, list):
                for item in node:
                    walk(item)

        walk(self.blocks)
        return "\n".join(parts)


@dataclass
class Upload:
    """A file in the fake workspace: reserved, then uploaded, then shared by completeUploadExternal."""

    id: str
    filename: str
    length: int
    alt_txt: str = ""
    data: bytes | None = None  # None until the bytes arrive at the upload URL
    title: str = ""
    channel: str | None = None  # None until completed (a completed file without channel is private)
    initial_comment: str = ""
    thread_ts: str | None = None
    completed: bool = False


class FakeSlack:
    """The fake workspace. Use `async with FakeSlack() as slack:`."""

    def __init__(
        self,
        *,
        team_id: str = "T0001",
        bot_user_id: str = "UBOT",
        bot_id: str = "BBOT",
        app_id: str = "A0001",
        enterprise_id: str | None = None,
        members: dict[str, list[str]] | None = None,
        usergroups: dict[str, list[str]] | None = None,
        users: dict[str, str] | None = None,
        user_fields: dict[str, dict[str, Any]] | None = None,
        post_rate: float | None = 1.0,
        post_burst: int = 5,
        time_scale: float = 1.0,
    ) -> None:
        self.team_id, self.bot_user_id, self.bot_id = team_id, bot_user_id, bot_id
        self.app_id, self.enterprise_id = app_id, enterprise_id
        # chat.postMessage per channel: `post_rate` a second after `post_burst` at once (Slack's rule)
        self.post_rate, self.post_burst, self.time_scale = post_rate, post_burst, time_scale
        self._buckets: dict[str, tuple[float, float]] = {}  # channel -> (tokens, time.monotonic())
        self.members = members or {}  # channel -> user ids
        self.usergroups = usergroups or {}  # group id -> user ids
        self.users = users or {}  # user id -> name
        # user id -> fields users.info returns on top of the defaults: a Slack Connect user
        # ({"team_id": "T...", "is_stranger": True}), a guest ({"is_restricted": True}), ...
        self.user_fields = user_fields or {}
        self.calls: list[Call] = []
        self.messages: dict[str, Posted] = {}  # ts -> message
        self.views: list[dict[str, Any]] = []
        self.files: dict[str, Upload] = {}  # file id -> file, from getUploadURLExternal on
        self.acks: dict[str, dict[str, Any]] = {}
        self.socket_connections = 0
        self._failures: dict[str, list[Failure]] = {}
        self._ts = itertools.count(1)
        self._changed = asyncio.Condition()
        self._sockets: list[web.WebSocketResponse] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)  # slack_sdk reads some methods with GET
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/upload/{file_id}", self._upload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    # --- failure injection --------------------------------------------------------------
    def fail(
        self, method: str, times: int = 1, status: int = 500, retry_after: int | None = None, error: str = ""
    ) -> None:
        """The next `times` calls of `method` fail: 429 (with Retry-After), 5xx, or 200 with ok:false."""
        default = {429: "ratelimited"}.get(status, "internal_error" if status >= 500 else "fatal_error")
        failure = Failure(status, retry_after, error or default)
        self._failures.setdefault(method, []).extend([failure] * times)

    def heal(self, method: str | None = None) -> None:
        """Forget the failures still queued for `method` (all methods when None)."""
        if method is None:
            self._failures.clear()
        else:
            self._failures.pop(method, None)

    # --- waiting ------------------------------------------------------------------------
    def called(
        self, method: str, where: Callable[[Call], bool] | None = None, failed: bool = False
    ) -> list[Call]:
        """Successful (or, with `failed`, failed) calls of `method` so far, optionally filtered."""
        return [
            c for c in self.calls if c.method == method and c.ok is not failed and (where is None or where(c))
        ]

    async def wait_for(
        self,
        method: str,
        count: int = 1,
        where: Callable[[Call], bool] | None = None,
        timeout: float = 15,
        failed: bool = False,
    ) -> list[Call]:
        """Wait until `count` successful (or failed) calls of `method` matching `where` arrived."""
        return await self._wait(lambda: self.called(method, where, failed), count, timeout, method)

    async def wait_ack(self, envelope_id: str, timeout: float = 15) -> dict[str, Any]:
        acks = await self._wait(
            lambda: [self.acks[envelope_id]] if envelope_id in self.acks else [], 1, timeout, "ack"
        )
        return acks[0]

    async def wait_connected(self, count: int = 1, timeout: float = 15) -> None:
        await self._wait(lambda: list(range(len(self._sockets))), count, timeout, "socket connection")

    async def _wait(self, probe: Callable[[], list[Any]], count: int, timeout: float, what: str) -> list[Any]:
        async def until() -> list[Any]:
            async with self._changed:
                while len(found := probe()) < count:
                    await self._changed.wait()
                return found

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            seen = [c.method for c in self.calls]
            raise AssertionError(f"waited {timeout}s for {count} x {what}; calls so far: {seen}") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- workspace views ------------------------------------------------------------------
    def channel_messages(self, channel: str) -> list[Posted]:
        """Top-level messages of a channel, oldest first."""
        return [m for m in self.messages.values() if m.channel == channel and m.thread_ts is None]

    def thread(self, thread_ts: str) -> list[Posted]:
        """Replies in a thread, oldest first."""
        return [m for m in self.messages.values() if m.thread_ts == thread_ts]

    def uploaded(self, channel: str) -> list[Upload]:
        """Files completed into a channel, oldest first."""
        return [f for f in self.files.values() if f.completed and f.channel == channel]

    # --- the Web API ------------------------------------------------------------------
    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await _params(request)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token = token or str(params.pop("token", ""))
        failures = self._failures.get(method)
        if failures:
            f = failures.pop(0)
            self.calls.append(Call(method, params, token, ok=False, status=f.status))
            await self._notify()
            headers = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
            if f.status >= 500:
                return web.Response(status=f.status, text="upstream trouble", headers=headers)
            return web.json_response({"ok": False, "error": f.error}, status=f.status, headers=headers)
        expected = "xapp-" if method == "apps.connections.open" else "xoxb-"
        if not token.startswith(expected):
            self.calls.append(Call(method, params, token, ok=False))
            await self._notify()
            return web.json_response({"ok": False, "error": "not_authed"})
        wait = self._rate_limited(str(params.get("channel", ""))) if method == "chat.postMessage" else 0.0
        if wait > 0:
            self.calls.append(Call(method, params, token, ok=False, status=429))
            await self._notify()
            return web.json_response(
                {"ok": False, "error": "ratelimited"},
                status=429,
                headers={"Retry-After": self._retry_after(wait)},
            )
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            body: dict[str, Any] = {"ok": False, "error": "unknown_method"}
        else:
            body = handler(params)
        self.calls.append(Call(method, params, token, ok=bool(body.get("ok"))))
        await self._notify()
        return web.json_response(body)

    def _rate_limited(self, channel: str) -> float:
        """Take a token from the channel's bucket: 0 when the post may go, else the (real) seconds
        until the next token. A refused post takes no token, as at Slack."""
        if self.post_rate is None:
            return 0.0
        rate = self.post_rate * self.time_scale  # tokens per real second
        now = time.monotonic()
        tokens, last = self._buckets.get(channel, (float(self.post_burst), now))
        tokens = min(float(self.post_burst), tokens + (now - last) * rate)
        if tokens >= 1:
            self._buckets[channel] = (tokens - 1, now)
            return 0.0
        self._buckets[channel] = (tokens, now)
        return (1 - tokens) / rate

    def _retry_after(self, wait: float) -> str:
        """Whole seconds, as Slack sends them (of the fake's clock: tenths of a second at time_scale 10)."""
        return f"{math.ceil(wait * self.time_scale) / self.time_scale:g}"

    def _next_ts(self) -> str:
        return f"{1_700_000_000 + next(self._ts)}.000100"

    def _m_auth_test(self, p: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ok": True,
            "url": "https://fake.slack.com/",
            "team": "Fake",
            "user": "apprentice",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }
        if self.enterprise_id:  # Slack adds it for workspaces of an Enterprise Grid organisation
            body["enterprise_id"] = self.enterprise_id
        return body

    def _m_bots_info(self, p: dict[str, Any]) -> dict[str, Any]:
        if str(p.get("bot", "")) != self.bot_id:
            return {"ok": False, "error": "bot_not_found"}
        bot = {
            "id": self.bot_id,
            "deleted": False,
            "name": "apprentice",
            "updated": 1_700_000_000,
            "app_id": self.app_id,
            "user_id": self.bot_user_id,
            "icons": {},
        }
        return {"ok": True, "bot": bot}

    def _m_chat_postMessage(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        ts = self._next_ts()
        thread = p.get("thread_ts") or None
        if thread is not None and thread not in self.messages:
            return {"ok": False, "error": "thread_not_found"}
        msg = Posted(str(p["channel"]), ts, str(p.get("text", "")), list(p.get("blocks") or []), thread)
        self.messages[ts] = msg
        return {"ok": True, "channel": msg.channel, "ts": ts, "message": {"text": msg.text, "ts": ts}}

    def _m_chat_update(self, p: dict[str, Any]) -> dict[str, Any]:
        msg = self.messages.get(str(p.get("ts")))
        if msg is None or msg.channel != p.get("channel"):
            return {"ok": False, "error": "message_not_found"}
        msg.text = str(p.get("text", msg.text))
        if "blocks" in p:
            msg.blocks = list(p["blocks"] or [])
        msg.edits += 1
        return {"ok": True, "channel": msg.channel, "ts": msg.ts, "text": msg.text}

    def _m_chat_postEphemeral(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "message_ts": self._next_ts()}

    def _m_views_open(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        view = dict(p.get("view") or {})
        view["id"] = f"V{len(self.views) + 1:06d}"
        view["hash"] = uuid.uuid4().hex[:12]
        self.views.append(view)
        return {"ok": True, "view": view}

    def _m_users_info(self, p: dict[str, Any]) -> dict[str, Any]:
        uid = str(p.get("user", ""))
        known = {u for ids in [*self.members.values(), *self.usergroups.values()] for u in ids}
        if uid not in self.users and uid not in known and uid not in self.user_fields:
            return {"ok": False, "error": "user_not_found"}
        name = self.users.get(uid, uid.lower())
        user = {
            "id": uid,
            "team_id": self.team_id,
            "name": name,
            "real_name": name.title(),
            "profile": {"display_name": name},
            "deleted": False,
            "is_bot": False,
            "is_restricted": False,
            "is_ultra_restricted": False,
            **self.user_fields.get(uid, {}),
        }
        return {"ok": True, "user": user}

    def _m_conversations_members(self, p: dict[str, Any]) -> dict[str, Any]:
        channel = str(p.get("channel", ""))
        if channel not in self.members:
            return {"ok": False, "error": "channel_not_found"}
        return {"ok": True, "members": self.members[channel], "response_metadata": {"next_cursor": ""}}

    def _m_usergroups_users_list(self, p: dict[str, Any]) -> dict[str, Any]:
        group = str(p.get("usergroup", ""))
        if group not in self.usergroups:
            return {"ok": False, "error": "no_such_subteam"}
        return {"ok": True, "users": self.usergroups[group]}

    def _m_files_getUploadURLExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("filename"):
            return {"ok": False, "error": "invalid_arguments"}
        try:
            length = int(p.get("length", ""))
        except ValueError:
            return {"ok": False, "error": "invalid_arguments"}
        file_id = f"F{len(self.files) + 1:08d}"
        self.files[file_id] = Upload(file_id, str(p["filename"]), length, str(p.get("alt_txt") or ""))
        upload_url = f"http://127.0.0.1:{self.port}/upload/{file_id}"
        return {"ok": True, "upload_url": upload_url, "file_id": file_id}

    def _m_files_completeUploadExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        given = p.get("files")
        if not isinstance(given, list) or not given:
            return {"ok": False, "error": "invalid_arguments"}
        done = [self.files.get(str(f.get("id"))) for f in given if isinstance(f, dict)]
        if len(done) != len(given) or any(f is None or f.data is None for f in done):
            return {"ok": False, "error": "file_not_found"}  # never reserved, or the bytes never came
        shared = []
        for upload, item in zip(done, given, strict=True):
            assert upload is not None
            upload.title = str(item.get("title") or upload.filename)
            upload.channel = str(p["channel_id"]) if p.get("channel_id") else None
            upload.initial_comment = str(p.get("initial_comment") or "")
            upload.thread_ts = str(p["thread_ts"]) if p.get("thread_ts") else None
            upload.completed = True
            channels = [upload.channel] if upload.channel else []
            shared.append(
                {"id": upload.id, "name": upload.filename, "title": upload.title, "channels": channels}
            )
        return {"ok": True, "files": shared}

    def _m_apps_connections_open(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket?ticket={uuid.uuid4().hex}"}

    async def _upload(self, request: web.Request) -> web.Response:
        """The upload URL: takes the raw bytes, answers like files.slack.com (text/plain "OK - n")."""
        file_id = request.match_info["file_id"]
        upload = self.files.get(file_id)
        data = await request.read()
        ok = upload is not None and upload.data is None and len(data) == upload.length
        self.calls.append(Call("upload", {"file_id": file_id, "size": len(data)}, "", ok))
        if ok:
            assert upload is not None
            upload.data = data
        await self._notify()
        if not ok:
            return web.Response(status=400, text="upload refused: unknown file, sent twice or wrong length")
        return web.Response(text=f"OK - {len(data)}")

    # --- Socket Mode ------------------------------------------------------------------
    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.socket_connections += 1
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1, "debug_info": {}}))
        self._sockets.append(ws)
        await self._notify()
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if "envelope_id" in data:
                        self.acks[data["envelope_id"]] = data
                        await self._notify()
        finally:
            if ws in self._sockets:
                self._sockets.remove(ws)
        return ws

    async def push(
        self, kind: str, payload: dict[str, Any], retry_attempt: int = 0, envelope_id: str = ""
    ) -> str:
        """Send one Socket Mode envelope (events_api, interactive, slash_commands); returns its id.

        A given `envelope_id` sends an envelope again (a redelivery or a replay)."""
        if not self._sockets:
            raise AssertionError("no Socket Mode connection; call wait_connected() first")
        envelope_id = envelope_id or uuid.uuid4().hex
        envelope = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": kind != "events_api",
            "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else "",
        }
        await self._sockets[-1].send_str(json.dumps(envelope))
        return envelope_id


async def _params(request: web.Request) -> dict[str, Any]:
    """JSON or form-encoded parameters; JSON-valued form fields (blocks, view) are decoded."""
    if request.method == "GET":
        params: dict[str, Any] = {}
    elif request.content_type == "application/json":
        raw = await request.json()
        params = dict(raw) if isinstance(raw, dict) else {}
    else:
        form = await request.post()
        params = {k: v for k, v in form.items() if isinstance(v, str)}
    params.update({k: v for k, v in request.query.items() if k not in params})
    for key in JSON_FIELDS & params.keys():
        if isinstance(params[key], str):
            try:
                params[key] = json.loads(params[key])
            except ValueError:
                pass
    return params


# --- signed requests, as Slack sends them ------------------------------------------------
def sign(secret: str, body: str, timestamp: int | None = None) -> dict[str, str]:
    """The `X-Slack-Request-Timestamp` and `X-Slack-Signature` headers for `body`."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


async def signed_post(
    url: str,
    secret: str,
    *,
    json_body: dict[str, Any] | None = None,
    form: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timestamp: int | None = None,
) -> tuple[int, str]:
    """POST a correctly signed request (JSON for events, form for interactivity); returns (status, body)."""
    if json_body is not None:
        body, ctype = json.dumps(json_body), "application/json"
    else:
        body, ctype = urllib.parse.urlencode(form or {}), "application/x-www-form-urlencoded"
    all_headers = {"Content-Type": ctype, **sign(secret, body, timestamp), **(headers or {})}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body.encode(), headers=all_headers) as resp,
    ):
        return resp.status, await resp.text()


def event_callback(event: dict[str, Any], event_id: str, team_id: str = "T0001") -> dict[str, Any]:
    """An Events API envelope around `event`."""
    return {
        "token": "legacy",
        "team_id": team_id,
        "api_app_id": "A0001",
        "type": "event_callback",
        "event_id": event_id,
        "event_time": int(time.time()),
        "event": event,
        "authorizations": [{"team_id": team_id, "user_id": "UBOT", "is_bot": True}],
    }


def block_actions(
    user: str, channel: str, message_ts: str, action_id: str, value: str, team_id: str = "T0001"
) -> dict[str, Any]:
    """A `block_actions` payload: `user` pressed the button `action_id` on message `message_ts`."""
    return {
        "type": "block_actions",
        "team": {"id": team_id, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": team_id},
        "api_app_id": "A0001",
        "token": "legacy",
        "trigger_id": f"trigger-{uuid.uuid4().hex[:8]}",
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel},
        "channel": {"id": channel, "name": "review"},
        "message": {"ts": message_ts, "type": "message"},
        "response_url": "https://hooks.invalid/actions",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "actions",
                "value": value,
                "action_ts": "1",
            }
        ],
    }


def view_submission(user: str, view: dict[str, Any], values: dict[str, Any], team_id: str = "T0001") -> dict:
    """A `view_submission` payload for a view the app opened, with the user's input `values`."""
    submitted = dict(view)
    submitted["state"] = {"values": values}
    submitted.setdefault("team_id", team_id)
    return {
        "type": "view_submission",
        "team": {"id": team_id, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": team_id},
        "api_app_id": "A0001",
        "token": "legacy",
        "trigger_id": f"trigger-{uuid.uuid4().hex[:8]}",
        "view": submitted,
    }


def slash_command(
    user: str, channel: str, text: str, command: str = "/apprentice", team_id: str = "T0001"
) -> dict[str, str]:
    """The form fields of a slash command request."""
    return {
        "token": "legacy",
        "team_id": team_id,
        "channel_id": channel,
        "user_id": user,
        "user_name": user.lower(),
        "command": command,
        "text": text,
        "api_app_id": "A0001",
        "response_url": "https://hooks.invalid/commands",
        "trigger_id": f"trigger-{uuid.uuid4().hex[:8]}",
    }


def interactive_form(payload: dict[str, Any]) -> dict[str, str]:
    """Interactivity requests are form-encoded as `payload=<json>`."""
    return {"payload": json.dumps(payload)}
