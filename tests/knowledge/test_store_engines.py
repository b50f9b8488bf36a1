"""The store on both engines it supports: SQLite (embedded) and a real PostgreSQL server.

Same models, same migrations, same code: every test here runs once per engine.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa
from alembic.script import ScriptDirectory

from knowledge.models import Base, OutboxItem, utcnow
from knowledge.store import Store, make_engine, migrate


def _head() -> str:
    from importlib import resources

    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("knowledge") / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head
    return head


def test_migrations_build_the_schema_from_a_blank_database(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
        migrate(engine)
        insp = sa.inspect(engine)
        tables = set(insp.get_table_names())
        assert set(Base.metadata.tables) <= tables
        for name, table in Base.metadata.tables.items():
            columns = {c["name"] for c in insp.get_columns(name)}
            missing = {c.name for c in table.columns} - columns
            assert not missing, f"{name} lacks {missing} on {engine.dialect.name}"
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == _head()
        migrate(engine)  # a second start is a no-op
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM alembic_version")) == 1
    finally:
        engine.dispose()


def test_conversation_messages_and_json_fields_round_trip(database_url: str) -> None:
    store = Store(database_url)
    try:
        conv = store.conversation_for("telegram", "c1", "u1", "Ann")
        assert store.conversation_for("telegram", "c1", "u1", "Ann").id == conv.id
        q = store.add_message(conv.id, "customer", "Where is my parcel? ✈", external_id="m1")
        sources = [{"title": "Shipping", "score": 0.81, "kind": "document"}]
        a = store.add_message(
            conv.id, "bot", "In transit.", reply_to_id=q.id, sources=sources, model="m", latency_ms=12.5
        )
        got = store.message(a.id)
        assert got is not None and got.sources == sources and got.latency_ms == 12.5
        assert store.reply_to(q.id) is not None and store.reply_to(q.id).id == a.id  # type: ignore[union-attr]
        assert [m.text for m in store.history(conv.id, 5)] == ["Where is my parcel? ✈", "In transit."]
        assert store.add_feedback(a.id, "down", "u1") is True
        assert store.add_feedback(a.id, "down", "u1") is False
        assert store.message(a.id).flagged  # type: ignore[union-attr]
        corr, created = store.add_correction(
            message_id=a.id, conversation_id=conv.id, request_key="k1", question="q", original="o",
            corrected="c", staff="S1",
        )
        again, created2 = store.add_correction(
            message_id=a.id, conversation_id=conv.id, request_key="k1", question="q", original="o",
            corrected="other", staff="S1",
        )
        assert created and not created2 and again.id == corr.id and again.corrected == "c"
        counts = store.counts_since(utcnow() - dt.timedelta(minutes=1))
        assert counts == {"conversations": 1, "answers": 1, "corrections": 1}
    finally:
        store.close()


def test_update_claims_are_exactly_once_across_racing_stores(database_url: str) -> None:
    """Two Store instances stand in for two replicas sharing one database."""
    a, b = Store(database_url), Store(database_url)
    try:
        ids = [str(i) for i in range(40)]
        with ThreadPoolExecutor(8) as pool:
            wins = list(pool.map(lambda i: (a if int(i) % 2 else b).claim_update("telegram", i), ids))
            wins += list(pool.map(lambda i: (b if int(i) % 2 else a).claim_update("telegram", i), ids))
        assert sum(wins) == len(ids)
    finally:
        a.close()
        b.close()


def test_lock_lease_has_one_holder_until_it_expires(database_url: str) -> None:
    a, b = Store(database_url), Store(database_url)
    try:
        assert a.acquire_lock("nightly", "replica-a", ttl_s=60)
        assert not b.acquire_lock("nightly", "replica-b", ttl_s=60)
        assert a.acquire_lock("nightly", "replica-a", ttl_s=60)  # renew
        a.release_lock("nightly", "replica-a")
        assert b.acquire_lock("nightly", "replica-b", ttl_s=-1)  # already expired lease
        assert a.acquire_lock("nightly", "replica-a", ttl_s=60)
    finally:
        a.close()
        b.close()


def test_outbox_keeps_order_and_depth(database_url: str) -> None:
    store = Store(database_url)
    try:
        first = store.enqueue("telegram", "send", {"chat_id": "1", "text": "a"}, key="1")
        second = store.enqueue("telegram", "send", {"chat_id": "1", "text": "b"}, key="1")
        store.enqueue("slack", "card", {"x": 1})
        assert [i.id for i in store.pending_outbox("telegram")] == [first, second]
        assert store.outbox_depth() == 3 and store.outbox_depth("telegram") == 2
        store.outbox_retry(first, 5, "boom")
        store.outbox_done(second)
        pending = store.pending_outbox("telegram")
        assert [(i.id, i.attempts, i.payload["text"]) for i in pending] == [(first, 1, "a")]
        store.set_kv("webhook_secret", "s1")
        store.set_kv("webhook_secret", "s2")
        assert store.get_kv("webhook_secret") == "s2"
    finally:
        store.close()


def test_outbox_items_are_claimed_by_one_replica_until_the_lease_ends(database_url: str) -> None:
    a, b = Store(database_url), Store(database_url)
    try:
        ids = [a.enqueue("telegram", "send", {"n": i}, key=str(i % 3)) for i in range(30)]
        with ThreadPoolExecutor(8) as pool:
            wins_a = list(pool.map(lambda i: a.claim_outbox(i, 60), ids))
            wins_b = list(pool.map(lambda i: b.claim_outbox(i, 60), ids))
        assert [x + y for x, y in zip(wins_a, wins_b, strict=True)] == [1] * len(ids)
        # claimed items still count as undelivered (they block their key and show in the depth)
        assert len(b.pending_outbox("telegram")) == 30 and b.outbox_depth("telegram") == 30
        a.outbox_done(ids[0])
        assert b.outbox_depth("telegram") == 29
        # a sender that died: its lease runs out and another replica may claim the item
        assert a.claim_outbox(ids[1], -1) is False  # still leased for 60 s
        with a.session() as s:
            s.execute(sa.update(OutboxItem).where(OutboxItem.id == ids[1]).values(next_attempt_at=utcnow()))
        assert b.claim_outbox(ids[1], 60) is True
        assert a.claim_outbox(ids[0], 60) is False  # delivered items are never claimed again
    finally:
        a.close()
        b.close()


def test_setdefault_kv_gives_racing_replicas_one_value(database_url: str) -> None:
    a, b = Store(database_url), Store(database_url)
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: (a, b)[i % 2].setdefault_kv("secret", f"s{i}"), range(16)))
        assert len(set(got)) == 1 and a.get_kv("secret") == got[0]
    finally:
        a.close()
        b.close()


def test_replicas_starting_together_migrate_once(database_url: str) -> None:
    """Several processes open a blank database at the same moment: one migrates, none fails."""
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: Store(database_url), range(4)))
    try:
        with stores[0].engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == _head()
    finally:
        for s in stores:
            s.close()
