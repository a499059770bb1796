"""Several trial attributes in one storage transaction.

Optuna's storage API writes one attribute per call; on an RDB storage each call is a session, a trial
lookup, an upsert and a commit. A candidate writes about a dozen attributes (its genome and lineage
from the sampler, its timings and cost from the objective), which made these writes the largest part
of the search's per-candidate overhead on SQLite. ``set_trial_attrs`` checks the trial once and writes
all of its attributes with one multi-row upsert per table in one commit on SQLite and PostgreSQL (the
same rows, the same "trial still updatable" check as Optuna's per-attribute path), and falls back to
the public per-attribute API on every other storage. The SQL is in storage_compat.py, with the rest of
what reaches into Optuna.
"""

from __future__ import annotations

from typing import Any, Mapping

from optuna.storages import BaseStorage

from autodiff_opt.search.storage_compat import upsert_backend, upsert_trial_attrs


def set_trial_attrs(storage: BaseStorage, trial_id: int, system: Mapping[str, Any] | None = None,
                    user: Mapping[str, Any] | None = None) -> None:
    """Write system and user attributes of one RUNNING trial, in one transaction where the storage allows."""
    system, user = dict(system or {}), dict(user or {})
    backend = upsert_backend(storage)
    if backend is None:
        for key, value in system.items():
            storage.set_trial_system_attr(trial_id, key, value)
        for key, value in user.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return
    upsert_trial_attrs(backend, trial_id, system, user)
