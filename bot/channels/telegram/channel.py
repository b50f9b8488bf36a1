"""The Telegram channel: python-telegram-bot (v22, async) translated to our own records at the edge.

This module takes updates in; `sender` sends the replies out (the two modules that import
`telegram`), and `text` holds the plain helpers. Updates arrive by long polling (default) or by
webhook on the project's HTTP server (`/telegram`, when APPRENTICE_TELEGRAM_WEBHOOK_URL is set),
become plain `Inbound` records for `ConversationService`, and the replies leave through the
durable `Outbox`, so a reply that Telegram refuses for now is kept and retried, never lost.

Delivery guarantees, and why they are shaped this way:

- **Each update once, none lost.** A webhook update is written to the database inbox before
  Telegram gets its 200 (Telegram redelivers anything else). Handling claims the update with a
  lease (`store.inbox_claim`, shared by restarts and replicas) and moves it to `processed_updates`
  only once its replies are in the outbox. A process killed in between leaves the claim to run
  out; then the sweeper hands the update in again, and the conversation service finds the stored
  message (and answer, if there is one) instead of answering twice. A redelivered update that is
  done is skipped. Long polling records each update when it is handled; an update fetched but not
  yet recorded when the process dies is lost (python-telegram-bot confirms updates on its next
  fetch), so deployments that must lose nothing use the webhook.
- **Replies at least once.** Every reply is written to the outbox before it is sent (`sender`).
- **One chat in order, chats concurrently.** PTB hands us updates one at a time in arrival order;
  our handler only starts a task per update and returns. Tasks of one chat queue on that chat's
  lock (`KeyedLocks`) in arrival order (an uncontended `asyncio.Lock` is taken without yielding, and
  waiters are served FIFO), tasks of different chats run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from telegram import CallbackQuery, Message, MessageEntity, Update
from telegram.constants import ChatType
from telegram.error import Conflict, InvalidToken, TelegramError
from telegram.ext import Application, ApplicationBuilder, ContextTypes, TypeHandler

from bot import logsafe
from bot.channels.telegram.sender import TelegramSender
from bot.channels.telegram.text import parse_csat, parse_feedback
from bot.conversation import ConversationService
from bot.envelope import Inbound, Outbound, clean_text
from bot.http import HttpServer
from bot.keylock import KeyedLocks
from bot.messages import CATALOG
from knowledge.settings import ConfigError, Settings
from knowledge.store import Store

log = logging.getLogger(__name__)

CHANNEL = "telegram"
WEBHOOK_PATH = "/telegram"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
SECRET_KV = "telegram_webhook_secret"
ALLOWED_UPDATES = ["message", "edited_message", "callback_query"]
CONFLICT_WINDOW_S = 120.0  # two 409s within this window: another process polls this token
# the English texts; every language's are in bot/messages.py
HELP_TEXT = CATALOG["help"]["en"]
ALREADY_RATED = CATALOG["already_rated"]["en"]
# An update whose handling failed (or was cut short by a crash) this often is not tried again: the
# customer gets an apology and staff a note. High enough that restarts alone never reach it (the
# soak: 50 kills in 10 minutes cut some updates 3 times), low enough to stop a crash loop.
MAX_ATTEMPTS = 8
# content a customer can send besides text; anything else (members joining, pins…) is not a message to us
_CONTENT_KINDS = (
    ("photo", "photo"),
    ("voice", "voice"),
    ("sticker", "sticker"),
    ("document", "document"),
    ("location", "location"),
    ("venue", "location"),
    ("animation", "other"),
    ("audio", "other"),
    ("video", "other"),
    ("video_note", "other"),
    ("contact", "other"),
    ("poll", "other"),
    ("dice", "other"),
    ("game", "other"),
    ("story", "other"),
)


class _ConflictsReported(logging.Filter):
    """Drop the Updater's own traceback of a 409 Conflict: `_polling_error` reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Conflict))


logging.getLogger("telegram.ext.Updater").addFilter(_ConflictsReported())


