"""`apprentice forget` must leave nothing of the customer behind.

Reported: after `forget`, `feedback.actor` kept the customer's id; a correction written for them
and served verbatim from the memory to another customer lived on in that customer's answer;
embedded Chroma's write-ahead queue kept the question (with an SSN) and the answer until about
1,000 later writes; dataset folders no adapter points to were neither listed nor erased; and in a
Telegram group every member's messages were filed under the first speaker, so the second member
could not be erased at all. Each runs through the real flow (ConversationService, or the Telegram
channel against the fake Bot API for the group), then every text column of every table, the raw
bytes of Chroma's SQLite file and every dataset file are searched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from apps import app_data_dir, app_settings, kb_template  # noqa: F401
from fakes.telegram_api import TOKEN, FakeTelegramApi, fake_telegram  # noqa: F401
from scripted import ScriptedModel
from sqlalchemy import JSON, String, Text, select

from bot.app import App
from bot.channels.telegram import TelegramChannel
from bot.conversation import ConversationService
from bot.envelope import Inbound
from knowledge.models import Base, Conversation, Correction, Feedback, Message
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.datasets import BuildOptions, build_datasets
from learning.privacy import ERASED, forget_customer

pytestmark = pytest.mark.timeout(180)

DOCS = {
    "shipping.md": "# Shipping\n\nWe ship within 3 working days by DHL to Norway and the EU.\n",
    "accounts.md": "# Accounts\n\nAccounts are verified by our support team within one day.\n",
}
GRACE_ID = "987650001"
SSN = "078-05-1120"
SSN_QUESTION = f"Hi, my SSN is {SSN}. Is my account verified yet?"
SSN_CORRECTION = f"Grace, we verified your account with SSN {SSN} this morning."
SHARED_QUESTION = "Do you deliver to Tromsø on Saturdays?"
SHARED_CORRECTION = "Saturday delivery to Tromsø is possible for an extra 90 NOK per parcel."
KIM_QUESTION = "How many working days does shipping take?"
KIM_CORRECTION = "Shipping takes three working days from our warehouse in Bergen."


def text_values(store: Store) -> list[str]:
    """Every value of every text, string and JSON column of every table."""
    out: list[str] = []
    with store.session() as s:
        for table in Base.metadata.sorted_tables:
            cols = [c for c in table.columns if isinstance(c.type, (String, Text, JSON))]
            if not cols:
                continue
            for row in s.execute(select(*cols)).all():
                out.extend(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in row)
    return out


def dataset_text(root: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.json*")))


async def test_forget_leaves_no_trace_in_the_database_chroma_or_datasets(
    tmp_path: Path, database_url: str
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    data = tmp_path / "data"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data,
        database_url=database_url,
        relevance_threshold=-1.0, overlap_threshold=0.0,
        rate_limit_per_minute=0,
        two_person_rule="off",
    )
    store = Store(settings.database)
    kb = KnowledgeBase.from_settings(settings)
    kb.ingest([docs])
    service = ConversationService(settings, store, kb, ScriptedModel())

    def ask(text: str, who: str, name: str) -> Inbound:
        return Inbound("telegram", who, who, text, name=name)

    [kim] = await service.handle(ask(KIM_QUESTION, "555000111", "Kim Keep"))
    await service.correct(kim.message_id, KIM_CORRECTION, "staff:ann")
    # Grace: a question with her SSN, corrected with it (private), and a question whose correction
    # holds nothing personal (shared with everyone); she rates an answer
    [ssn] = await service.handle(ask(SSN_QUESTION, GRACE_ID, "Grace Hopper"))
    private = (await service.correct(ssn.message_id, SSN_CORRECTION, "staff:ann")).correction
    [shared_q] = await service.handle(ask(SHARED_QUESTION, GRACE_ID, "Grace Hopper"))
    shared = (await service.correct(shared_q.message_id, SHARED_CORRECTION, "staff:ann")).correction
    assert await service.customer_feedback(ssn.message_id, f"telegram:{GRACE_ID}", True)
    # Mallory gets Grace's shared correction verbatim from the memory, and rates it
    [copy] = await service.handle(ask(SHARED_QUESTION, "444000222", "Mal Lory"))
    assert copy.text == SHARED_CORRECTION
    assert await service.customer_feedback(copy.message_id, "telegram:444000222", False)
    # datasets no adapter points to: a nightly run's and one built by hand under data_dir
    build_datasets(settings, store, kb, data / "runs" / "r1" / "dataset", BuildOptions(heldout_fraction=0.0))
    build_datasets(settings, store, kb, data / "datasets" / "manual", BuildOptions(heldout_fraction=0.0))
    assert SHARED_CORRECTION in dataset_text(data)
    assert any(SSN in v for v in text_values(store)) and GRACE_ID in "".join(text_values(store))

    report = forget_customer(store, kb, f"telegram:{GRACE_ID}", actor="dpo@shop", data_dir=data)
    kb.close()

    assert report.corrections_revoked == sorted([private.id, shared.id])
    assert report.copies_erased == 1 and report.feedback_scrubbed == 1
    assert sorted(report.datasets_with_their_data) == sorted(
        [str(data / "runs" / "r1" / "dataset"), str(data / "datasets" / "manual")]
    )
    assert report.dataset_rows_removed > 0 and report.chroma_queue_purged is not None
    # the database: nowhere, in any table
    values = text_values(store)
    everything = "\n".join(values)
    for gone in (GRACE_ID, SSN, "Grace", SSN_QUESTION, SHARED_CORRECTION, "Saturday delivery"):
        assert gone not in everything, gone
    # Mallory's answer row stays (her counts and rating stay right), its text is a placeholder
    copied = store.message(copy.message_id)
    assert copied is not None and copied.text == ERASED
    assert store.message(copied.reply_to_id).text == SHARED_QUESTION  # her own question stays
    with store.session() as s:
        actors = set(s.scalars(select(Feedback.actor)).all())
        kinds = sorted(s.scalars(select(Feedback.kind)).all())
    assert f"telegram:{GRACE_ID}" not in actors and "telegram:444000222" in actors
    assert kinds == ["down", "up"]
    # Chroma's file: the raw bytes, write-ahead queue and free pages included
    chroma = (data / "chroma" / "chroma.sqlite3").read_bytes()
    assert SSN.encode() not in chroma and b"Saturday delivery" not in chroma
    assert KIM_CORRECTION.encode() in chroma  # everyone else's memory stays
    # the datasets: their rows gone, everyone else's kept
    written = dataset_text(data)
    for gone in (SSN, "Grace", "Saturday delivery", "Is my account verified"):
        assert gone not in written, gone
    assert KIM_CORRECTION in written
    manifest = json.loads((data / "datasets" / "manual" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["erasures"] and manifest["counts"]["sft"] == len(manifest["lineage"]["sft"])
    # the memory still works for everyone else, and no longer knows Grace's corrections
    kb = KnowledgeBase.from_settings(settings)
    try:
        assert any(p.text == KIM_CORRECTION for p in kb.recall(KIM_QUESTION))
        assert all(p.correction_id not in (private.id, shared.id) for p in kb.recall(SHARED_QUESTION, 5))
    finally:
        kb.close()
    store.close()


def group_update(fake: FakeTelegramApi, group: int, user: int, name: str, text: str) -> dict[str, Any]:
    update = fake.message_update(
        group, f"@apprentice_test_bot {text}", user_id=user, first_name=name, chat_type="supergroup"
    )
    update["message"]["entities"] = [{"type": "mention", "offset": 0, "length": 20}]
    return update


async def test_the_second_member_of_a_group_is_erased_without_touching_the_first(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
    database_url: str,
) -> None:
    fake, group, ann, bob = fake_telegram, -100777, 770011, 770022
    settings = app_settings(
        app_data_dir, telegram_bot_token=TOKEN, telegram_api_url=fake.base_url, relevance_threshold=-1.0,
        overlap_threshold=0.0,
        database_url=database_url, rate_limit_per_minute=0,
    )  # fmt: skip
    async with App(settings, generator=ScriptedModel()) as app:
        channel = TelegramChannel(
            settings, app.service, app.store, app.http, poll_timeout_s=2, outbox_poll_s=0.05,
            retry_base_s=0.05,
        )  # fmt: skip
        await app.add_channel(channel)
        await app.start_http()
        await fake.wait_for("getUpdates")
        await fake.push_update(group_update(fake, group, ann, "Ann", "where is order 4411 of Ann Arbor?"))
        await fake.wait_for("sendMessage", count=1)
        mark = fake.mark()
        await fake.push_update(group_update(fake, group, bob, "Bob", f"my SSN is {SSN}, is order 9922 out?"))
        [answer] = await fake.wait_for("sendMessage", since=mark)
        store = app.store
        with store.session() as s:
            [conv] = s.scalars(select(Conversation).where(Conversation.chat_id == str(group))).all()
            rows = list(s.scalars(select(Message).where(Message.conversation_id == conv.id)).all())
        assert {m.sender_id for m in rows if m.role == "customer"} == {str(ann), str(bob)}
        bobs = next(m for m in rows if m.role == "customer" and m.sender_id == str(bob))
        reply = next(m for m in rows if m.reply_to_id == bobs.id)
        assert await app.service.customer_feedback(reply.id, f"telegram:{bob}", True)
        before = {m.id: m.text for m in rows}

        report = forget_customer(store, None, f"telegram:{bob}", data_dir=app_data_dir)
        assert report.customers == [f"telegram:{bob}"] and report.group_conversations == [conv.id]
        assert report.conversations == []  # Bob owns no conversation: Ann spoke first
        with store.session() as s:
            after = {m.id: m for m in s.scalars(select(Message).where(Message.conversation_id == conv.id))}
            fb = list(s.scalars(select(Feedback)).all())
            still = s.get(Conversation, conv.id)
        for mid, text in before.items():
            if mid in (bobs.id, reply.id):
                assert after[mid].text == ""
            else:  # Ann's question and her answer, untouched
                assert after[mid].text == text and text
        assert after[bobs.id].sender_id == "erased"
        assert [f.actor for f in fb] == [f"erased:f{fb[0].id}"] and fb[0].kind == "up"
        assert still is not None and still.chat_id == str(group)  # the group goes on for Ann
        everything = "\n".join(text_values(store))
        assert str(bob) not in everything and SSN not in everything and "9922" not in everything
        assert str(ann) in everything and "4411 of Ann Arbor" in everything
        assert answer.params["text"]  # the reply Bob got was sent before; Telegram keeps its copy

        # Ann can be erased too, and the record of the group is then empty
        forget_customer(store, None, f"telegram:{ann}", data_dir=app_data_dir)
        everything = "\n".join(text_values(store))
        assert str(ann) not in everything and "Ann Arbor" not in everything


def test_nothing_to_forget_for_an_unknown_sender(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        with pytest.raises(LookupError):
            forget_customer(store, None, "telegram:31337")
        with store.session() as s:
            assert s.scalars(select(Correction)).all() == []
    finally:
        store.close()
