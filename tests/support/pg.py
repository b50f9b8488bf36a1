"""A real PostgreSQL server for the tests: initdb into a temp dir, 127.0.0.1 on a free port, trust auth.

`tests/support/services.sh` installs Debian's `postgresql` package when it is missing; this module only
starts a private instance (never the system one) and stops it at the end of the session. When
PostgreSQL truly cannot be started the PostgreSQL tests skip with a loud message, unless
APPRENTICE_TEST_REQUIRE_SERVERS=1 (CI), where they fail instead.

Also used outside pytest (tests/bench/load_replicas.py):
`with PostgresServer() as pg: pg.create_database("x")`.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

REQUIRE_ENV = "APPRENTICE_TEST_REQUIRE_SERVERS"


class ServerUnavailable(RuntimeError):
    """The server could not be started on this machine; the message says why and what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian layout, else PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ServerUnavailable(
        "PostgreSQL is not installed (no initdb found). Run `make services` (bash tests/support/services.sh) "
        "as root to install Debian's postgresql package."
    )


class PostgresServer:
    """A throw-away PostgreSQL cluster owned by this process."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="apprentice-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.host = "127.0.0.1"
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        self._started = False
        self._names = itertools.count(1)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)

    def start(self) -> PostgresServer:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        res = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync", "--no-instructions")
        if res.returncode != 0:
            raise ServerUnavailable(f"initdb failed: {res.stderr.strip()[-800:]}")
        # Durability off: a test cluster trades crash safety for speed.
        opts = (
            f"-h {self.host} -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        res = self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"),
                        "-w", "-t", "60", "start")
        if res.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-1500:]
            raise ServerUnavailable(f"pg_ctl start failed: {res.stderr.strip()[-500:]}\n{log}")
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = name or f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(
            host=self.host, port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def skip_loudly(what: str, reason: str) -> None:
    """Skip (or fail when servers are required): printed to stderr so nobody misses it."""
    msg = f"{what} tests SKIPPED: {reason}"
    print(f"\n{'!' * 78}\n!! {msg}\n{'!' * 78}", file=sys.stderr)
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{msg} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session."""
    try:
        server = PostgresServer()
        server.start()
    except (ServerUnavailable, OSError, subprocess.SubprocessError) as exc:
        if "server" in locals():
            server.stop()
        skip_loudly("PostgreSQL", str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh empty database on each engine the store supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'apprentice.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()
