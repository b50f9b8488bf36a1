"""PII redaction: measured on the labelled set, checksums enforced, look-alikes left alone."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from learning.redact import find_pii, iban_ok, luhn_ok, measure, redact

LABELLED = Path(__file__).resolve().parents[1] / "data" / "pii_labelled.jsonl"


def test_labelled_set_precision_and_recall() -> None:
    report = measure(LABELLED)
    assert report["examples"] >= 80
    assert report["recall"] >= 0.95, report["errors"]
    assert report["precision"] >= 0.9, report["errors"]
    for label, scores in report["per_label"].items():  # type: ignore[union-attr]
        assert scores["support"] >= 5, f"too few {label} examples to measure"


def test_placeholders_and_counts() -> None:
    text, counts = redact(
        "I'm jo@example.com, call +44 20 7946 0958, card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, ship to 221B Baker Street."
    )
    assert text == "I'm [EMAIL], call [PHONE], card [CARD], IBAN [IBAN], ship to [ADDRESS]."
    assert counts == {"EMAIL": 1, "PHONE": 1, "CARD": 1, "IBAN": 1, "ADDRESS": 1}


@pytest.mark.parametrize(
    "text",
    [
        "Order 4111 1111 1111 1112 was charged twice.",  # fails Luhn
        "IBAN DE89 3704 0044 0532 0130 01 bounced",  # fails mod-97
        "Where is order 123456789?",
        "Firmware 10.4.12.1 on router 192.168.100.200",
        "Bought on 2024-03-15, paid $1,299.99.",
        "Serial number 4512-8890-1123 stopped working.",
    ],
)
def test_look_alikes_are_kept(text: str) -> None:
    assert redact(text) == (text, {})


def test_checksums() -> None:
    assert luhn_ok("4012888888881881") and not luhn_ok("4012888888881882")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
    assert not iban_ok("GB82 WEST 1234 5698 7654")  # wrong length for GB


def test_spans_do_not_overlap() -> None:
    spans = find_pii("Mail anna@web.de, IBAN NL91ABNA0417164300, phone +31 6 12345678")
    assert [s.label for s in spans] == ["EMAIL", "IBAN", "PHONE"]
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
