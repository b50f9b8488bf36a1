"""`apprentice serve` replicas as real subprocesses, for the replica test and tests/bench/load_replicas.py.

Each replica gets its own data dir, HTTP port and log file, and shares what a scaled-out install
shares: one PostgreSQL database, one Chroma server, one model server (APPRENTICE_LLM_URL) and
the Telegram bot (webhook mode). The environment is built from scratch for the APPRENTICE_* and
chat-service variables, so nothing leaks in from the developer's shell or `.env`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
_OWN_PREFIXES = ("APPRENTICE_", "TELEGRAM_", "SLACK_")


def clean_env(**settings: str) -> dict[str, str]:
    """The parent environment without our variables, plus offline switches and `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ANONYMIZED_TELEMETRY="False",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", APPRENTICE_ENV_FILE=os.devnull)
    env.update(settings)
    return env


def serve_env(
    data_dir: Path, port: int, *, db: str, chroma: str, llm: str, telegram: str, token: str,
    secret: str = "", kb: str = "", model: str = "", **extra: str,
) -> dict[str, str]:
    """Settings of one replica in the scaled-out topology (Telegram webhook mode)."""
    settings = {
        "APPRENTICE_DATA_DIR": str(data_dir),
        "APPRENTICE_DATABASE_URL": db,
        "APPRENTICE_CHROMA_URL": chroma,
        "APPRENTICE_LLM_URL": llm,
        "TELEGRAM_BOT_TOKEN": token,
        "APPRENTICE_TELEGRAM_API_URL": telegram,
        "APPRENTICE_TELEGRAM_WEBHOOK_URL": "https://bot.example.com/telegram",
        "APPRENTICE_HTTP_HOST": "127.0.0.1",
        "APPRENTICE_HTTP_PORT": str(port),
        "APPRENTICE_REVIEW": "none",
        # the fake model echoes the question, which these tests follow reply by reply (tests/conftest.py)
        "APPRENTICE_ANSWER_MODE": "model",
    }
    if secret:  # else the first replica generates one into the database and the others read it
        settings["APPRENTICE_TELEGRAM_WEBHOOK_SECRET"] = secret
    if kb:
        settings["APPRENTICE_KB"] = kb
    if model:
        settings["APPRENTICE_MODEL"] = model
    settings.update(extra)
    return clean_env(**settings)


@dataclass
class Replica:
    """One `apprentice serve` process."""

    name: str
    root: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "serve"], cwd=self.root, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def wait_ready(self, http: aiohttp.ClientSession, timeout_s: float = 180.0) -> None:
        """Poll /readyz (bounded) until it answers 200; fail with the replica's log if it died."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"replica {self.name} exited with {code}:\n{self.log_tail()}")
            try:
                async with http.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.name} not ready in {timeout_s:.0f}s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    async def post_update(self, http: aiohttp.ClientSession, update: dict[str, Any], secret: str) -> int:
        """Deliver one Telegram update the way Telegram does (JSON body, secret header)."""
        async with http.post(
            f"{self.url}/telegram", data=json.dumps(update),
            headers={"Content-Type": "application/json", SECRET_HEADER: secret},
        ) as resp:
            return resp.status

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        async with http.get(f"{self.url}/metrics") as resp:
            return await resp.text()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait(timeout=timeout_s)
        return proc.returncode


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if sample == name and got == want:
            return float(value)
    return 0.0
