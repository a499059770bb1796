"""The Hydra app end to end on a tiny model: report files, resume after SIGKILL, refusals, composition."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from autodiff_opt.cli import CONFIG_DIR
from audit import EVALUATED, assert_budget_spent
from autodiff_opt.search.evolution import genome_of
from cli_helpers import cli_command, cli_env, compose_cfg, kill_when, run_cli, tiny_overrides
from cli_helpers import load_study as _load

pytestmark = pytest.mark.slow


def test_end_to_end_writes_table_json_and_figures(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db"), tmp_path, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = pd.read_csv(run_dir / "final.csv")
    assert set(final.schedule) == {"searched", "ddim_uniform", "trailing"}
    assert final.fid_final.notna().all() and (final.nfe == 4).all()
    best = json.loads((run_dir / "best_schedule.json").read_text())
    assert len(best["timesteps"]) == 4 and "set_timesteps(timesteps=" in best["diffusers_snippet"]
    assert "| schedule |" in (run_dir / "final.md").read_text()
    assert "plotly" in (run_dir / "report.html").read_text()[:20000].lower()
    study = _load(tmp_path / "s.db")
    used = assert_budget_spent(study, 12, 48, 4)  # the default sampler: 6 x 2 candidate-equivalents, pruned ones cheaper
    assert study.user_attrs["autodiff:signature"]["search.sampler"] == "autodiffusion"
    operators = {t.system_attrs["autodiff:operator"] for t in study.trials if t.system_attrs.get("autodiff:parents")}
    assert "local" in operators, operators  # the surrogate's pool picked a local move: the EA has none
    assert best["timesteps"] == list(genome_of(study.best_trial).timesteps)
    # a second run of the same command finds the search done and reuses the stored final evaluation
    again = run_cli(tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db"), tmp_path, tmp_path / "run2")
    assert again.returncode == 0 and f"already spent {used:.1f} of 12 candidate-equivalents" in again.stderr + again.stdout
    assert len(_load(tmp_path / "s.db").trials) == len(study.trials)


def _counts(db: Path) -> Counter[str]:
    """Trial states; a RUNNING trial counts as 'EVALUATING' once the sampler has given it a genome."""
    query = ("select t.state, (select count(*) from trial_system_attributes a where a.trial_id = t.trial_id"
             " and a.key = 'autodiff:genome') from trials t")
    with sqlite3.connect(db, timeout=30) as con:
        try:
            rows = list(con.execute(query))
        except sqlite3.OperationalError:
            return Counter()
    return Counter(state for state, _ in rows) + Counter("EVALUATING" for state, g in rows if state == "RUNNING" and g)


def test_sigkill_mid_study_then_resume(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, db, **{"search.num_samples": 200, "search.batch_size": 25,
                                                                      "search.generations": 3})  # 8 batches a candidate
    kill_when(lambda: (c := _counts(db))["COMPLETE"] >= 4 and c["EVALUATING"] == 1, overrides, tmp_path, tmp_path / "run1")
    killed = _load(db)
    running = [t for t in killed.trials if t.state == TrialState.RUNNING]
    done_before = {t.number: genome_of(t).key() for t in killed.trials if t.state == TrialState.COMPLETE}
    assert len(running) == 1 and len(done_before) >= 4

    resumed = run_cli(overrides, tmp_path, tmp_path / "run2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = _load(db)
    assert_budget_spent(study, 18, 200, 4)  # 6 x 3 candidate-equivalents, none evaluated twice
    keys = [genome_of(t).key() for t in study.get_trials(states=EVALUATED)]
    for number, key in done_before.items():  # finished work is kept as it was
        assert study.trials[number].state == TrialState.COMPLETE and genome_of(study.trials[number]).key() == key
    interrupted = study.trials[running[0].number]
    assert interrupted.state == TrialState.FAIL
    assert genome_of(interrupted).key() in keys, "the interrupted candidate was not evaluated again"
    assert (tmp_path / "run2" / "final.csv").is_file()


def test_incompatible_study_is_refused(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    first = run_cli(tiny_overrides(tiny_model_dir, tiny_reference, db, **{"search.generations": 1, "final.enabled": "false",
                                                                          "storage.study_name": "shared"}), tmp_path, tmp_path / "r1")
    assert first.returncode == 0, first.stderr[-2000:]
    made = len(_load(db).trials)
    other_k = tiny_overrides(tiny_model_dir, tiny_reference, db, **{"search.num_steps": 5, "storage.study_name": "shared",
                                                                    "search.generations": 1})
    proc = run_cli(other_k, tmp_path, tmp_path / "r2")
    assert proc.returncode == 2
    assert "another search space" in proc.stderr and "num_steps" in proc.stderr
    assert len(_load(db).trials) == made  # the refused run added no trial


@pytest.mark.parametrize("override,message", [
    ("search.num_stepz=4", "Key 'num_stepz' not in 'SearchConfig'"),
    ("search.num_steps=four", "Value 'four' of type 'str' could not be converted to Integer"),
])
def test_bad_override_fails_at_start(override: str, message: str, tmp_path: Path) -> None:
    """Hydra refuses it while composing (its own exit status 1 and message), before the run directory exists."""
    proc = subprocess.run(cli_command([override], tmp_path / "r"), cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


def _with(overrides: list[str], override: str) -> list[str]:
    key = override.split("=")[0]
    return [o for o in overrides if o.split("=")[0] != key] + [override]


@pytest.mark.parametrize("override,message", [
    ("search.num_steps=0", "K must be at least 1"),
    ("storage.url=postgresql://nobody@127.0.0.1:1/none", "cannot be opened"),
])
def test_bad_input_gives_one_line_error_and_exit_2(override: str, message: str, tiny_model_dir: Path,
                                                   tiny_reference: Path, tmp_path: Path) -> None:
    proc = run_cli(_with(tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db"), override), tmp_path,
                   tmp_path / "r", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("override,message", [
    ("search.num_steps=1001", "exceeds the model's T=1000"),
    ("search.schedules=[[10,500,20,5]]", "not strictly descending"),
    ("search.schedules=[[500,500,20,5]]", "more than once"),
    ("search.schedules=[[1500,500,20,5]]", "outside"),
    ("search.schedules=[[500,20,5]]", "has 3 steps"),
    ("model.pretrained=/nonexistent/model", "no such file or directory"),
    ("dataset.reference=/nonexistent/ref.npz", "dataset.reference=/nonexistent/ref.npz is missing"),
    ("search.sampler=nsga", "search.sampler='nsga' is unknown: use one of autodiffusion,"),
    ("search.rungs=[0.5,1.0]", "each is a fraction of search.num_samples"),
    ("search.peers=[gits]", "unknown: use gits_dp and/or ays"),
])
def test_bad_input_is_refused_before_any_work(override: str, message: str, tiny_model_dir: Path,
                                              tiny_reference: Path, tmp_path: Path) -> None:
    from autodiff_opt.core.errors import USER_ERRORS
    from autodiff_opt.runner import run

    cfg = compose_cfg(_with(tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db"), override), tmp_path)
    with pytest.raises(USER_ERRORS, match=re.escape(message)):
        run(cfg)
    db = tmp_path / "s.db"  # the storage may be opened (checked) first, but no study may be made
    assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == [], "work started before the check"


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def test_every_experiment_composes() -> None:
    """Each experiment file's own settings (read with PyYAML) are what the composed config holds."""
    import yaml
    from omegaconf import OmegaConf

    experiments = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
    assert "imagenet64" in experiments
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        default = compose(config_name="config")
        assert default.model.pretrained == "builtin:digits-ddpm" and default.search.num_steps == 4
        for name in experiments:
            cfg = OmegaConf.to_container(compose(config_name="config", overrides=[f"+experiment={name}"]))
            written = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{name}.yaml").read_text())
            written.pop("defaults", None)
            leaves = {k: v for k, v in _leaves(written).items() if not (isinstance(v, str) and "${" in v)}
            # the embedded models' experiments: their model group does the rest
            assert len(leaves) >= (3 if name.startswith("digits_") else 10), (name, leaves)
            for key, value in leaves.items():
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert node == value, (name, key, node, value)
