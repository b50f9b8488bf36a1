"""`apprentice serve` as a deployment meets it: what is missing or wrong is one line and a non-zero exit.

A container or a systemd unit gives the process no terminal; a server that cannot serve must say
why and stop, not fall back to the terminal chat, exit 0 and be restarted forever.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from fakes.openai_api import FakeOpenAIServer
from fakes.telegram_api import TOKEN, FakeTelegramApi
from pg import free_port
from replicas import clean_env

ROOT = Path(__file__).resolve().parents[2]
MODEL = "shop-model"


def run_serve(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "serve"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("apprentice:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_a_server_with_no_channel_and_no_terminal_exits_with_one_line(tmp_path: Path) -> None:
    proc = run_serve(clean_env(APPRENTICE_DATA_DIR=str(tmp_path / "data")), tmp_path)
    line = one_line(proc)
    assert "no channel to serve" in line and "TELEGRAM_BOT_TOKEN" in line and "SLACK_BOT_TOKEN" in line
    assert not (tmp_path / "data").exists(), "it stopped before loading anything"


def test_a_chat_deployment_without_its_own_documents_refuses_the_demo_shop(tmp_path: Path) -> None:
    env = clean_env(APPRENTICE_DATA_DIR=str(tmp_path / "data"), TELEGRAM_BOT_TOKEN=TOKEN)
    assert "APPRENTICE_KB is empty" in one_line(run_serve(env, tmp_path))


def telegram_env(tmp_path: Path, llm: str, telegram: str, token: str, **extra: str) -> dict[str, str]:
    kb = tmp_path / "kb"
    kb.mkdir(exist_ok=True)
    (kb / "shipping.md").write_text("# Shipping\n\nWe ship bikes within 3 days.\n", encoding="utf-8")
    return clean_env(
        APPRENTICE_DATA_DIR=str(tmp_path / "data"),
        APPRENTICE_KB=str(kb),
        APPRENTICE_LLM_URL=llm,
        APPRENTICE_MODEL=MODEL,
        APPRENTICE_TELEGRAM_API_URL=telegram,
        TELEGRAM_BOT_TOKEN=token,
        APPRENTICE_HTTP_PORT=str(free_port()),
        APPRENTICE_RETRAIN_CRON="off",
        **extra,
    )


async def test_a_wrong_telegram_token_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    async with FakeTelegramApi() as telegram, FakeOpenAIServer(MODEL) as llm:
        env = telegram_env(tmp_path, llm.base_url, telegram.base_url, "123:wrong")
        proc = await asyncio.to_thread(run_serve, env, tmp_path)
    line = one_line(proc)
    assert "Telegram refused TELEGRAM_BOT_TOKEN" in line and "@BotFather" in line
    assert "123:wrong" not in proc.stderr


async def test_a_webhook_url_telegram_refuses_is_one_line(tmp_path: Path) -> None:
    async with FakeTelegramApi() as telegram, FakeOpenAIServer(MODEL) as llm:
        telegram.fail(
            "setWebhook", status=400, description="Bad Request: bad webhook: HTTPS url must be provided"
        )
        env = telegram_env(
            tmp_path,
            llm.base_url,
            telegram.base_url,
            TOKEN,
            APPRENTICE_TELEGRAM_WEBHOOK_URL="http://bot.example.com:8080/telegram",
        )
        proc = await asyncio.to_thread(run_serve, env, tmp_path)
    line = one_line(proc)
    assert "APPRENTICE_TELEGRAM_WEBHOOK_URL" in line and "https://" in line and "8443" in line


async def test_a_second_long_poller_on_the_same_token_stops_with_one_line(tmp_path: Path) -> None:
    async with FakeTelegramApi() as telegram, FakeOpenAIServer(MODEL) as llm:
        conflict = "Conflict: terminated by other getUpdates request; make sure only one bot instance runs"
        telegram.fail("getUpdates", times=1000, status=409, description=conflict)
        env = telegram_env(tmp_path, llm.base_url, telegram.base_url, TOKEN)
        proc = await asyncio.to_thread(run_serve, env, tmp_path)
    line = one_line(proc)
    assert "409 Conflict" in line and "APPRENTICE_TELEGRAM_WEBHOOK_URL" in line
