"""The review channel's outbox sender: cards, card updates, thread notes, digests, reports and charts.

Posting to Slack never delays a customer: everything staff see goes into the durable outbox (keyed
by conversation, or "report", so each stays in order) and this sender posts it; a 429 holds the whole
outbox for its Retry-After (the limit is per channel and every item posts to the review channel),
other failures back off, nothing is lost. It creates a conversation's thread parent the first time
the thread is needed.

Slack posts about one message a second per channel, so at volume cards would queue for ever.
Flagged answers go first (`rank`) and always get their own card with buttons. Once an unflagged
card has waited APPRENTICE_SLACK_DIGEST_AFTER_S, every unflagged card still waiting is folded into
digest messages queued behind the flagged cards, and for a while a conversation's first card opens
its thread itself (one message, not two). See docs/slack.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.channels.slack.blocks import (
    MAX_SECTION,
    context,
    digest_line,
    note_blocks,
    plain,
    render_card,
    render_digest,
    render_report,
    thread_header,
    thread_parent,
)
from bot.channels.slack.identity import CHANNEL, Directory
from bot.channels.slack.web import AUTH_ERRORS, SlackError, SlackWeb
from bot.outbox import Drop, Outbox, Retry
from knowledge.models import Conversation, OutboxItem
from knowledge.settings import Settings
from knowledge.store import Store

if TYPE_CHECKING:
    from learning.nightly import NightlyReport

log = logging.getLogger(__name__)

DIGEST_SIZE = 100  # answers per digest message: 100 one-line summaries fit Slack's 50 blocks
# outbox items read per round: flagged cards behind the unflagged backlog (which folding keeps to
# APPRENTICE_SLACK_DIGEST_AFTER_S of answers, about 650 at 1,300 answers a minute) are still seen
OUTBOX_BATCH = 1000
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
CHART_ALT = "Evaluation scores of the candidate adapter and the active one, per evaluation set"


class SlackSender:
    """Delivers the Slack outbox into the review channel `channel_id`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        web: SlackWeb,
        people: Directory,
        *,
        poll_s: float,
        base_delay_s: float,
        lease_s: float,
        behind_s: float,
    ) -> None:
        self.settings, self.store, self.web, self.people = settings, store, web, people
        self.channel_id = settings.slack_channel
        self.behind_s = behind_s  # after a fold, the channel counts as behind this long (see behind)
        self._behind_until = 0.0  # time.monotonic() until which the channel counts as behind
        self.outbox = Outbox(
            store, CHANNEL, self.send, poll_s=poll_s, base_delay_s=base_delay_s, lease_s=lease_s,
            before_round=self.fold_backlog, rank=rank, batch=OUTBOX_BATCH,
        )  # fmt: skip

    async def send(self, kind: str, payload: dict[str, Any]) -> None:
        """Post one outbox item; Slack's refusals become Retry (later, or after Retry-After) or Drop."""
        try:
            if kind == "card":
                await self._post_card(int(payload["message_id"]))
            elif kind == "update":
                await self._update_card(int(payload["message_id"]))
            elif kind == "note":
                await self._post_note(payload)
            elif kind == "report":
                text, blocks = render_report(str(payload["text"]))
                await self.web.post(channel=self.channel_id, text=text, blocks=blocks)
            elif kind == "report_chart":
                await self._upload_chart(payload)
            elif kind == "digest":
                await self._post_digest(payload)
            else:
                raise Drop(f"unknown Slack outbox item kind {kind!r}")
        except SlackError as exc:
            raise self._verdict(kind, exc) from exc

    def _verdict(self, kind: str, exc: SlackError) -> Retry | Drop:
        """What to do about an item Slack refused."""
        if exc.upload:  # the upload step itself (not a Web API method) failed
            return Retry(str(exc))
        if exc.error == "missing_scope" and kind == "report_chart":
            # a scope only an admin can grant: retrying would hold the reports behind it forever
            log.error(
                "Slack refused the nightly chart (missing_scope, needs %s): add the files:write bot "
                "scope to the Slack app (ops/slack-manifest.yaml) and reinstall it; the chart is "
                "dropped, the text report is unaffected",
                exc.needed or "files:write",
            )
            return Drop("Slack app lacks the files:write scope; chart not posted")
        if exc.status == 429 or exc.error == "ratelimited":
            # the limit is per channel and every item posts to the review channel: all wait
            return Retry("Slack rate limit", exc.retry_after, hold=True)
        if exc.error in PERMANENT:
            return Drop(f"Slack refused the {kind}: {exc.error}")
        if exc.error in AUTH_ERRORS or exc.error in ("channel_not_found", "not_in_channel"):
            log.error(
                "Slack refused a %s (%s): check SLACK_BOT_TOKEN and that the app is in channel %s; "
                "it will be retried",
                kind,
                exc.error,
                self.channel_id,
            )
        return Retry(f"Slack error {exc.status} {exc.error}")

    async def _upload_chart(self, payload: dict[str, Any]) -> None:
        """Upload a report's PNG into the review channel (slack_sdk's getUploadURLExternal flow).

        The bytes are read off the event loop; a chart that no retry can bring back is dropped.
        """
        path = Path(str(payload["path"]))
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise Drop(f"the report chart {path} cannot be read ({type(exc).__name__}); not posted") from exc
        await self.web.upload(
            channel=self.channel_id,
            file=data,
            filename=path.name,
            title=str(payload.get("title") or path.name),
            alt_txt=CHART_ALT,
        )

    # --- threads and cards ----------------------------------------------------------------------
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
        return name, thread_header(name, conv)

    async def _thread(self, conversation_id: int) -> str:
        """The ts of the conversation's thread parent, posting the parent the first time."""
        conv, ts = await self._existing_thread(conversation_id)
        if ts:
            return ts
        name, header = await asyncio.to_thread(self._header, conv)
        resp = await self.web.post(
            channel=self.channel_id, text=f"{name} on {conv.channel}", blocks=thread_parent(header)
        )
        ts = str(resp["ts"])
        await asyncio.to_thread(self.store.set_review_thread, conv.id, f"{self.channel_id}:{ts}")
        return ts

    async def _post_card(self, message_id: int) -> None:
        state = await asyncio.to_thread(self.store.answer_card, message_id)
        if state is None:
            raise Drop(f"answer {message_id} no longer exists")
        conv, thread = await self._existing_thread(state.conversation_id)
        if not thread and not self.behind():
            thread = await self._thread(conv.id)
        names = await self.people.names_for(state.actors())
        text, blocks = render_card(state, names, self.settings.oncall_group)
        if not thread:  # behind Slack's pace: the card opens the thread itself, one message instead of two
            blocks = [context((await asyncio.to_thread(self._header, conv))[1]), *blocks]
        resp = await self.web.post(
            channel=self.channel_id, thread_ts=thread or None, text=text, blocks=blocks
        )
        if not thread:
            await asyncio.to_thread(self.store.set_review_thread, conv.id, f"{self.channel_id}:{resp['ts']}")
        await asyncio.to_thread(self.store.set_kv, card_key(message_id), f"{self.channel_id}:{resp['ts']}")

    async def _update_card(self, message_id: int) -> None:
        where = await asyncio.to_thread(self.store.get_kv, card_key(message_id))
        channel, _, ts = (where or "").rpartition(":")
        if not ts or channel != self.channel_id:
            if self.settings.review != "none":
                await self._post_card(message_id)  # never posted (review=flagged): post it now
            return
        state = await asyncio.to_thread(self.store.answer_card, message_id)
        if state is None:
            raise Drop(f"answer {message_id} no longer exists")
        names = await self.people.names_for(state.actors())
        text, blocks = render_card(state, names, self.settings.oncall_group)
        await self.web.update(channel=channel, ts=ts, text=text, blocks=blocks)

    async def _post_note(self, payload: dict[str, Any]) -> None:
        if payload.get("unless_taken"):  # a scheduled on-call ping: not needed once staff took over
            conv = await asyncio.to_thread(self.store.conversation, int(payload["conversation_id"]))
            if conv is None or conv.mode == "human":
                return
        thread = await self._thread(int(payload["conversation_id"]))
        text = str(payload["text"])[:MAX_SECTION]
        value = f"{payload['conversation_id']}:{payload.get('message_id', 0)}"
        await self.web.post(
            channel=self.channel_id,
            thread_ts=thread,
            text=plain(text),
            blocks=note_blocks(text, list(payload.get("buttons") or []), value),
            reply_broadcast=bool(payload.get("broadcast")),
        )

    # --- digests: the review backlog at Slack's pace ----------------------------------------------
    async def fold_backlog(self) -> None:
        """Before each outbox round: past APPRENTICE_SLACK_DIGEST_AFTER_S, fold the unflagged backlog.

        A failure only postpones the fold to the next round; the cards themselves stay queued.
        """
        after = self.settings.slack_digest_after_s
        if after <= 0:
            return
        try:
            folded = await asyncio.to_thread(self.store.fold_unflagged_cards, CHANNEL, after, DIGEST_SIZE)
        except Exception:  # the database: the next round tries again
            log.exception("could not fold the Slack review backlog into a digest")
            return
        if folded:
            log.info("Slack is behind: %d unflagged answers folded into digests", folded)
            self._behind_until = time.monotonic() + self.behind_s

    def behind(self) -> bool:
        """Whether this replica folded a digest lately: the review channel is at Slack's limit, and a
        conversation's first card opens its thread itself instead of after a separate parent."""
        return time.monotonic() < self._behind_until

    async def _post_digest(self, payload: dict[str, Any]) -> None:
        """One top-level message listing the folded answers, one line each (no thread parents)."""
        answers = [(int(c), int(m)) for c, m in payload["answers"]]
        found = await asyncio.to_thread(self.store.answer_lines, [m for _, m in answers])
        text, blocks = render_digest([digest_line(c, m, found.get(m)) for c, m in answers])
        meta = [{"conversation": c, "answer": m} for c, m in answers]
        await self.web.post(
            channel=self.channel_id,
            text=text,
            blocks=blocks,
            metadata={"event_type": "apprentice_digest", "event_payload": {"answers": meta}},
        )


