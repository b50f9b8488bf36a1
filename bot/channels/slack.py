"""Slack: the staff review channel. Staff watch every answer, correct it, or take the chat over.

The only module that imports `slack_bolt` / `slack_sdk`. It connects through Socket Mode when
SLACK_APP_TOKEN is set and serves `/slack/events` on the project's HTTP server when
SLACK_SIGNING_SECRET is set (slack_sdk's SignatureVerifier checks every signature there, on the
raw body, before bolt reads it; a signature is accepted once, see `_replayed`).

Who may act (issue #18): a request must come from our own workspace (or Enterprise Grid
organisation) and our own app, as `auth.test` and `bots.info` name them at start; Slack Connect
users from other organisations, strangers and guests are never staff, even in the review channel.
A form's `private_metadata` is signed (HMAC, key in the database), so a submission can only
touch the answer its form was opened for, by the person it was opened for.

Three rules shape it:
- Posting to Slack never delays a customer. Cards, card updates, thread notes and the nightly
  report (its text, then its chart as an uploaded PNG) go into the durable outbox (keyed by
  conversation, or "report", so each stays in order) and a background drainer posts them;
  a 429 waits its Retry-After, other failures back off, nothing is lost.
  The drainer creates a conversation's thread parent the first time it needs one.
- Slack posts about one message a second per channel, so at volume cards would queue for ever.
  A 429 holds the whole outbox for its Retry-After (every other card would meet the same limit).
  Flagged answers (unsure, fallback, model error, guard-blocked) go first and always get their
  own card with buttons. Once an unflagged card has waited APPRENTICE_SLACK_DIGEST_AFTER_S, every
  unflagged card still waiting is folded into digest messages (one line per answer, up to
  DIGEST_SIZE each) queued behind the flagged cards, and for a while a conversation's first card
  opens its thread itself (one message, not two). Nothing is dropped; nothing lags for minutes.
- A Slack request is answered fast and handled after. Listeners check who is acting, ack,
  and hand the work to a task; work on one conversation runs in arrival order. Retried
  events (same event_id) and double clicks never store anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from bot.conversation import Answer, ConversationService, correction_problem
from bot.hours import short as short_time
from bot.http import HttpServer
from bot.outbox import Drop, Outbox, Retry
from bot.ratelimit import RateLimiter
from knowledge.models import Conversation, Correction, Feedback, Message, OutboxItem, RegistryState, utcnow
from knowledge.settings import Settings
from knowledge.store import Store

log = logging.getLogger(__name__)

CHANNEL = "slack"  # outbox channel, staff-id prefix and update-claim namespace
EVENTS_PATH = "/slack/events"
SIGNATURE_MAX_AGE_S = 300  # Slack's own rule (and SignatureVerifier's): older or future timestamps fail
# An accepted signature (HTTP) or envelope id (Socket Mode) is remembered in the shared rate-limit
# table under this prefix until its timestamp leaves the window (plus a margin for replicas' clocks)
REPLAY_KEY = "slack:replay:"
REPLAY_MARGIN_S = 60
ENVELOPE_KEEP_S = 600.0
FORM_SECRET_KV = "slack_form_secret"  # HMAC key of the forms' private_metadata, shared by replicas
STAFF_CACHE_S = 300.0
MAX_SECTION = 2900  # Slack allows 3000 characters in a section text
DIGEST_SIZE = 100  # answers per digest message: 100 one-line summaries fit Slack's 50 blocks
# outbox items read per round: flagged cards behind the unflagged backlog (which folding keeps to
# APPRENTICE_SLACK_DIGEST_AFTER_S of answers, about 650 at 1,300 answers a minute) are still seen
OUTBOX_BATCH = 1000
REASONS = [
    ("wrong_fact", "Wrong fact"),
    ("missing_info", "Missing information"),
    ("tone", "Tone"),
    ("policy", "Policy"),
    ("other", "Other"),
]
SEND, REMEMBER = "send", "remember"
CORRECTION_WAIT_S = 30.0
STALE_FORM = "This form no longer matches an answer; press the button on the card again."
REFUSAL = (
    "Only support staff can do this. Ask an admin to add you to APPRENTICE_STAFF "
    "(or, when it is unset, to the review channel)."
)
# Errors that no retry can fix: the item is dropped (and audited by the outbox).
PERMANENT = {
    "invalid_blocks",
    "invalid_blocks_format",
    "msg_too_long",
    "no_text",
    "invalid_arguments",
    "message_not_found",
    "cant_update_message",
    "edit_window_closed",
}
AUTH_ERRORS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
CHART_ALT = "Evaluation scores of the candidate adapter and the active one, per evaluation set"


class SlackChannel:
    """Mirrors answers into the review channel and turns staff actions into service calls."""

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
        self.behind_s = behind_s  # after a fold, the channel counts as behind this long (see _behind)
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
        self.client = AsyncWebClient(token=self.token, base_url=_api_url(settings.slack_api_url))
        self.outbox = Outbox(
            store, CHANNEL, self._send, poll_s=poll_s, base_delay_s=base_delay_s, lease_s=lease_s,
            before_round=self._fold_backlog, rank=_rank, batch=OUTBOX_BATCH,
        )  # fmt: skip
        self._app: AsyncApp | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._socket_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._names: dict[str, str] = {}
        self._staff_cache: tuple[float, frozenset[str]] | None = None
        self._verifier = SignatureVerifier(self.signing_secret) if self.signing_secret else None
        self._seen = RateLimiter(store)  # accepted signatures and envelope ids, shared by replicas
        self._me: Identity | None = None  # our workspace, organisation and app (auth.test, bots.info)
        self._members: dict[str, tuple[float, str]] = {}  # user -> (when, why not staff; "" = may be)
        self._form_key = b""  # HMAC key of the forms' private_metadata (FORM_SECRET_KV)
        self._behind_until = 0.0  # time.monotonic() until which the channel counts as behind (_behind)
        users, groups = _parse_staff(settings.staff)
        self._staff_users, self._staff_groups = users, groups
        if self.signing_secret:
            http.add_route("POST", EVENTS_PATH, self._http_events)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Check the token, start the outbox drainer, connect Socket Mode, and begin reviewing."""
        await self._check_token()
        key = await asyncio.to_thread(self.store.setdefault_kv, FORM_SECRET_KV, secrets.token_urlsafe(32))
        self._form_key = key.encode()
        app = AsyncApp(
            client=self.client,
            signing_secret=self.signing_secret,
            process_before_response=True,  # listeners only ack and schedule, so this stays fast
            logger=logging.getLogger("slack_bolt"),
        )
        app.action(re.compile(r"^apprentice_"))(self._on_action)
        app.view("apprentice_correct")(self._on_correct_submit)
        app.view("apprentice_flag")(self._on_flag_submit)
        app.event("message")(self._on_message)
        app.command("/apprentice")(self._on_command)
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

    async def _check_token(self) -> None:
        """Fail start-up on a rejected token; only warn when Slack is merely unreachable."""
        try:
            auth = await self.client.auth_test()
            self._me = await self._identity(auth)
        except SlackApiError as exc:
            if _error_of(exc) in AUTH_ERRORS:
                raise RuntimeError(
                    f"Slack rejected SLACK_BOT_TOKEN ({_error_of(exc)}); copy the Bot User OAuth Token "
                    "(xoxb-...) from the app's 'OAuth & Permissions' page."
                ) from exc
            log.warning("Slack auth.test failed (%s); cards wait in the outbox", _error_of(exc))
        except (OSError, TimeoutError) as exc:
            log.warning("Slack is unreachable (%s); cards wait in the outbox", type(exc).__name__)

    async def _identity(self, auth: Any) -> Identity:
        """Who we are, from auth.test's answer and bots.info (the app id; "" when Slack will not say)."""
        app = ""
        bot = str(auth.get("bot_id") or "")
        if bot:
            try:
                app = str(((await self.client.bots_info(bot=bot)).get("bot") or {}).get("app_id") or "")
            except (SlackApiError, OSError, TimeoutError) as exc:
                log.warning(
                    "Slack bots.info failed (%s); requests' app id is not checked", type(exc).__name__
                )
        return Identity(
            team=str(auth.get("team_id") or ""),
            enterprise=str(auth.get("enterprise_id") or ""),
            app=app,
            org_wide=bool(auth.get("is_enterprise_install")),
        )

    async def _whoami(self) -> Identity | None:
        """Our identity; asked again when Slack was unreachable at start (None: nobody is staff yet)."""
        if self._me is None:
            with contextlib.suppress(RuntimeError):  # a rejected token: logged by the next start
                await self._check_token()
        return self._me

    async def idle(self) -> None:
        """Wait until every scheduled staff action has finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def _spawn(self, key: str | None, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background; work sharing a key runs in the order it was scheduled."""
        before = self._chains.get(key) if key else None

        async def run() -> None:
            if before is not None:
                await asyncio.wait([before])
            try:
                await work
            except Exception:
                log.exception("Slack action failed")

        task = asyncio.create_task(run())
        self._tasks.add(task)
        if key:
            self._chains[key] = task

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if key and self._chains.get(key) is t:
                del self._chains[key]

        task.add_done_callback(done)
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
        except SQLAlchemyError:
            log.exception("could not check a Slack request for a replay")
            return web.Response(status=503, text="try again")
        if replayed:  # Slack signs each delivery and retry afresh: the same signature is a copy
            log.warning("refused a replayed Slack request (its signature was accepted before)")
            return web.Response(status=200, text="")  # answered, nothing done; Slack never retries a 200
        problem = _malformed(raw, request.content_type)
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

    # --- Reviewer (called by the conversation service) -------------------------------------
    async def answer_posted(self, conv: Conversation, answer: Answer) -> None:
        review = self.settings.review
        if answer.repeat and await asyncio.to_thread(self._carded, answer.message_id):
            return  # a redelivered message whose card is already posted or queued
        if review == "all" or (review == "flagged" and answer.flagged):
            # "flagged": False marks a card that may be folded into a digest at volume
            await self._put("card", conv.id, {"message_id": answer.message_id, "flagged": answer.flagged})

    def _carded(self, message_id: int) -> bool:
        if self.store.get_kv(_card_key(message_id)):
            return True
        return self.store.outbox_has(CHANNEL, message_id, "card")

    async def customer_flag(self, conv: Conversation, message_id: int | None, why: str) -> None:
        if self.settings.review == "none":
            return
        oncall = f" <!subteam^{self.settings.oncall_group}>" if self.settings.oncall_group else ""
        # outside APPRENTICE_BUSINESS_HOURS the mention waits for the opening (a scheduled note)
        now = self.service.clock()
        opening = self.service.hours.closed_until(now) if oncall and self.service.hours else None
        if message_id is not None:
            await self._put("update", conv.id, {"message_id": message_id})
            if oncall and opening is not None:
                await self._ping_later(conv.id, f"👎 The customer disliked an answer.{oncall}", opening)
            elif oncall:  # an edited message notifies nobody; a thread reply with the mention does
                await self._put("note", conv.id, {"text": f"👎 The customer disliked an answer.{oncall}"})
            return
        text = f"🙋 *The customer {_esc(why)}.*{oncall} Press *Take over* to reply to them here."
        if opening is not None:
            when = short_time(opening, now.astimezone(opening.tzinfo))
            text = (
                f"🙋 *The customer {_esc(why)}.* (outside business hours; on-call will be pinged at {when}) "
                "Press *Take over* to reply to them here."
            )
            ping = f"⏰ Business hours have started:{oncall} the customer {_esc(why)} while we were away."
            await self._ping_later(conv.id, ping, opening)
        await self._put(
            "note",
            conv.id,
            {"text": text, "buttons": ["take_over"], "message_id": 0, "broadcast": True},
        )

    async def _ping_later(self, conversation_id: int, text: str, opening: dt.datetime) -> None:
        """The on-call mention as a note scheduled for the opening (one per conversation; skipped if
        staff took the conversation over by then). Its own outbox key: the thread's other notes and
        cards do not wait for it."""
        key = f"oncall:{conversation_id}"

        def scheduled() -> bool:
            with self.store.session() as s:
                q = select(OutboxItem.id).where(
                    OutboxItem.channel == CHANNEL, OutboxItem.key == key, OutboxItem.status == "scheduled"
                )
                return s.scalar(q.limit(1)) is not None

        if await asyncio.to_thread(scheduled):
            return
        payload = {"conversation_id": conversation_id, "text": text, "unless_taken": True, "broadcast": True}
        await self.outbox.put("note", payload, key=key, not_before=opening)

    async def relay(self, conv: Conversation, text: str) -> None:
        await self._put("note", conv.id, {"text": f"💬 *Customer:*\n{_quote(text)}"})

    async def correction_stored(self, conv: Conversation | None, correction: Correction) -> None:
        if conv is not None and correction.message_id is not None and self.settings.review != "none":
            await self._put("update", conv.id, {"message_id": correction.message_id})

    async def post_report(self, result: dict[str, Any]) -> None:
        """The nightly learning report, posted to the review channel (through the outbox, like cards)."""
        for kind, payload in report_items(result):
            await self.outbox.put(kind, payload, key="report")

    async def post_stats(self, text: str, chart: str | None = None) -> None:
        """The weekly resolution figures (bot/stats.py), posted like the nightly report: the text,
        then the chart, through the outbox."""
        await self.outbox.put("report", {"text": text}, key="report")
        if chart:
            payload = {"path": chart, "title": "Resolution figures"}
            await self.outbox.put("report_chart", payload, key="report")

    async def _put(self, kind: str, conversation_id: int, payload: dict[str, Any]) -> None:
        await self.outbox.put(
            kind, {"conversation_id": conversation_id, **payload}, key=f"conv:{conversation_id}"
        )

    # --- the outbox sender ----------------------------------------------------------------
    async def _send(self, kind: str, payload: dict[str, Any]) -> None:
        try:
            if kind == "card":
                await self._post_card(int(payload["message_id"]))
            elif kind == "update":
                await self._update_card(int(payload["message_id"]))
            elif kind == "note":
                await self._post_note(payload)
            elif kind == "report":
                text = _short(str(payload["text"]), MAX_SECTION - 8)
                await self.client.chat_postMessage(
                    channel=self.channel_id, text=text, blocks=[_section(f"```{_esc(text)}```")]
                )
            elif kind == "report_chart":
                await self._upload_chart(payload)
            elif kind == "digest":
                await self._post_digest(payload)
            else:
                raise Drop(f"unknown Slack outbox item kind {kind!r}")
        except SlackApiError as exc:
            error = _error_of(exc)
            if error == "missing_scope" and kind == "report_chart":
                # a scope only an admin can grant: retrying would hold the reports behind it forever
                log.error(
                    "Slack refused the nightly chart (missing_scope, needs %s): add the files:write bot "
                    "scope to the Slack app (ops/slack-manifest.yaml) and reinstall it; the chart is "
                    "dropped, the text report is unaffected",
                    _needed_scope(exc) or "files:write",
                )
                raise Drop("Slack app lacks the files:write scope; chart not posted") from exc
            status = getattr(exc.response, "status_code", 0)
            if status == 429 or error == "ratelimited":
                # the limit is per channel and every item posts to the review channel: all wait
                raise Retry("Slack rate limit", _retry_after(exc), hold=True) from exc
            if error in PERMANENT:
                raise Drop(f"Slack refused the {kind}: {error}") from exc
            if error in AUTH_ERRORS or error in ("channel_not_found", "not_in_channel"):
                log.error(
                    "Slack refused a %s (%s): check SLACK_BOT_TOKEN and that the app is in channel %s; "
                    "it will be retried",
                    kind,
                    error,
                    self.channel_id,
                )
            raise Retry(f"Slack error {status} {error}") from exc

    async def _upload_chart(self, payload: dict[str, Any]) -> None:
        """Upload the report's PNG into the review channel (slack_sdk's getUploadURLExternal flow).

        The bytes are read off the event loop; a chart that no retry can bring back is dropped.
        """
        path = Path(str(payload["path"]))
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise Drop(f"the report chart {path} cannot be read ({type(exc).__name__}); not posted") from exc
        try:
            await self.client.files_upload_v2(
                channel=self.channel_id,
                file=data,
                filename=path.name,
                title=str(payload.get("title") or path.name),
                alt_txt=CHART_ALT,
            )
        except SlackRequestError as exc:  # the upload step itself (not a Web API method) failed
            raise Retry(f"Slack file upload failed: {exc}") from exc

    async def _existing_thread(self, conversation_id: int) -> tuple[Conversation, str]:
        """The conversation and the ts of its thread parent in the review channel ("" when none yet)."""
        conv = await asyncio.to_thread(self.store.conversation, conversation_id)
        if conv is None:
            raise Drop(f"conversation {conversation_id} no longer exists")
        channel, _, ts = (conv.review_thread or "").rpartition(":")
        return conv, ts if channel == self.channel_id else ""

    def _header(self, conv: Conversation) -> tuple[str, str]:
        """Who the conversation is with: the customer's name, and the line that heads its thread."""
        customer = self.store.customer(conv.customer_id)
        name = (customer.display_name if customer else "") or "A customer"
        text = (
            f"🧑 *{_esc(name)}* on *{_esc(conv.channel)}* (chat `{_esc(conv.chat_id)}`) · "
            f"conversation #{conv.id}"
        )
        return name, text

    async def _thread(self, conversation_id: int) -> str:
        """The ts of the conversation's thread parent, posting the parent the first time."""
        conv, ts = await self._existing_thread(conversation_id)
        if ts:
            return ts
        name, text = await asyncio.to_thread(self._header, conv)
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": "The bot's answers appear in this thread. After *Take over*, "
                        "replies in this thread go to the customer.",
                    }
                ],
            },
        ]
        resp = await self.client.chat_postMessage(
            channel=self.channel_id, text=f"{name} on {conv.channel}", blocks=blocks
        )
        ts = str(resp["ts"])
        await asyncio.to_thread(self.store.set_review_thread, conv.id, f"{self.channel_id}:{ts}")
        return ts

    async def _post_card(self, message_id: int) -> None:
        state = await asyncio.to_thread(self._card_state, message_id)
        if state is None:
            raise Drop(f"answer {message_id} no longer exists")
        conv, thread = await self._existing_thread(state.conversation_id)
        if not thread and not self._behind():
            thread = await self._thread(conv.id)
        names = await self._names_for(state.actors())
        text, blocks = render_card(state, names, self.settings.oncall_group)
        if not thread:  # behind Slack's pace: the card opens the thread itself, one message instead of two
            blocks = [_context((await asyncio.to_thread(self._header, conv))[1]), *blocks]
        resp = await self.client.chat_postMessage(
            channel=self.channel_id, thread_ts=thread or None, text=text, blocks=blocks
        )
        if not thread:
            await asyncio.to_thread(self.store.set_review_thread, conv.id, f"{self.channel_id}:{resp['ts']}")
        await asyncio.to_thread(self.store.set_kv, _card_key(message_id), f"{self.channel_id}:{resp['ts']}")

    async def _update_card(self, message_id: int) -> None:
        where = await asyncio.to_thread(self.store.get_kv, _card_key(message_id))
        channel, _, ts = (where or "").rpartition(":")
        if not ts or channel != self.channel_id:
            if self.settings.review != "none":
                await self._post_card(message_id)  # never posted (review=flagged): post it now
            return
        state = await asyncio.to_thread(self._card_state, message_id)
        if state is None:
            raise Drop(f"answer {message_id} no longer exists")
        names = await self._names_for(state.actors())
        text, blocks = render_card(state, names, self.settings.oncall_group)
        await self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)

    async def _post_note(self, payload: dict[str, Any]) -> None:
        if payload.get("unless_taken"):  # a scheduled on-call ping: not needed once staff took over
            conv = await asyncio.to_thread(self.store.conversation, int(payload["conversation_id"]))
            if conv is None or conv.mode == "human":
                return
        thread = await self._thread(int(payload["conversation_id"]))
        text = str(payload["text"])[:MAX_SECTION]
        blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
        if payload.get("buttons"):
            value = f"{payload['conversation_id']}:{payload.get('message_id', 0)}"
            blocks.append(
                {
                    "type": "actions",
                    "block_id": "actions",
                    "elements": [_button(b, value) for b in payload["buttons"]],
                }
            )
        await self.client.chat_postMessage(
            channel=self.channel_id,
            thread_ts=thread,
            text=_plain(text),
            blocks=blocks,
            reply_broadcast=bool(payload.get("broadcast")),
        )

    # --- digests: the review backlog at Slack's pace ----------------------------------------
    async def _fold_backlog(self) -> None:
        """Before each outbox round: past APPRENTICE_SLACK_DIGEST_AFTER_S, fold the unflagged backlog.

        A failure only postpones the fold to the next round; the cards themselves stay queued.
        """
        after = self.settings.slack_digest_after_s
        if after <= 0:
            return
        try:
            folded = await asyncio.to_thread(self._fold, after)
        except SQLAlchemyError:
            log.exception("could not fold the Slack review backlog into a digest")
            return
        if folded:
            log.info("Slack is behind: %d unflagged answers folded into digests", folded)
            self._behind_until = time.monotonic() + self.behind_s

    def _behind(self) -> bool:
        """Whether this replica folded a digest lately: the review channel is at Slack's limit, and a
        conversation's first card opens its thread itself instead of after a separate parent."""
        return time.monotonic() < self._behind_until

    def _fold(self, after_s: float) -> int:
        """When the oldest unflagged card has waited `after_s`, mark every unflagged card still
        pending "folded" and queue digest items listing them; returns how many were folded.

        One transaction, and only "pending" rows: a card another replica claimed (or folded) at the
        same moment is in exactly one place. The digests are queued last, so the flagged cards
        already waiting go first. A folded card still counts as queued for `_carded`.
        """
        waiting = (
            OutboxItem.channel == CHANNEL,
            OutboxItem.kind == "card",
            OutboxItem.status == "pending",
            OutboxItem.payload["flagged"].as_boolean().is_(False),
        )
        with self.store.session() as s:
            oldest = s.scalar(select(func.min(OutboxItem.created_at)).where(*waiting))
            if oldest is None or (utcnow() - oldest).total_seconds() < after_s:
                return 0
            rows = s.execute(
                update(OutboxItem)
                .where(*waiting)
                .values(status="folded")
                .returning(OutboxItem.id, OutboxItem.payload)
                .execution_options(synchronize_session=False)
            ).all()
            answers = [[int(p["conversation_id"]), int(p["message_id"])] for _, p in sorted(rows)]
            for start in range(0, len(answers), DIGEST_SIZE):
                digest = {"answers": answers[start : start + DIGEST_SIZE]}
                s.add(OutboxItem(channel=CHANNEL, kind="digest", key="", payload=digest))
        return len(answers)

    async def _post_digest(self, payload: dict[str, Any]) -> None:
        """One top-level message listing the folded answers, one line each (no thread parents)."""
        answers = [(int(c), int(m)) for c, m in payload["answers"]]
        lines = await asyncio.to_thread(self._digest_lines, answers)
        text, blocks = render_digest(lines)
        meta = [{"conversation": c, "answer": m} for c, m in answers]
        await self.client.chat_postMessage(
            channel=self.channel_id,
            text=text,
            blocks=blocks,
            metadata={"event_type": "apprentice_digest", "event_payload": {"answers": meta}},
        )

    def _digest_lines(self, answers: list[tuple[int, int]]) -> list[str]:
        """`#conversation · answer #id: “question” → answer`, shortened to one line each."""
        ids = [m for _, m in answers]
        with self.store.session() as s:
            replies = {m.id: m for m in s.scalars(select(Message).where(Message.id.in_(ids))).all()}
            asked = [m.reply_to_id for m in replies.values() if m.reply_to_id]
            questions = {m.id: m.text for m in s.scalars(select(Message).where(Message.id.in_(asked))).all()}
        lines = []
        for cid, mid in answers:
            msg = replies.get(mid)
            if msg is None:
                lines.append(f"#{cid} · answer #{mid}: (erased)")
                continue
            question = _one_line(questions.get(msg.reply_to_id or 0, ""), 70)
            mark = " ⏳" if msg.status == "busy" else ""
            lines.append(f"#{cid} · answer #{mid}{mark}: “{question}” → {_one_line(msg.text, 100)}")
        return lines

    def _card_state(self, message_id: int) -> CardState | None:
        with self.store.session() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                return None
            conv = s.get(Conversation, msg.conversation_id)
            question = s.get(Message, msg.reply_to_id) if msg.reply_to_id else None
            feedback = s.scalars(
                select(Feedback).where(Feedback.message_id == message_id).order_by(Feedback.id)
            ).all()
            corrections = s.scalars(
                select(Correction).where(Correction.message_id == message_id).order_by(Correction.id)
            ).all()
        return CardState(
            conversation_id=msg.conversation_id,
            message_id=msg.id,
            mode=conv.mode if conv else "bot",
            question=question.text if question else "",
            answer=msg.text,
            status=msg.status,
            sources=list(msg.sources or []),
            model=msg.model,
            adapter_version=msg.adapter_version,
            latency_ms=msg.latency_ms,
            feedback=[(f.kind, f.actor, f.reason) for f in feedback],
            corrections=[(c.id, c.staff, c.corrected, c.reason, c.status) for c in corrections],
        )

    # --- names and staff ----------------------------------------------------------------
    async def _names_for(self, actors: set[str]) -> dict[str, str]:
        return {a: await self._display(a) for a in actors}

    async def _display(self, actor: str) -> str:
        """`@name` for a Slack staff id ("slack:U123"), the actor itself otherwise."""
        if not actor.startswith(f"{CHANNEL}:"):
            return actor
        user = actor.split(":", 1)[1]
        if user not in self._names:
            try:
                info = (await self.client.users_info(user=user))["user"]
                profile = info.get("profile") or {}
                name = profile.get("display_name") or info.get("real_name") or info.get("name") or user
                self._names[user] = f"@{name}"
            except (SlackApiError, OSError, TimeoutError, KeyError):
                return f"<@{user}>"  # Slack itself renders this as @name
        return self._names[user]

    async def _is_staff(
        self, user: str, body: Mapping[str, Any], event: Mapping[str, Any] | None = None
    ) -> bool:
        """Whether `user`, acting through the request `body`, is staff: the request comes from our own
        workspace (organisation) and app, the user is on the staff list, and, when the review channel's
        members are the staff, a full member of our workspace (no guest, no Slack Connect user)."""
        me = await self._whoami()
        if me is None:
            log.warning("refused a Slack action: Slack has not said yet which workspace is ours")
            return False
        why = _foreign(me, body, event or {})
        if not why and user in await self._staff():
            if self._staff_users or self._staff_groups:
                return True
            why = await self._outsider(user, me)
            if not why:
                return True
        if why:
            log.info("refused a Slack action by %s: %s", user, why)
        return False

    async def _outsider(self, user: str, me: Identity) -> str:
        """Why a member of the review channel is not staff ("" when a full member of our workspace).

        users.info, cached like the staff list; when Slack cannot say, the last answer or a refusal."""
        now = time.monotonic()
        cached = self._members.get(user)
        if cached is not None and now - cached[0] < STAFF_CACHE_S:
            return cached[1]
        try:
            info = (await self.client.users_info(user=user))["user"]
        except (SlackApiError, OSError, TimeoutError, KeyError, TypeError) as exc:
            log.warning("could not look up Slack user %s (%s)", user, type(exc).__name__)
            return cached[1] if cached is not None else "users.info failed"
        why = _not_a_member(info if isinstance(info, dict) else {}, me)
        self._members[user] = (now, why)
        return why

    async def _staff(self) -> frozenset[str]:
        """APPRENTICE_STAFF users and groups, else the review channel's members (cached a while)."""
        if not self._staff_groups and self._staff_users:
            return self._staff_users
        now = time.monotonic()
        if self._staff_cache is not None and now - self._staff_cache[0] < STAFF_CACHE_S:
            return self._staff_cache[1]
        found: set[str] = set(self._staff_users)
        try:
            if self._staff_groups:
                for group in self._staff_groups:
                    resp = await self.client.usergroups_users_list(usergroup=group)
                    found.update(resp.get("users") or [])
            else:
                cursor = None
                while True:
                    resp = await self.client.conversations_members(
                        channel=self.channel_id, limit=1000, cursor=cursor
                    )
                    found.update(resp.get("members") or [])
                    cursor = (resp.get("response_metadata") or {}).get("next_cursor")
                    if not cursor:
                        break
        except (SlackApiError, OSError, TimeoutError) as exc:
            log.warning("could not read the staff list from Slack (%s)", type(exc).__name__)
            # fail closed, but keep a previous answer while Slack is unreachable
            return self._staff_cache[1] if self._staff_cache else frozenset(self._staff_users)
        staff = frozenset(found)
        self._staff_cache = (now, staff)
        return staff

    async def _refuse(self, user: str, channel: str | None, thread_ts: str | None = None) -> None:
        log.info("refused a Slack action by non-staff user %s", user)
        await self._ephemeral(user, REFUSAL, channel, thread_ts)

    async def _ephemeral(
        self, user: str, text: str, channel: str | None = None, thread_ts: str | None = None
    ) -> None:
        try:
            await self.client.chat_postEphemeral(
                channel=channel or self.channel_id, user=user, text=text, thread_ts=thread_ts
            )
        except (SlackApiError, OSError, TimeoutError) as exc:
            log.warning("could not send an ephemeral message to %s (%s)", user, type(exc).__name__)

    # --- listeners: buttons ---------------------------------------------------------------
    async def _on_action(self, ack: Any, body: dict[str, Any]) -> None:
        await ack()
        action = (body.get("actions") or [{}])[0]
        user = str((body.get("user") or {}).get("id", ""))
        name = str(action.get("action_id", "")).removeprefix("apprentice_")
        try:
            cid, mid = (int(x) for x in str(action.get("value", "")).split(":", 1))
        except ValueError:
            log.warning("Slack action %s with an unreadable value", name)
            return
        channel = str((body.get("channel") or {}).get("id") or self.channel_id)
        if name in ("correct", "flag"):  # the trigger id expires in 3 s: open modals at once
            self._spawn(
                None,
                self._open_modal(name, user, channel, cid, mid, str(body.get("trigger_id", "")), body),
            )
        else:
            self._spawn(f"conv:{cid}", self._button(name, user, channel, cid, mid, body))

    async def _button(
        self, name: str, user: str, channel: str, cid: int, mid: int, body: Mapping[str, Any]
    ) -> None:
        if not await self._is_staff(user, body):
            await self._refuse(user, channel)
            return
        staff = f"{CHANNEL}:{user}"
        if name == "approve":
            if await self.service.staff_feedback(mid, "approve", staff):
                await self._put("update", cid, {"message_id": mid})
        elif name in ("take_over", "hand_back"):
            conv = await asyncio.to_thread(self.store.conversation, cid)
            if conv is None:
                return
            if name == "take_over" and conv.mode != "human":
                await self.service.take_over(cid, staff)
                note = (
                    f"🙋 <@{user}> took over. The bot is paused for this conversation; replies in this "
                    "thread go to the customer."
                )
                await self._after_mode_change(cid, mid, note, ["hand_back"])
            elif name == "hand_back" and conv.mode == "human":
                await self.service.hand_back(cid, staff)
                await self._after_mode_change(
                    cid, mid, f"🤖 <@{user}> handed back; the bot answers again.", []
                )
        else:
            log.warning("unknown Slack action %s", name)

    async def _after_mode_change(self, cid: int, mid: int, note: str, buttons: list[str]) -> None:
        if mid:
            await self._put("update", cid, {"message_id": mid})
        await self._put("note", cid, {"text": note, "buttons": buttons, "message_id": mid})

    async def _open_modal(
        self, name: str, user: str, channel: str, cid: int, mid: int, trigger: str, body: Mapping[str, Any]
    ) -> None:
        if not await self._is_staff(user, body):
            await self._refuse(user, channel)
            return
        msg = await asyncio.to_thread(self.store.message, mid)
        if msg is None:
            await self._ephemeral(user, f"Answer #{mid} no longer exists.", channel)
            return
        meta = self._sign_form({"c": cid, "m": mid, "ch": channel, "u": user})
        view = correct_modal(msg.text, meta) if name == "correct" else flag_modal(meta)
        try:
            await self.client.views_open(trigger_id=trigger, view=view)
        except SlackApiError as exc:
            log.warning("could not open the %s modal (%s)", name, _error_of(exc))
            await self._ephemeral(
                user, "Slack did not open the form; please press the button again.", channel
            )

    def _sign_form(self, fields: dict[str, Any]) -> str:
        """A form's private_metadata: the answer, channel and user it was opened for, and their HMAC."""
        return form_metadata(self._form_key, fields)

    def _form(self, view: dict[str, Any], user: str) -> dict[str, Any] | None:
        """The answer a submitted form is about ({"m", "c", "ch"}); None when its metadata is
        unreadable, was not signed by us (forged, altered, or from before signing), or the form was
        opened for someone else."""
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
            fields = {"c": int(meta["c"]), "m": int(meta["m"]), "ch": meta.get("ch"), "u": str(meta["u"])}
            mac = str(meta["s"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if not (self._form_key and hmac.compare_digest(_form_mac(self._form_key, fields), mac)):
            log.warning("refused a Slack form whose metadata we did not sign (answer #%s)", fields["m"])
            return None
        if fields["u"] != user:
            log.warning("refused a Slack form opened by %s and submitted by %s", fields["u"], user)
            return None
        return {"m": fields["m"], "c": fields["c"], "ch": fields["ch"]}

    # --- listeners: modal submissions -------------------------------------------------------
    async def _on_correct_submit(self, ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        user = str((body.get("user") or {}).get("id", ""))
        meta = self._form(view, user)
        values = _values(view)
        text = str(((values.get("corrected") or {}).get("text") or {}).get("value") or "")
        selected = ((values.get("reason") or {}).get("reason") or {}).get("selected_option") or {}
        reason = str(selected.get("value") or "other")
        chosen = ((values.get("options") or {}).get("options") or {}).get("selected_options") or []
        options = {str(o.get("value")) for o in chosen}
        if not await self._is_staff(user, body):
            await ack(response_action="errors", errors={"corrected": REFUSAL})
            self._spawn(None, self._refuse(user, (meta or {}).get("ch")))
            return
        if not text.strip():
            await ack(
                response_action="errors", errors={"corrected": "Type the answer the customer should get."}
            )
            return
        problem = correction_problem(text)  # a pasted secret: the form stays open, nothing is stored
        if problem:
            await ack(response_action="errors", errors={"corrected": problem})
            return
        if meta is None:
            await ack(response_action="errors", errors={"corrected": STALE_FORM})
            return
        await ack()
        mid, cid = meta["m"], meta["c"]
        key = request_key(mid, user, text)
        work = self._correct(
            user, meta.get("ch"), mid, text, reason, SEND in options, REMEMBER in options, key
        )
        task = self._spawn(f"conv:{cid}", work)
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
            result = await self.service.correct(
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

    async def _on_flag_submit(self, ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        user = str((body.get("user") or {}).get("id", ""))
        meta = self._form(view, user)
        values = _values(view)
        reason = str(((values.get("reason") or {}).get("reason") or {}).get("value") or "")
        if not await self._is_staff(user, body):
            await ack(response_action="errors", errors={"reason": REFUSAL})
            self._spawn(None, self._refuse(user, (meta or {}).get("ch")))
            return
        if meta is None:
            await ack(response_action="errors", errors={"reason": STALE_FORM})
            return
        await ack()
        mid, cid = meta["m"], meta["c"]

        async def flag() -> None:
            if await self.service.staff_feedback(mid, "flag", f"{CHANNEL}:{user}", reason.strip()):
                await self._put("update", cid, {"message_id": mid})

        self._spawn(f"conv:{cid}", flag())

    # --- listeners: thread replies ------------------------------------------------------
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

    async def _thread_reply(self, event_id: str, event: dict[str, Any], body: Mapping[str, Any]) -> None:
        if not await asyncio.to_thread(self.store.claim_update, CHANNEL, event_id):
            log.info("Slack event %s already handled (a retry)", event_id)
            return
        thread = f"{self.channel_id}:{event['thread_ts']}"
        conv = await asyncio.to_thread(self._conversation_by_thread, thread)
        if conv is None or conv.mode != "human":
            return  # staff talking among themselves
        user = str(event.get("user", ""))
        if not await self._is_staff(user, body, event):
            await self._refuse(user, self.channel_id, str(event["thread_ts"]))
            return
        text = slack_to_plain(str(event.get("text", "")))
        delivered = await self.service.staff_reply(
            conv.id, text, f"{CHANNEL}:{user}", external_id=f"{CHANNEL}:{event.get('ts')}"
        )
        if text.strip() and not delivered:
            await self._ephemeral(
                user,
                "Your reply is stored but could not be sent to the customer now.",
                self.channel_id,
                str(event["thread_ts"]),
            )

    def _conversation_by_thread(self, thread: str) -> Conversation | None:
        with self.store.session() as s:
            return s.scalar(select(Conversation).where(Conversation.review_thread == thread).limit(1))

    # --- the /apprentice command --------------------------------------------------------
    async def _on_command(self, ack: Any, command: dict[str, Any]) -> None:
        user = str(command.get("user_id", ""))
        if not await self._is_staff(user, command):
            await ack(text=REFUSAL)
            return
        await ack(text=await self.command(str(command.get("text", "")), f"{CHANNEL}:{user}"))

    async def command(self, text: str, staff: str) -> str:
        """`/apprentice status | corrections | pending | approve ID | revoke ID`: the reply shown to staff."""
        verb, _, arg = text.strip().partition(" ")
        verb = verb.lower()
        if verb in ("", "status"):
            return await asyncio.to_thread(self._status)
        if verb == "stats":
            from bot.stats import compute, format_stats, parse_days, write_chart

            days = parse_days(arg)
            if days is None:
                return "Usage: `/apprentice stats [7d]` (the last N days, 1 to 366; default 7)."
            figures = await asyncio.to_thread(compute, self.store, days)
            # the chart goes to the review channel (a slash command's reply cannot carry a file)
            stamp = utcnow().strftime("%Y%m%dT%H%M%S")
            path = self.settings.data_dir / "stats" / f"{stamp}-{days}d.png"
            chart = await asyncio.to_thread(write_chart, figures, path)
            title = f"Resolution figures, last {days} days (asked by <@{staff.removeprefix(CHANNEL + ':')}>)"
            await self.outbox.put("report_chart", {"path": str(chart), "title": title}, key="report")
            return f"```{_esc(format_stats(figures))}```\nThe chart follows in the review channel."
        if verb == "corrections":
            latest = await asyncio.to_thread(self.store.corrections, limit=10)
            if not latest:
                return "No corrections yet."
            lines = ["*Latest corrections*"]
            for c in latest:
                who = await self._display(c.staff)
                when = c.created_at.strftime("%Y-%m-%d %H:%M")
                state = "" if c.status == "active" else f" · *{c.status}*"
                lines.append(
                    f"#{c.id} · {when} · {who} · {c.reason}{state}\n{_quote(_short(c.question, 150))}\n"
                    f"→ {_esc(_short(c.corrected, 300))}"
                )
            return "\n".join(lines)
        if verb == "pending":
            waiting = [c for c in await asyncio.to_thread(self.store.corrections) if c.status == "pending"]
            if not waiting:
                return "No corrections wait for a second approval."
            lines = ["*Corrections waiting for a second approval* (`/apprentice approve ID`)"]
            for c in waiting[:20]:
                who = await self._display(c.staff)
                lines.append(
                    f"#{c.id} · by {who}\n{_quote(_short(c.question, 150))}\n"
                    f"→ {_esc(_short(c.corrected, 300))}"
                )
            return "\n".join(lines)
        if verb == "approve":
            try:
                cid = int(arg.strip().lstrip("#"))
            except ValueError:
                return "Usage: `/apprentice approve ID` (the number from `/apprentice pending`)."
            corr, outcome = await self.service.approve_correction(cid, staff)
            if outcome == "approved" and corr is not None:
                if corr.conversation_id is not None and corr.message_id is not None:
                    await self._put("update", corr.conversation_id, {"message_id": corr.message_id})
                return f"Correction #{cid} approved: memory and training now use it."
            return {
                "missing": f"There is no correction #{cid}. `/apprentice pending` lists those waiting.",
                "not pending": f"Correction #{cid} does not wait for an approval.",
                "same person": f"Correction #{cid} is yours; a second staff member must approve it.",
            }[outcome]
        if verb == "revoke":
            try:
                cid = int(arg.strip().lstrip("#"))
            except ValueError:
                return "Usage: `/apprentice revoke ID` (the number from `/apprentice corrections`)."
            corr = await self.service.revoke(cid, staff)
            if corr is None:
                return f"There is no correction #{cid}. `/apprentice corrections` lists them."
            return f"Correction #{cid} revoked: it is no longer used for memory or training."
        return (
            "Usage: `/apprentice status`, `/apprentice stats [7d]`, `/apprentice corrections`, "
            "`/apprentice pending`, "
            "`/apprentice approve ID` or `/apprentice revoke ID`."
        )

    def _status(self) -> str:
        midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        counts = self.store.counts_since(midnight)
        adapter = "base"
        try:
            with self.store.session() as s:
                row = s.get(RegistryState, 1)
                if row is not None and row.active_version:
                    adapter = row.active_version
        except SQLAlchemyError:
            pass
        waiting = self.store.outbox_depth(CHANNEL)
        return (
            f"*Today (UTC):* {counts['conversations']} conversations, {counts['answers']} answers, "
            f"{counts['corrections']} corrections.\n*Active adapter:* {adapter}"
            + (f"\n{waiting} Slack posts waiting in the outbox." if waiting else "")
        )


# --- cards and modals (plain functions: easy to read, easy to test) --------------------------
@dataclass
class CardState:
    """Everything a review card shows, read from the store when the card is (re)drawn."""

    conversation_id: int
    message_id: int
    mode: str
    question: str
    answer: str
    status: str
    sources: list[dict[str, Any]]
    model: str | None
    adapter_version: str | None
    latency_ms: float | None
    feedback: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, actor, reason)
    corrections: list[tuple[int, str, str, str, str]] = field(default_factory=list)

    def actors(self) -> set[str]:
        return {a for k, a, _ in self.feedback if k in ("approve", "flag")} | {c[1] for c in self.corrections}


def render_card(state: CardState, names: dict[str, str], oncall_group: str = "") -> tuple[str, list[Any]]:
    """The card's fallback text and Block Kit blocks."""
    blocks: list[dict[str, Any]] = [
        _section(f"*Customer:*\n{_quote(_short(state.question, 1400))}"),
        _section(f"*Bot:*\n{_quote(_short(state.answer, 1400))}"),
    ]
    if state.sources:
        shown = []
        for s in state.sources[:6]:
            score = float(s.get("score") or 0.0)
            if s.get("kind") == "correction":
                shown.append(f"📌 correction memory #{s.get('correction_id')} ({score:.2f})")
            else:
                shown.append(
                    f"📄 {_esc(_short(str(s.get('title') or s.get('source') or '?'), 80))} ({score:.2f})"
                )
        blocks.append(_context("*Sources:* " + " · ".join(shown)))
    else:
        blocks.append(_context("*Sources:* none"))
    latency = f"{state.latency_ms:,.0f} ms" if state.latency_ms is not None else "n/a"
    blocks.append(
        _context(
            f"adapter *{_esc(state.adapter_version or 'base')}* · model {_esc(state.model or 'n/a')} · "
            f"{latency} · answer #{state.message_id} · conversation #{state.conversation_id}"
        )
    )
    marks = []
    if state.status in ("unsure", "error", "busy", "blocked"):
        marks.append(
            {
                "unsure": "❔ The bot was not sure.",
                "error": "⚠️ The model failed.",
                "busy": "⏳ The model was busy.",
                "blocked": "🛡️ The output guard withheld the model's reply (it would have leaked data).",
            }[state.status]
        )
    if any(k == "down" for k, _, _ in state.feedback):
        mention = f" <!subteam^{oncall_group}>" if oncall_group else ""
        marks.append(f"👎 *The customer disliked this answer.*{mention}")
    for kind, actor, reason in state.feedback:
        who = names.get(actor, actor)
        if kind == "approve":
            marks.append(f"✅ Approved by {who}")
        elif kind == "flag":
            marks.append(f"🚩 Flagged by {who}" + (f": {_esc(_short(reason, 300))}" if reason else ""))
    for cid, actor, corrected, reason, status in state.corrections:
        label = dict(REASONS).get(reason, reason)
        revoked = {
            "revoked": " ~(revoked)~",
            "pending": f" (waits for a second staff approval: `/apprentice approve {cid}`)",
        }.get(status, "")
        marks.append(
            f"✏️ *Corrected by {names.get(actor, actor)}* ({label}, #{cid}){revoked}:\n"
            f"{_quote(_short(corrected, 1200))}"
        )
    if state.mode == "human":
        marks.append("🙋 Taken over by staff: the bot is paused.")
    if marks:
        blocks.append(_section(_short("\n".join(marks), MAX_SECTION)))
    value = f"{state.conversation_id}:{state.message_id}"
    buttons = ["approve", "flag", "correct", "hand_back" if state.mode == "human" else "take_over"]
    blocks.append(
        {"type": "actions", "block_id": "actions", "elements": [_button(b, value) for b in buttons]}
    )
    corrected = f" (corrected by {names.get(state.corrections[-1][1], '')})" if state.corrections else ""
    text = f"Answer #{state.message_id}{corrected}: {_short(state.answer, 200)}"
    return text, blocks


def render_digest(lines: list[str]) -> tuple[str, list[Any]]:
    """A digest's fallback text and blocks: a header, then the answer lines in sections."""
    header = (
        f"🗂️ *{len(lines)} answers without a flag*: the review channel is at Slack's posting limit "
        "(about one message a second), so they are listed here. Flagged answers still get their own "
        "cards; a customer's 👎 brings an answer's full card."
    )
    blocks: list[dict[str, Any]] = [_section(header)]
    chunk: list[str] = []
    for line in lines:
        if chunk and len("\n".join([*chunk, line])) > MAX_SECTION:
            blocks.append(_section("\n".join(chunk)))
            chunk = []
        chunk.append(line)
    if chunk:
        blocks.append(_section("\n".join(chunk)))
    return f"Digest of {len(lines)} answers", blocks


_BUTTONS = {
    "approve": ("Approve", "primary"),
    "flag": ("Flag", "danger"),
    "correct": ("Correct", None),
    "take_over": ("Take over", None),
    "hand_back": ("Hand back", None),
}


def _button(name: str, value: str) -> dict[str, Any]:
    label, style = _BUTTONS[name]
    button: dict[str, Any] = {
        "type": "button",
        "action_id": f"apprentice_{name}",
        "text": {"type": "plain_text", "text": label},
        "value": value,
    }
    if style:
        button["style"] = style
    return button


def correct_modal(answer: str, private_metadata: str) -> dict[str, Any]:
    """The Correct form: the answer pre-filled, a reason, and two options that start ticked."""
    options = [
        {"text": {"type": "plain_text", "text": "Send to the customer"}, "value": SEND},
        {"text": {"type": "plain_text", "text": "Remember for similar questions"}, "value": REMEMBER},
    ]
    reasons = [{"text": {"type": "plain_text", "text": label}, "value": v} for v, label in REASONS]
    return {
        "type": "modal",
        "callback_id": "apprentice_correct",
        "private_metadata": private_metadata,
        "title": {"type": "plain_text", "text": "Correct the answer"},
        "submit": {"type": "plain_text", "text": "Save"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "input",
                "block_id": "corrected",
                "label": {"type": "plain_text", "text": "The answer the customer should get"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": "text",
                    "multiline": True,
                    "initial_value": answer[:3000],
                    "max_length": 3000,
                },
            },
            {
                "type": "input",
                "block_id": "reason",
                "label": {"type": "plain_text", "text": "Reason"},
                "element": {
                    "type": "static_select",
                    "action_id": "reason",
                    "options": reasons,
                    "initial_option": reasons[0],
                },
            },
            {
                "type": "input",
                "block_id": "options",
                "optional": True,
                "label": {"type": "plain_text", "text": "Options"},
                "element": {
                    "type": "checkboxes",
                    "action_id": "options",
                    "options": options,
                    "initial_options": options,
                },
            },
        ],
    }


def flag_modal(private_metadata: str) -> dict[str, Any]:
    return {
        "type": "modal",
        "callback_id": "apprentice_flag",
        "private_metadata": private_metadata,
        "title": {"type": "plain_text", "text": "Flag the answer"},
        "submit": {"type": "plain_text", "text": "Flag"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "input",
                "block_id": "reason",
                "optional": True,
                "label": {"type": "plain_text", "text": "Why? (optional)"},
                "element": {"type": "plain_text_input", "action_id": "reason", "max_length": 500},
            }
        ],
    }


def request_key(message_id: int, user: str, text: str) -> str:
    """The idempotency key of a correction: retries, double submits and a second modal store once."""
    digest = hashlib.sha256(f"{message_id}\n{user}\n{' '.join(text.split())}".encode()).hexdigest()
    return f"{CHANNEL}:{digest[:48]}"


_LINK = re.compile(r"<([^<>|]+)(?:\|([^<>]*))?>")


def slack_to_plain(text: str) -> str:
    """Slack message markup as plain text for a customer: links unwrapped, mentions dropped."""

    def link(m: re.Match[str]) -> str:
        target, label = m.group(1), m.group(2)
        if target[:1] in "@#!":
            return label or ""
        target = target.removeprefix("mailto:")
        return f"{label} ({target})" if label and label != target else target

    out = _LINK.sub(link, text)
    return out.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").strip()


def _malformed(raw: bytes, content_type: str) -> str:
    """Why a signed body is not a Slack request ("" when it may be one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "body is not UTF-8"
    # The same rules as bolt's parse_body: JSON when declared so OR when the body starts with "{";
    # form fields through parse_qsl, where the last of repeated fields wins.
    if content_type == "application/json" or text.startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            return "body is not JSON"
        if not isinstance(body, dict):
            return "body is not a JSON object"
        return _odd_shape(body, EVENT_SHAPE)
    form = dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
    if "payload" in text and "payload" in form:
        try:
            payload = json.loads(form["payload"])
        except ValueError:
            return "payload is not JSON"
        if not isinstance(payload, dict):
            return "payload is not a JSON object"
        problem = _odd_shape(payload, PAYLOAD_SHAPE)
        if problem:
            return problem
        if payload.get("type") == "block_actions" and not (
            payload.get("actions") and all(isinstance(a.get("action_id"), str) for a in payload["actions"])
        ):
            return "block_actions without actions"
        view = payload.get("view")
        if payload.get("type") in ("view_submission", "view_closed") and not (
            isinstance(view, dict)
            and isinstance(view.get("type"), str)
            and isinstance(view.get("callback_id"), str)
        ):
            return "a view payload without a view type and callback_id"
    return ""


# The types bolt and our listeners rely on, checked before either reads the body: field -> type,
# or field -> nested shape (a dict), or field -> (list, item shape). Absent fields are fine.
EVENT_SHAPE: dict[str, Any] = {
    "type": str,
    "team_id": str,
    "api_app_id": str,
    "event_id": str,
    "event": {"type": str},  # lenient: other event types carry objects where messages carry ids
    "authorizations": (list, dict),
}
PAYLOAD_SHAPE: dict[str, Any] = {
    "type": str,
    "user": {"id": str},
    "team": dict,
    "channel": {"id": str},
    "container": dict,
    "message": dict,
    "enterprise": dict,
    "trigger_id": str,
    "actions": (list, {"action_id": str}),
    "view": {"type": str, "callback_id": str, "private_metadata": str, "state": {"values": dict}},
}


def _odd_shape(body: dict[str, Any], shape: dict[str, Any]) -> str:
    """The first field of `body` whose type is not what `shape` says ("" when all fit)."""
    for name, want in shape.items():
        if name not in body or (body[name] is None and name in ("enterprise", "team", "channel")):
            continue
        value = body[name]
        if isinstance(want, dict):
            if not isinstance(value, dict):
                return f"{name} is not an object"
            inner = _odd_shape(value, want)
            if inner:
                return f"{name}.{inner}"
        elif isinstance(want, tuple):
            kind, item = want
            if not isinstance(value, kind):
                return f"{name} is not a list"
            for element in value:
                if not isinstance(element, dict):
                    return f"{name} holds a non-object"
                if isinstance(item, dict) and _odd_shape(element, item):
                    return f"{name} holds an odd object"
        elif not isinstance(value, want):
            return f"{name} is not a {want.__name__}"
    return ""


def form_metadata(key: bytes, fields: dict[str, Any]) -> str:
    """A form's private_metadata: `fields` ({"c", "m", "ch", "u"}) and their HMAC under `key`
    (FORM_SECRET_KV in the database; tools that submit forms, like the soak, sign with it too)."""
    return json.dumps({**fields, "s": _form_mac(key, fields)})


def _form_mac(key: bytes, fields: dict[str, Any]) -> str:
    """HMAC-SHA256 of a form's metadata fields, in one canonical JSON spelling."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Our own Slack workspace, Enterprise Grid organisation ("" when none) and app ("" when unknown)."""

    team: str
    enterprise: str = ""
    app: str = ""
    org_wide: bool = False  # installed on a whole organisation: any of its workspaces is ours


def _id_of(value: Any) -> str:
    return str(value.get("id") or "") if isinstance(value, dict) else ""


def _foreign(me: Identity, body: Mapping[str, Any], event: Mapping[str, Any]) -> str:
    """Why a request does not come from our workspace and app ("" when it does).

    The team and organisation the request was made in (`team.id` of interactivity payloads,
    `team_id` of events and commands), the acting user's own team (Slack Connect users keep
    theirs: `user.team_id`, an event's `user_team`) and the app (`api_app_id`)."""
    team = _id_of(body.get("team")) or str(body.get("team_id") or "")
    enterprise = _id_of(body.get("enterprise")) or str(body.get("enterprise_id") or "")
    user = body.get("user")
    user_team = str((user.get("team_id") if isinstance(user, dict) else "") or event.get("user_team") or "")
    app = str(body.get("api_app_id") or "")
    if me.org_wide:
        if enterprise != me.enterprise:
            return f"the request came from organisation {enterprise or '(none)'}"
    else:
        if team != me.team:
            return f"the request came from team {team or '(none)'}"
        if enterprise and enterprise != me.enterprise:
            return f"the request came from organisation {enterprise}"
        if user_team and user_team != me.team:
            return f"a user of team {user_team} (Slack Connect)"
    if me.app and app and app != me.app:
        return f"the request is for app {app}"
    return ""


def _not_a_member(info: dict[str, Any], me: Identity) -> str:
    """Why a users.info user is not a full member of our workspace ("" when they are)."""
    if info.get("is_stranger"):
        return "an external user (Slack Connect)"
    if info.get("is_restricted") or info.get("is_ultra_restricted"):
        return "a guest account"
    if info.get("deleted") or info.get("is_bot"):
        return "a deactivated account or a bot"
    if me.org_wide:
        grid = info.get("enterprise_user")
        if not isinstance(grid, dict) or grid.get("enterprise_id") != me.enterprise:
            return "a user outside our organisation"
    elif info.get("team_id") != me.team:
        return f"a user of team {info.get('team_id')} (Slack Connect)"
    return ""


class _SocketHandler(AsyncSocketModeHandler):
    """Bolt's Socket Mode handler; an envelope handled before (by any replica) is acked, not handled."""

    def __init__(self, app: AsyncApp, app_token: str, seen: Any) -> None:
        super().__init__(app, app_token)
        self._seen = seen

    async def handle(self, client: AsyncBaseSocketModeClient, req: SocketModeRequest) -> None:  # type: ignore[override]
        if req.envelope_id and await self._seen(req.envelope_id):
            log.warning("ignored a Socket Mode envelope delivered again (%s)", req.envelope_id)
            await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))
            return
        await super().handle(client, req)  # type: ignore[arg-type]


