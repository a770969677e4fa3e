"""A throwaway PostgreSQL server for the multi-worker tests (Debian's ``postgresql`` package).

The server runs from a fresh data folder on a free port, owned by the ``postgres``
user when the tests run as root (PostgreSQL refuses to run as root), and is
stopped when the session ends. Tests skip, saying why, only where it cannot start.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set by .ci/run, where the server is installed: not starting is then a failure, not a skip.
REQUIRED = os.environ.get("CANAO_REQUIRE_POSTGRES") == "1"

INSTALL_HINT = "apt-get install postgresql && pip install 'canao[postgres]'"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"PostgreSQL is required here (CANAO_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(reason)


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


class PostgresServer:
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port

    def new_database(self) -> str:
        """A URL to an empty database of its own (each test starts from nothing)."""
        import psycopg

        name = f"canao_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name, driver="postgresql+psycopg")

    def url(self, database: str, driver: str | None = None) -> str:
        scheme = driver or "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    binaries = _binaries()
    if binaries is None:
        _unavailable(f"PostgreSQL is not installed ({INSTALL_HINT})")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable(f"no PostgreSQL driver ({INSTALL_HINT})")
    root = Path(tempfile.mkdtemp(prefix="canao-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres")
    port = _free_port()
    init = subprocess.run(
        _as_server_user(
            [str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if init.returncode != 0:
        _unavailable(f"initdb failed: {init.stderr.decode(errors='replace').strip()[:300]}")
    log = (root / "server.log").open("wb")  # a file, not a pipe: a full pipe stalls the server
    server = subprocess.Popen(
        _as_server_user(
            [
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-h",
                "127.0.0.1",
                "-k",
                str(root),
            ]
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(port, server, root / "server.log")
        yield PostgresServer(root, port)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        if server.poll() is not None:
            error = log.read_text(errors="replace")
            _unavailable(f"PostgreSQL did not start: {error.strip()[:300]}")
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres").close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                _unavailable("PostgreSQL did not accept connections within 30 s")
            time.sleep(0.2)