class TelegramChannel:
    """Serves customers on one Telegram bot. `start()` returns once updates are flowing."""

    def __init__(
        self,
        settings: Settings,
        service: ConversationService,
        store: Store,
        http: HttpServer,
        *,
        poll_timeout_s: float = 30.0,
        typing_every_s: float = 4.0,
        outbox_poll_s: float = 1.0,
        retry_base_s: float = 1.0,
        sweep_s: float = 5.0,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        token = settings.telegram_bot_token.get_secret_value()
        if not token:
            raise ValueError(
                "TELEGRAM_BOT_TOKEN is not set; create a bot with @BotFather and export its token "
                "(README: 'Connecting a real Telegram bot')."
            )
        self.settings, self.service, self.store, self.http = settings, service, store, http
        self.webhook_url = settings.telegram_webhook_url.strip()
        self.poll_timeout_s = poll_timeout_s
        base_url = settings.telegram_api_url.rstrip("/")
        builder = ApplicationBuilder().token(token).base_url(base_url)
        if base_url.endswith("/bot"):
            builder = builder.base_file_url(base_url[: -len("/bot")] + "/file/bot")
        if self.webhook_url:
            builder = builder.updater(None)  # updates come in through our own HTTP server
        self.application: Application[Any, Any, Any, Any, Any, Any] = builder.build()
        # One handler, run in arrival order; it only starts a task per update (see module docstring).
        self.application.add_handler(TypeHandler(Update, self._on_update))
        self.application.add_error_handler(self._on_error)
        self.replies = TelegramSender(
            self.application.bot, store,
            poll_s=outbox_poll_s, base_delay_s=retry_base_s, typing_every_s=typing_every_s,
        )  # fmt: skip
        self.outbox = self.replies.outbox
        self._chat_locks = KeyedLocks()
        self._secret = ""
        self._started = False
        # a claim outlives the slowest answer (the generation timeout) with room to spare
        self.lease_s = settings.llm_timeout_s * 2 + 30
        self.sweep_s = sweep_s
        self._sweeper: asyncio.Task[None] | None = None
        self._swept: set[str] = set()  # update ids handed in by the sweeper, not yet handled
        self.on_fatal = on_fatal  # told when this channel cannot go on (another process polls the token)
        self._conflicts: list[float] = []
        service.deliverers[CHANNEL] = self.replies.deliver
        service.dedup_channels.add(CHANNEL)  # the sender drops repeats already in the outbox

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to the Bot API, start the outbox and begin polling (or register the webhook)."""
        if self.webhook_url:
            self.http.add_route("POST", WEBHOOK_PATH, self._webhook)
        try:
            await self.application.initialize()  # getMe: a bad token fails here, loudly
        except InvalidToken:
            raise ConfigError(
                "Telegram refused TELEGRAM_BOT_TOKEN; copy the token again from @BotFather (/token)."
            ) from None
        except TelegramError as exc:
            raise ConfigError(
                f"could not reach the Telegram Bot API at {self.settings.telegram_api_url} ({exc}); "
                "check the network or APPRENTICE_TELEGRAM_API_URL."
            ) from None
        try:
            self.outbox.start()
            await self.application.start()
            await self._sweep(older_than_s=0.0)  # updates a killed process received but never handled
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="telegram-inbox")
            if self.webhook_url:
                self._secret = await asyncio.to_thread(self._webhook_secret)
                try:
                    await self.application.bot.set_webhook(
                        self.webhook_url, secret_token=self._secret, allowed_updates=ALLOWED_UPDATES
                    )
                except TelegramError as exc:
                    raise ConfigError(
                        f"Telegram refused APPRENTICE_TELEGRAM_WEBHOOK_URL ({exc}); it must be a public "
                        "https:// URL on port 443, 80, 88 or 8443 that reaches /telegram (README: Deploy)."
                    ) from None
                log.info("Telegram webhook registered at %s", self.webhook_url)
            else:
                updater = self.application.updater
                assert updater is not None
                await updater.start_polling(
                    timeout=dt.timedelta(seconds=self.poll_timeout_s),
                    allowed_updates=ALLOWED_UPDATES,
                    drop_pending_updates=False,
                    error_callback=self._polling_error,
                )
                log.info("Telegram long polling as @%s", self.application.bot.username)
        except BaseException:
            await self._teardown()
            raise
        self._started = True

    def _polling_error(self, exc: TelegramError) -> None:
        """Log a failed getUpdates; a lasting 409 Conflict means another process polls this token.

        Two long-pollers on one token take turns stealing each other's updates, so this process
        stops with one clear line instead. One conflict is forgiven: a process that was just
        restarted can meet its predecessor's last long poll.
        """
        if not isinstance(exc, Conflict):
            log.warning("Telegram getUpdates failed (%s); retrying", exc)
            return
        now = time.monotonic()
        self._conflicts = [t for t in self._conflicts if now - t < CONFLICT_WINDOW_S] + [now]
        if len(self._conflicts) >= 2 and self.on_fatal is not None:
            self.on_fatal(
                "another process is polling Telegram with this TELEGRAM_BOT_TOKEN (409 Conflict). Run "
                "one poller per bot, or set APPRENTICE_TELEGRAM_WEBHOOK_URL so replicas share a webhook."
            )

    async def stop(self) -> None:
        """Stop taking updates, finish those in hand, stop the outbox (pending replies stay queued)."""
        await self._teardown()
        if self.service.deliverers.get(CHANNEL) == self.replies.deliver:
            del self.service.deliverers[CHANNEL]

    async def _teardown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        updater = self.application.updater
        if updater is not None and updater.running:
            await updater.stop()
        if self.application.running:
            await self.application.stop()  # waits for the update tasks in flight
        await self.outbox.stop()
        await self.application.shutdown()
        self._started = False

    def _webhook_secret(self) -> str:
        """The configured secret, else the one persisted by an earlier start, else a new one (persisted)."""
        configured = self.settings.telegram_webhook_secret.get_secret_value()
        if configured:
            return configured
        # A-Z a-z 0-9 _ -, as Telegram requires; replicas starting together agree on one value
        generated = self.store.setdefault_kv(SECRET_KV, secrets.token_urlsafe(32))
        logsafe.mask_also(generated)  # not a setting, so the log filter learns it here
        return generated

    # --- updates in --------------------------------------------------------------------
    async def _webhook(self, request: web.Request) -> web.Response:
        """POST /telegram: Telegram's update push, accepted only with our secret token."""
        got = request.headers.get(SECRET_HEADER, "").encode("utf-8", "replace")
        if not self._secret or not hmac.compare_digest(got, self._secret.encode()):
            log.warning("refused a %s request without the right secret token", WEBHOOK_PATH)
            return web.Response(status=403, text="forbidden")
        try:
            data = await request.json()
        except ValueError:
            return web.Response(status=400, text="body must be a JSON Telegram update")
        update = parse_update(data, self.application.bot)
        if update is None:
            return web.Response(status=400, text="body must be a JSON Telegram update")
        # kept in the database before the 200: a crash from here on is resumed, never lost
        fresh = await asyncio.to_thread(self.store.inbox_put, CHANNEL, str(update.update_id), data)
        if fresh:  # a redelivery of an update kept or handled already needs nothing more
            await self.application.update_queue.put(update)
        return web.Response(text="ok")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                await self._sweep(older_than_s=2 * self.sweep_s)
            except Exception:
                log.exception("Telegram inbox sweep failed")

    async def _sweep(self, older_than_s: float) -> None:
        """Hand in updates nobody handles: received before a crash, or whose handler's claim ran out."""
        for item in await asyncio.to_thread(self.store.inbox_due, CHANNEL, older_than_s):
            if item.update_id in self._swept:
                continue
            update = parse_update(item.payload, self.application.bot)
            if update is None:
                await asyncio.to_thread(self.store.inbox_done, CHANNEL, item.update_id)
                continue
            log.info("Telegram update %s handed in again (not handled before)", item.update_id)
            self._swept.add(item.update_id)
            await self.application.update_queue.put(update)

    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Called by PTB for every update, one at a time: start its task and return at once."""
        if update.callback_query is not None:  # button presses need no chat order
            self.application.create_task(self._process(update, None), update=update)
            return
        chat = update.effective_chat
        key = str(chat.id) if chat is not None else f"update:{update.update_id}"
        self.application.create_task(self._process(update, self._chat_locks.get(key)), update=update)

    async def _process(self, update: Update, lock: asyncio.Lock | None) -> None:
        async with lock if lock is not None else contextlib.nullcontext():
            try:
                await self._handle(update)
            except Exception:
                log.exception("Telegram update %s failed", update.update_id)

    async def _handle(self, update: Update) -> None:
        uid = str(update.update_id)
        try:
            await self._handle_claimed(update, uid)
        finally:
            self._swept.discard(uid)

    async def _handle_claimed(self, update: Update, uid: str) -> None:
        query = update.callback_query
        msg = update.message or update.edited_message
        if query is None and (msg is None or getattr(msg, "chat", None) is None or not self._addressed(msg)):
            await asyncio.to_thread(self.store.inbox_done, CHANNEL, uid)
            return  # not for us: channel posts, service messages, group chatter
        payload = json.loads(update.to_json())
        attempt = await asyncio.to_thread(self.store.inbox_claim, CHANNEL, uid, self.lease_s, payload)
        if attempt is None:
            log.info("Telegram update %s was already handled or is in hand; skipped", uid)
            return
        if attempt > MAX_ATTEMPTS:
            log.error("Telegram update %s failed %d times; the customer gets an apology", uid, attempt - 1)
            kind = _kind(msg, edited=update.edited_message is not None) if msg is not None else None
            if msg is not None and kind is not None:
                inbound = self._inbound(msg, kind, update.update_id)
                for out in await self.service.give_up(inbound, "sent a message the bot failed to handle"):
                    await self.replies.enqueue(inbound.chat_id, inbound.customer_id, out)
            await asyncio.to_thread(self.store.inbox_done, CHANNEL, uid)
            return
        if query is not None:
            await self._on_button(query)
        else:
            assert msg is not None
            await self._on_message(msg, update)
        # the replies are in the outbox: only now is the update done
        await asyncio.to_thread(self.store.inbox_done, CHANNEL, uid)

    async def _on_message(self, msg: Message, update: Update) -> None:
        kind = _kind(msg, edited=update.edited_message is not None)
        if kind is None:
            return
        inbound = self._inbound(msg, kind, update.update_id)
        if kind == "text" and _command_of(msg) is not None:
            await self._command(msg, inbound)
            return
        if kind == "text" and await self._bot_mode(inbound):
            async with self.replies.typing(inbound.chat_id):
                outs = await self.service.handle(inbound)
        else:  # non-text and taken-over conversations: no typing, the service decides
            outs = await self.service.handle(inbound)
        for out in outs:
            await self.replies.enqueue(inbound.chat_id, inbound.customer_id, out)

    def _inbound(self, msg: Message, kind: str, update_id: int) -> Inbound:
        user = msg.from_user
        # unique per conversation in the store; an edit keeps the message id, so it gets its own
        external = str(msg.message_id) if kind != "edited" else f"{msg.message_id}:edit:{update_id}"
        customer = str(user.id) if user is not None else str(msg.chat.id)
        text = msg.text if kind == "text" and isinstance(msg.text, str) else None
        if text is not None and msg.chat.type != ChatType.PRIVATE:
            text = self._strip_mention(text)
        contact = msg.contact  # only the customer's own number: a shared friend's contact is not theirs
        own_phone = ""
        if contact is not None and user is not None and contact.user_id == user.id:
            own_phone = str(contact.phone_number or "")
        return Inbound(
            CHANNEL,
            str(msg.chat.id),
            customer,
            text,
            external_id=external,
            name=clean_text(str(user.full_name or ""))[:256] if user is not None else "",
            kind=kind,
            language=str(user.language_code or "") if user is not None else "",
            username=str(user.username or "") if user is not None else "",
            phone=own_phone,
        )

    async def _bot_mode(self, inbound: Inbound) -> bool:
        """True when the bot (not staff) answers this chat, so "typing…" is honest."""
        conv = await asyncio.to_thread(
            self.store.conversation_for, CHANNEL, inbound.chat_id, inbound.customer_id, inbound.name,
            inbound.username, inbound.phone,
        )
        return conv.mode != "human"

    # --- groups ------------------------------------------------------------------------
    def _addressed(self, msg: Message) -> bool:
        """Private chats always; groups only when mentioned, replied to or commanded (unless mode is all)."""
        if msg.chat.type == ChatType.PRIVATE:
            return True
        if msg.chat.type == ChatType.CHANNEL:
            return False
        command = _command_of(msg)
        if command is not None:
            return command[1] in ("", self._username())
        if self.settings.telegram_group_mode == "all":
            return True
        bot = self.application.bot
        reply = msg.reply_to_message
        if reply is not None and reply.from_user is not None and reply.from_user.id == bot.id:
            return True
        # PTB's parsers assume the text they point into exists: entities without text/caption are junk
        entities = {
            **(msg.parse_entities() if isinstance(msg.text, str) else {}),
            **(msg.parse_caption_entities() if isinstance(msg.caption, str) else {}),
        }
        for entity, text in entities.items():
            if entity.type == MessageEntity.MENTION and text[1:].lower() == self._username():
                return True
            if (
                entity.type == MessageEntity.TEXT_MENTION
                and entity.user is not None
                and entity.user.id == bot.id
            ):
                return True
        return False

    def _username(self) -> str:
        return (self.application.bot.username or "").lower()

    def _strip_mention(self, text: str) -> str:
        name = self._username()
        if not name:
            return text
        return re.sub(rf"@{re.escape(name)}\b", "", text, flags=re.IGNORECASE).strip()

    # --- commands and buttons -------------------------------------------------------------
    async def _command(self, msg: Message, inbound: Inbound) -> None:
        command = _command_of(msg)
        name = command[0] if command is not None else "help"
        outs: list[Outbound] | None
        if name == "human":  # rate-limited, and one on-call ping per conversation per window
            outs = await self.service.ask_human(inbound)
        else:  # counted against the customer's rate limit like any message
            outs = await self.service.admit(inbound)
        if outs is None:  # /start, else /help and anything we do not know, in the customer's language
            lang = self.service.messages.choose(inbound.language)
            key = "start" if name == "start" else "help"
            outs = [Outbound(self.service.messages.text(key, lang), 0, kind="notice")]
        for out in outs:
            await self.replies.enqueue(inbound.chat_id, inbound.customer_id, out)

    async def _on_button(self, query: CallbackQuery) -> None:
        """👍/👎 on an answer: stored once per customer and answer; every press gets an answer."""
        thanks: str | None = None
        csat = parse_csat(query.data)
        if csat is not None:
            await self._on_csat(query, *csat)
            return
        parsed = parse_feedback(query.data)
        chat = query.message.chat.id if query.message is not None else None
        valid = parsed is not None and chat is not None and await self._owns(parsed[1], str(chat))
        if parsed is not None and valid:
            up, message_id = parsed
            actor = f"{CHANNEL}:{query.from_user.id}"
            code = str(query.from_user.language_code or "")
            thanks = await self.service.customer_feedback(message_id, actor, up, language=code)
        try:  # a stale or forged button is answered too (silently), so the client stops its spinner
            lang = self.service.messages.choose(query.from_user.language_code)
            rated = self.service.messages.text("already_rated", lang) if valid else None
            await query.answer(text=thanks or rated)
        except TelegramError as exc:  # an old query (>15 min) cannot be answered; nothing else to do
            log.info("could not answer callback query: %s", exc)
        if thanks is not None:
            with contextlib.suppress(TelegramError):  # the buttons go once used; cosmetic
                await query.edit_message_reply_markup(reply_markup=None)

    async def _on_csat(self, query: CallbackQuery, yes: bool, conversation_id: int) -> None:
        """Yes/No to "Did this solve your problem?": recorded once, and only from the asked chat."""
        chat = query.message.chat.id if query.message is not None else None
        conv = await asyncio.to_thread(self.store.conversation, conversation_id)
        thanks: str | None = None
        if chat is not None and conv is not None and conv.channel == CHANNEL and conv.chat_id == str(chat):
            code = str(query.from_user.language_code or "")
            thanks = await self.service.satisfaction(conversation_id, yes, language=code)
        with contextlib.suppress(TelegramError):  # every press is answered, so the spinner stops
            await query.answer(text=thanks)
        if thanks is not None:
            with contextlib.suppress(TelegramError):
                await query.edit_message_reply_markup(reply_markup=None)

    async def _owns(self, message_id: int, chat_id: str) -> bool:
        """The button's answer belongs to this chat (a modified client can send any callback data)."""

        def check() -> bool:
            msg = self.store.message(message_id)
            if msg is None:
                return False
            conv = self.store.conversation(msg.conversation_id)
            return conv is not None and conv.channel == CHANNEL and conv.chat_id == chat_id

        return await asyncio.to_thread(check)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("Telegram handler error: %r", context.error, exc_info=context.error)


# --- pure helpers (tested directly) ---------------------------------------------------------


def parse_update(data: object, bot: Any) -> Update | None:
    """The Update in a webhook body, or None when it is not one (odd types, fields out of range)."""
    if not isinstance(data, dict):
        return None
    uid = data.get("update_id")
    if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid < 2**63:
        return None
    try:
        return Update.de_json(data, bot)
    except Exception:  # python-telegram-bot raises whatever the field parsers raise
        return None


def _command_of(msg: Message) -> tuple[str, str] | None:
    """(command, addressed bot) for "/cmd@bot args", lower-cased; None when not a command."""
    if not msg.text or not isinstance(msg.text, str) or not msg.entities:
        return None
    first = msg.entities[0]
    if first.type != MessageEntity.BOT_COMMAND or first.offset != 0 or not isinstance(first.length, int):
        return None
    name, _, target = msg.text[1 : first.length].partition("@")
    return name.lower(), target.lower()


def _kind(msg: Message, edited: bool) -> str | None:
    """Our Inbound kind for a message; None for service messages (members joining, pins…)."""
    if edited:
        return "edited"
    if msg.text is not None:
        return "text"
    for attr, kind in _CONTENT_KINDS:
        if getattr(msg, attr, None):
            return kind
    return None
