"""One study-wide lock for every worker of a study, whatever process or machine it runs on.

Why: ``AutoDiffusionSampler.before_trial`` reads the trials, decides (generation, slot, genome, the
generation's parents, the stage-2 start) and writes the result back. Two workers that interleave there
see the same snapshot: they take the same slot, or both add a trial to a generation that had one free
slot (population + 1 trials), or draw the same genome. The sampler runs that section under
``study_lock`` (so does the runner's seeding of the baselines). Optuna's own samplers need no lock:
their ``before_trial`` writes nothing, and what they sample is not tied to slots.

The lock is released by the OS or the database server when its holder dies, so a killed worker cannot
leave it taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Iterator

from optuna.storages import RDBStorage
from optuna.study import Study

from autodiff_opt.search.storage_compat import journal_file_path, study_id, study_storage, unwrap_storage

log = logging.getLogger(__name__)


def _lock_key(study_id: int) -> int:
    """A signed 64-bit key for pg_advisory_lock, fixed per study."""
    digest = hashlib.sha256(f"autodiff-opt:study:{study_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not take the study lock {path} in {timeout:.0f}s") from None
                time.sleep(0.005)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _rdb_lock(storage: RDBStorage, study_id: int, timeout: float) -> Iterator[None]:
    from sqlalchemy import text

    dialect = storage.engine.dialect.name
    if dialect == "sqlite":
        database = storage.engine.url.database
        if database and database != ":memory:":
            with _file_lock(Path(database).with_name(Path(database).name + ".autodiff-lock"), timeout):
                yield
            return
        with _thread_lock(study_id, timeout):
            yield
        return
    key = _lock_key(study_id)
    with storage.engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(text(f"SET LOCAL lock_timeout = {int(timeout * 1000)}"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=key))
            try:
                yield
            finally:
                conn.rollback()  # ends the transaction: releases the lock
        elif dialect in ("mysql", "mariadb"):
            name = f"autodiff-opt-{key & 0xFFFFFFFF:x}"
            if conn.execute(text("SELECT GET_LOCK(:name, :t)").bindparams(name=name, t=int(timeout))).scalar() != 1:
                raise TimeoutError(f"could not take the study lock {name} in {timeout:.0f}s")
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:name)").bindparams(name=name))
        else:
            log.warning("no study lock for %s storages: concurrent workers may race", dialect)
            yield


_THREAD_LOCKS: dict[int, threading.Lock] = {}


@contextlib.contextmanager
def _thread_lock(study_id: int, timeout: float) -> Iterator[None]:
    lock = _THREAD_LOCKS.setdefault(study_id, threading.Lock())
    if not lock.acquire(timeout=timeout):
        raise TimeoutError(f"could not take the in-process study lock in {timeout:.0f}s")
    try:
        yield
    finally:
        lock.release()


def study_lock(study: Study, timeout: float = 120.0) -> contextlib.AbstractContextManager[None]:
    """Mutual exclusion across all workers of `study`, whatever process or machine they run on.

    PostgreSQL: a transaction-scoped advisory lock on its own connection. MySQL: GET_LOCK. SQLite and
    journal files: flock on '<file>.autodiff-lock' beside them (local file systems; NFS flock support
    varies). In-memory storages: a lock of this process.
    """
    storage = unwrap_storage(study_storage(study))
    if isinstance(storage, RDBStorage):
        return _rdb_lock(storage, study_id(study), timeout)
    path = journal_file_path(storage)
    if path:
        return _file_lock(Path(path).with_name(Path(path).name + ".autodiff-lock"), timeout)
    return _thread_lock(study_id(study), timeout)
