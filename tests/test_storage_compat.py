"""search/storage_compat.py, the one module that reaches into Optuna: its functions on real SQLite,
PostgreSQL, journal and in-memory storages, checked against Optuna's public API where it has a twin;
the supported version range; and a scan of src/ that no other module reaches into Optuna.

.ci/floors runs this file under the floor Optuna (4.0.0); `make test` under the newest installed.
`python tests/test_storage_compat.py [SRC]` prints the counts docs/architecture.md quotes.
"""

from __future__ import annotations

import ast
import re
import sys
import time
from pathlib import Path

import optuna
import pytest

from autodiff_opt.core.errors import USER_ERRORS, StudyError
from autodiff_opt.search import storage_compat as compat
from autodiff_opt.search.attrs import set_trial_attrs
from autodiff_opt.search.study import make_storage

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "autodiff_opt/search/storage_compat.py"
# Optuna's private attributes the project needed (the list plus the heartbeat protocol's method)
OPTUNA_PRIVATE_ATTRS = {"_storage", "_study_id", "_trial_id", "_backend", "_file_path", "_get_stale_trial_ids",
                        "_cached_frozen_trial", "_create_scoped_session"}


# --- the scan: modules importing Optuna's private modules, uses of its private attributes --------------
def _private_optuna_imports(tree: ast.AST) -> list[str]:
    """One entry per import statement naming an optuna module or name that starts with an underscore."""
    def private(name: str) -> bool:
        return name.split(".")[0] == "optuna" and any(p.startswith("_") for p in name.split(".")[1:])

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if private(node.module) or any(private(f"{node.module}.{a.name}") for a in node.names):
                found.append(node.module)
    return found


