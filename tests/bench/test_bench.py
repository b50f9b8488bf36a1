"""Both benchmarks end to end on a tiny slice (tiny random Llama, 2 corrected groups), so their
reports cannot silently rot. The figures mean nothing here; the schema and the mechanics do."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.answers import CLOSINGS, OPENINGS, AnswersOptions, courteous, pick, run_answers_bench
from bench.loop import STAGES, LoopOptions, run_loop_bench, select
from bench.speed import run_speed_bench
from knowledge.settings import Settings
from learning.train import TrainConfig

BENCH = Path(__file__).parents[2].parent / "shared" / "bench" / "emanual"
TINY = TrainConfig(
    rank=4, alpha=8, max_steps=2, batch_size=2, max_length=512, gradient_checkpointing=False, dpo_epochs=1
)


@pytest.fixture(scope="module")
def emanual_slice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A few groups of the emanual set and the documents that ground them, copied to a tmp folder."""
    if not (BENCH / "questions.jsonl").is_file():
        pytest.skip(f"SKIPPED LOUDLY: the bench data is missing at {BENCH} (see ../shared/bench/README.md)")
    rows = [json.loads(x) for x in (BENCH / "questions.jsonl").read_text().splitlines() if x.strip()]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    multi = [g for g, m in groups.items() if len(m) >= 2][:3]
    single = [g for g, m in groups.items() if len(m) == 1][:3]
    picked = [r for g in multi + single for r in groups[g]]
    root = tmp_path_factory.mktemp("emanual-slice")
    kb = root / "kb"
    kb.mkdir()
    for doc in sorted({d for r in picked for d in r["gold_docs"]})[:6]:
        shutil.copy(BENCH / "kb" / f"{doc}.md", kb / f"{doc}.md")
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return kb, questions


def _settings(tmp: Path, model: Path) -> Settings:
    return Settings(
        data_dir=tmp / "data", model=str(model), dtype="float32", max_new_tokens=8, top_k=2, max_batch=4
    )


def test_selection_is_deterministic_and_prefers_paraphrased_groups() -> None:
    rows = [
        {"id": "a1", "question": "qa1", "answer": "A", "group": "a"},
        {"id": "a2", "question": "qa2", "answer": "A2", "group": "a"},
        {"id": "b1", "question": "qb1", "answer": "B", "group": "b"},
        {"id": "c1", "question": "qc1", "answer": "C", "group": "c"},
        {"id": "c2", "question": "qc2", "answer": "C", "group": "c"},
        {"id": "d1", "question": "qd1", "answer": "D", "group": "d"},
    ]
    sel = select(rows, groups=3, controls=1, seed=7)
    assert sel == select(rows, groups=3, controls=1, seed=7)
    assert {it.group for it in sel.feedback[:2]} == {"a", "c"}  # two phrasings first
    by_group = {it.group: it for it in sel.heldout}
    assert (
        by_group["a"].question == "qa2" and by_group["a"].reference == "A"
    )  # taught answer is the reference
    single = sel.feedback[2]
    assert by_group[single.group].question == single.question  # a singleton is asked again
    assert len(sel.control) == 1 and sel.control[0].group not in {it.group for it in sel.feedback}


