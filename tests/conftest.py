"""Shared fixtures. Server fixtures live in their own modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

from chroma_server import chroma_server, chroma_url  # noqa: F401
from pg import database_url, postgres_server, postgres_url  # noqa: F401
