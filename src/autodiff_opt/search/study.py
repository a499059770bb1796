"""Storage and study: SQLite by default, PostgreSQL/MySQL for many workers, journal files for many local processes.

Journal files get heartbeats: Optuna's heartbeat (fail a RUNNING trial whose worker stopped
beating, then queue it again with ``RetryHeartbeatStaleTrialCallback``) exists only for RDB storages.
``HeartbeatJournalStorage`` (in storage_compat.py: it implements Optuna's private heartbeat protocol) adds it to the journal file storage: the beat is a trial system attribute,
and a trial is stale when neither its last beat nor its start is younger than the grace period (a retry
copies the attributes of the trial it retries, so a beat older than the retry's own start is ignored).
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.study import Study
from optuna.trial import FrozenTrial

from autodiff_opt.core.errors import StudyError
from autodiff_opt.search.space import SIGNATURE_ATTR
from autodiff_opt.search.storage_compat import (  # noqa: F401  (FINISHED_TRIAL_ERROR: recovery.py imports it here)
    FINISHED_TRIAL_ERROR, HeartbeatJournalStorage, check_optuna,
)

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

JOURNAL_PREFIX = "journal:"


def retry_callback(max_retry: int | None) -> Callable[[Study, FrozenTrial], None]:
    """Optuna's callback that queues a failed trial again with its attributes (renamed in Optuna 4.9)."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=max_retry)


def _rdb_storage(url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int) -> RDBStorage:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = server_engine_kwargs(url)
    if heartbeat_interval:
        callback_kw = ("heartbeat_stale_trial_callback"
                       if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters
                       else "failed_trial_callback")
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      **{callback_kw: retry_callback(max_retry)})
    storage = RDBStorage(url, **kwargs)
    if url.startswith("sqlite:///") and not url.endswith(":memory:"):
        _fast_sqlite(storage)
    elif not url.startswith("sqlite"):
        log.info("storage %s: at most %d connections from this process (pool_size=%d, max_overflow=%d, pre-ping)",
                 _redact(url), POOL_SIZE + MAX_OVERFLOW, POOL_SIZE, MAX_OVERFLOW)
    return storage


# A worker needs at most two connections at once: the study lock's (held while the sampler decides) and one
# for the storage's own reads and writes (Optuna's heartbeat thread runs only around the objective, when no
# lock is held). Sixteen workers then hold at most 32 of PostgreSQL's default 100 (max_connections). Both
# are kept open (pool_size=2) rather than one plus an overflow connection (pool_size=1, max_overflow=1):
# the lock needs the second one at every trial, and an overflow connection is closed when returned, so
# 1 + 1 reconnected (server fork, password exchange) once per trial: 0.55-0.62 s/trial against 0.41-0.47
# with 2 + 0, one process, no-op objective, loaded 2-core machine (docs/workers.md).
POOL_SIZE, MAX_OVERFLOW = 2, 0


def server_engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine settings for a database server: at most POOL_SIZE + MAX_OVERFLOW connections per
    process, each checked before use (a server restart or an idle timeout no longer fails the next write),
    and, for PostgreSQL, an application_name that says which host and process holds it (pg_stat_activity)."""
    kwargs: dict[str, Any] = {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW, "pool_pre_ping": True}
    if url.startswith(("postgresql", "postgres")):
        kwargs["connect_args"] = {"application_name": application_name()}
    return kwargs


def application_name() -> str:
    """'autodiff-opt <host>:<pid>' (PostgreSQL keeps 63 bytes of it)."""
    import os
    import socket

    return f"autodiff-opt {socket.gethostname()}:{os.getpid()}"[:63]


def _fast_sqlite(storage: RDBStorage) -> None:
    """Write-ahead log and synchronous=NORMAL: a commit no longer waits for fsync, which is most of the
    per-trial storage time. A killed process loses nothing committed (only a power cut could lose the
    last commits); readers (the dashboard, other workers) no longer block the writer. Local disks only."""
    import sqlalchemy

    def pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections made before the listener are reopened with the pragmas


def make_storage(
    url: str, heartbeat_interval: int | None = 5, grace_period: int | None = 20, max_retry: int = 3
) -> BaseStorage:
    """'sqlite:///file.db', 'postgresql://user@host/db', or 'journal:/path/file.log'; a clear error when unreachable."""
    check_optuna()  # outside the supported versions: one line naming them
    try:
        if url.startswith(JOURNAL_PREFIX):  # heartbeats kept as trial attributes (HeartbeatJournalStorage)
            return journal_storage(url[len(JOURNAL_PREFIX):], heartbeat_interval, grace_period, max_retry)
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(url, heartbeat_interval, grace_period, max_retry)
    except Exception as err:
        raise StudyError(
            f"storage.url={_redact(url)} cannot be opened ({type(err).__name__}: {str(err).splitlines()[0][:200]}):"
            " check the URL, that the database server is running and reachable, and the credentials"
        ) from err


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def journal_storage(path: str | Path, heartbeat_interval: int | None = 5, grace_period: int | None = 20,
                    max_retry: int | None = 3) -> JournalStorage:
    """A journal file storage; with `heartbeat_interval` set, dead workers' trials are failed and retried."""
    from optuna.storages.journal import JournalFileBackend

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(path))
    if not heartbeat_interval:
        return JournalStorage(backend)
    return HeartbeatJournalStorage(backend, heartbeat_interval, grace_period, retry_callback(max_retry))


def open_study(
    storage: BaseStorage, study_name: str, signature: dict[str, Any], sampler: optuna.samplers.BaseSampler,
    num_objectives: int = 1, pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study or resume it; refuse one whose search space (K, T, model, metric, ...) differs."""
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner,
                                    directions=["minimize"] * num_objectives, load_if_exists=True)
    except ValueError as err:  # an existing study with other directions
        raise StudyError(f"study {study_name!r}: {err}; use another storage.study_name") from err
    if study.metric_names is None:  # what optuna-dashboard shows instead of "Objective 0"
        study.set_metric_names(["FID", "cost (full steps)"][:num_objectives])
    stored = study.user_attrs.get(SIGNATURE_ATTR)
    wanted = json.loads(json.dumps(signature))
    if stored is None:
        if study.trials:
            raise StudyError(f"study {study_name!r} exists but was not made by autodiff-opt: use another storage.study_name")
        study.set_user_attr(SIGNATURE_ATTR, wanted)
        return study
    diff = {k: (stored.get(k), wanted.get(k)) for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)}
    if diff:
        detail = "; ".join(f"{k}: study has {a!r}, config has {b!r}" for k, (a, b) in diff.items())
        raise StudyError(
            f"study {study_name!r} was created with another search space ({detail}): use another"
            " storage.study_name, or the original settings to resume it"
        )
    return study
