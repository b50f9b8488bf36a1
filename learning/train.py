"""LoRA training with TRL: SFT on the corrections, then DPO on the same adapter.

Two halves live here. `main(cfg)` is the training job itself (`python -m learning.train ...`); it is
the only place in the project that imports trl. `run_training` is what the server and the CLI call:
it runs that job in a SUBPROCESS (or the command of `APPRENTICE_TRAIN_COMMAND`), so a crash or an
out-of-memory kill in training never takes the bot down, and registers the adapter it wrote.

The job writes into a hidden `.partial` folder and renames it into place only when everything is
saved, so a killed run leaves no half-written adapter behind. Defaults suit SmolLM2-135M on a CPU
(docs/engines.md: learning rate and epochs matter most; lr 1e-3 learned facts where lr 2e-4 learned none).
Six epochs were needed to memorise facts from bare questions; the datasets' grounded views (the
answer is in the retrieved passages) reach their floor within the first epoch (SFT loss 0.40 at
epoch 0.75, 0.42 at 1.75 on the emanual benchmark), so two epochs are the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learning.cpus import cpu_budget

if TYPE_CHECKING:
    from transformers import HfArgumentParser

    from knowledge.models import Adapter
    from knowledge.settings import Settings
    from knowledge.store import Store

log = logging.getLogger(__name__)

META_FILE = "apprentice.json"
LOG_FILE = "train_log.jsonl"
LOSS_PREFIX = "apprentice-train "  # stdout lines the parent reads: "apprentice-train {json}"
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainingFailed(RuntimeError):
    """The training job did not produce an adapter; the active adapter is untouched."""


@dataclass
class TrainConfig:
    """Hyperparameters of one nightly training job (SFT, then DPO on the same LoRA adapter).

    Every field is a flag (`--dpo-epochs`, `--dpo_epochs`) of `apprentice train`, `apprentice retrain`,
    `apprentice bench loop` and the job itself (`python -m learning.train`), parsed by transformers'
    HfArgumentParser (`train_parser`) as TRL parses its configs.
    """

    _argument_group_name = "training"  # HfArgumentParser's heading for these flags

    rank: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    targets: list[str] = field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        metadata={"help": "LoRA target modules, comma- or space-separated."},
    )
    epochs: float = field(default=2.0, metadata={"help": "SFT epochs."})
    lr: float = field(default=1e-3, metadata={"help": "SFT learning rate."})
    batch_size: int = field(default=4, metadata={"help": "Batch size of both stages."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    dpo_epochs: float = field(default=1.0, metadata={"help": "DPO epochs (0 skips DPO)."})
    dpo_lr: float = field(default=1e-4, metadata={"help": "DPO learning rate."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta."})
    max_length: int = field(default=2048, metadata={"help": "Longest training row, in tokens."})
    max_steps: int = field(
        default=-1, metadata={"help": "Cap the steps of each stage (testing); -1: no cap."}
    )
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Share of the steps that warm the learning rate up."}
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in the backward pass (less memory)."}
    )
    threads: int = field(default=0, metadata={"help": "CPU threads; 0: what the machine can spare now."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    dpo: bool = field(default=True, metadata={"help": "Run DPO after SFT."})

    def __post_init__(self) -> None:
        # "a,b" and "a b" both name two modules: the job's own command line writes commas
        self.targets = [t for item in self.targets for t in str(item).split(",") if t]
        if self.dpo_epochs <= 0:
            self.dpo = False


@dataclass
class JobSpec:
    """What one training job reads and writes."""

    dataset: str  # folder with sft.jsonl, dpo.jsonl and manifest.json
    out: str  # the adapter folder to create; must not exist yet
    base: str  # the base model folder (safetensors)
    base_name: str = ""  # the id recorded in the metadata (APPRENTICE_MODEL)
    init_adapter: str | None = None  # continue training this adapter instead of a fresh one
    config: TrainConfig = field(default_factory=TrainConfig)


# --- the job (runs in the subprocess) --------------------------------------------------------------


def cpu_threads() -> int:
    """Threads for CPU training: the cores this process may use, minus those other work keeps busy.

    Measured on the 2-core box with other jobs running (load 8): LoRA SFT of SmolLM2 ran at
    122-157 tokens/s on one thread and 17-24 tokens/s on two, because OpenMP threads wait for each
    other whenever the scheduler parks one. On an idle machine every core is used.
    """
    cores = cpu_budget()
    try:
        busy = int(os.getloadavg()[0])
    except OSError:  # pragma: no cover
        busy = 0
    return max(1, min(cores, cores - busy + 1))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _emit(kind: str, **values: Any) -> None:
    print(LOSS_PREFIX + json.dumps({"event": kind, **values}), flush=True)


def main(spec: JobSpec) -> dict[str, Any]:
    """Train and save the adapter into `spec.out`; return its metadata. Heavy imports happen here."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from learning.modelfiles import base_model_hash, chat_template_hash

    cfg = spec.config
    out = Path(spec.out)
    if out.exists():
        raise TrainingFailed(f"{out} already exists; adapter versions are never overwritten.")
    dataset_dir = Path(spec.dataset)
    sft_rows = _read_jsonl(dataset_dir / "sft.jsonl")
    dpo_rows = _read_jsonl(dataset_dir / "dpo.jsonl") if cfg.dpo else []
    if not sft_rows:
        raise TrainingFailed(
            f"{dataset_dir / 'sft.jsonl'} holds no rows; build a dataset with new examples first."
        )
    manifest = dataset_dir / "manifest.json"
    manifest_hash = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else ""

    cuda = torch.cuda.is_available()
    torch.manual_seed(cfg.seed)
    if not cuda:
        torch.set_num_threads(cfg.threads or cpu_threads())
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log_path = partial / LOG_FILE
    losses: dict[str, list[dict[str, float]]] = {"sft": [], "dpo": []}

    class LossLog(TrainerCallback):  # type: ignore[misc]
        """Every logged loss goes to train_log.jsonl and, one line each, to the parent's log."""

        stage = "sft"

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if not logs:
                return
            entry = {"stage": self.stage, "step": state.global_step, "epoch": round(state.epoch or 0.0, 3)}
            entry.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
            with log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            if "loss" in logs:
                losses[self.stage].append({"step": state.global_step, "loss": float(logs["loss"])})
                _emit("loss", stage=self.stage, step=state.global_step, loss=round(float(logs["loss"]), 4))

    tokenizer = AutoTokenizer.from_pretrained(spec.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(
        spec.base, dtype=torch.bfloat16 if cuda else torch.float32
    )
    if spec.init_adapter:
        model = PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
    else:
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    _emit("start", sft_rows=len(sft_rows), dpo_rows=len(dpo_rows), device="cuda" if cuda else "cpu")

    callback = LossLog()
    work = partial / "work"
    sft = make_sft_trainer(model, tokenizer, sft_rows, cfg, work, [callback])
    sft_result = sft.train()
    model = sft.model
    dpo_result = None
    if dpo_rows:
        callback.stage = "dpo"
        dpo = make_dpo_trainer(model, tokenizer, dpo_rows, cfg, work, [callback])
        dpo_result = dpo.train()
        model = dpo.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # DPO's frozen reference copy is not part of the result
    model.save_pretrained(str(partial), selected_adapters=["default"])
    shutil.rmtree(partial / "work", ignore_errors=True)

    meta = {
        "base_model": spec.base_name or spec.base,
        "base_path": spec.base,
        "base_hash": base_model_hash(spec.base),
        "chat_template_hash": chat_template_hash(tokenizer),
        "dataset": str(dataset_dir),
        "dataset_manifest_sha256": manifest_hash,
        "init_adapter": spec.init_adapter,
        "training_args": dataclasses.asdict(cfg),
        "rows": {"sft": len(sft_rows), "dpo": len(dpo_rows)},
        "losses": losses,
        "final_loss": {
            "sft": float(sft_result.training_loss),
            "dpo": float(dpo_result.training_loss) if dpo_result is not None else None,
        },
        "device": "cuda" if cuda else "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
        },
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (partial / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.rename(partial, out)  # the adapter appears complete or not at all
    _emit("done", out=str(out), wall_time_s=meta["wall_time_s"])
    return meta


def _common_args(cfg: TrainConfig, output_dir: Path) -> dict[str, Any]:
    """Trainer arguments shared by both stages; device and precision follow the hardware."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "max_steps": cfg.max_steps,
        "logging_steps": 1 if cfg.max_steps > 0 else 5,
        "save_strategy": "no",
        "report_to": "none",
        "seed": cfg.seed,
        "bf16": True,  # mixed precision: bf16 on CUDA; on the CPU it needs use_cpu (docs/engines.md)
        "use_cpu": not cuda,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "max_length": cfg.max_length,
        "warmup_steps": cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "lr_scheduler_type": "cosine",
        "disable_tqdm": False,
        "dataloader_num_workers": 0,
    }


def make_sft_trainer(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    cfg: TrainConfig,
    output_dir: Path,
    callbacks: list[Any] | None = None,
) -> Any:
    """TRL's SFTTrainer on prompt-completion rows: the loss counts only the completion."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_common_args(cfg, output_dir), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        completion_only_loss=True,
        # Rows with retrieved passages are ~5x longer than bare ones; batching similar lengths
        # avoids computing mostly padding (on the CPU, mixed batches ran at a quarter of the speed).
        train_sampling_strategy="group_by_length",
    )  # fmt: skip
    return SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=callbacks or [],
    )  # fmt: skip


