"""Slack: the staff review channel. Staff watch every answer, correct it, or take the chat over.

This module is the app: its lifecycle, the two ways requests come in, and bolt's listeners. It
connects through Socket Mode when SLACK_APP_TOKEN is set and serves `/slack/events` on the
project's HTTP server when SLACK_SIGNING_SECRET is set (slack_sdk's SignatureVerifier checks every
signature there, on the raw body, before bolt reads it; a signature is accepted once, see
`_replayed`). The rest of the package: `feed` (what the conversation service tells staff),
`sender` (the outbox into Slack), `blocks` (Block Kit), `identity` (who is staff), `validation`
(request shapes and signed forms), `web` (the Web API client). docs/slack.md has the rules.

A Slack request is answered fast and handled after. One listener middleware, `_staff_only`, stands
in front of every staff listener (buttons, forms, `/apprentice`): anyone else gets a refusal and
the listener never runs. Listeners ack and hand the work to a task; work on one conversation runs
in arrival order. Retried events (same event_id) and double clicks never store anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.response import BoltResponse
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse

from bot.channels.slack.blocks import REMEMBER, SEND, correct_modal, flag_modal, slack_to_plain
from bot.channels.slack.feed import Mrkdwn, ReviewFeed
from bot.channels.slack.identity import CHANNEL, Directory
from bot.channels.slack.sender import SlackSender
from bot.channels.slack.validation import (
    FORM_SECRET_KV,
    acting_user,
    form_metadata,
    form_values,
    malformed,
    read_form,
    request_key,
)
from bot.channels.slack.web import SlackError, SlackWeb
from bot.conversation import ConversationService
from bot.http import HttpServer
from bot.keylock import KeyedLocks
from bot.ratelimit import RateLimiter
from bot.staff import correction_problem
from bot.staff_commands import StaffCommands
from knowledge.settings import Settings
from knowledge.store import Store

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
SIGNATURE_MAX_AGE_S = 300  # Slack's own rule (and SignatureVerifier's): older or future timestamps fail
# An accepted signature (HTTP) or envelope id (Socket Mode) is remembered in the shared rate-limit
# table under this prefix until its timestamp leaves the window (plus a margin for replicas' clocks)
REPLAY_KEY = "slack:replay:"
REPLAY_MARGIN_S = 60
ENVELOPE_KEEP_S = 600.0
CORRECTION_WAIT_S = 30.0
STALE_FORM = "This form no longer matches an answer; press the button on the card again."
REFUSAL = (
    "Only support staff can do this. Ask an admin to add you to APPRENTICE_STAFF "
    "(or, when it is unset, to the review channel)."
)


class SlackChannel(ReviewFeed):
    """Mirrors answers into the review channel and turns staff actions into staff commands."""

    def __init__(
        self,
        settings: Settings,
        service: ConversationService,
        store: Store,
        http: HttpServer,
        *,
        poll_s: float = 1.0,
        base_delay_s: float = 1.0,
        lease_s: float = 120.0,
        behind_s: float = 120.0,
    ) -> None:
        self.settings, self.service, self.store = settings, service, store
        self.token = settings.slack_bot_token.get_secret_value()
        self.app_token = settings.slack_app_token.get_secret_value()
        self.signing_secret = settings.slack_signing_secret.get_secret_value()
        if not self.token:
            raise ValueError(
                "SLACK_BOT_TOKEN is not set; create a Slack app from ops/slack-manifest.yaml, install it "
                "and copy its Bot User OAuth Token (xoxb-...)."
            )
        if not settings.slack_channel:
            raise ValueError(
                "APPRENTICE_SLACK_CHANNEL is not set; invite the app to the review channel and set the "
                "channel's ID (C..., from the channel's details)."
            )
        if not self.app_token and not self.signing_secret:
            raise ValueError(
                "Set SLACK_APP_TOKEN (Socket Mode, no public URL needed) or SLACK_SIGNING_SECRET "
                f"(HTTP mode at {EVENTS_PATH}); see the README section 'Connecting a real Slack app'."
            )
        self.channel_id = settings.slack_channel
        self.web = SlackWeb(self.token, settings.slack_api_url)
        self.people = Directory(self.web, self.channel_id, settings.staff)
        self.sender = SlackSender(
            settings, store, self.web, self.people,
            poll_s=poll_s, base_delay_s=base_delay_s, lease_s=lease_s, behind_s=behind_s,
        )  # fmt: skip
        self.outbox = self.sender.outbox
        self.commands = StaffCommands(service)
        self._surface = Mrkdwn(self.people, self.outbox)
        self._app: AsyncApp | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._socket_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks = KeyedLocks()  # work on one conversation (or thread) runs in arrival order
        self._verifier = SignatureVerifier(self.signing_secret) if self.signing_secret else None
        self._seen = RateLimiter(store)  # accepted signatures and envelope ids, shared by replicas
        self._form_key = b""  # HMAC key of the forms' private_metadata (FORM_SECRET_KV)
        if self.signing_secret:
            http.add_route("POST", EVENTS_PATH, self._http_events)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Check the token, start the outbox drainer, connect Socket Mode, and begin reviewing."""
        await self.people.check_token()
        key = await asyncio.to_thread(self.store.setdefault_kv, FORM_SECRET_KV, secrets.token_urlsafe(32))
        self._form_key = key.encode()
        app = AsyncApp(
            client=self.web.client,
            signing_secret=self.signing_secret,
            process_before_response=True,  # listeners only ack and schedule, so this stays fast
            logger=logging.getLogger("slack_bolt"),
        )
        staff_only = [self._staff_only]
        app.action(re.compile(r"^apprentice_"), middleware=staff_only)(self._on_action)
        app.view("apprentice_correct", middleware=staff_only)(self._on_correct_submit)
        app.view("apprentice_flag", middleware=staff_only)(self._on_flag_submit)
        app.command("/apprentice", middleware=staff_only)(self._on_command)
        app.event("message")(self._on_message)
        self._app = app
        self.outbox.start()
        if self.app_token:
            self._socket = _SocketHandler(app, self.app_token, self._envelope_seen)
            # connect() retries on its own until Slack answers; never hold up start-up for it
            self._socket_task = asyncio.create_task(self._socket.connect_async(), name="slack-socket")
        self.service.reviewers.append(self)
        log.info(
            "Slack review channel %s (%s)",
            self.channel_id,
            "+".join(m for m, on in (("socket", self.app_token), ("http", self.signing_secret)) if on),
        )

    async def stop(self) -> None:
        """Stop reviewing; unsent cards stay in the outbox for the next start."""
        if self in self.service.reviewers:
            self.service.reviewers.remove(self)
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close_async()
        if self._socket_task is not None:
            self._socket_task.cancel()
            with contextlib.suppress(BaseException):
                await self._socket_task
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=10)
            for task in pending:
                task.cancel()
        await self.outbox.stop()
        self._app = None

    async def idle(self) -> None:
        """Wait until every scheduled staff action has finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def _spawn(self, key: str | None, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background; work sharing a key runs one at a time, in scheduling order
        (tasks start in creation order and an asyncio lock serves its waiters first come, first served)."""

        async def run() -> None:
            try:
                if key is None:
                    await work
                else:
                    async with self._locks.get(key):
                        await work
            except Exception:
                log.exception("Slack action failed")

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- HTTP mode ------------------------------------------------------------------------
    async def _http_events(self, request: web.Request) -> web.StreamResponse:
        if self._app is None:
            return web.Response(status=503, text="The Slack channel is not running.")
        raw = await request.read()
        # Bolt parses the body before it checks the signature, and raises (a 500) on bodies that are
        # not UTF-8 or not an object. Check the signature on the raw bytes first, then the shape.
        if not self._signed(request, raw):
            return web.Response(status=401, text="invalid signature")
        try:
            replayed = await self._replayed(request)
        except Exception:  # the database: Slack retries a request that is not answered 200
            log.exception("could not check a Slack request for a replay")
            return web.Response(status=503, text="try again")
        if replayed:  # Slack signs each delivery and retry afresh: the same signature is a copy
            log.warning("refused a replayed Slack request (its signature was accepted before)")
            return web.Response(status=200, text="")  # answered, nothing done; Slack never retries a 200
        problem = malformed(raw, request.content_type)
        if problem:
            return web.Response(status=400, text=problem)
        try:
            response = await self._app.async_dispatch(await to_bolt_request(request))
        except Exception:  # an authenticated but odd request must not become a 500 loop on Slack's side
            log.exception("Slack request could not be handled")
            return web.Response(status=400, text="malformed Slack request")
        return await to_aiohttp_response(response)

    def _signed(self, request: web.Request, raw: bytes) -> bool:
        """Slack's v0 signature over the raw body (slack_sdk's SignatureVerifier: constant-time
        comparison, stale or future timestamps fail). A body that is not UTF-8 is never Slack's."""
        if self._verifier is None:
            return False
        try:
            return self._verifier.is_valid(
                raw.decode("utf-8"),
                request.headers.get("X-Slack-Request-Timestamp"),
                request.headers.get("X-Slack-Signature"),
            )
        except (ValueError, TypeError):  # not UTF-8, a timestamp that is no number, a non-ASCII signature
            return False

    async def _replayed(self, request: web.Request) -> bool:
        """Whether this (valid) signature was accepted before, by this replica or any other.

        Remembered in the shared rate-limit table until its timestamp leaves Slack's window, after
        which the signature check refuses it anyway; ended entries are deleted by the limiter's sweep.
        """
        stamp = int(request.headers["X-Slack-Request-Timestamp"])
        keep = stamp + SIGNATURE_MAX_AGE_S - time.time() + REPLAY_MARGIN_S
        signature = request.headers["X-Slack-Signature"]
        return await self._seen.hit(REPLAY_KEY + signature, keep) > 1

    async def _envelope_seen(self, envelope_id: str) -> bool:
        """Socket Mode: whether this envelope id was handled before (acked again, not handled twice)."""
        return await self._seen.hit(f"{REPLAY_KEY}envelope:{envelope_id}", ENVELOPE_KEEP_S) > 1

    # --- who may act ------------------------------------------------------------------------
    async def _staff_only(
        self, body: dict[str, Any], ack: AsyncAck, next_: Callable[[], Awaitable[None]]
    ) -> BoltResponse | None:
        """Bolt listener middleware of every staff listener: staff go on to the listener; anyone
        else is answered with a refusal (inside a form, in the command's reply, or as an ephemeral
        message for a button) and the listener never runs."""
        user = acting_user(body)
        if await self.people.is_staff(user, body):
            await next_()
            return None
        kind = body.get("type")
        if kind == "view_submission":
            found = body.get("view")
            view: dict[str, Any] = found if isinstance(found, dict) else {}
            form = read_form(self._form_key, view, user)
            self._spawn(None, self._refuse(user, form.channel if form else None))
            field = "reason" if view.get("callback_id") == "apprentice_flag" else "corrected"
            return await ack(response_action="errors", errors={field: REFUSAL})
        if kind == "block_actions":
            channel = body.get("channel")
            where = str(channel.get("id") or "") if isinstance(channel, dict) else ""
            self._spawn(None, self._refuse(user, where or None))
            return await ack()
        return await ack(text=REFUSAL)  # /apprentice: the refusal is the command's reply

    async def _refuse(self, user: str, channel: str | None, thread_ts: str | None = None) -> None:
        log.info("refused a Slack action by non-staff user %s", user)
        await self._ephemeral(user, REFUSAL, channel, thread_ts)

    async def _ephemeral(
        self, user: str, text: str, channel: str | None = None, thread_ts: str | None = None
    ) -> None:
        try:
            await self.web.ephemeral(
                channel=channel or self.channel_id, user=user, text=text, thread_ts=thread_ts
            )
        except (SlackError, OSError, TimeoutError) as exc:
            log.warning("could not send an ephemeral message to %s (%s)", user, type(exc).__name__)

    # --- listeners: buttons ---------------------------------------------------------------
    async def _on_action(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        action = (body.get("actions") or [{}])[0]
        user = acting_user(body)
        name = str(action.get("action_id", "")).removeprefix("apprentice_")
        try:
            cid, mid = (int(x) for x in str(action.get("value", "")).split(":", 1))
        except ValueError:
            log.warning("Slack action %s with an unreadable value", name)
            return
        channel = str((body.get("channel") or {}).get("id") or self.channel_id)
        if name in ("correct", "flag"):  # the trigger id expires in 3 s: open modals at once
            trigger = str(body.get("trigger_id", ""))
            self._spawn(None, self._open_modal(name, user, channel, cid, mid, trigger))
        else:
            self._spawn(f"conv:{cid}", self._button(name, user, cid, mid))

    async def _button(self, name: str, user: str, cid: int, mid: int) -> None:
        staff = f"{CHANNEL}:{user}"
        if name == "approve":
            if await self.commands.approve_answer(mid, staff):
                await self._put("update", cid, {"message_id": mid})
        elif name == "take_over":
            if await self.commands.take_over(cid, staff):
                note = (
                    f"🙋 <@{user}> took over. The bot is paused for this conversation; replies in this "
                    "thread go to the customer."
                )
                await self._after_mode_change(cid, mid, note, ["hand_back"])
        elif name == "hand_back":
            if await self.commands.hand_back(cid, staff):
                note = f"🤖 <@{user}> handed back; the bot answers again."
                await self._after_mode_change(cid, mid, note, [])
        else:
            log.warning("unknown Slack action %s", name)

    async def _after_mode_change(self, cid: int, mid: int, note: str, buttons: list[str]) -> None:
        if mid:
            await self._put("update", cid, {"message_id": mid})
        await self._put("note", cid, {"text": note, "buttons": buttons, "message_id": mid})

    async def _open_modal(self, name: str, user: str, channel: str, cid: int, mid: int, trigger: str) -> None:
        msg = await asyncio.to_thread(self.store.message, mid)
        if msg is None:
            await self._ephemeral(user, f"Answer #{mid} no longer exists.", channel)
            return
        meta = form_metadata(self._form_key, {"c": cid, "m": mid, "ch": channel, "u": user})
        view = correct_modal(msg.text, meta) if name == "correct" else flag_modal(meta)
        try:
            await self.web.open_view(trigger, view)
        except SlackError as exc:
            log.warning("could not open the %s modal (%s)", name, exc.error)
            await self._ephemeral(
                user, "Slack did not open the form; please press the button again.", channel
            )

    # --- listeners: modal submissions -------------------------------------------------------
    async def _on_correct_submit(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        user = acting_user(body)
        form = read_form(self._form_key, view, user)
        values = form_values(view)
        text = str(((values.get("corrected") or {}).get("text") or {}).get("value") or "")
        selected = ((values.get("reason") or {}).get("reason") or {}).get("selected_option") or {}
        reason = str(selected.get("value") or "other")
        chosen = ((values.get("options") or {}).get("options") or {}).get("selected_options") or []
        options = {str(o.get("value")) for o in chosen}
        if not text.strip():
            await ack(
                response_action="errors", errors={"corrected": "Type the answer the customer should get."}
            )
            return
        problem = correction_problem(text)  # a pasted secret: the form stays open, nothing is stored
        if problem:
            await ack(response_action="errors", errors={"corrected": problem})
            return
        if form is None:
            await ack(response_action="errors", errors={"corrected": STALE_FORM})
            return
        await ack()
        key = request_key(form.message_id, user, text)
        work = self._correct(
            user, form.channel, form.message_id, text, reason, SEND in options, REMEMBER in options, key
        )
        task = self._spawn(f"conv:{form.conversation_id}", work)
        # The HTTP response (process_before_response) goes out when this returns: waiting until the
        # correction is stored means a 200 is never sent for a correction a crash could still lose.
        # Usually that is well inside Slack's 3 s; on a busy machine Slack may show the staff member
        # an error first, and pressing Save again stores nothing twice (the request key).
        await asyncio.wait({task}, timeout=CORRECTION_WAIT_S)

    async def _correct(
        self,
        user: str,
        channel: str | None,
        mid: int,
        text: str,
        reason: str,
        send: bool,
        remember: bool,
        key: str,
    ) -> None:
        try:
            result = await self.commands.correct(
                mid, text, f"{CHANNEL}:{user}", reason=reason, send=send, remember=remember, request_key=key
            )
        except (LookupError, ValueError) as exc:
            await self._ephemeral(user, f"The correction was not stored: {exc}", channel)
            return
        if result.created and send and not result.delivered:
            await self._ephemeral(
                user,
                f"Correction #{result.correction.id} is stored but could not be sent to the customer now.",
                channel,
            )

    async def _on_flag_submit(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        user = acting_user(body)
        form = read_form(self._form_key, view, user)
        reason = str(((form_values(view).get("reason") or {}).get("reason") or {}).get("value") or "")
        if form is None:
            await ack(response_action="errors", errors={"reason": STALE_FORM})
            return
        await ack()
        mid, cid = form.message_id, form.conversation_id

        async def flag() -> None:
            if await self.commands.flag_answer(mid, f"{CHANNEL}:{user}", reason):
                await self._put("update", cid, {"message_id": mid})

        self._spawn(f"conv:{cid}", flag())

    # --- listeners: thread replies and /apprentice ------------------------------------------------
    async def _on_message(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        thread_ts = event.get("thread_ts")
        if (
            event.get("channel") != self.channel_id
            or not thread_ts
            or thread_ts == event.get("ts")
            or event.get("bot_id")
            or event.get("subtype") not in (None, "thread_broadcast")
        ):
            return
        event_id = str(body.get("event_id") or f"{event.get('channel')}:{event.get('ts')}")
        self._spawn(f"thread:{thread_ts}", self._thread_reply(event_id, event, body))

    async def _thread_reply(self, event_id: str, event: dict[str, Any], body: dict[str, Any]) -> None:
        """A message in a conversation's thread goes to the customer once staff took it over.

        Not behind `_staff_only`: a thread message is a staff action only in a taken-over
        conversation (elsewhere staff talk among themselves), so the check comes after that."""
        if not await asyncio.to_thread(self.store.claim_update, CHANNEL, event_id):
            log.info("Slack event %s already handled (a retry)", event_id)
            return
        thread = f"{self.channel_id}:{event['thread_ts']}"
        conv = await asyncio.to_thread(self.store.conversation_by_review_thread, thread)
        if conv is None or conv.mode != "human":
            return  # staff talking among themselves
        user = str(event.get("user", ""))
        if not await self.people.is_staff(user, body, event):
            await self._refuse(user, self.channel_id, str(event["thread_ts"]))
            return
        text = slack_to_plain(str(event.get("text", "")))
        delivered = await self.commands.reply(
            conv.id, text, f"{CHANNEL}:{user}", external_id=f"{CHANNEL}:{event.get('ts')}"
        )
        if text.strip() and not delivered:
            await self._ephemeral(
                user,
                "Your reply is stored but could not be sent to the customer now.",
                self.channel_id,
                str(event["thread_ts"]),
            )

    async def _on_command(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """`/apprentice VERB` (behind `_staff_only`): the staff command's reply, in mrkdwn."""
        staff = f"{CHANNEL}:{acting_user(command)}"
        await ack(text=await self.commands.run(str(command.get("text", "")), staff, self._surface))


class _SocketHandler(AsyncSocketModeHandler):
    """Bolt's Socket Mode handler; an envelope handled before (by any replica) is acked, not handled."""

    def __init__(self, app: AsyncApp, app_token: str, seen: Callable[[str], Awaitable[bool]]) -> None:
        super().__init__(app, app_token)
        self._seen = seen

    async def handle(self, client: AsyncBaseSocketModeClient, req: SocketModeRequest) -> None:  # type: ignore[override]
        if req.envelope_id and await self._seen(req.envelope_id):
            log.warning("ignored a Socket Mode envelope delivered again (%s)", req.envelope_id)
            await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))
            return
        await super().handle(client, req)  # type: ignore[arg-type]


__all__ = ["EVENTS_PATH", "REPLAY_KEY", "SlackChannel"]
