"""Secrets pasted into a correction were served to other customers and trained on.

Every kind is tried through the real flow: a staff correction holding it is refused with a message
naming the kind (never the value) and nothing is stored, remembered or delivered; a model reply
holding it is blocked by the output guard; a dataset built from a conversation holding it has
`[SECRET]` instead. One detector module (`learning/secrets_scan.py`) serves all three and the log
filter. Ordinary support answers (order numbers, prices, product codes, tracking numbers, URLs)
are not secrets. The values are assembled at run time so that no scanner mistakes this file for a leak.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from scripted import ScriptedModel

from bot.conversation import ConversationService
from bot.envelope import Inbound, Outbound
from bot.guard import BLOCKED
from bot.logsafe import MASK, SecretFilter
from bot.staff import CorrectionRefused, correction_problem
from knowledge.models import Conversation
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store
from learning.datasets import BuildOptions, build_datasets
from learning.redact import redact
from learning.secrets_scan import find_secrets, secret_kinds

LABELLED = Path(__file__).resolve().parents[1] / "data" / "pii_labelled.jsonl"
KB = Path(__file__).resolve().parents[2] / "knowledge" / "demo_kb"

# (kind reported, the secret value, how staff pasted it)
SECRETS = [
    ("Stripe key", "sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc", "Use the key {} to refund it."),
    ("Stripe key", "pk_" + "live_" + "51HxYzAbCdEfGhIjKlMn", "Publishable key: {}"),
    ("Stripe key", "rk_" + "live_" + "51HxYzAbCdEfGhIjKlMnOp", "restricted key {} for refunds"),
    ("AWS access key", "AKIA" + "IOSFODNN7EXAMPLE", "The bucket key is {}."),
    ("GitHub token", "ghp_" + "16C7e42F292c6912E7710c838347Ae178B4a", "token {} for the repo"),
    ("GitHub token", "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzAB", "PAT {}"),
    (
        "JSON Web Token",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
        + "eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "Send the header Authorization: Bearer {}",
    ),
    ("password", "Tr0ub4dor&3", "Log in to the dealer portal.\npassword: {}"),
    ("password", "s3cr3tPassw0rd", "db user=shop pwd={}"),
    ("Slack token", "xoxb-" + "17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy", "bot token {}"),
    ("Slack token", "xoxp-" + "17653672481-19874698323-19874698323-4f2a1b", "user token {}"),
    ("Slack token", "xapp-1-" + "A0123456789-1234567890123-abcdef0123456789", "app token {}"),
    ("Google API key", "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "Maps key {}"),
    (
        "private key",
        "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq8\n-----END RSA PRIVATE KEY-----",
        "{}",
    ),
    (
        "high-entropy string",
        "9fQ2xL7vKp3ZrT8mW1nB4cY6hJ0dS5aE",
        "Your voucher API secret is {} (keep it safe).",
    ),
]
IDS = [f"{kind}:{value[:7]}" for kind, value, _ in SECRETS]

ORDINARY = [
    "Your order 5512 ships Monday; the total is $1,299.99 including VAT.",
    "Product code SKU-4471-B is back in stock at both stores.",
    "Track it with 1Z999AA10123456784 at https://www.ups.com/track?tracknum=1Z999AA10123456784&loc=en_US",
    "See https://northwindbikes.example/support/returns-and-refunds/how-to-return-an-e-bike-2024 for steps",
    "Your reference is ORD-2024-000551234-NW and the USPS number is 9400111899223344556677.",
    "Use code WELCOME10 at checkout; the Voltline E-Commuter 2024 costs €2,499.",
    "Refund 550e8400-e29b-41d4-a716-446655440000 went out today, DHL JJD0099887766554433221.",
    "Gift card GC-7Q4K-9M2P-X8LZ-3RTV has a balance of $50.",
    "Password: reset it from the login page with the link we emailed you.",
    "Your password must be at least 12 characters long.",
    "Invoice INV-2025-04-0007113 is attached; firmware 10.4.12.1 fixes the display.",
]


@pytest.fixture
def flow(tmp_path: Path, demo_kb: KnowledgeBase) -> Any:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        relevance_threshold=-1.0, overlap_threshold=0.0,
        rate_limit_per_minute=0,
        two_person_rule="off",
    )
    store = Store(settings.database)
    model = ScriptedModel()
    service = ConversationService(settings, store, demo_kb, model)
    sent: list[Outbound] = []

    async def deliver(conv: Conversation, out: Outbound) -> None:
        sent.append(out)

    service.deliverers["test"] = deliver
    yield service, model, store, sent
    for corr in store.corrections(include_revoked=True):
        demo_kb.forget(corr.id)
    store.close()


def ask(text: str, chat: str = "c1") -> Inbound:
    return Inbound("test", chat, f"cust-{chat}", text, name="Customer")


@pytest.mark.parametrize(("kind", "value", "pasted"), SECRETS, ids=IDS)
async def test_a_correction_holding_a_secret_is_refused_and_nothing_is_stored_or_sent(
    flow: Any, kind: str, value: str, pasted: str, caplog: pytest.LogCaptureFixture
) -> None:
    service, model, store, sent = flow
    model.enqueue("Let me check that for you.")
    [answer] = await service.handle(ask("How do I get a refund for order 5512?"))
    text = pasted.format(value)
    with pytest.raises(CorrectionRefused) as info:
        await service.correct(answer.message_id, text, "staff:ann", request_key="k1")
    message = str(info.value)
    assert kind in info.value.kinds and kind in message and value not in message
    assert correction_problem(text) == message  # what a form shows before it is submitted
    assert store.corrections(include_revoked=True) == [] and sent == []
    assert [m.role for m in store.history(answer.conversation_id, 10)] == ["customer", "bot"]
    assert service.kb.recall("How do I get a refund for order 5512?", 5) == [] or all(
        value not in p.text for p in service.kb.recall("How do I get a refund for order 5512?", 5)
    )
    assert value not in caplog.text


@pytest.mark.parametrize(("kind", "value", "pasted"), SECRETS, ids=IDS)
async def test_a_reply_holding_a_secret_is_blocked_by_the_guard(
    flow: Any, kind: str, value: str, pasted: str, caplog: pytest.LogCaptureFixture
) -> None:
    service, model, store, _sent = flow
    caplog.set_level("WARNING", logger="bot.conversation")
    model.enqueue(pasted.format(value))  # a model that repeats what it was told (or a poisoned adapter)
    [out] = await service.handle(ask("What is your API key?"))
    assert out.text == BLOCKED
    stored = store.message(out.message_id)
    assert stored is not None and stored.status == "blocked" and value not in stored.text
    assert "secret" in caplog.text and value not in caplog.text


@pytest.mark.parametrize(("kind", "value", "pasted"), SECRETS, ids=IDS)
def test_the_redactor_and_the_log_filter_take_every_kind_out(kind: str, value: str, pasted: str) -> None:
    text = pasted.format(value)
    redacted, counts = redact(text)
    assert value not in redacted and "[SECRET]" in redacted and counts.get("SECRET") == 1
    assert secret_kinds(text) == [kind]
    masked = SecretFilter([]).mask(text)
    if kind != "high-entropy string":  # logs get the known shapes only (hashes and ids are no secrets)
        assert value not in masked and MASK in masked


async def test_datasets_never_contain_a_secret(flow: Any, tmp_path: Path) -> None:
    """Secrets that still reach the store (a customer pastes one, staff reply in a taken-over chat)
    are `[SECRET]` in sft.jsonl, dpo.jsonl and eval.jsonl."""
    service, model, _store, _sent = flow
    values = [value for _, value, _ in SECRETS]
    model.enqueue("Let me check.", "Let me check.")
    [a1] = await service.handle(ask(f"My key {values[0]} stopped working, why?", "c1"))
    await service.correct(a1.message_id, "Live keys stop working when they are rolled in the dashboard.", "s")
    [a2] = await service.handle(ask("Can you set up my dealer account?", "c2"))
    await service.take_over(a2.conversation_id, "staff:ann")
    await service.staff_reply(a2.conversation_id, "Done: " + " / ".join(values[1:6]), "staff:ann")
    out = tmp_path / "ds"
    build_datasets(service.settings, service.store, service.kb, out, BuildOptions(heldout_fraction=0.5))
    written = "".join(
        (out / name).read_text(encoding="utf-8") for name in ("sft.jsonl", "dpo.jsonl", "eval.jsonl")
    )
    assert "[SECRET]" in written
    assert not any(v in written or json.dumps(v)[1:-1] in written for v in values)


@pytest.mark.parametrize("text", ORDINARY)
async def test_ordinary_support_answers_are_not_secrets(flow: Any, text: str) -> None:
    service, model, _store, sent = flow
    assert find_secrets(text) == [] and correction_problem(text) is None
    assert service.guard.check(text, ["Where is order 5512?"]).reason != "secret"
    model.enqueue("Let me check.")
    [answer] = await service.handle(ask("Where is my order 5512?"))
    result = await service.correct(answer.message_id, text, "staff:ann")
    assert result.created and [o.text for o in sent] == [text]


def test_no_secret_is_found_in_the_labelled_set_or_the_demo_documents() -> None:
    texts = [json.loads(line)["text"] for line in LABELLED.read_text(encoding="utf-8").splitlines() if line]
    texts += [p.read_text(encoding="utf-8") for p in sorted(KB.glob("*.md"))]
    found = {t[s.start : s.end] for t in texts for s in find_secrets(t)}
    assert found == set()


def test_the_log_filter_uses_the_same_detectors(caplog: pytest.LogCaptureFixture) -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "keys %s %s", None, None)
    record.args = (SECRETS[0][1], SECRETS[3][1])
    assert SecretFilter([]).filter(record)
    assert record.getMessage() == f"keys {MASK} {MASK}"


async def test_the_terminal_channel_refuses_a_secret_and_says_what_kind(
    tmp_path: Path, demo_kb: KnowledgeBase
) -> None:
    from bot.channels.terminal import TerminalChannel

    settings = Settings(_env_file=None, data_dir=tmp_path, relevance_threshold=-1.0, overlap_threshold=0.0)  # type: ignore[call-arg]
    store = Store(settings.database)
    model = ScriptedModel()
    model.enqueue("Let me check.")
    service = ConversationService(settings, store, demo_kb, model)
    key = SECRETS[3][1]
    script = f"How do I log in to the dealer portal?\n/correct Use the key {key}\n/quit\n".encode()
    out = io.StringIO()
    assert await TerminalChannel(service, io.BytesIO(script), out).run() == 0
    printed = out.getvalue()
    assert "correction not stored" in printed and "AWS access key" in printed and key not in printed
    assert store.corrections(include_revoked=True) == []
    store.close()