def make_dpo_trainer(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    cfg: TrainConfig,
    output_dir: Path,
    callbacks: list[Any] | None = None,
) -> Any:
    """TRL's DPOTrainer on the same PeftModel; the reference is a frozen copy of the adapter."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **_common_args(cfg, output_dir), num_train_epochs=cfg.dpo_epochs, learning_rate=cfg.dpo_lr,
        beta=cfg.beta,
    )  # fmt: skip
    return DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=callbacks or [],
    )  # fmt: skip


# --- the flags (transformers' HfArgumentParser, imported only when a command parses them) ----------


def train_parser(prog: str, **options: Any) -> HfArgumentParser:
    """An HfArgumentParser for TrainConfig's flags (about 0.7 s to import: never at `apprentice --help`)."""
    from transformers import HfArgumentParser

    config: Any = TrainConfig  # transformers types it as its own DataClassType
    return HfArgumentParser(config, prog=prog, **options)


def parse_train_config(args: Sequence[str], prog: str) -> TrainConfig:
    """TrainConfig from flags such as ["--epochs", "3", "--targets", "q_proj,v_proj"]; exits 2 on an
    unknown flag or a bad value, as argparse does."""
    parser = train_parser(prog)
    cfg, unknown = parser.parse_args_into_dataclasses(
        args=list(args), return_remaining_strings=True, look_for_args_file=False
    )
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    assert isinstance(cfg, TrainConfig)
    return cfg


