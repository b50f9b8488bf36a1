"""Staff commands: what support staff can do, written once for every channel.

Slack's `/apprentice VERB` and the terminal's `/apprentice VERB` run the same `StaffCommands.run`;
a Slack card's buttons and forms and the terminal's /correct, /approve, /flag and /sources act on an
answer through the same methods. A channel only translates: it reads its own input, says who the
staff member is ("slack:U123", "terminal:local"), and lends a `Surface` that writes the replies in
its own markup (Slack mrkdwn, plain text) and shows a chart its own way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any, Protocol

from bot.conversation import ConversationService
from bot.staff import CorrectionResult
from bot.stats import compute, format_stats, parse_days, write_chart
from knowledge.models import Correction, utcnow

REVIEW_OUTBOX = "slack"  # the outbox of the review channel: the status line says how much waits in it
USAGE = (
    "Usage: `/apprentice status`, `/apprentice stats [7d]`, `/apprentice corrections`, "
    "`/apprentice pending`, `/apprentice approve ID`, `/apprentice revoke ID` "
    "or `/apprentice card ID` (an answer's card, with its buttons)."
)


class Surface(Protocol):
    """How a channel shows a staff command's reply."""

    def bold(self, text: str) -> str: ...

    def escape(self, text: str) -> str:
        """Customer, model or staff text, made inert in the channel's markup."""
        ...

    def quote(self, text: str) -> str:
        """Text (escaped here) shown as a quotation."""
        ...

    def preformatted(self, text: str) -> str:
        """A block of fixed-width lines (escaped here)."""
        ...

    async def name(self, actor: str) -> str:
        """What to call a staff member ("slack:U123" -> "@ada")."""
        ...

    async def show_chart(self, path: Path, days: int, staff: str) -> str:
        """Show a chart of the last `days` days that `staff` asked for; the reply's sentence about it."""
        ...

    async def correction_approved(self, correction: Correction) -> None:
        """A pending correction was approved: redraw whatever shows it."""
        ...

    async def show_card(self, conversation_id: int, message_id: int) -> str:
        """Show an answer's card, with the buttons that act on it; the reply's sentence about it."""
        ...


