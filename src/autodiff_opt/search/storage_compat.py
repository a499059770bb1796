"""The one module that reaches into Optuna's internals (docs/architecture.md, "Optuna's internals and errors").

Optuna's public API has no way to: get a study's storage and id or a trial's id (``_storage``, ``_study_id``,
``_trial_id``); see through the cache layer ``create_study`` wraps RDB storages in (``_CachedStorage``);
ask whether a storage beats (``_heartbeat``) or implement the heartbeat protocol for a journal file
(``BaseHeartbeat``, ``_get_stale_trial_ids``); find a journal file's path (``_file_path``); write several
trial attributes in one transaction, or see which trials have no heartbeat row (``_rdb``). Everything of
that kind is here and nowhere else (tests/test_storage_compat.py checks the source tree), each access
behind a function, so a new Optuna release breaks this module only, and ``check_optuna`` refuses a
version outside the range these accesses are tested on (the floor in pyproject.toml, .ci/floors, and
the newest, on SQLite and PostgreSQL).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Iterable, Mapping

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState
from packaging.version import Version

from autodiff_opt.core.errors import StudyError
from autodiff_opt.core.keys import HEARTBEAT_ATTR

log = logging.getLogger(__name__)

try:
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
except ImportError:  # moved in an Optuna outside the supported range: the import must not fail before
    # check_optuna (called when a storage is opened) can say so in one line
    class _CachedStorage:  # type: ignore[no-redef]  # nothing is one
        pass

    class BaseHeartbeat:  # type: ignore[no-redef]
        pass

    def is_heartbeat_enabled(storage: BaseStorage) -> bool:  # type: ignore[misc]
        return False

# The Optuna versions this module is written for: the floor is pyproject.toml's (run by .ci/floors), the
# ceiling the next major release, whose removals of deprecated names are where internals move.
OPTUNA_FLOOR, OPTUNA_CEILING = "4.0.0", "6"
NEWEST_TESTED = "5.1"  # the newest minor release the tests ran on; newer ones in range get a warning
SUPPORTED_OPTUNA = f">={OPTUNA_FLOOR},<{OPTUNA_CEILING}"
UPSERT_DIALECTS = ("sqlite", "postgresql")

# what Optuna raises on a write to a finished trial (its own class since Optuna 4.5, a RuntimeError before)
FINISHED_TRIAL_ERROR: type[Exception] = getattr(optuna.exceptions, "UpdateFinishedTrialError", RuntimeError)


def optuna_problem(version: str | None = None) -> str | None:
    """None when `version` (default: the installed one) is supported, else one line naming the range and the fix."""
    version = version or optuna.__version__
    if Version(OPTUNA_FLOOR) <= Version(version) < Version(OPTUNA_CEILING):
        return None
    return (f"optuna {version} is outside the versions autodiff-opt supports ({SUPPORTED_OPTUNA}):"
            f" pip install 'optuna{SUPPORTED_OPTUNA}'")


def check_optuna(version: str | None = None) -> None:
    """Raise StudyError (one line, exit 2 from the CLI) outside the supported range."""
    problem = optuna_problem(version)
    if problem is not None:
        raise StudyError(problem)
    version = version or optuna.__version__
    major, minor = Version(NEWEST_TESTED).release[:2]
    if Version(version).release[:2] > (major, minor):
        log.warning("optuna %s is newer than the newest release autodiff-opt was tested on (%s): if a storage"
                    " call fails, pip install 'optuna>=%s,<%d.%d'", version, NEWEST_TESTED, OPTUNA_FLOOR, major, minor + 1)


def _private(obj: Any, name: str) -> Any:
    """obj.<name>, or a one-line StudyError naming the Optuna version where it is gone."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise StudyError(f"optuna {optuna.__version__}: {type(obj).__name__}.{name} is gone; autodiff-opt supports"
                         f" {SUPPORTED_OPTUNA}: pip install 'optuna{SUPPORTED_OPTUNA}'") from None


# --- ids and storages -----------------------------------------------------------------------------
def study_storage(study: Study) -> BaseStorage:
    """The storage the study reads and writes (Optuna's cache layer included, as Optuna uses it)."""
    return _private(study, "_storage")


def study_id(study: Study) -> int:
    """The study's id in its storage."""
    return int(_private(study, "_study_id"))


def trial_id(trial: Trial | FrozenTrial) -> int:
    """The trial's id in its storage (the number is per study; storage calls take the id)."""
    return int(_private(trial, "_trial_id"))