def _values(view: dict[str, Any]) -> dict[str, Any]:
    values = (view.get("state") or {}).get("values") or {}
    return {k: v for k, v in values.items() if isinstance(v, dict)} if isinstance(values, dict) else {}


def _api_url(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _rank(item: OutboxItem) -> int:
    """Outbox order: an unflagged answer's card (which a digest may replace) after everything else."""
    return 1 if item.kind == "card" and item.payload.get("flagged") is False else 0


def _card_key(message_id: int) -> str:
    return f"slack:card:{message_id}"


def _error_of(exc: SlackApiError) -> str:
    data = getattr(exc.response, "data", None)
    return str(data.get("error", "")) if isinstance(data, dict) else ""


def _needed_scope(exc: SlackApiError) -> str:
    """The scope Slack names in a missing_scope error ("" when it names none)."""
    data = getattr(exc.response, "data", None)
    return str(data.get("needed") or "") if isinstance(data, dict) else ""


def report_items(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The outbox items of a learning report: its text, then its chart (nothing for a skipped run)."""
    if result.get("status") == "skipped":
        return []
    from learning.nightly import format_report  # lazy: the learning job's imports are not ours

    items: list[tuple[str, dict[str, Any]]] = [("report", {"text": format_report(result)})]
    if result.get("chart"):  # one key for both: the chart follows its text, never overtakes it
        items.append(("report_chart", _chart_payload(result)))
    return items


def queue_report(store: Store, result: dict[str, Any]) -> int:
    """Queue a report made outside `serve` (`apprentice retrain`, the CronJob) for the review channel.

    Whichever bot replica drains the Slack outbox posts it; returns how many items were queued.
    """
    items = report_items(result)
    for kind, payload in items:
        store.enqueue(CHANNEL, kind, payload, "report")
    return len(items)


def _chart_payload(result: dict[str, Any]) -> dict[str, Any]:
    """The outbox item of a report's chart: its path and a title that says which run it shows."""
    candidate = result.get("candidate") or "?"
    baseline = result.get("baseline") or "base model"
    title = f"Nightly learning ({result.get('status', '?')}): {candidate} vs {baseline}"
    return {"path": str(result["chart"]), "title": title}


def _retry_after(exc: SlackApiError) -> float:
    headers = getattr(exc.response, "headers", None) or {}
    try:
        return max(0.0, float(headers.get("Retry-After", 1)))
    except (TypeError, ValueError):
        return 1.0


def _parse_staff(value: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """APPRENTICE_STAFF: user ids (U..., W...) and user group ids (S...)."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    return frozenset(x for x in items if not x.startswith("S")), tuple(x for x in items if x.startswith("S"))


def _esc(text: str) -> str:
    """Escape for mrkdwn, so customer text can never mention @channel or fake a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _quote(text: str) -> str:
    return "\n".join(f">{_esc(line)}" for line in (text or " ").splitlines() or [" "])


def _plain(mrkdwn: str) -> str:
    return mrkdwn.replace("*", "")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str, limit: int) -> str:
    """Customer or model text as one escaped line of at most `limit` characters."""
    return _esc(_short(" ".join(text.split()), limit))


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _short(text, MAX_SECTION)}}


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": _short(text, MAX_SECTION)}]}


__all__ = [
    "CardState",
    "SlackChannel",
    "correct_modal",
    "form_metadata",
    "render_card",
    "render_digest",
    "request_key",
    "slack_to_plain",
]
