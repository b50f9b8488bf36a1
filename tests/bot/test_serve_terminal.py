"""`apprentice serve` as a new user runs it: piped stdin, the real SmolLM2, the bundled demo KB."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_piped_session_learns_a_correction(tmp_path: Path, smollm2_dir: Path) -> None:
    script = (
        "Do you sell gift cards?\n"
        "/correct Yes: gift cards come in $25, $50 and $100, never expire, and come in the Sparkle wrap.\n"
        "Can I buy a gift card?\n"
        "/quit\n"
    )
    env = {
        **os.environ,
        "APPRENTICE_DATA_DIR": str(tmp_path / "data"),
        "APPRENTICE_MODEL_CACHE": str(smollm2_dir.parent),
        "APPRENTICE_MAX_NEW_TOKENS": "48",
        "APPRENTICE_TWO_PERSON_RULE": "off",  # the taught fact contradicts the demo page on purpose
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)  # the bot quiets the bar itself
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "serve"], input=script.encode(), capture_output=True,
        env=env, cwd=ROOT, timeout=600,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "Traceback" not in out + proc.stderr.decode()
    lines = [line for line in out.splitlines() if line.startswith("bot")]
    # first answer from the model, then the correction delivered, then the paraphrase answered with it
    assert len(lines) == 3, out
    assert lines[1].startswith("bot (corrected)> Yes: gift cards come in $25, $50 and $100")
    assert "Sparkle wrap" in lines[2]
    assert "Sparkle" not in lines[0]

    # a later session on the same data: the documents are in already, so the model loads before
    # the embeddings do, and no "Loading weights" bar of theirs may cut into the chat
    again = subprocess.run(
        [sys.executable, "-m", "bot.cli", "serve"], input=b"Can I buy a gift card?\n/quit\n",
        capture_output=True, env=env, cwd=ROOT, timeout=600,
    )
    assert again.returncode == 0 and "Sparkle wrap" in again.stdout.decode()
    assert "Loading weights" not in again.stderr.decode(), again.stderr.decode()[-2000:]
