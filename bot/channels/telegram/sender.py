"""Replies out to Telegram: every reply goes through the durable outbox, at least once, in chat order.

A reply is written to the outbox (split into Telegram-sized parts, keyed by the chat so one
chat's messages stay in order) before it is sent. 429 waits `retry_after`; 5xx and network errors
back off; 403 (the customer blocked the bot) marks the customer unreachable and drops the reply.
Replies are plain text (no parse_mode), so model output cannot break markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup
from telegram.constants import ChatAction
from telegram.error import BadRequest, ChatMigrated, Forbidden, RetryAfter, TelegramError

from bot.channels.telegram.text import csat_data, feedback_data, seconds, split_text
from bot.envelope import Outbound
from bot.outbox import Drop, Outbox, Retry
from knowledge.models import Conversation
from knowledge.store import Store

log = logging.getLogger(__name__)

CHANNEL = "telegram"


class TelegramSender:
    """The Telegram outbox: `enqueue` a reply, the drainer sends it with `send`."""

    def __init__(
        self, bot: Bot, store: Store, *, poll_s: float, base_delay_s: float, typing_every_s: float
    ) -> None:
        self.bot, self.store, self.typing_every_s = bot, store, typing_every_s
        self.outbox = Outbox(store, CHANNEL, self.send, poll_s=poll_s, base_delay_s=base_delay_s)

    async def deliver(self, conv: Conversation, out: Outbound) -> None:
        """The service's deliverer: staff replies and corrections for a Telegram conversation."""
        customer = await asyncio.to_thread(self.store.customer, conv.customer_id)
        await self.enqueue(conv.chat_id, customer.external_id if customer else conv.chat_id, out)

    async def enqueue(self, chat_id: str, customer_id: str, out: Outbound) -> None:
        """Queue one reply (split into Telegram-sized parts) in the outbox; buttons go on the last part."""
        if (
            out.repeat
            and out.message_id is not None
            and await asyncio.to_thread(self.store.outbox_has, CHANNEL, out.message_id)
        ):
            return  # queued before the crash (or sent): once is enough
        parts = split_text(out.text)
        for i, part in enumerate(parts):
            buttons = out.message_id if out.feedback_buttons and i == len(parts) - 1 else None
            payload: dict[str, Any] = {
                "chat_id": chat_id,
                "customer_id": customer_id,
                "text": part,
                "message_id": out.message_id,
                "buttons": buttons,
            }
            if out.kind == "csat" and i == len(parts) - 1:
                payload["csat"] = out.conversation_id  # Yes / No buttons
                payload["choices"] = list(out.choices)
            await self.outbox.put("message", payload, key=chat_id)

    async def send(self, kind: str, payload: dict[str, Any]) -> None:
        """The outbox sender: one sendMessage, its failures translated to Retry/Drop."""
        if kind != "message":
            raise Drop(f"unknown Telegram outbox item kind {kind!r}")
        buttons = payload.get("buttons")
        csat = payload.get("csat")
        # the Yes / No labels; an item queued before they were localised has none and gets English
        choices = [str(c)[:64] for c in payload.get("choices") or []][:2]
        markup: InlineKeyboardMarkup | None = None
        if buttons:
            markup = feedback_markup(int(buttons))
        elif csat:
            markup = csat_markup(int(csat), *choices)
        try:
            await self.bot.send_message(
                chat_id=payload["chat_id"],
                text=payload["text"],  # plain text: no parse_mode, so model output cannot break markup
                reply_markup=markup,
            )
        except RetryAfter as exc:
            raise Retry("Telegram flood control", after=seconds(exc.retry_after)) from exc
        except Forbidden as exc:
            await asyncio.to_thread(self.store.mark_unreachable, CHANNEL, str(payload["customer_id"]))
            raise Drop(f"customer unreachable on Telegram: {exc.message}") from exc
        except (BadRequest, ChatMigrated) as exc:  # will never succeed as sent
            raise Drop(f"Telegram refused the message: {exc}") from exc
        except TelegramError as exc:  # 5xx, timeouts, network: back off and try again
            raise Retry(f"Telegram error: {exc}") from exc

    @contextlib.asynccontextmanager
    async def typing(self, chat_id: str) -> AsyncIterator[None]:
        """Show "typing…" while the body runs (Telegram shows it ~5 s, so it is renewed)."""
        stop = asyncio.Event()
        task = asyncio.create_task(self._keep_typing(chat_id, stop), name=f"typing-{chat_id}")
        try:
            yield
        finally:
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep_typing(self, chat_id: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.bot.send_chat_action(chat_id=chat_id, action=ChatAction.TYPING)
            except Forbidden:
                return
            except TelegramError as exc:  # cosmetic; never hold up the answer for it
                log.debug("sendChatAction failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.typing_every_s)


def feedback_markup(message_id: int) -> InlineKeyboardMarkup:
    """👍/👎 under an answer; the callback data carries the stored answer's id."""
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("👍", callback_data=feedback_data(True, message_id)),
                InlineKeyboardButton("👎", callback_data=feedback_data(False, message_id)),
            ]
        ]
    )


def csat_markup(conversation_id: int, yes: str = "Yes", no: str = "No") -> InlineKeyboardMarkup:
    """Yes / No (in the customer's language) under "Did this solve your problem?"; the callback data
    carries the conversation id (checked against the chat the press comes from)."""
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(yes, callback_data=csat_data(True, conversation_id)),
                InlineKeyboardButton(no, callback_data=csat_data(False, conversation_id)),
            ]
        ]
    )
