"""Slack at volume: about one message a second per channel, and what the review channel does about it.

The fake Slack enforces the limit (HTTP 429, Retry-After, `ratelimited`). The real SlackChannel and
outbox wait out Retry-After for the whole channel and lose no card; once cards queue up, unflagged
answers are folded into digests while every flagged answer keeps its own card, first. Answers are
put into the outbox the way the conversation service does it (`answer_posted`), without a model.
Fakes with `time_scale` run Slack's clock faster so that waiting out Retry-After takes tenths of
a second; nothing here waits on a clock, only on what the fake has received.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, cast

import aiohttp
from fakes.slack_api import Call, FakeSlack
from sqlalchemy import func, select

from bot.channels.slack import DIGEST_SIZE, SlackChannel
from bot.channels.slack.feed import Mrkdwn
from bot.conversation import ConversationService
from bot.envelope import Answer
from bot.http import HttpServer
from bot.outbox import by_rank
from knowledge.models import AuditEntry, Conversation, OutboxItem
from knowledge.settings import Settings
from knowledge.store import Store

REVIEW = "CREVIEW"


def make_channel(tmp_path: Path, slack: FakeSlack, **overrides: Any) -> tuple[SlackChannel, Store]:
    """A SlackChannel on a fresh database; not started, so answers can queue up first."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        slack_bot_token="xoxb-test",
        slack_signing_secret="volume-signing-secret",
        slack_channel=REVIEW,
        slack_api_url=slack.api_url,
        **overrides,
    )
    store = Store(settings.database)
    service = ConversationService(settings, store, cast(Any, None), cast(Any, None))  # no model needed
    http = HttpServer("127.0.0.1", 0)
    return SlackChannel(settings, service, store, http, poll_s=0.05, base_delay_s=0.05, lease_s=5), store


async def queue_answer(
    channel: SlackChannel, store: Store, chat: str, n: int, flagged: bool
) -> tuple[Conversation, Answer]:
    """Store a question and the bot's answer, and hand the answer to the channel as the service does."""
    conv = store.conversation_for("test", chat, f"cust-{chat}", "Ada")
    question = store.add_message(conv.id, "customer", f"Question {n}: when does my bike arrive?")
    status, text = ("unsure", f"Answer {n}: not sure.") if flagged else ("ok", f"Answer {n}: in 3 days.")
    reply = store.add_message(conv.id, "bot", text, reply_to_id=question.id, status=status, flagged=flagged)
    answer = Answer(conv.id, question.id, reply.id, question.text, text, [], status, "m", None, 1.0, flagged)
    await channel.answer_posted(conv, answer)
    return conv, answer


def card_of(call: Call) -> int | None:
    """The answer id of a review card (its Correct button), None for any other message."""
    for block in call.params.get("blocks") or []:
        for element in block.get("elements", []) if block.get("type") == "actions" else []:
            if element.get("action_id") == "apprentice_correct":
                return int(str(element["value"]).split(":")[1])
    return None


def digest_of(call: Call) -> list[int]:
    """The answer ids a digest lists (its message metadata), [] for any other message."""
    meta = call.params.get("metadata") or {}
    if meta.get("event_type") != "apprentice_digest":
        return []
    return [int(a["answer"]) for a in meta["event_payload"]["answers"]]


class Drain:
    """Lets a test wait until the Slack outbox is empty: each item recorded as sent wakes it."""

    def __init__(self, store: Store) -> None:
        self.store, self.sent = store, asyncio.Event()
        loop, record = asyncio.get_running_loop(), store.outbox_done

        def outbox_done(item_id: int) -> None:  # runs in the outbox's database thread
            record(item_id)
            loop.call_soon_threadsafe(self.sent.set)

        store.outbox_done = outbox_done  # type: ignore[method-assign]

    async def wait(self, timeout: float = 15) -> None:
        async def empty() -> None:
            while True:
                self.sent.clear()
                if not await asyncio.to_thread(self.store.outbox_depth, "slack"):
                    return
                await self.sent.wait()

        await asyncio.wait_for(empty(), timeout)


def dropped(store: Store) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count()).where(AuditEntry.action == "outbox_drop")) or 0)


