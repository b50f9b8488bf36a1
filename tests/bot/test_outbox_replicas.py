"""Two replicas drain one outbox table: every item is sent once, and one chat's items stay in order."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.outbox import Outbox, Retry
from knowledge.store import Store


async def test_two_drainers_send_each_item_once_and_in_key_order(database_url: str) -> None:
    stores = [Store(database_url), Store(database_url)]
    sent: list[tuple[str, dict[str, Any]]] = []
    failed_once: set[int] = set()

    def sender(name: str):  # type: ignore[no-untyped-def]
        async def send(kind: str, payload: dict[str, Any]) -> None:
            if payload["n"] % 7 == 0 and payload["n"] not in failed_once:
                failed_once.add(payload["n"])
                raise Retry("try again", after=0)
            await asyncio.sleep(0)  # let the other replica run in between
            sent.append((name, payload))

        return send

    outboxes = [Outbox(s, "telegram", sender(f"r{i}"), base_delay_s=0, batch=5) for i, s in enumerate(stores)]
    try:
        for n in range(40):
            stores[n % 2].enqueue("telegram", "send", {"n": n, "chat": n % 4}, key=str(n % 4))
        # one round each on its own first, so both deliver however the threads are scheduled; then
        # both at once until the outbox is empty
        for outbox in outboxes:
            await outbox.drain_once()
        while stores[0].outbox_depth("telegram"):
            await asyncio.gather(*(o.drain_once() for o in outboxes))
    finally:
        for s in stores:
            s.close()
    numbers = [p["n"] for _, p in sent]
    assert sorted(numbers) == list(range(40))  # each once, none lost
    for chat in range(4):
        in_chat = [n for n in numbers if n % 4 == chat]
        assert in_chat == sorted(in_chat), f"chat {chat} out of order: {in_chat}"
    assert {name for name, _ in sent} == {"r0", "r1"}  # both replicas did deliver