def unwrap_storage(storage: BaseStorage) -> BaseStorage:
    """The storage under Optuna's cache wrapper (RDB storages are wrapped by create_study)."""
    return _private(storage, "_backend") if isinstance(storage, _CachedStorage) else storage


def journal_file_path(storage: BaseStorage) -> str | None:
    """The file a journal storage writes to; None for other storages and other journal backends (Redis)."""
    storage = unwrap_storage(storage)
    if not isinstance(storage, JournalStorage):
        return None
    return getattr(_private(storage, "_backend"), "_file_path", None)


# --- study system attributes (Study.system_attrs is gone since Optuna 5) ------------------------
def study_system_attrs(study: Study) -> dict[str, Any]:
    return study_storage(study).get_study_system_attrs(study_id(study))


def set_study_system_attr(study: Study, key: str, value: Any) -> None:
    study_storage(study).set_study_system_attr(study_id(study), key, value)


# --- heartbeats -------------------------------------------------------------------------------------
def heartbeat_enabled(storage: BaseStorage) -> bool:
    return bool(is_heartbeat_enabled(storage))


def record_heartbeat(storage: BaseStorage, trial_id: int) -> None:
    """One beat for the trial, where the storage has heartbeats."""
    if heartbeat_enabled(storage):
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]


def stale_trial_ids(storage: BaseStorage, study_id: int) -> list[int]:
    """The RUNNING trials of the study whose heartbeat is older than the grace period ([] without heartbeats)."""
    if not heartbeat_enabled(storage):
        return []
    return list(storage._get_stale_trial_ids(study_id))  # type: ignore[attr-defined]


def trials_without_heartbeat(storage: BaseStorage, trial_ids: Iterable[int]) -> list[int]:
    """Of `trial_ids`, those an RDB storage holds no heartbeat row for (killed before their first beat);
    [] for other storages."""
    backend = unwrap_storage(storage)
    if not isinstance(backend, RDBStorage):
        return []
    from optuna.storages._rdb.models import TrialHeartbeatModel

    session = backend.scoped_session()
    try:
        return [i for i in trial_ids if TrialHeartbeatModel.where_trial_id(i, session) is None]
    finally:
        session.close()


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage with the heartbeat protocol RDBStorage has.

    With it, `study.optimize` records a beat every `heartbeat_interval` seconds while a trial runs,
    fails RUNNING trials whose last sign of life (beat or start) is older than `grace_period`, and hands
    them to `heartbeat_stale_trial_callback` (e.g. RetryHeartbeatStaleTrialCallback, which re-queues
    the trial with the same system attributes: same genome, generation and slot).
    Clocks: beats are wall-clock times of the writing process, so workers sharing a journal file must
    share a clock (one machine, which is what journal files are for).
    """

    def __init__(self, backend: Any, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(backend)
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be a positive integer or None")
        if grace_period is not None and grace_period <= 0:
            raise ValueError("grace_period must be a positive integer or None")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period if grace_period is not None else (2 * heartbeat_interval if heartbeat_interval else None)
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except (FINISHED_TRIAL_ERROR, KeyError):
            pass  # finished (or failed as stale by another worker) meanwhile: nothing left to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self.grace_period is None:
            return []
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            last = max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
            if now - last > self.grace_period:
                stale.append(trial_id(trial))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback

    get_failed_trial_callback = get_heartbeat_stale_trial_callback  # the name before Optuna 4.9


# --- several trial attributes in one transaction (search/attrs.py) --------------------------------
def upsert_backend(storage: BaseStorage) -> RDBStorage | None:
    """The RDB storage under `storage` when its database takes a multi-row upsert (SQLite, PostgreSQL)."""
    backend = unwrap_storage(storage)
    if isinstance(backend, RDBStorage) and backend.engine.name in UPSERT_DIALECTS:
        return backend
    return None


def _insert(dialect: str) -> Any:
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert


def upsert_trial_attrs(backend: RDBStorage, trial_id: int, system: Mapping[str, Any], user: Mapping[str, Any]) -> None:
    """Optuna's attribute rows for one updatable trial, one multi-row upsert per table, one commit (the same
    rows and the same "trial still updatable" check as Optuna's per-attribute path)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    insert = _insert(backend.engine.name)
    with _create_scoped_session(backend.scoped_session) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        backend.check_trial_is_updatable(trial_id, trial.state)
        for model, attrs in ((models.TrialSystemAttributeModel, system), (models.TrialUserAttributeModel, user)):
            if not attrs:
                continue
            rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
            stmt = insert(model).values(rows)
            session.execute(stmt.on_conflict_do_update(index_elements=[model.trial_id, model.key],
                                                       set_={"value_json": stmt.excluded.value_json}))