def train_flags_help(prog: str) -> str:
    """The help of TrainConfig's flags, for a command whose own argparse parser leaves them over."""
    return train_parser(prog, usage=argparse.SUPPRESS, add_help=False).format_help()


def config_args(cfg: TrainConfig) -> list[str]:
    """`cfg` as command-line flags of `python -m learning.train`."""
    args: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        text = ",".join(value) if isinstance(value, list) else str(value)
        args += ["--" + f.name.replace("_", "-"), text]
    return args


def cli(argv: list[str] | None = None) -> int:
    parser = train_parser("python -m learning.train", description="Train one LoRA adapter (SFT, then DPO).")
    job = parser.add_argument_group("job")
    job.add_argument("--dataset", required=True, help="Folder with sft.jsonl, dpo.jsonl and manifest.json.")
    job.add_argument("--out", required=True, help="Adapter folder to create (must not exist).")
    job.add_argument("--base", required=True, help="Base model folder.")
    job.add_argument("--base-name", default="", help="Base model id recorded in the metadata.")
    job.add_argument("--init-adapter", default=None, help="Continue training this adapter folder.")
    cfg, args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(JobSpec(args.dataset, args.out, args.base, args.base_name, args.init_adapter, cfg))
    except TrainingFailed as exc:
        print(f"training failed: {exc}", file=sys.stderr)
        return 1
    return 0


# --- the parent side (runs in the server or the CLI; no heavy imports) ------------------------------