def _private_attr_uses(tree: ast.AST) -> list[str]:
    """obj._x for Optuna's private names, except on `self` (a class's own attributes)."""
    return [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in OPTUNA_PRIVATE_ATTRS
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")]


def scan(src: Path) -> dict[str, dict[str, list[str]]]:
    """{module path: {"imports": [...], "attrs": [...]}} for every module of src/autodiff_opt reaching into Optuna."""
    out = {}
    for path in sorted((src / "autodiff_opt").rglob("*.py")):
        tree = ast.parse(path.read_text())
        text = path.read_text()
        hits = {"imports": _private_optuna_imports(tree), "attrs": _private_attr_uses(tree)
                + re.findall(r"getattr\([^,]+,\s*\"(_backend|_file_path|_storage)\"", text)}
        if hits["imports"] or hits["attrs"]:
            out[str(path.relative_to(src))] = hits
    return out


def test_only_the_adapter_reaches_into_optuna() -> None:
    hits = scan(ROOT / "src")
    assert set(hits) == {ADAPTER}, {k: v for k, v in hits.items() if k != ADAPTER}
    assert hits[ADAPTER]["imports"]  # the scan sees what it looks for


# --- the version range -------------------------------------------------------------------------------
def test_supported_range_is_pyprojects_and_outside_it_is_one_line() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"optuna{compat.SUPPORTED_OPTUNA}"' in text  # the range the adapter names is the one pip installs
    assert compat.optuna_problem() is None  # the installed one (floor or newest)
    for version in ("3.6.1", "6.0.0"):
        problem = compat.optuna_problem(version)
        assert problem is not None and "\n" not in problem and version in problem
        assert compat.SUPPORTED_OPTUNA in problem and "pip install" in problem
        with pytest.raises(StudyError, match=re.escape(compat.SUPPORTED_OPTUNA)) as err:
            compat.check_optuna(version)
        assert isinstance(err.value, USER_ERRORS)  # the CLI's one line and exit 2
    assert compat.optuna_problem(compat.OPTUNA_FLOOR) is None


def test_a_newer_release_in_range_is_run_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    major, minor = (int(p) for p in compat.NEWEST_TESTED.split("."))
    with caplog.at_level("WARNING", logger=compat.__name__):
        compat.check_optuna(compat.NEWEST_TESTED + ".0")
        assert not caplog.records
        compat.check_optuna(f"{major}.{minor + 1}.0")
    assert len(caplog.records) == 1 and f"<{major}.{minor + 1}" in caplog.records[0].getMessage()


# --- the adapter's functions on real storages -----------------------------------------------------
def _storage(kind: str, tmp_path: Path, pg_url: str | None, **heartbeat: int) -> optuna.storages.BaseStorage:
    urls = {"sqlite": f"sqlite:///{tmp_path / 's.db'}", "postgresql": pg_url, "journal": f"journal:{tmp_path / 'j.log'}"}
    return make_storage(str(urls[kind]), **heartbeat) if kind in urls else optuna.storages.InMemoryStorage()


def _pg_url(kind: str, request: pytest.FixtureRequest) -> str | None:
    """A fresh PostgreSQL database (tests/pg.py) only where the case needs one."""
    return request.getfixturevalue("pg_url") if kind == "postgresql" else None


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "journal", "memory"])
def test_ids_storage_and_study_attrs_agree_with_optunas_public_api(kind: str, tmp_path: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    storage = _storage(kind, tmp_path, _pg_url(kind, request), heartbeat_interval=5)
    study = optuna.create_study(storage=storage, study_name=f"compat-{kind}")
    other = optuna.create_study(storage=storage, study_name=f"other-{kind}")  # ids differ from 0 and 1 somewhere
    other.ask()
    trial = study.ask()
    public = compat.study_storage(study)
    assert compat.study_id(study) == public.get_study_id_from_name(study.study_name) != compat.study_id(other)
    frozen = study.trials[-1]
    assert compat.trial_id(trial) == compat.trial_id(frozen) == public.get_trial_id_from_study_id_trial_number(
        compat.study_id(study), trial.number)
    compat.set_study_system_attr(study, "compat:x", [1, "a"])
    assert compat.study_system_attrs(study)["compat:x"] == [1, "a"]
    assert "compat:x" not in compat.study_system_attrs(other)
    assert public.get_study_system_attrs(public.get_study_id_from_name(study.study_name))["compat:x"] == [1, "a"]
    backend = compat.unwrap_storage(public)
    assert type(backend) is {"sqlite": optuna.storages.RDBStorage, "postgresql": optuna.storages.RDBStorage,
                             "journal": compat.HeartbeatJournalStorage, "memory": optuna.storages.InMemoryStorage}[kind]
    assert compat.journal_file_path(public) == (str(tmp_path / "j.log") if kind == "journal" else None)
    assert (compat.upsert_backend(public) is backend) == (kind in ("sqlite", "postgresql"))


def test_heartbeats_through_the_adapter(tmp_path: Path, pg_url: str) -> None:
    """SQLite, PostgreSQL and a journal file side by side (one wait for the three)."""
    kinds = ("sqlite", "postgresql", "journal")
    studies = {k: optuna.create_study(storage=_storage(k, tmp_path, pg_url, heartbeat_interval=1, grace_period=1),
                                      study_name=f"beats-{k}") for k in kinds}
    ids = {k: [compat.trial_id(study.ask()), compat.trial_id(study.ask())] for k, study in studies.items()}
    for kind, study in studies.items():
        public, (beaten, silent) = compat.study_storage(study), ids[kind]
        assert compat.heartbeat_enabled(public) and compat.heartbeat_enabled(compat.unwrap_storage(public))
        compat.record_heartbeat(public, beaten)
        assert compat.trials_without_heartbeat(public, ids[kind]) == ([silent] if kind != "journal" else []), kind
        compat.record_heartbeat(public, silent)  # its last beat (an RDB storage ignores a trial that never beat)
        assert compat.trials_without_heartbeat(public, ids[kind]) == []
    time.sleep(2.1)  # past the 1 s grace period; SQLite's CURRENT_TIMESTAMP has whole seconds
    for kind, study in studies.items():
        public, (beaten, silent) = compat.study_storage(study), ids[kind]
        compat.record_heartbeat(public, beaten)
        stale = compat.stale_trial_ids(compat.unwrap_storage(public), compat.study_id(study))
        assert stale == [silent], kind  # the silent one is stale after the grace period, the one that beat is not
        plain = _storage(kind, tmp_path / "plain", pg_url, heartbeat_interval=0)  # no heartbeats: nothing is stale
        assert not compat.heartbeat_enabled(plain) and compat.stale_trial_ids(plain, compat.study_id(study)) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_one_transaction_upsert_and_its_refusal_of_a_finished_trial(kind: str, tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    storage = _storage(kind, tmp_path, _pg_url(kind, request), heartbeat_interval=0)
    study = optuna.create_study(storage=storage, study_name=f"upsert-{kind}")
    trial = study.ask()
    trial.set_user_attr("nfe", 99)
    backend = compat.upsert_backend(compat.study_storage(study))
    assert backend is not None
    compat.upsert_trial_attrs(backend, compat.trial_id(trial), {"autodiff:g": [1, 2]}, {"nfe": 4, "s": {"a": 1.5}})
    frozen = compat.study_storage(study).get_trial(compat.trial_id(trial))
    assert frozen.system_attrs["autodiff:g"] == [1, 2] and frozen.user_attrs == {"nfe": 4, "s": {"a": 1.5}}
    study.tell(trial, 1.0)
    with pytest.raises(compat.FINISHED_TRIAL_ERROR):
        set_trial_attrs(compat.study_storage(study), compat.trial_id(trial), user={"x": 1})
    assert "x" not in study.trials[0].user_attrs


if __name__ == "__main__":  # the counts of docs/architecture.md, for any checkout's src/
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src"
    hits = scan(src)
    outside = {k: v for k, v in hits.items() if k != ADAPTER}
    print(f"modules importing Optuna's private modules: {sum(bool(v['imports']) for v in hits.values())}"
          f" ({sum(len(v['imports']) for v in hits.values())} imports)")
    print(f"modules using Optuna's private attributes: {sum(bool(v['attrs']) for v in hits.values())};"
          f" uses outside the adapter: {sum(len(v['attrs']) for v in outside.values())}")
    for path, v in hits.items():
        print(f"  {path}: {len(v['imports'])} imports, {len(v['attrs'])} attribute uses")