async def test_the_fake_refuses_posts_beyond_the_rate_with_429_and_retry_after() -> None:
    async def post(slack: FakeSlack, channel: str) -> tuple[int, str | None, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                slack.api_url + "chat.postMessage",
                json={"channel": channel, "text": "hello"},
                headers={"Authorization": "Bearer xoxb-test"},
            ) as resp,
        ):
            return resp.status, resp.headers.get("Retry-After"), await resp.json()

    assert FakeSlack().post_rate == 1.0  # by default the fake is as strict as Slack: one a second
    # one post every 20 s after a burst of two: the third is refused whatever the machine's speed
    async with FakeSlack(post_rate=0.05, post_burst=2) as slack:
        assert [(await post(slack, "C1"))[0] for _ in range(2)] == [200, 200]
        assert await post(slack, "C1") == (429, "20", {"ok": False, "error": "ratelimited"})
        assert (await post(slack, "C2"))[0] == 200  # the limit is per channel
        assert [c.status for c in slack.calls] == [200, 200, 429, 200]
        assert len(slack.channel_messages("C1")) == 2
    async with FakeSlack(post_rate=0.05, post_burst=1, time_scale=10) as fast:
        await post(fast, "C1")
        assert (await post(fast, "C1"))[:2] == (429, "2")  # Slack's 20 s, ten times faster
    async with FakeSlack(post_rate=None) as unlimited:
        assert {(await post(unlimited, "C1"))[0] for _ in range(12)} == {200}


async def test_cards_beyond_the_rate_wait_out_retry_after_and_all_arrive(tmp_path: Path) -> None:
    async with FakeSlack(post_burst=2, time_scale=10) as slack:
        channel, store = make_channel(tmp_path, slack, slack_digest_after_s=0)  # no digests: only waiting
        try:
            answers = [(await queue_answer(channel, store, f"chat-{n % 2}", n, False))[1] for n in range(8)]
            drain = Drain(store)
            await channel.start()
            await slack.wait_for("chat.postMessage", 10)  # two thread parents and eight cards
            posts = [c for c in slack.calls if c.method == "chat.postMessage"]
            carded = [card_of(c) for c in posts if c.ok and card_of(c) is not None]
            assert sorted(carded) == sorted(a.message_id for a in answers)  # each card once, none lost
            statuses = [c.status for c in posts]
            assert 429 in statuses, "the burst should have met Slack's limit"
            # after a 429 the whole channel waited its Retry-After: the next post always went through
            assert all(b == 200 for a, b in itertools.pairwise(statuses) if a == 429)
            await drain.wait()
            assert dropped(store) == 0
            with store.session() as s:
                retried = s.scalars(select(OutboxItem).where(OutboxItem.attempts > 0)).all()
            assert retried and all("Slack rate limit" in item.last_error for item in retried)
        finally:
            await channel.stop()
            store.close()


