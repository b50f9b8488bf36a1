"""The inbox (migration 0002) and the resume queries, on SQLite and PostgreSQL.

An update is kept until handled, handled by one holder at a time, taken up again when its holder
died (the lease ran out), and recorded as processed once; the outbox says whether a stored reply
was already queued, so a resumed answer is not queued twice.
"""

from __future__ import annotations

from knowledge.store import Store


def test_an_update_is_kept_claimed_once_resumed_after_its_lease_and_done_once(database_url: str) -> None:
    store = Store(database_url)
    try:
        assert store.inbox_put("telegram", "1", {"update_id": 1})
        assert not store.inbox_put("telegram", "1", {"update_id": 1})  # a redelivery: kept already
        assert [i.update_id for i in store.inbox_due("telegram", older_than_s=0)] == ["1"]
        assert store.inbox_claim("telegram", "1", lease_s=60) == 1
        assert store.inbox_claim("telegram", "1", lease_s=60) is None  # in hand elsewhere
        assert store.inbox_due("telegram", older_than_s=0) == []
        # polling: not in the inbox yet; a claim adds it. A holder that died: its lease runs out.
        assert store.inbox_claim("telegram", "2", lease_s=-1, payload={"update_id": 2}) == 1
        assert [i.update_id for i in store.inbox_due("telegram", older_than_s=0)] == ["2"]
        assert store.inbox_claim("telegram", "2", lease_s=60) == 2  # second attempt
        store.inbox_done("telegram", "1")
        store.inbox_done("telegram", "2")
        store.inbox_done("telegram", "2")  # a second finisher records nothing twice
        assert store.inbox_claim("telegram", "1", lease_s=60, payload={}) is None  # processed
        assert not store.inbox_put("telegram", "2", {})
        assert not store.claim_update("telegram", "1") and not store.claim_update("telegram", "2")
    finally:
        store.close()


def test_outbox_and_message_lookups_for_resumed_answers(database_url: str) -> None:
    store = Store(database_url)
    try:
        conv = store.conversation_for("telegram", "42", "42", "Ada")
        q = store.add_message(conv.id, "customer", "hello", external_id="m1")
        a = store.add_message(conv.id, "bot", "hi!", reply_to_id=q.id)
        assert store.message_by_external(conv.id, "m1").id == q.id
        assert store.message_by_external(conv.id, "m2") is None
        assert store.first_reply(q.id).id == a.id
        assert not store.outbox_has("telegram", a.id)
        store.enqueue("telegram", "message", {"chat_id": "42", "text": "hi!", "message_id": a.id}, key="42")
        store.enqueue("slack", "report", {"text": "nightly"}, key="report")  # no message id at all
        assert store.outbox_has("telegram", a.id) and not store.outbox_has("slack", a.id)
        assert store.outbox_has("telegram", a.id, "message")
        assert not store.outbox_has("telegram", a.id, "card")
    finally:
        store.close()
