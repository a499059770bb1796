"""A throwaway PostgreSQL server for tests and benchmarks, from the Debian `postgresql` binaries.

`start_server()` runs initdb and pg_ctl in a fresh temporary directory (trust authentication, listening
on 127.0.0.1 on a free port and on a unix socket in that directory only) and returns a handle whose
`stop()` shuts the server down and deletes the directory. initdb and pg_ctl refuse to run as root, so
as root they run as the `postgres` system user (created by the Debian package) via runuser/su.

Missing binaries are an error, never a skip: CI (.ci/run) installs the package, so a missing server
means a broken machine, and the PostgreSQL tests must say so.

Fixtures (imported into conftest.py): `pg_server` (one server per test session) and `pg_url` (a fresh
database per test, as an SQLAlchemy URL).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "install them with `apt-get install -y postgresql` (.ci/run does this on CI)"
SERVER_USER = "postgres"  # the system user the Debian package creates; also our database superuser


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing or the server would not start; the message says why."""


def find_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    candidates = [Path(os.path.realpath(on_path)).parent] if on_path else []
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version_key(Path(p).parent.name))
    candidates += [Path(p) for p in reversed(versions)]
    for folder in candidates:
        if all((folder / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PostgresUnavailable(f"PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found: {INSTALL_HINT}")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(cmd: list[str]) -> list[str]:
    """Root cannot run initdb/pg_ctl: run them as the `postgres` system user."""
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError as err:
        raise PostgresUnavailable(f"running as root, but there is no {SERVER_USER!r} system user to run the server as:"
                                  f" {INSTALL_HINT}") from err
    if shutil.which("runuser"):
        return ["runuser", "-u", SERVER_USER, "--", *cmd]
    return ["su", SERVER_USER, "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]


def _run(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise PostgresUnavailable(f"{' '.join(cmd[:2])} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")


@dataclass
class PostgresServer:
    root: Path
    bin_dir: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        con = psycopg.connect(host="127.0.0.1", port=self.port, user=SERVER_USER, dbname="postgres", connect_timeout=10,
                              autocommit=True)
        try:
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (immediate if that hangs), then delete the directory."""
        pg_ctl = str(self.bin_dir / "pg_ctl")
        for mode in ("fast", "immediate"):
            try:
                _run([pg_ctl, "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "20"], timeout=40)
                break
            except (PostgresUnavailable, subprocess.TimeoutExpired):
                continue
        shutil.rmtree(self.root, ignore_errors=True)


def start_server(durable: bool = False, max_connections: int = 100, attempts: int = 3) -> PostgresServer:
    """initdb + pg_ctl start in a new temporary directory. `durable=False` turns fsync off (tests only)."""
    bin_dir = find_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="autodiff-pg-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVER_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    root.chmod(0o700)
    server = PostgresServer(root, bin_dir, 0)
    try:
        _run([str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", SERVER_USER, "--auth=trust",
              "-E", "UTF8", "--locale=C", "--no-sync"], timeout=120)
        settings = [f"listen_addresses=127.0.0.1", f"unix_socket_directories={root}", f"max_connections={max_connections}"]
        if not durable:
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        last_error: Exception | None = None
        for _ in range(attempts):  # a free port can be taken between free_port() and the server's bind
            server.port = free_port()
            options = " ".join(f"-c {s}" for s in settings) + f" -p {server.port}"
            try:
                _run([str(bin_dir / "pg_ctl"), "start", "-D", str(server.data_dir), "-l", str(server.log_file),
                      "-w", "-t", "60", "-o", options], timeout=90)
                return server
            except (PostgresUnavailable, subprocess.TimeoutExpired) as err:
                last_error = err
        log_tail = server.log_file.read_text()[-1500:] if server.log_file.is_file() else ""
        raise PostgresUnavailable(f"the PostgreSQL server did not start: {last_error}\n{log_tail}")
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="session")
def pg_server() -> "PostgresServer":
    """One throwaway server for the test session; fails (not skips) when PostgreSQL is not installed."""
    try:
        server = start_server()
    except PostgresUnavailable as err:
        pytest.fail(str(err), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh database on the session's server, as an SQLAlchemy URL."""
    return pg_server.create_database()

