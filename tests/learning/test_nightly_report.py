"""The nightly report: its JSON form names only what the run reached, and it renders the same
from the object and from that JSON form (the Slack channel passes the JSON form)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from knowledge.store import Store
from learning import registry
from learning.nightly import NightlyReport

SCORES = {
    "candidate": {"heldout": {"score": 0.512, "n": 4}, "regression": {"score": 0.4, "n": 3}, "control": None},
    "baseline": {"heldout": {"score": 0.31, "n": 4}, "regression": {"score": 0.45, "n": 3}, "control": None},
}


def test_a_report_names_only_what_its_run_reached() -> None:
    assert NightlyReport(status="locked", reason="busy").as_dict() == {"status": "locked", "reason": "busy"}
    skipped = NightlyReport(run=4, status="skipped", started_at="t", reason="few", examples={"new": 2})
    skipped.wall_time_s = 0.5
    assert list(skipped.as_dict()) == ["run", "status", "started_at", "reason", "examples", "wall_time_s"]


def test_an_evaluated_report_keeps_its_empty_baseline_and_round_trips() -> None:
    report = NightlyReport(
        run=7, status="rejected", started_at="t", reason="no gain", candidate="v0003",
        examples={"new": 5, "sft": 12, "dpo": 3, "replay": 2, "held_back": {"staff_reply": 1}},
        scores=SCORES, chart="/runs/00007/eval.png", run_dir="/runs/00007", timings={}, wall_time_s=61.4,
    )  # fmt: skip
    data = report.as_dict()
    assert data["baseline"] is None and data["warm_start"] is None and data["losses"] is None
    assert NightlyReport.from_dict(data) == report
    text = report.render()
    assert text == NightlyReport.from_dict(data).render()
    assert text.splitlines() == [
        "Nightly learning: adapter v0003 NOT promoted; still serving the base model.",
        "Examples: 5 new, 12 SFT rows, 3 DPO pairs, 2 replayed",
        "Held back until a second staff member approves (two-person rule): 1 staff_reply",
        "  heldout    0.310 -> 0.512 (n=4)",
        "  regression 0.450 -> 0.400 (n=3)",
        "Why: no gain",
        "Wall time: 61 s",
        "Chart: /runs/00007/eval.png",
    ]


def test_a_partial_report_read_back_from_json_renders() -> None:
    assert NightlyReport.from_dict({"status": "skipped"}).render() == "Nightly learning: skipped."
    assert NightlyReport.from_dict({}).render() == "Nightly learning: ?."


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield s
    s.close()


def test_a_refused_promotion_leaves_the_pointer_alone(store: Store, tmp_path: Path) -> None:
    with pytest.raises(registry.RegistryError, match="No adapter"):
        registry.promote(store, "v0042")
    assert store.adapter_pointer() == registry.Pointer(None, None)
    assert store.adapter_versions() == set()
    folder = tmp_path / "v0001"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    registry.register(store, "v0001", folder, {"base_hash": "a" * 64})
    with pytest.raises(registry.BaseMismatch):
        registry.promote(store, "v0001", base_hash="b" * 64)
    assert registry.promote(store, "v0001", base_hash="a" * 64) == registry.Pointer("v0001", None)
    assert store.adapter_versions() == {"v0001"}


def test_a_training_run_stores_its_report_as_json(store: Store) -> None:
    run_id = store.start_training_run()
    report = NightlyReport(run=run_id, status="skipped", started_at="t", reason="few", examples={"new": 3})
    store.finish_training_run(
        run_id, status=report.status, reason="few", candidate=None, examples=3, report=report.as_dict()
    )
    from knowledge.models import TrainingRun

    with store.session() as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None and run.status == "skipped" and run.finished_at is not None
        assert run.report == report.as_dict() and run.examples == 3
    assert store.last_promotion() is None