async def test_a_burst_folds_unflagged_answers_into_digests_and_flagged_ones_keep_their_cards(
    tmp_path: Path,
) -> None:
    async with FakeSlack(post_burst=3, time_scale=10) as slack:
        # any wait at all counts as falling behind: the first outbox round folds the backlog
        channel, store = make_channel(tmp_path, slack, slack_digest_after_s=1e-6)
        try:
            queued = [await queue_answer(channel, store, f"chat-{n % 6}", n, n % 4 == 3) for n in range(30)]
            flagged = {a.message_id for _, a in queued if a.flagged}
            plain = {a.message_id for _, a in queued if not a.flagged}
            drain = Drain(store)
            await channel.start()
            await slack.wait_for("chat.postMessage", len(flagged), where=lambda c: card_of(c) in flagged)
            await slack.wait_for("chat.postMessage", where=lambda c: bool(digest_of(c)))

            posts = slack.called("chat.postMessage")
            own = [card_of(c) for c in posts if card_of(c) is not None]
            listed = [m for c in posts for m in digest_of(c)]
            assert sorted(own) == sorted(flagged)  # every flagged answer: its own card, once
            assert sorted(listed) == sorted(plain)  # every other answer: one digest line, none lost
            last_card = max(i for i, c in enumerate(posts) if card_of(c) is not None)
            first_digest = min(i for i, c in enumerate(posts) if digest_of(c))
            assert last_card < first_digest  # flagged answers first
            [digest] = [m for m in slack.channel_messages(REVIEW) if "without a flag" in m.all_text()]
            for conv, answer in queued:
                if not answer.flagged:
                    assert f"#{conv.id} · answer #{answer.message_id}: “Question" in digest.all_text()
            # behind Slack's pace, a conversation's first card opens its thread (one message, not two)
            for conv in {c.id: c for c, a in queued if a.flagged}.values():
                thread = store.conversation(conv.id).review_thread or ""
                opener = slack.messages[thread.rpartition(":")[2]]
                assert opener.thread_ts is None and f"conversation #{conv.id}" in opener.all_text()
                assert card_of_blocks(opener.blocks) in flagged
            await drain.wait()
            assert dropped(store) == 0

            # a customer's 👎 on an answer that is only a digest line brings its full card
            conv, answer = next((c, a) for c, a in queued if not a.flagged)
            await channel.customer_flag(conv, answer.message_id, "disliked an answer")
            await slack.wait_for("chat.postMessage", where=lambda c: card_of(c) == answer.message_id)

            # so does `/apprentice card ID` from staff, for another digest line's answer
            conv, answer = [(c, a) for c, a in queued if not a.flagged][1]
            staff, surface = channel.commands, Mrkdwn(channel.people, channel.outbox)  # as /apprentice
            reply = await staff.run(f"card {answer.message_id}", "slack:UADA", surface)
            assert f"card of answer #{answer.message_id}" in reply and f"conversation #{conv.id}" in reply
            [card] = await slack.wait_for("chat.postMessage", where=lambda c: card_of(c) == answer.message_id)
            thread = (store.conversation(conv.id).review_thread or "").rpartition(":")[2]
            assert card.params.get("thread_ts") in (None, thread)
            # a number that is no answer (the question's) gets a clear reply
            no_answer = await staff.run(f"card {answer.question_id}", "slack:UADA", surface)
            assert no_answer.startswith(f"There is no answer #{answer.question_id}.")
            assert "Which answer?" in await staff.run("card", "slack:UADA", surface)
        finally:
            await channel.stop()
            store.close()


def card_of_blocks(blocks: list[dict[str, Any]]) -> int | None:
    return card_of(Call("chat.postMessage", {"blocks": blocks}, "", True))


def test_rank_lets_urgent_items_overtake_but_keeps_each_key_in_order() -> None:
    def item(id_: int, key: str, urgent: bool) -> OutboxItem:
        return OutboxItem(id=id_, channel="slack", kind="card", key=key, payload={"urgent": urgent})

    items = [
        item(1, "a", False),
        item(2, "b", False),
        item(3, "a", True),
        item(4, "c", True),
        item(5, "b", False),
    ]
    ordered = by_rank(items, lambda i: 0 if i.payload["urgent"] else 1)
    # 4 is urgent; 3 is urgent and takes 1 (same key, older) with it; b's items keep their place
    assert [i.id for i in ordered] == [1, 3, 4, 2, 5]


async def test_a_fold_lists_each_waiting_unflagged_card_once_on_each_engine(
    tmp_path: Path, database_url: str
) -> None:
    async with FakeSlack() as slack:
        channel, store = make_channel(tmp_path, slack, database_url=database_url)
        try:
            queued = [(await queue_answer(channel, store, "chat", n, n == 2))[1] for n in range(5)]
            items = store.pending_outbox("slack")
            assert store.claim_outbox(items[1].id, 60)  # another replica is sending this one right now
            fold = store.fold_unflagged_cards
            # answers 0, 3 and 4: not the flagged one, not the claimed one
            assert fold("slack", 0.0, DIGEST_SIZE) == 3
            assert fold("slack", 0.0, DIGEST_SIZE) == 0
            with store.session() as s:
                status = dict(s.execute(select(OutboxItem.id, OutboxItem.status)).tuples().all())
                [digest] = s.scalars(select(OutboxItem).where(OutboxItem.kind == "digest")).all()
            assert [status[i.id] for i in items] == ["folded", "sending", "pending", "folded", "folded"]
            ids = [a.message_id for a in queued]
            assert [m for _, m in digest.payload["answers"]] == [ids[0], ids[3], ids[4]]
            assert digest.status == "pending" and digest.id > max(i.id for i in items)  # queued last
        finally:
            store.close()
