"""An `App` over a temp data dir, built the way `apprentice serve` builds it (for channel tests).

The bundled demo knowledge base is ingested ONCE per session into a template data dir; each test
gets a copy, so `App`'s start-up ingest finds every document unchanged (one hash per file) instead
of embedding the whole KB again. Channel tests then add their channel and start the HTTP server:

    settings = app_settings(app_data_dir, telegram_bot_token=..., ...)
    async with App(settings, generator=model) as app:
        await app.add_channel(SomeChannel(settings, app.service, app.store, app.http))
        await app.start_http()
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from knowledge.settings import Settings


@pytest.fixture(scope="session")
def kb_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose embedded Chroma already holds the bundled demo KB."""
    from knowledge.retrieve import KnowledgeBase

    settings = Settings(data_dir=tmp_path_factory.mktemp("kb-template"))
    kb = KnowledgeBase.from_settings(settings)
    try:
        kb.ingest([settings.kb_path])
    finally:
        kb.close()
    return settings.data_dir


@pytest.fixture
def app_data_dir(tmp_path: Path, kb_template: Path) -> Path:
    """A fresh data dir for one test, with the demo KB already in it."""
    dest = tmp_path / "data"
    shutil.copytree(kb_template, dest)
    return dest


def app_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test App: the given data dir, HTTP on a free port, nothing read from the environment."""
    values: dict[str, Any] = {"data_dir": data_dir, "http_port": 0, "http_host": "127.0.0.1"}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]
