"""set_trial_attrs: a candidate's attributes in one transaction, read back through Optuna's own API."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import sqlalchemy

from autodiff_opt.search.attrs import set_trial_attrs
from autodiff_opt.search.study import make_storage

SYSTEM = {"autodiff:genome": '{"t": [999, 500]}', "autodiff:generation": 3, "autodiff:parents": [4, 7]}
USER = {"nfe": 4, "gen_seconds": 0.1234, "timesteps": [999, 749, 499, 249], "fail_reason": None, "nested": {"a": [1.5]}}


def _storages(tmp_path: Path, pg_url: str) -> dict[str, optuna.storages.BaseStorage]:
    return {"sqlite": make_storage(f"sqlite:///{tmp_path / 'a.db'}", heartbeat_interval=None),
            "postgresql": make_storage(pg_url, heartbeat_interval=None),
            "memory": optuna.storages.InMemoryStorage()}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "memory"])
def test_attrs_round_trip_and_overwrite(kind: str, tmp_path: Path, pg_url: str) -> None:
    storage = _storages(tmp_path, pg_url)[kind]
    study = optuna.create_study(storage=storage, study_name=f"attrs-{kind}")
    trial = study.ask()
    trial.set_user_attr("nfe", 99)  # an existing key is overwritten, not duplicated
    set_trial_attrs(study._storage, trial._trial_id, system=SYSTEM, user=USER)
    set_trial_attrs(study._storage, trial._trial_id, user={"gen_seconds": 2.5})
    study.tell(trial, 1.0)
    frozen = study._storage.get_trial(trial._trial_id)
    assert {k: frozen.system_attrs[k] for k in SYSTEM} == SYSTEM
    assert frozen.user_attrs == {**USER, "gen_seconds": 2.5}


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_finished_trial_refused_like_optuna(kind: str, tmp_path: Path, pg_url: str) -> None:
    storage = _storages(tmp_path, pg_url)[kind]
    study = optuna.create_study(storage=storage, study_name=f"done-{kind}")
    trial = study.ask()
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        study._storage.set_trial_user_attr(trial._trial_id, "x", 1)  # Optuna's own path refuses ...
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_trial_attrs(study._storage, trial._trial_id, user={"x": 1})  # ... and so does ours
    assert "x" not in study._storage.get_trial(trial._trial_id).user_attrs


def test_one_commit_for_all_attributes(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'c.db'}", heartbeat_interval=None)
    study = optuna.create_study(storage=storage, study_name="commits")
    trial = study.ask()
    engine = study._storage._backend.engine
    commits: list[int] = []
    sqlalchemy.event.listen(engine, "commit", lambda _conn: commits.append(1))
    set_trial_attrs(study._storage, trial._trial_id, system=SYSTEM, user=USER)
    assert len(commits) == 1
    for key, value in USER.items():  # the per-attribute API: one commit each
        study._storage.set_trial_user_attr(trial._trial_id, key, value)
    assert len(commits) == 1 + len(USER)
