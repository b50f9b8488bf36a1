"""The soak (tests/bench/soak.py) in small: three SIGKILLs of `apprentice serve` mid-stream, nothing lost.

The full run is `.venv/bin/python tests/bench/soak.py --kills 50 --out bench-out/soak` (docs/security.md
quotes its figures). This variant keeps CI short; it checks the same things.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soak


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_three_kills_lose_nothing_and_answer_nothing_twice(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = tmp_path / "work"
    code = soak.main(["--kills", "3", "--messages", "12", "--out", str(out), "--work", str(work)])
    report = json.loads((out / "soak.json").read_text())
    assert report["kills"] == 3 and report["customer_messages"] == 12
    assert report["messages_lost"] == 0 and report["duplicates_queued_twice"] == 0, report
    # the at-least-once window (a kill after Telegram accepted a message, before it was recorded)
    assert report["duplicates"] == report["duplicates_resent_after_kill_mid_send"] <= 3, report
    assert report["corrections_missing"] == 0 and report["corrections_duplicated"] == 0, report
    assert report["cards_missing"] == 0 and report["adapter"]["intact"], report
    assert code == 0, report