def build_command(spec: JobSpec, template: str = "") -> list[str]:
    """The job's command line: this Python running learning.train, or the operator's template.

    Template placeholders: {dataset}, {out}, {base}, {base_name}, {init_adapter}, {python}, {args}
    (the hyperparameter flags); values are shell-quoted.
    """
    flags = config_args(spec.config)
    if spec.init_adapter:
        flags += ["--init-adapter", spec.init_adapter]
    if not template:
        return [
            sys.executable, "-m", "learning.train", "--dataset", spec.dataset, "--out", spec.out,
            "--base", spec.base, "--base-name", spec.base_name, *flags,
        ]  # fmt: skip
    values = {
        "dataset": spec.dataset,
        "out": spec.out,
        "base": spec.base,
        "base_name": spec.base_name,
        "init_adapter": spec.init_adapter or "",
        "python": sys.executable,
    }
    quoted = {k: shlex.quote(v) for k, v in values.items()}
    try:
        line = template.format(**quoted, args=" ".join(shlex.quote(a) for a in flags))
    except (KeyError, IndexError) as exc:
        raise TrainingFailed(
            f"APPRENTICE_TRAIN_COMMAND uses an unknown placeholder {exc}; use {{dataset}}, {{out}}, "
            "{base}, {base_name}, {init_adapter}, {python} or {args}."
        ) from None
    return ["/bin/sh", "-c", line]


def run_subprocess(
    command: list[str],
    log_path: Path | None = None,
    on_line: Callable[[str, subprocess.Popen[str]], None] | None = None,
    timeout_s: float | None = None,
) -> int:
    """Run the job in its own process group and return its exit status (negative: killed by a signal).

    Output goes to `log_path` when given, else straight to our terminal (progress bar included).
    `on_line` sees every output line with the process (progress reporting; tests kill the job
    mid-run through it). After `timeout_s` the whole group is killed.
    """
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    piped = log_path is not None or on_line is not None
    sink = log_path.open("a", encoding="utf-8") if log_path else None
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE if piped else None,
        stderr=subprocess.STDOUT if piped else None,
        text=True,
        env=env,
        start_new_session=True,  # its own group: a kill reaches the whole job and never us
        preexec_fn=_parent_death_signal(),
    )
    timer = threading.Timer(timeout_s, _kill_group, [proc]) if timeout_s else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        if proc.stdout is not None:
            for line in proc.stdout:
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                else:
                    sys.stdout.write(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"), proc)
        return proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            _kill_group(proc)
        if sink is not None:
            sink.close()


def parse_event(line: str) -> dict[str, Any] | None:
    """The job's progress event in an output line (a progress bar may share the line), if any."""
    at = line.find(LOSS_PREFIX)
    if at < 0:
        return None
    try:
        event: dict[str, Any] = json.loads(line[at + len(LOSS_PREFIX) :])
    except ValueError:
        return None
    return event


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec hook giving the child SIGKILL when the server dies (Linux), so no training is orphaned.

    The libc function is looked up here, in the parent: the child only calls it, which is safe
    between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return hook


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_training(
    settings: Settings,
    store: Store,
    dataset: Path,
    config: TrainConfig | None = None,
    *,
    init_version: str | None = None,
    log_path: Path | None = None,
    on_line: Callable[[str, subprocess.Popen[str]], None] | None = None,
    timeout_s: float | None = None,
) -> Adapter:
    """Train a new adapter version from `dataset` in a subprocess and register it (not active).

    Raises TrainingFailed when the job fails or is killed; nothing is registered then, and any
    half-written folder is removed.
    """
    from learning import registry
    from learning.modelfiles import resolve_model

    base = resolve_model(settings.model, settings.models_dir)
    version, out = registry.reserve_version(store, registry.adapters_root(settings))
    init_path = None
    if init_version:
        init = registry.get_adapter(store, init_version)
        init_path = init.path if init else None
    spec = JobSpec(str(dataset), str(out), base, settings.model, init_path, config or TrainConfig())
    command = build_command(spec, settings.train_command)
    log.info("training %s in a subprocess", version)
    started = time.perf_counter()
    code = run_subprocess(command, log_path, on_line, timeout_s)
    registry.remove_partials(out.parent, out.name)
    if code != 0:
        shutil.rmtree(out, ignore_errors=True)  # a template command may have written half of it
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        where = f"; see {log_path}" if log_path else ""
        raise TrainingFailed(f"the training job {how}{where}. The active adapter is unchanged.")
    if not (out / "adapter_config.json").is_file() or not (out / META_FILE).is_file():
        raise TrainingFailed(f"the training job finished but wrote no adapter into {out}.")
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    meta.setdefault("wall_time_s", round(time.perf_counter() - started, 1))
    return registry.register(store, version, out, meta)


if __name__ == "__main__":
    sys.exit(cli())
