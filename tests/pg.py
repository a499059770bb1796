"""A throwaway PostgreSQL server for tests and benchmarks: pytest-postgresql's process fixture.

`pg_proc` is pytest-postgresql's `postgresql_proc`: initdb and pg_ctl in the session's temporary
directory, a free port, one server per test session (per xdist worker), listening on 127.0.0.1 only,
fsync off. Its executable is tests/pg_ctl, which as root (CI) runs pg_ctl in a user namespace, since
PostgreSQL refuses root. Such a server can still open what root owns, so it asks for a password (random
per session) instead of trusting every local connection.

Missing binaries are an error, never a skip: CI (.ci/run) installs the package, so a missing server
means a broken machine, and the PostgreSQL tests must say so.

Fixtures (imported into conftest.py): `pg_server` (the running server, pytest-postgresql's
PostgreSQLExecutor) and `pg_url` (a fresh database per test, as an SQLAlchemy URL). `start_server()`
starts the same server outside pytest (experiments/bench_storage.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from glob import glob
from pathlib import Path
from shutil import which

import pytest
from pytest_postgresql import factories
from pytest_postgresql.executors import PostgreSQLExecutor
from pytest_postgresql.janitor import DatabaseJanitor

INSTALL_HINT = "install them with `apt-get install -y postgresql` (.ci/run does this on CI)"
PG_CTL = Path(__file__).with_name("pg_ctl")  # what pytest-postgresql runs; it runs $AUTODIFF_PG_CTL
USER, HOST, PASSWORD = "postgres", "127.0.0.1", secrets.token_hex(16)
FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing or cannot run here; the message says why."""


def find_pg_ctl() -> Path:
    """pg_ctl from PATH, else from the newest /usr/lib/postgresql/*/bin (Debian's layout)."""
    on_path = which("pg_ctl")
    candidates = [Path(os.path.realpath(on_path))] if on_path else []
    versions = sorted(glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version_key(Path(p).parent.name))
    candidates += [Path(p) / "pg_ctl" for p in reversed(versions)]
    for pg_ctl in candidates:
        if all((pg_ctl.parent / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return pg_ctl
    raise PostgresUnavailable(f"PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found: {INSTALL_HINT}")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)


def prepare() -> Path:
    """Find pg_ctl and hand it to tests/pg_ctl (AUTODIFF_PG_CTL); as root, check that user namespaces work."""
    pg_ctl = find_pg_ctl()
    if os.geteuid() == 0:
        try:
            probe = subprocess.run(["unshare", "--user", "--map-user=65534", "--map-group=65534", "--", "true"],
                                   capture_output=True, text=True, timeout=30)
            refused = probe.returncode != 0 and (probe.stderr.strip() or f"exit {probe.returncode}")
        except OSError as err:
            refused = str(err)
        if refused:
            raise PostgresUnavailable(
                "the tests run as root, which PostgreSQL refuses; tests/pg_ctl runs it in a user namespace"
                f" (unshare --user), which this machine refuses ({refused}): run the tests as another user")
    os.environ["AUTODIFF_PG_CTL"] = str(pg_ctl)  # read by tests/pg_ctl until the server is stopped
    return pg_ctl


pg_proc = factories.postgresql_proc(executable=str(PG_CTL), host=HOST, port=None, user=USER, password=PASSWORD,
                                    postgres_options=f"-c listen_addresses={HOST} {FAST}")


def url(server: PostgreSQLExecutor, database: str = "postgres") -> str:
    return f"postgresql://{server.user}:{server.password}@{server.host}:{server.port}/{database}"


def create_database(server: PostgreSQLExecutor, name: str | None = None) -> str:
    """A new empty database; returns its URL."""
    name = name or f"t_{uuid.uuid4().hex[:12]}"
    DatabaseJanitor(user=server.user, host=server.host, port=server.port, dbname=name, password=server.password).init()
    return url(server, name)


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> PostgreSQLExecutor:
    """One throwaway server for the test session; fails (not skips) when PostgreSQL is not installed."""
    try:
        prepare()
    except PostgresUnavailable as err:
        pytest.fail(str(err), pytrace=False)
    return request.getfixturevalue("pg_proc")


@pytest.fixture
def pg_url(pg_server: PostgreSQLExecutor) -> str:
    """A fresh database on the session's server, as an SQLAlchemy URL."""
    return create_database(pg_server)


def start_server(durable: bool = False) -> PostgreSQLExecutor:
    """The same server outside pytest, in a new temporary directory; `durable=True` keeps fsync on.
    Stop it with stop_server()."""
    prepare()
    import port_for

    root = Path(tempfile.mkdtemp(prefix="autodiff-pg-"))
    durability = "-c fsync=on -c synchronous_commit=on -c full_page_writes=on" if durable else FAST  # after pg_ctl's -F
    server = PostgreSQLExecutor(executable=str(PG_CTL), host=HOST, port=port_for.select_random(),
                                datadir=str(root / "data"), unixsocketdir=str(root), logfile=str(root / "server.log"),
                                startparams="-w", dbname="postgres", user=USER, password=PASSWORD,
                                postgres_options=f"-c listen_addresses={HOST} {durability}")
    try:
        server.start()
        with DatabaseJanitor(user=USER, host=HOST, port=server.port, dbname="postgres", password=PASSWORD).cursor():
            pass  # connects, retrying while the server is still starting up (as the fixture's janitor does)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: PostgreSQLExecutor) -> None:
    """Stop a server of start_server() and delete its directory."""
    try:
        if server.running():
            server.stop()
    finally:
        shutil.rmtree(Path(server.datadir).parent, ignore_errors=True)
