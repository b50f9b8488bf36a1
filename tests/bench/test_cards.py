"""`apprentice bench cards` end to end: the real SlackChannel and outbox against the fake Slack."""

from __future__ import annotations

import json
from pathlib import Path

from bot import cli


def test_bench_cards_writes_a_report_and_a_chart(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "cards", "--out", str(out), "--rates", "120", "--minutes", "0.25", "--scale", "20"]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert {"rates", "time_scale", "digest_after_s", "slack_posts_per_s", "ok"} <= report.keys()
    run = report["rates"]["120"]
    for key in ("lag_s", "flagged_lag_s"):
        assert set(run[key]) == {"p50", "p95", "max"}
    assert run["answers"] == 30 and run["answers_covered"] == 30 and run["flagged_dropped"] == 0
    expected = {"cards_posted", "digests_posted", "flagged_posted", "answers_in_digest", "rate_limited_429"}
    assert expected <= run.keys()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
