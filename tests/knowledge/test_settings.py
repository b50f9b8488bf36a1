"""Where settings come from: the environment, then `.env` in the working folder or APPRENTICE_ENV_FILE."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from replicas import clean_env

ROOT = Path(__file__).resolve().parents[2]
READ = "from knowledge.settings import Settings; s = Settings(); print(s.max_batch, s.timezone)"


def settings_in(cwd: Path, **env: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", READ], cwd=cwd, env={**clean_env(PYTHONPATH=str(ROOT)), **env},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return run.stdout.strip()


def test_dotenv_in_the_working_folder_is_read_unless_another_file_is_named(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("APPRENTICE_MAX_BATCH=3\nAPPRENTICE_TIMEZONE=Europe/Berlin\n")
    (tmp_path / "other.env").write_text("APPRENTICE_MAX_BATCH=5\n")
    assert settings_in(tmp_path, APPRENTICE_ENV_FILE=".env") == "3 Europe/Berlin"
    other = str(tmp_path / "other.env")
    assert settings_in(tmp_path, APPRENTICE_ENV_FILE=other) == "5 UTC"
    assert settings_in(tmp_path, APPRENTICE_ENV_FILE=other, APPRENTICE_MAX_BATCH="7") == "7 UTC"  # env wins
    # the test suite itself never reads an operator's .env (tests/conftest.py, tests/support/replicas.py)
    assert settings_in(tmp_path) == "8 UTC"
