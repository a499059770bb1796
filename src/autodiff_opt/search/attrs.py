"""Several trial attributes in one storage transaction.

Optuna's storage API writes one attribute per call; on an RDB storage each call is a session, a trial
lookup, an upsert and a commit. A candidate writes about a dozen attributes (its genome and lineage
from the sampler, its timings and cost from the objective), which made these writes the largest part
of the search's per-candidate overhead on SQLite. ``set_trial_attrs`` checks the trial once and writes
all of its attributes with one multi-row upsert per table in one commit on SQLite and PostgreSQL (the
same rows, the same "trial still updatable" check as Optuna's per-attribute path), and falls back to
the public per-attribute API on every other storage.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from optuna.storages import BaseStorage, RDBStorage

UPSERT_DIALECTS = ("sqlite", "postgresql")


def _rdb_backend(storage: BaseStorage) -> RDBStorage | None:
    backend = getattr(storage, "_backend", storage)  # Optuna wraps RDB storages in a cache layer
    if isinstance(backend, RDBStorage) and backend.engine.name in UPSERT_DIALECTS:
        return backend
    return None


def _insert(dialect: str) -> Any:
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert


def set_trial_attrs(storage: BaseStorage, trial_id: int, system: Mapping[str, Any] | None = None,
                    user: Mapping[str, Any] | None = None) -> None:
    """Write system and user attributes of one RUNNING trial, in one transaction where the storage allows."""
    system, user = dict(system or {}), dict(user or {})
    backend = _rdb_backend(storage)
    if backend is None:
        for key, value in system.items():
            storage.set_trial_system_attr(trial_id, key, value)
        for key, value in user.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return
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