def rank(item: OutboxItem) -> int:
    """Outbox order: an unflagged answer's card (which a digest may replace) after everything else."""
    return 1 if item.kind == "card" and item.payload.get("flagged") is False else 0


def card_key(message_id: int) -> str:
    """The key-value entry that says where an answer's card is ("CHANNEL:ts")."""
    return f"slack:card:{message_id}"


# --- reports ----------------------------------------------------------------------------------
def report_items(result: NightlyReport) -> list[tuple[str, dict[str, Any]]]:
    """The outbox items of a learning report: its text, then its chart (nothing for a skipped run)."""
    if result.status == "skipped":
        return []
    items: list[tuple[str, dict[str, Any]]] = [("report", {"text": result.render()})]
    if result.chart:  # one key for both: the chart follows its text, never overtakes it
        items.append(("report_chart", _chart_payload(result)))
    return items


def queue_report(store: Store, result: NightlyReport) -> int:
    """Queue a report made outside `serve` (`apprentice retrain`, the CronJob) for the review channel.

    Whichever bot replica drains the Slack outbox posts it; returns how many items were queued.
    """
    items = report_items(result)
    for kind, payload in items:
        store.enqueue(CHANNEL, kind, payload, "report")
    return len(items)


def _chart_payload(result: NightlyReport) -> dict[str, Any]:
    """The outbox item of a report's chart: its path and a title that says which run it shows."""
    candidate = result.candidate or "?"
    baseline = result.baseline or "base model"
    title = f"Nightly learning ({result.status}): {candidate} vs {baseline}"
    return {"path": str(result.chart), "title": title}