@pytest.mark.slow
def test_loop_bench_writes_the_report(
    emanual_slice: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    kb, questions = emanual_slice
    out = tmp_path / "out"
    report = run_loop_bench(
        _settings(tmp_path, tiny_model_dir),
        kb,
        questions,
        out,
        LoopOptions(groups=2, controls=2, seed=1, train=TINY),
    )
    assert report == json.loads((out / "report.json").read_text())
    assert {
        "dataset",
        "model",
        "groups",
        "controls",
        "seed",
        "scores",
        "uplift_vs_baseline",
        "control_change",
        "latency_s",
        "train",
        "gate",
        "answers",
    } <= set(report)
    assert report["groups"] == 2 and report["controls"] == 2 and report["seed"] == 1
    for stage in STAGES:
        assert set(report["scores"][stage]) == {"heldout", "control"}, stage
        assert all(0.0 <= v <= 1.0 for v in report["scores"][stage].values())
    assert set(report["uplift_vs_baseline"]) == set(report["control_change"]) == {"memory", "weights", "both"}
    for kind in ("rag", "no_retrieval"):
        assert set(report["latency_s"][kind]) == {"p50", "p95"}
    assert {"examples", "wall_s", "tokens_per_s"} <= set(report["train"]) and report["train"]["examples"] > 0
    assert report["train"]["tokens_per_s"] > 0
    assert report["gate"]["candidate"] == "v0001" and report["gate"]["status"] in ("promoted", "rejected")
    # The corrections went through the same path as Slack's, and the memory answers the repeated question.
    assert report["corrections"] == 2 and 0 <= report["second_approvals"] <= 2
    assert (
        report["memory_answered_heldout"]["memory"] > 0 and report["memory_answered_heldout"]["baseline"] == 0
    )
    assert report["memory_answered_heldout"]["weights"] == 0  # memory off
    lines = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in lines}
    assert stages == {*STAGES, "feedback"}
    n = report["heldout_questions"] + report["controls"]
    assert sum(r["stage"] == "baseline" for r in lines) == n
    assert all(r["adapter_version"] == "v0001" for r in lines if r["stage"] == "weights")
    assert all(r["adapter_version"] is None for r in lines if r["stage"] == "baseline")
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_speed_bench_writes_the_report(
    emanual_slice: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    kb, _ = emanual_slice
    out = tmp_path / "out"
    report = run_speed_bench(
        _settings(tmp_path, tiny_model_dir),
        out,
        kb_dir=kb,
        max_new_tokens=8,
        samples=2,
        rounds=1,
        retrieval_queries=5,
        train_steps=1,
        sizes={"1k": 100, "10k": 300},
    )
    assert report == json.loads((out / "speed.json").read_text())
    numbers = [
        "decode_tok_s_batch1",
        "ttft_s",
        "bandwidth_gb_s",
        "roofline_tok_s",
        "roofline_ratio",
        "ingest_docs_per_s",
        "train_tokens_per_s",
    ]
    for key in numbers:
        assert isinstance(report[key], float) and report[key] > 0 and math.isfinite(report[key]), key
    # APPRENTICE_ENGINE=auto on a CPU: the ONNX engine answers, the other paths are measured beside it
    assert report["model"] == str(tiny_model_dir) and report["dtype"] == "int8"
    assert report["decode_path"].startswith("onnxruntime-genai")
    assert set(report["decode_paths"]) == {"onnx int8", "transformers float32"}
    assert 0 < report["engine_weights_bytes_per_token"] < report["weights_bytes_per_token"]
    assert all(v["decode_tok_s"] > 0 for v in report["decode_paths"].values())
    assert set(report["throughput_tok_s"]) == {"1", "4", "8"}
    eight = report["throughput_detail"]["8"]
    assert eight["mean_batch"] > 1  # concurrent requests were batched
    assert eight["prefill_s"] > 0 and eight["decode_s"] > 0 and eight["decode_tok_s"] > 0
    assert eight["padded_prompt_tokens"] >= eight["prompt_tokens"] > 0
    assert set(report["latency_s"]) == {"rag", "no_retrieval"}
    assert set(report["retrieval_ms"]) == {"1k", "10k"}
    assert all(set(v) == {"p50", "p95"} for v in report["retrieval_ms"].values())
    assert report["roofline_ratio"] == pytest.approx(
        report["decode_tok_s_batch1"] / report["roofline_tok_s"], rel=0.01
    )
    assert (out / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_answers_bench_takes_the_same_questions_for_the_same_seed() -> None:
    rows = [{"id": str(i)} for i in range(50)]
    assert pick(rows, 10, seed=3) == pick(rows, 10, seed=3) != pick(rows, 10, seed=4)
    assert pick(rows, 10, seed=3) == pick(rows, 20, seed=3)[:10]  # a larger limit extends a smaller one
    assert sorted(r["id"] for r in pick(rows, None, seed=0)) == sorted(r["id"] for r in rows)


def test_courteous_questions_are_the_questions_between_an_opening_and_a_closing() -> None:
    rows = [{"id": f"q{i}", "question": f" How do I do thing {i}? ", "answer": "x"} for i in range(60)]
    asked = courteous(rows, seed=1)
    assert asked == courteous(rows, seed=1) != courteous(rows, seed=2)
    assert [r["id"] for r in asked] == [r["id"] for r in rows] and rows[0]["question"].startswith(" ")
    for r, a in zip(rows, asked, strict=True):
        before, _, after = a["question"].partition(r["question"].strip())
        assert before.strip() in OPENINGS and after.strip() in CLOSINGS
    assert sum(a["question"] != r["question"].strip() for r, a in zip(rows, asked, strict=True)) > 40


@pytest.mark.slow
def test_answers_bench_writes_the_report(
    emanual_slice: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    kb, questions = emanual_slice
    out = tmp_path / "out"
    settings = _settings(tmp_path, tiny_model_dir).model_copy(update={"answer_mode": "grounded"})
    report = run_answers_bench(settings, kb, questions, out, AnswersOptions(limit=4, seed=2))
    assert report == json.loads((out / "report.json").read_text())
    assert report["questions"] == 4 and report["answer_mode"] == "grounded"
    assert set(report["reference_scores"]) == {"passage", "extract"}
    shares = ("truncated", "off_role", "unsupported", "abstained", "fallback")
    for key in ("score", *shares):
        assert 0.0 <= report[key] <= 1.0, key
    passage = report["reference_scores"]["passage"]
    assert report["ratio_vs_passage"] == pytest.approx(report["score"] / passage, rel=0.01)
    assert set(report["latency_s"]) == {"p50", "p95"} and report["words_p50"] >= 0
    # a random tiny model never writes the documents' words: every answer fell back to the extract
    assert report["fallback"] == 1.0 and report["truncated"] == 0.0
    lines = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        fields = {"id", "question", "reference", "answer", "status", "sources", "score", "latency_s"}
        assert fields <= set(line)
        assert line["sources"] and {"title", "text", "score"} <= set(line["sources"][0])
    asked = {line["id"] for line in lines}
    all_ids = [json.loads(x)["id"] for x in questions.read_text().splitlines()]
    assert asked == {r["id"] for r in pick([{"id": i} for i in all_ids], 4, seed=2)}
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_answers_bench_without_reference_answers_reports_what_the_customers_got(
    emanual_slice: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Questions the documents mostly do not answer come without references: nothing is scored."""
    kb, questions = emanual_slice
    bare = tmp_path / "bare.jsonl"
    rows = [json.loads(x) for x in questions.read_text().splitlines()]
    bare.write_text("".join(json.dumps({"id": r["id"], "question": r["question"]}) + "\n" for r in rows))
    out = tmp_path / "out"
    settings = _settings(tmp_path, tiny_model_dir).model_copy(update={"answer_mode": "extract"})
    report = run_answers_bench(settings, kb, bare, out, AnswersOptions(limit=3))
    assert report["questions"] == 3 and sum(report["statuses"].values()) == 3
    assert (
        report["score"] is None and report["reference_scores"] is None and report["ratio_vs_passage"] is None
    )
    assert 0.0 <= report["abstained"] <= 1.0 and report["words_p50"] > 0
    lines = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [line["reference"] for line in lines] == [None] * 3 and all(line["answer"] for line in lines)
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_answers_bench_says_what_is_wrong_with_its_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import main

    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"id": "q1", "question": "Where?", "answer": "Here."}\n')
    out = str(tmp_path / "out")
    args = ["bench", "answers", "--kb", str(tmp_path), "--questions", str(questions), "--out", out]
    assert main(args) == 2
    assert "missing group" in capsys.readouterr().err
    # every question has its reference answer, or none has one (then nothing is scored)
    questions.write_text(
        '{"id": "q1", "question": "Where?", "answer": "Here.", "group": "g"}\n'
        '{"id": "q2", "question": "When?"}\n'
    )
    assert main(args) == 2
    assert "1 of 2 questions have no answer" in capsys.readouterr().err
    questions.write_text('{"id": "q1", "answer": "Here."}\n')
    assert main(args) == 2
    assert "missing question" in capsys.readouterr().err
    assert main([*args[:2], "--kb", str(tmp_path / "nowhere"), *args[4:]]) == 2
    assert "--kb takes a folder" in capsys.readouterr().err
