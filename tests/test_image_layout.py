"""The container image's layout, reproduced without Docker: `apprentice serve` starts and answers.

ops/Dockerfile installs the code and converts the model as root, then runs as a non-root user that
can write only the data volume. Here: a copy of the code and the converted model sit in read-only
folders, the data dir is the one writable place. A non-root user runs it as it is; under root (CI
containers) the process keeps uid 0 but `setpriv` drops the capabilities that let root ignore file
permissions, so it meets the read-only folders exactly as the image's user does.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from replicas import clean_env

ROOT = Path(__file__).resolve().parents[1]
DROP_ROOT_OVERRIDES = [
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search",
    "--inh-caps",
    "-dac_override,-dac_read_search",
    "--",
]


def read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(
            mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
            | stat.S_IRUSR
            | stat.S_IRGRP
            | stat.S_IROTH
            | (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0)
        )


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def image(smollm2_dir: Path) -> Iterator[Path]:
    # not under pytest's tmp_path: its parent is private to root, and `nobody` must reach the folders
    root = Path(tempfile.mkdtemp(prefix="apprentice-image-"))
    root.chmod(0o755)
    try:
        shutil.copytree(smollm2_dir, root / "opt" / "models" / smollm2_dir.name)
        for package in ("bot", "knowledge", "learning"):
            shutil.copytree(
                ROOT / package, root / "opt" / "app" / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        read_only(root / "opt")
        for writable in (root / "data", root / "home"):
            writable.mkdir(mode=0o700)
        yield root
    finally:
        for path in [root, *root.rglob("*")]:  # let the cleanup delete what was made read-only
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_serve_starts_and_answers_with_read_only_code_and_model_as_a_non_root_user(image: Path) -> None:
    app, models, data = image / "opt" / "app", image / "opt" / "models", image / "data"
    before = listing(image / "opt")
    env = clean_env(
        HOME=str(image / "home"),
        PYTHONPATH=str(app),
        APPRENTICE_DATA_DIR=str(data),
        APPRENTICE_MODEL_CACHE=str(models),
        APPRENTICE_MAX_NEW_TOKENS="32",
        APPRENTICE_RETRAIN_CRON="off",
    )
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without util-linux's setpriv, file permissions cannot be enforced")
        prefix = DROP_ROOT_OVERRIDES
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "bot.cli", "serve"],
        input="How long is the warranty?\n/quit\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=data,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "PermissionError" not in proc.stderr, proc.stderr[-3000:]
    answers = [line for line in proc.stdout.splitlines() if line.startswith("bot")]
    assert len(answers) == 1 and len(answers[0]) > len("bot> ") + 20, proc.stdout
    assert listing(image / "opt") == before, "nothing was written into the image's code or model folders"
    assert any((data / "models" / "onnx").glob("SmolLM2-135M-Instruct-*")), (
        "the export went to the data volume"
    )
