"""Secrets: read from the environment only, never shown, compared in constant time; HTTP on loopback.

The webhook and signing-secret checks are also exercised end to end (tests/bot/channels/test_telegram.py
`test_webhook_accepts_only_the_secret_token`, tests/bot/channels/test_slack.py
`test_bad_or_stale_signature_is_refused`, and the fuzz test's unsigned requests); here we pin the
properties that a refactor could silently lose.
"""

from __future__ import annotations

import inspect
import logging
import socket
from pathlib import Path

import pytest
from pydantic import SecretStr

from bot import cli
from bot.channels.slack import SlackChannel
from bot.channels.slack.validation import read_form
from bot.channels.telegram import TelegramChannel
from bot.http import HttpServer
from knowledge.settings import Settings

SECRETS = {
    "TELEGRAM_BOT_TOKEN": ("telegram_bot_token", "7712345678:AAHsecret-telegram-token-value-000"),
    "SLACK_BOT_TOKEN": ("slack_bot_token", "xoxb-1111-2222-secret-slack-bot"),
    "SLACK_APP_TOKEN": ("slack_app_token", "xapp-1-A111-secret-slack-app"),
    "SLACK_SIGNING_SECRET": ("slack_signing_secret", "secret-signing-value-0123456789"),
    "APPRENTICE_TELEGRAM_WEBHOOK_SECRET": ("telegram_webhook_secret", "secret-webhook-value-0123456789"),
}


def test_tokens_come_from_the_environment_and_never_show(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    for env, (_, value) in SECRETS.items():
        monkeypatch.setenv(env, value)
    settings = Settings()
    caplog.set_level(logging.DEBUG)
    logging.getLogger("test").info("settings: %s / %r", settings, settings)
    shown = [repr(settings), str(settings), settings.model_dump_json(), caplog.text]
    for field, value in SECRETS.values():
        assert isinstance(getattr(settings, field), SecretStr), field
        assert getattr(settings, field).get_secret_value() == value  # read from the environment
        assert all(value not in text for text in shown), field


def test_every_secret_field_is_a_secretstr_and_no_cli_flag_takes_one() -> None:
    secret_like = [n for n in Settings.model_fields if n.endswith(("_token", "_secret"))]
    assert sorted(secret_like) == sorted(f for f, _ in SECRETS.values())
    for name in secret_like:
        assert Settings.model_fields[name].annotation is SecretStr, name
    help_text = cli.build_parser().format_help()
    for action in cli.build_parser()._actions:  # no --token on the command line (shell history, ps)
        assert not any("token" in o or "secret" in o for o in action.option_strings)
    assert "token" not in help_text.lower()


def test_secrets_are_compared_in_constant_time() -> None:
    from slack_sdk.signature import SignatureVerifier  # what bolt verifies Socket-less requests with

    assert "hmac.compare_digest" in inspect.getsource(TelegramChannel._webhook)
    assert "self._verifier.is_valid(" in inspect.getsource(SlackChannel._signed)  # a SignatureVerifier
    assert "SignatureVerifier(self.signing_secret)" in inspect.getsource(SlackChannel.__init__)
    assert "hmac.compare_digest" in inspect.getsource(SignatureVerifier.is_valid)
    assert "hmac.compare_digest" in inspect.getsource(read_form)  # the forms' signed metadata


async def test_the_http_server_binds_loopback_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPRENTICE_HTTP_HOST", raising=False)
    settings = Settings(_env_file=None, http_port=0)  # type: ignore[call-arg]
    assert settings.http_host == "127.0.0.1"
    for host, expected in ((settings.http_host, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
        server = HttpServer(host, 0)
        await server.start()
        try:
            assert server._runner is not None
            [address] = server._runner.addresses
            assert address[0] == expected
            if expected == "127.0.0.1":  # not reachable on the machine's other addresses
                outside = _non_loopback_address()
                if outside:
                    with pytest.raises(OSError):
                        socket.create_connection((outside, server.port), timeout=2).close()
        finally:
            await server.stop()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address