class StaffCommands:
    """The staff side of the conversation service, as the channels call it."""

    def __init__(self, service: ConversationService) -> None:
        self.service = service
        self.store = service.store
        self.settings = service.settings

    # --- acting on one answer ----------------------------------------------------------------
    async def correct(
        self,
        message_id: int,
        text: str,
        staff: str,
        *,
        reason: str = "other",
        send: bool = True,
        remember: bool = True,
        request_key: str | None = None,
    ) -> CorrectionResult:
        """Store, remember and send a correction (raises CorrectionRefused for a secret,
        LookupError or ValueError for an answer or text that cannot be corrected)."""
        return await self.service.correct(
            message_id, text, staff, reason=reason, send=send, remember=remember, request_key=request_key
        )

    async def approve_answer(self, message_id: int, staff: str, reason: str = "") -> bool:
        """Mark an answer as a good example; False when this staff member had already done so."""
        return await self.service.staff_feedback(message_id, "approve", staff, reason)

    async def flag_answer(self, message_id: int, staff: str, reason: str = "") -> bool:
        """Flag an answer for review; False when this staff member had already done so."""
        return await self.service.staff_feedback(message_id, "flag", staff, reason.strip())

    async def sources(self, message_id: int) -> list[dict[str, Any]]:
        """The passages an answer used (none for an answer that is gone)."""
        msg = await asyncio.to_thread(self.store.message, message_id)
        return list(msg.sources or []) if msg is not None else []

    async def take_over(self, conversation_id: int, staff: str) -> bool:
        """Staff take the conversation; False when it is gone or staff have it already."""
        conv = await asyncio.to_thread(self.store.conversation, conversation_id)
        if conv is None or conv.mode == "human":
            return False
        await self.service.take_over(conversation_id, staff)
        return True

    async def hand_back(self, conversation_id: int, staff: str) -> bool:
        """The bot answers again; False when the conversation is gone or the bot has it already."""
        conv = await asyncio.to_thread(self.store.conversation, conversation_id)
        if conv is None or conv.mode != "human":
            return False
        await self.service.hand_back(conversation_id, staff)
        return True

    async def reply(self, conversation_id: int, text: str, staff: str, external_id: str = "") -> bool:
        """Write to the customer of a taken-over conversation; True once it reached them."""
        return await self.service.staff_reply(conversation_id, text, staff, external_id=external_id)

    # --- the review desk's verbs -------------------------------------------------------------
    async def run(self, text: str, staff: str, surface: Surface) -> str:
        """`status | stats [7d] | corrections | pending | approve ID | revoke ID | card ID`: the reply
        to show."""
        verb, _, arg = text.strip().partition(" ")
        verb = verb.lower()
        if verb in ("", "status"):
            return await asyncio.to_thread(self._status, surface)
        if verb == "stats":
            return await self._stats(arg, staff, surface)
        if verb == "corrections":
            return await self._corrections(surface)
        if verb == "pending":
            return await self._pending(surface)
        if verb == "approve":
            return await self._approve(arg, staff, surface)
        if verb == "revoke":
            return await self._revoke(arg, staff)
        if verb == "card":
            return await self._card(arg, surface)
        return USAGE

    def _status(self, surface: Surface) -> str:
        midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        counts = self.store.counts_since(midnight)
        adapter = self.store.active_adapter() or "base"
        waiting = self.store.outbox_depth(REVIEW_OUTBOX)
        kinds = ("conversations", "answers", "corrections")
        today = ", ".join(_count(counts[k], k.rstrip("s")) for k in kinds)
        return (
            f"{surface.bold('Today (UTC):')} {today}.\n{surface.bold('Active adapter:')} {adapter}"
            + (f"\n{_count(waiting, 'Slack post')} waiting in the outbox." if waiting else "")
        )

    async def _stats(self, arg: str, staff: str, surface: Surface) -> str:
        days = parse_days(arg)
        if days is None:
            return "Usage: `/apprentice stats [7d]` (the last N days, 1 to 366; default 7)."
        figures = await asyncio.to_thread(compute, self.store, days)
        stamp = utcnow().strftime("%Y%m%dT%H%M%S")
        path = self.settings.data_dir / "stats" / f"{stamp}-{days}d.png"
        chart = await asyncio.to_thread(write_chart, figures, path)
        shown = await surface.show_chart(chart, days, staff)
        return f"{surface.preformatted(format_stats(figures))}\n{shown}"

    async def _corrections(self, surface: Surface) -> str:
        latest = await asyncio.to_thread(self.store.corrections, limit=10)
        if not latest:
            return "No corrections yet."
        lines = [surface.bold("Latest corrections")]
        for c in latest:
            who = await surface.name(c.staff)
            when = c.created_at.strftime("%Y-%m-%d %H:%M")
            state = "" if c.status == "active" else f" · {surface.bold(c.status)}"
            lines.append(f"#{c.id} · {when} · {who} · {c.reason}{state}\n{_excerpt(c, surface)}")
        return "\n".join(lines)

    async def _pending(self, surface: Surface) -> str:
        waiting = [c for c in await asyncio.to_thread(self.store.corrections) if c.status == "pending"]
        if not waiting:
            return "No corrections wait for a second approval."
        lines = [f"{surface.bold('Corrections waiting for a second approval')} (`/apprentice approve ID`)"]
        reviews = await asyncio.to_thread(self.store.correction_reviews, waiting[:20])
        for c in waiting[:20]:
            who = await surface.name(c.staff)
            why = f" · {surface.escape(reviews[c.id])}" if c.id in reviews else ""
            lines.append(f"#{c.id} · by {who}{why}\n{_excerpt(c, surface)}")
        return "\n".join(lines)

    async def _approve(self, arg: str, staff: str, surface: Surface) -> str:
        cid = _number(arg)
        if cid is None:
            return "Usage: `/apprentice approve ID` (the number from `/apprentice pending`)."
        corr, outcome = await self.service.approve_correction(cid, staff)
        if outcome == "approved" and corr is not None:
            await surface.correction_approved(corr)
            return f"Correction #{cid} approved: memory and training now use it."
        return {
            "missing": f"There is no correction #{cid}. `/apprentice pending` lists those waiting.",
            "not pending": f"Correction #{cid} does not wait for an approval.",
            "same person": f"Correction #{cid} is yours; a second staff member must approve it.",
        }[outcome]

    async def _revoke(self, arg: str, staff: str) -> str:
        cid = _number(arg)
        if cid is None:
            return "Usage: `/apprentice revoke ID` (the number from `/apprentice corrections`)."
        if await self.service.revoke(cid, staff) is None:
            return f"There is no correction #{cid}. `/apprentice corrections` lists them."
        return f"Correction #{cid} revoked: it is no longer used for memory or training."

    async def _card(self, arg: str, surface: Surface) -> str:
        """An answer's card on demand: at volume, unflagged answers are only lines of a digest (`answer
        #ID`), and this is how staff get the buttons to approve, flag or correct one of them."""
        message_id = _number(arg)
        if message_id is None:
            return "Which answer? `/apprentice card ID`, with the number after `answer #` in a digest line."
        msg = await asyncio.to_thread(self.store.message, message_id)
        if msg is None or msg.role != "bot":
            return f"There is no answer #{message_id}."
        if self.settings.review == "none":
            return "No cards are posted: APPRENTICE_REVIEW is `none`."
        return await surface.show_card(msg.conversation_id, message_id)


def _count(n: int, noun: str) -> str:
    """ "1 answer", "2 answers"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _excerpt(c: Correction, surface: Surface) -> str:
    """A correction in two lines: the question (quoted) and the corrected answer, both shortened."""
    return f"{surface.quote(_short(c.question, 150))}\n→ {surface.escape(_short(c.corrected, 300))}"


def _number(arg: str) -> int | None:
    """A correction id as staff type it ("12" or "#12"); None when it is not one."""
    try:
        return int(arg.strip().lstrip("#"))
    except ValueError:
        return None


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PlainText:
    """The terminal's surface: plain text, staff ids as they are, a chart left where it was written."""

    def bold(self, text: str) -> str:
        return text

    def escape(self, text: str) -> str:
        return text

    def quote(self, text: str) -> str:
        return "\n".join(f"> {line}" for line in (text or " ").splitlines() or [" "])

    def preformatted(self, text: str) -> str:
        return text

    async def name(self, actor: str) -> str:
        return actor

    async def show_chart(self, path: Path, days: int, staff: str) -> str:
        return f"The chart is in {path}."

    async def correction_approved(self, correction: Correction) -> None:
        return None

    async def show_card(self, conversation_id: int, message_id: int) -> str:
        return "Cards are Slack's. Here /correct, /approve, /flag and /sources act on the last answer."


__all__ = ["USAGE", "PlainText", "StaffCommands", "Surface"]
