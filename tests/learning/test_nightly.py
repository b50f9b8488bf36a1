"""The nightly job with the tiny random Llama: training in a subprocess, the gate, a killed run, the
lock and the schedule. Training is kept to a couple of steps; the run the tests share is the `nightly`
fixture (tests/learning/conftest.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nightly_world import LESSONS, TINY, make_world, seed

from knowledge.models import TrainingRun
from knowledge.settings import ConfigError, Settings
from learning import registry
from learning.answer import EVIDENCE, cite, ground
from learning.evaluate import Gate, answers_with, evaluate, served, token_f1
from learning.generation import Generation
from learning.modelfiles import base_model_hash
from learning.nightly import crontab_weekdays, run_nightly, start_scheduler
from learning.train import TrainConfig, TrainingFailed, build_command, parse_event, run_training

# --- training ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_gate_trains_but_does_not_promote(nightly: Any) -> None:
    _, store, _, report = nightly
    assert report.status == "rejected", report
    assert report.candidate == "v0001" and report.baseline is None
    assert "heldout" in report.reason or "regression" in report.reason
    assert registry.pointer(store).active is None
    with store.session() as s:
        [run] = s.query(TrainingRun).all()
    assert run.status == "rejected" and run.candidate_version == "v0001" and run.finished_at is not None
    run_dir = Path(report.run_dir)
    assert json.loads((run_dir / "eval.json").read_text())["promote"] is False
    assert (run_dir / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "NOT promoted" in report.render()


@pytest.mark.slow
def test_training_writes_a_new_peft_version_with_metadata(nightly: Any, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    settings, store, _, report = nightly
    adapter = registry.get_adapter(store, "v0001")
    assert adapter is not None
    folder = Path(adapter.path)
    assert folder == (registry.adapters_root(settings) / "v0001").resolve()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert not any(".ref." in k for k in weights), "DPO's reference copy must not be saved"
    # LoRA B starts at zero: a non-zero B is what training changed.
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    meta = json.loads((folder / "apprentice.json").read_text())
    manifest = Path(report.run_dir) / "dataset" / "manifest.json"
    assert meta["base_hash"] == base_model_hash(tiny_model_dir) == adapter.base_hash
    assert meta["dataset_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert len(meta["chat_template_hash"]) == 64
    assert meta["training_args"]["lr"] == TINY.lr and meta["losses"]["sft"] and meta["losses"]["dpo"]
    assert meta["wall_time_s"] > 0


@pytest.mark.slow
def test_training_moves_the_adapter_and_leaves_the_base_frozen(
    nightly: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learning.train import make_sft_trainer

    rows = [
        json.loads(x)
        for x in (Path(nightly[3].run_dir) / "dataset" / "sft.jsonl").read_text().splitlines()
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = TrainConfig(max_steps=2, batch_size=2, max_length=512, gradient_checkpointing=False, lr=1e-2)
    make_sft_trainer(model, tokenizer, rows, cfg, tmp_path / "work").train()
    after = dict(model.named_parameters())
    lora = [k for k in before if "lora_" in k]
    base = [k for k in before if "lora_" not in k]
    assert lora and base
    assert all(torch.equal(before[k], after[k].detach()) for k in base), "a base weight changed"
    assert all(not after[k].requires_grad for k in base)
    assert any(not torch.equal(before[k], after[k].detach()) for k in lora), "the adapter did not move"


@pytest.mark.slow
def test_a_killed_training_run_leaves_the_active_adapter_untouched(fresh: Any) -> None:
    settings, store, kb = fresh
    seed(store, kb)
    registry.promote(store, "v0001")
    from learning.datasets import BuildOptions, build_datasets

    build_datasets(settings, store, kb, settings.data_dir / "ds", BuildOptions())
    killed: list[int] = []

    def kill_at_first_loss(line: str, proc: subprocess.Popen[str]) -> None:
        event = parse_event(line)
        if event and event["event"] == "loss" and not killed:
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)

    with pytest.raises(TrainingFailed, match="killed by signal 9"):
        run_training(settings, store, settings.data_dir / "ds", TINY, on_line=kill_at_first_loss)
    assert killed
    assert registry.pointer(store).active == "v0001"
    assert [a.version for a in registry.list_adapters(store)] == ["v0001", "v0002"]
    assert sorted(p.name for p in registry.adapters_root(settings).iterdir()) == ["v0001", "v0002"]


def test_train_command_template_replaces_the_subprocess(fresh: Any) -> None:
    settings, store, _ = fresh
    source = registry.get_adapter(store, "v0001")
    assert source is not None
    # A "remote" job: the template only has to leave a finished adapter at {out}.
    template = f"cp -r {source.path} {{out}} && echo {{dataset}} > {{out}}/dataset.txt"
    adapter = run_training(
        settings.model_copy(update={"train_command": template}), store, settings.data_dir / "some dataset"
    )
    assert adapter.version == "v0003"
    assert (Path(adapter.path) / "dataset.txt").read_text().strip() == str(settings.data_dir / "some dataset")
    failing = settings.model_copy(update={"train_command": "exit 3"})
    with pytest.raises(TrainingFailed, match="status 3"):
        run_training(failing, store, settings.data_dir)
    with pytest.raises(TrainingFailed, match="unknown placeholder"):
        build_command(run_spec(settings), "{nope}")
    assert [a.version for a in registry.list_adapters(store)] == ["v0001", "v0002", "v0003"]
    # the settings table and the README name exactly the placeholders the code fills in
    described = Settings.model_fields["train_command"].description or ""
    named = re.findall(r"\{(\w+)\}", described)
    assert len(named) == 7 and "dataset" in named and "args" in named
    line = build_command(run_spec(settings), " ".join(f"{{{n}}}" for n in named))[-1]
    assert "{" not in line
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert all(f"`{{{n}}}`" in readme for n in named)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_the_training_job_dies_with_the_server() -> None:
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    job = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"
    server = (
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        "from learning.train import run_subprocess\n"
        f"run_subprocess([sys.executable, '-c', {job!r}], on_line=lambda line, p: print(line, flush=True))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()  # the server dies without any cleanup
    parent.wait()
    for _ in range(400):  # the kernel delivers the parent-death signal at once; allow 20 s
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child), "the training job outlived the server"


def run_spec(settings: Settings) -> Any:
    from learning.train import JobSpec

    return JobSpec("d", "o", "b")


def test_the_gate_scores_the_answers_serving_sends(fresh: Any, tmp_path: Path) -> None:
    """On a CPU under `auto` a customer reads the extract of the passage the adapter reads as best,
    so that is what the gate scores; under `model` the reply as the model wrote it; with the memory
    on, a winning correction as it is."""
    settings, store, kb = fresh
    seed(store, kb)
    rows = [{"set": "heldout", "question": q, "reference": c} for q, _, c in LESSONS]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = registry.get_adapter(store, "v0001")
    assert adapter is not None
    candidate = (str(adapter.path), "v0001")

    def answers(s: Settings, memory: bool = False, runtime: Any = None) -> list[str]:
        out = tmp_path / "out"
        report = evaluate(s, kb, tmp_path / "ds", candidate, None, out, memory=memory, runtime=runtime)
        return [r["candidate"] for r in report["rows"]]

    settings = settings.model_copy(update={"answer_mode": "auto"})  # the default (tests run `model`)
    extracts = answers(settings)
    for (question, _, _), answer in zip(LESSONS, extracts, strict=True):
        assert answer in {cite(question, p) for p in kb.search(question, settings.top_k)}
    written = answers(settings.model_copy(update={"answer_mode": "model"}))
    assert not set(written) & set(extracts)  # the tiny random model's own words, no extract
    assert answers(settings, memory=True) == [c for _, _, c in LESSONS]
    # behind a model server (vLLM) serving writes under auto: so does the gate, on its own runtime
    from learning.runtime import build_local

    runtime = build_local(settings, timeout_s=600)
    try:
        answers(settings, runtime=runtime)
        alone = runtime.stats.requests  # one token per adapter confirms the switch
        answers(settings.model_copy(update={"llm_url": "http://127.0.0.1:9/v1"}), runtime=runtime)
        assert (alone, runtime.stats.requests - alone) == (2, 2 + 2 * len(LESSONS))
    finally:
        runtime.close()


class ScriptedRuntime:
    """The face of the local runtime that `answers_with` uses, replying `reply` to every prompt."""

    device = "cpu"

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.version: str | None = None

    def set_adapter(self, path: str | None, version: str | None) -> None:
        self.version = version

    def generate_batch(self, prompts: list[Any], max_new_tokens: int | None = None) -> list[Generation]:
        return [Generation(self.reply, "scripted", self.version, 10, 3, 0.01) for _ in prompts]


def test_the_gate_counts_corrections_of_similar_questions_as_evidence_as_serving_does(tmp_path: Path) -> None:
    """A reply an adapter learned from a staff correction passes serving's check (the correction of
    a similar question is evidence, bot/conversation.py); the gate's check must let it pass too, or
    it scores the extract in its place and never sees what the adapter learned."""
    settings, store, kb = make_world(tmp_path, tmp_path / "unused-model", answer_mode="grounded")
    try:
        lesson = "Our couriers do not deliver on Sundays or public holidays."
        kb.remember(99, "Do you deliver on Sundays?", lesson)
        question = "Can my parcel be delivered on a Sunday?"
        [near] = kb.recall(question, 1)
        assert near.score >= EVIDENCE
        [q] = served(settings, kb, [{"question": question}], memory=False)
        assert [p.text for p in q.lessons] == [lesson]
        assert ground(question, lesson, q.documents).fallback  # the documents alone do not say it
        assert answers_with(settings, ScriptedRuntime(lesson), (None, None), [q]) == [lesson]  # type: ignore[arg-type]
    finally:
        kb.close()
        store.close()


# --- the nightly job ---------------------------------------------------------------------------


def test_the_lock_prevents_two_runs_and_few_examples_skip(fresh: Any) -> None:
    settings, store, kb = fresh
    assert store.acquire_lock("nightly", "replica-b", 600)
    assert run_nightly(settings, store, kb).status == "locked"
    with store.session() as s:
        assert s.query(TrainingRun).count() == 0
    store.release_lock("nightly", "replica-b")
    few = settings.model_copy(update={"min_new_examples": 50})
    seed(store, kb)
    report = run_nightly(few, store, kb)
    assert report.status == "skipped" and "4 new examples" in report.reason
    assert store.acquire_lock("nightly", "replica-b", 600), "the job released its lock"


async def test_scheduler_uses_the_cron_and_never_overlaps(fresh: Any) -> None:
    settings, store, kb = fresh
    scheduler = start_scheduler(settings.model_copy(update={"retrain_cron": "30 2 * * 1-5"}), store, kb)
    try:
        [job] = scheduler.get_jobs()
        assert job.coalesce is True and job.max_instances == 1
        fields = {f.name: str(f) for f in job.trigger.fields}
        assert (fields["minute"], fields["hour"], fields["day_of_week"]) == ("30", "2", "mon,tue,wed,thu,fri")
    finally:
        scheduler.shutdown(wait=False)
    with pytest.raises(ConfigError, match="APPRENTICE_RETRAIN_CRON"):
        start_scheduler(settings.model_copy(update={"retrain_cron": "every night"}), store, kb)


async def test_the_nightly_job_can_be_switched_off_and_reads_nicknames_and_the_zone(fresh: Any) -> None:
    settings, store, kb = fresh
    for off in ("", "off", " OFF "):
        assert start_scheduler(settings.model_copy(update={"retrain_cron": off}), store, kb) is None
    berlin = settings.model_copy(update={"retrain_cron": "@daily", "timezone": "Europe/Berlin"})
    scheduler = start_scheduler(berlin, store, kb)
    try:
        [job] = scheduler.get_jobs()
        assert str(job.trigger.timezone) == "Europe/Berlin"
        fields = {f.name: str(f) for f in job.trigger.fields}
        assert (fields["minute"], fields["hour"]) == ("0", "0")
        assert job.next_run_time.utcoffset() in (dt.timedelta(hours=1), dt.timedelta(hours=2))
    finally:
        scheduler.shutdown(wait=False)
    with pytest.raises(ValueError, match="IANA"):
        Settings(_env_file=None, timezone="Mars/Olympus")  # type: ignore[call-arg]


def test_crontab_weekdays_count_from_sunday() -> None:
    assert crontab_weekdays("0") == "sun" and crontab_weekdays("7") == "sun"
    assert crontab_weekdays("1-5") == "mon,tue,wed,thu,fri"
    assert crontab_weekdays("*/3") == "sun,wed,sat"
    assert crontab_weekdays("*") == "*" and crontab_weekdays("sat,sun") == "sat,sun"
    with pytest.raises(ValueError):
        crontab_weekdays("9")


def test_gate_rules() -> None:
    gate = Gate(margin=0.1, tolerance=0.02)
    ok, why = gate.decide(
        {"heldout": 0.6, "regression": 0.5, "control": 0.49},
        {"heldout": 0.5, "regression": 0.5, "control": 0.5},
    )
    assert ok, why
    ok, why = gate.decide({"heldout": 0.52, "control": 0.5}, {"heldout": 0.5, "control": 0.5})
    assert not ok and "not better" in why
    ok, why = gate.decide({"heldout": 0.9, "control": 0.4}, {"heldout": 0.5, "control": 0.5})
    assert not ok and "control" in why and "REGRESSED" in why
    assert token_f1("The frame has a two-year warranty", "frame: two-year warranty!") == pytest.approx(6 / 7)
