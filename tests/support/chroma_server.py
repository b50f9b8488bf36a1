"""A real Chroma server for the tests: `chroma run` from the installed chromadb, 127.0.0.1, a free port.

Its data lives in a temp dir and it is terminated at the end of the session. The knowledge-base
tests run against it as well as against embedded Chroma through the `chroma_url` fixture
("" = embedded). Collections are wiped before each test that asks for the server, so tests
stay independent while sharing one process.

Also used outside pytest (tests/bench/load_replicas.py): `with ChromaServer() as chroma: chroma.url`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from pg import ServerUnavailable, free_port, skip_loudly

STARTUP_TIMEOUT_S = 60.0


def chroma_executable() -> Path:
    """The `chroma` CLI installed next to this interpreter (the venv's chromadb)."""
    exe = Path(sys.executable).parent / "chroma"
    if exe.exists():
        return exe
    found = shutil.which("chroma")
    if found:
        return Path(found)
    raise ServerUnavailable("the `chroma` CLI is missing; install the project: `make test` creates .venv.")


class ChromaServer:
    """A throw-away `chroma run` process owned by this process."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="apprentice-chroma-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.root / "chroma.log"

    def start(self) -> ChromaServer:
        env = {**os.environ, "ANONYMIZED_TELEMETRY": "False", "CHROMA_TELEMETRY": "False", "NO_COLOR": "1"}
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [str(chroma_executable()), "run", "--path", str(self.root / "data"),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # readiness polling, bounded
            if self._proc.poll() is not None:
                raise ServerUnavailable(f"chroma run exited with {self._proc.returncode}: {self.log_tail()}")
            if self.heartbeat():
                return self
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"chroma not ready in {STARTUP_TIMEOUT_S:.0f}s: {self.log_tail()}")
            time.sleep(0.1)

    def heartbeat(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=1) as resp:
                return resp.status == 200 and "nanosecond heartbeat" in json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-1200:]
        except OSError:
            return ""

    def wipe(self) -> None:
        """Delete every collection (tests share the server, never its data)."""
        from knowledge import vectors

        client = vectors.open_client(self.root, self.url)
        try:
            for col in client.list_collections():
                client.delete_collection(getattr(col, "name", col))
        finally:
            vectors.close_client(client)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ChromaServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def chroma_server() -> Iterator[ChromaServer]:
    """One Chroma server for the whole session."""
    server = ChromaServer()
    try:
        server.start()
    except (ServerUnavailable, OSError, subprocess.SubprocessError) as exc:
        server.stop()
        skip_loudly("Chroma server", str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["embedded", pytest.param("server", marks=pytest.mark.chroma_server)])
def chroma_url(request: pytest.FixtureRequest) -> str:
    """APPRENTICE_CHROMA_URL for a test: "" (embedded PersistentClient) or a wiped Chroma server."""
    if request.param == "embedded":
        return ""
    server: ChromaServer = request.getfixturevalue("chroma_server")
    server.wipe()
    return server.url
