"""Storage and study: SQLite by default, PostgreSQL/MySQL for many workers, journal files for many local processes."""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage

from autodiff_opt.core.errors import StudyError
from autodiff_opt.search.concurrency import journal_storage, retry_callback

from autodiff_opt.search.space import SIGNATURE_ATTR

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

JOURNAL_PREFIX = "journal:"




def _rdb_storage(url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int) -> RDBStorage:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    if heartbeat_interval:
        callback_kw = ("heartbeat_stale_trial_callback"
                       if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters
                       else "failed_trial_callback")
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      **{callback_kw: retry_callback(max_retry)})
    storage = RDBStorage(url, **kwargs)
    if url.startswith("sqlite:///") and not url.endswith(":memory:"):
        _fast_sqlite(storage)
    return storage


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
    try:
        if url.startswith(JOURNAL_PREFIX):  # heartbeats kept as trial attributes (Optuna has none for journals)
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
