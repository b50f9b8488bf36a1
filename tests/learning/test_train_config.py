"""TrainConfig's flags: written once (the dataclass fields and their help), parsed by transformers'
HfArgumentParser for `apprentice train`, `retrain`, `bench loop` and the job itself."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bot import cli
from learning.train import (
    ALL_PROJECTIONS,
    JobSpec,
    TrainConfig,
    build_command,
    config_args,
    parse_train_config,
)


def test_no_flags_give_the_defaults_and_every_field_has_help() -> None:
    assert parse_train_config([], "apprentice train") == TrainConfig()
    assert TrainConfig().targets == list(ALL_PROJECTIONS)
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_flags_keep_their_names_and_forms() -> None:
    cfg = parse_train_config(
        ["--epochs", "3", "--lr", "2e-4", "--dpo-lr=5e-5", "--batch_size", "2", "--max-steps", "-1",
         "--targets", "q_proj,v_proj", "--gradient-checkpointing", "false"],
        "apprentice train",
    )  # fmt: skip
    assert (cfg.epochs, cfg.lr, cfg.dpo_lr, cfg.batch_size, cfg.max_steps) == (3.0, 2e-4, 5e-5, 2, -1)
    assert cfg.targets == ["q_proj", "v_proj"] and cfg.gradient_checkpointing is False
    assert parse_train_config(["--targets", "q_proj", "v_proj"], "x").targets == ["q_proj", "v_proj"]
    assert parse_train_config(["--dpo-epochs", "0"], "x").dpo is False  # 0 skips DPO
    assert parse_train_config(["--no-dpo"], "x").dpo is False


def test_the_job_reads_back_exactly_the_config_it_was_given() -> None:
    cfg = TrainConfig(rank=4, targets=["q_proj"], dpo=False, max_steps=2, gradient_checkpointing=False)
    assert parse_train_config(config_args(cfg), "python -m learning.train") == cfg
    command = build_command(JobSpec("d", "o", "b", config=cfg))
    assert command[command.index("--targets") + 1] == "q_proj"
    assert dataclasses.asdict(cfg)["targets"] == ["q_proj"]  # as recorded in the adapter's metadata


def test_a_bad_flag_or_value_exits_like_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as bad_flag:
        parse_train_config(["--epochz", "2"], "apprentice train")
    assert bad_flag.value.code == 2 and "unrecognized arguments: --epochz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_value:
        parse_train_config(["--rank", "many"], "apprentice train")
    assert bad_value.value.code == 2 and "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train"], ["retrain"], ["bench", "loop"]])
def test_training_commands_list_the_flags_in_their_help(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert f"usage: apprentice {' '.join(command)}" in out
    for flag, text in (
        ("--epochs", "SFT epochs."),
        ("--dpo-epochs", "0 skips DPO"),
        ("--rank", "LoRA rank."),
    ):
        assert flag in out and text in out


def test_the_cli_hands_leftover_flags_to_the_training_command_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from learning.commands import train_config

    seen: dict[str, Any] = {}

    def fake_retrain(args: Any) -> int:
        seen["args"], seen["config"] = args, train_config(args)
        return 0

    monkeypatch.setattr(cli, "cmd_retrain", fake_retrain)
    assert cli.main(["retrain", "--epochs", "4", "--force", "--dpo-epochs", "0"]) == 0
    assert seen["args"].force is True
    assert (seen["config"].epochs, seen["config"].dpo) == (4.0, False)

    with pytest.raises(SystemExit) as refused:
        cli.main(["adapters", "list", "--epochs", "4"])
    assert refused.value.code == 2 and "unrecognized arguments: --epochs 4" in capsys.readouterr().err
