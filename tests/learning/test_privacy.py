"""Privacy (OWASP LLM02): erasure with lineage, logs without customers' words or tokens, redaction measured.

`apprentice forget` runs through the real CLI on a real store, knowledge base and dataset
manifests; the log test runs a Telegram conversation through the App and the fake Bot API and
reads every record the libraries and our modules emitted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from apps import app_data_dir, app_settings, kb_template  # noqa: F401
from fakes.telegram_api import TOKEN, FakeTelegramApi, fake_telegram  # noqa: F401
from scripted import ScriptedModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from bot import cli
from bot.app import App
from bot.channels.telegram import TelegramChannel
from bot.conversation import ConversationService
from bot.envelope import Inbound
from bot.logsafe import MASK, SecretFilter
from knowledge.models import AuditEntry, Conversation, Customer, Message
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning import registry
from learning.datasets import BuildOptions, build_datasets

DOCS = {
    "warranty.md": "# Warranty\n\nEvery frame has a two-year warranty. Batteries are covered for one year.\n",
    "shipping.md": "# Shipping\n\nWe ship within 3 working days by DHL to Norway and the EU.\n",
}
LABELLED = Path(__file__).resolve().parents[1] / "data" / "pii_labelled.jsonl"


def _adapter(root: Path, version: str) -> Path:
    folder = root / "adapters" / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    return folder


async def test_forget_erases_a_customer_and_lists_the_adapters_trained_on_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    data = tmp_path / "data"
    settings = Settings(_env_file=None, data_dir=data, rate_limit_per_minute=0, two_person_rule="off")  # type: ignore[call-arg]
    store = Store(settings.database)
    kb = KnowledgeBase.from_settings(settings)
    kb.ingest([docs])
    service = ConversationService(settings, store, kb, ScriptedModel())

    def ask(text: str, who: str, name: str = "") -> Inbound:
        return Inbound("telegram", who, who, text, name=name)

    # another customer is corrected first; a dataset and adapter v0 come from before Zed arrived
    [keep] = await service.handle(ask("How long is the frame warranty?", "777", "Kim Keep"))
    kept = (await service.correct(keep.message_id, "Two years on every frame.", "staff:ann")).correction
    await service.staff_feedback(keep.message_id, "approve", "staff:ann")
    build_datasets(settings, store, kb, tmp_path / "ds0", BuildOptions(heldout_fraction=0.0))
    # Zed: a question the memory answers (a paraphrase of Kim's lesson) and a corrected question
    [para] = await service.handle(ask("What warranty is there on the frame?", "555", "Zed Zulu"))
    assert para.text == "Two years on every frame."
    [mine] = await service.handle(
        ask("Hi, zed.zulu@example.org here. Do you ship to Oslo?", "555", "Zed Zulu")
    )
    zeds = (
        await service.correct(mine.message_id, "Yes Zed, we ship to Oslo by DHL.", "staff:ann")
    ).correction
    manifest = build_datasets(settings, store, kb, tmp_path / "ds1", BuildOptions(heldout_fraction=0.0))
    zed_conv = store.conversation(zeds.conversation_id)
    assert zed_conv is not None
    # lineage: Kim's lesson now also holds Zed's wording (a paraphrase), and says so
    assert any(
        f"correction:{kept.id}" in e["ids"] and zed_conv.id in e["conversations"]
        for e in manifest["lineage"]["sft"]
    )
    registry.register(store, "v0", _adapter(data, "v0"), {"dataset": str(tmp_path / "ds0")})
    v1 = _adapter(data, "v1")
    registry.register(store, "v1", v1, {"dataset": str(tmp_path / "ds1")})
    registry.register(
        store, "v2", _adapter(data, "v2"), {"dataset": str(tmp_path / "ds0"), "init_adapter": str(v1)}
    )
    registry.promote(store, "v2")
    store.enqueue(
        "telegram", "message", {"chat_id": "555", "text": "Yes Zed, we ship to Oslo by DHL."}, key="555"
    )
    kb.close()

    monkeypatch.setenv("APPRENTICE_DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["forget", "telegram:555", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and store.customer(zed_conv.customer_id).erased_at is None  # nothing changed yet
    with store.session() as s:  # "Hi, zed.zulu@… here. Do you ship …" was searched without its "Hi,"
        searched = s.scalars(select(Message.search_text).where(Message.conversation_id == zed_conv.id)).all()
    assert any(x and "zed.zulu@example.org" in x for x in searched)
    assert cli.main(["forget", "telegram:555", "--json", "--actor", "dpo@shop"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["customers"] == ["telegram:555"] and report["conversations"] == [zed_conv.id]
    assert report["adapters_trained_on_them"] == ["v1", "v2"]  # v2 was trained on top of v1
    assert report["active_adapter_affected"] and report["datasets_with_their_data"] == [str(tmp_path / "ds1")]
    assert report["corrections_revoked"] == [zeds.id] and report["outbox_items_deleted"] == 1

    with store.session() as s:
        texts = s.scalars(select(Message.text).where(Message.conversation_id == zed_conv.id)).all()
        searched = s.scalars(select(Message.search_text).where(Message.conversation_id == zed_conv.id)).all()
        customer = s.get(Customer, zed_conv.customer_id)
        conv = s.get(Conversation, zed_conv.id)
        forget_entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "forget"))
        audit_text = json.dumps([[e.before, e.after] for e in s.scalars(select(AuditEntry)).all()])
    assert texts and set(texts) == {""} and set(searched) == {None}
    assert customer.erased_at and customer.display_name == "" and customer.external_id.startswith("erased:")
    assert conv.chat_id.startswith("erased:")
    assert forget_entry.actor == "dpo@shop" and "Oslo" not in audit_text and "zed" not in audit_text.lower()
    assert store.correction(zeds.id).status == "revoked" and store.outbox_depth() == 0
    kb = KnowledgeBase.from_settings(settings)
    try:
        assert not kb.recall("Do you ship to Oslo?") or all(
            p.correction_id != zeds.id for p in kb.recall("Do you ship to Oslo?", 5)
        )
        assert any(p.correction_id == kept.id for p in kb.recall("How long is the frame warranty?"))
        after = build_datasets(settings, store, kb, tmp_path / "ds2", BuildOptions(heldout_fraction=0.0))
    finally:
        kb.close()
    written = "".join((tmp_path / "ds2" / n).read_text() for n in ("sft.jsonl", "dpo.jsonl", "eval.jsonl"))
    assert "Zed" not in written and "Oslo" not in written and "What warranty is there" not in written
    assert "Two years on every frame." in written  # the other customer's lesson stays
    assert not any(zed_conv.id in e["conversations"] for e in after["lineage"]["sft"])
    # a new message from the same Telegram user starts a fresh record
    fresh = store.conversation_for("telegram", "555", "555", "Zed")
    assert fresh.id != zed_conv.id
    store.close()


def test_forget_an_unknown_customer_says_what_to_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPRENTICE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["forget", "telegram:404", "--dry-run"]) == 1
    assert "CHANNEL:ID" in capsys.readouterr().err


async def test_logs_hold_no_token_and_no_customer_text_at_info(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_words = "my passport number is X1234567 and my email is lea@example.org"
    caplog.set_level(logging.DEBUG)
    settings = app_settings(
        app_data_dir, telegram_bot_token=TOKEN, telegram_api_url=fake_telegram.base_url,
        relevance_threshold=-1.0, overlap_threshold=0.0, log_level="DEBUG",
    )  # fmt: skip
    model = ScriptedModel()
    model.enqueue("Thanks, we will check your order.", RuntimeError(f"model crashed on: {secret_words}"))
    async with App(settings, generator=model) as app:
        channel = TelegramChannel(
            settings, app.service, app.store, app.http, poll_timeout_s=1, outbox_poll_s=0.05
        )
        await app.add_channel(channel)
        await app.start_http()
        await fake_telegram.wait_for("getUpdates")
        await fake_telegram.push_message(4242, f"Hello, {secret_words}. Where is my order?")
        await fake_telegram.wait_for("sendMessage", count=1)
        await fake_telegram.push_message(4242, f"Again: {secret_words}")  # the model fails on this one
        await fake_telegram.wait_for("sendMessage", count=2)
    assert any(r.levelno < logging.INFO for r in caplog.records)  # the libraries did log in detail
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert loud  # and something at INFO and above
    for record in loud:
        text = record.getMessage() + (
            logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        )
        assert TOKEN not in text, record.name
        assert "X1234567" not in text and "lea@example.org" not in text, (record.name, text)


def test_sql_errors_do_not_carry_the_customers_text(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    conv = store.conversation_for("test", "c", "u")
    store.add_message(conv.id, "customer", "first", external_id="m1")
    with pytest.raises(IntegrityError) as info:
        store.add_message(conv.id, "customer", "my card is 4111 1111 1111 1111", external_id="m1")
    assert "4111" not in str(info.value)
    store.close()


def test_the_log_filter_masks_secrets_and_token_shapes_in_messages_and_tracebacks() -> None:
    guard = SecretFilter(["configured-secret-value"])
    try:
        raise RuntimeError(
            "POST https://api.telegram.org/bot123456:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/getMe"
        )
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "token %s and %s", None, None)
        record.args = ("configured-secret-value", "xoxb-1234-abcdefghijkl")
        import sys

        record.exc_info = sys.exc_info()
    assert guard.filter(record)
    assert record.getMessage() == f"token {MASK} and {MASK}"
    assert "AAAAAAAA" not in (record.exc_text or "") and MASK in (record.exc_text or "")


def test_bench_redaction_writes_precision_and_recall(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "redaction"
    assert cli.main(["bench", "redaction", "--out", str(out), "--labelled", str(LABELLED)]) == 0
    report: dict[str, Any] = json.loads((out / "redaction.json").read_text())
    assert report["examples"] >= 100 and report["gold_spans"] >= 80
    assert report["recall"] >= 0.95 and report["precision"] >= 0.9
    labels = {"EMAIL", "IBAN", "CARD", "PHONE", "ADDRESS", "SSN", "DOB", "ID", "NAME"}
    assert set(report["per_label"]) == labels
    assert "precision" in capsys.readouterr().out
