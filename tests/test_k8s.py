"""deploy/k8s: each Job's container command, run as a local process against a throwaway PostgreSQL.

There is no Kubernetes here: the test reads the manifests, checks what the scheduler relies on (an
Indexed worker Job with parallelism, one GPU per pod, disruptions not counted as failures, the database
URL from a Secret and never on a command line), and runs each container's `sh -c` command with the
environment the manifests give it (the ConfigMap, the Secret's AUTODIFF_OPT_DB pointing at the test's
server, JOB_COMPLETION_INDEX), in the documented order: study creator, workers, final run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

import cheap_worker as cw
from audit import assert_budget_spent
from cli_helpers import cli_env, tiny_overrides

pytestmark = pytest.mark.slow
K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def manifests() -> dict[str, dict[str, Any]]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def test_manifests_say_what_the_scheduler_needs() -> None:
    m = manifests()
    workers = m["Job/autodiff-workers"]["spec"]
    assert workers["completionMode"] == "Indexed" and workers["parallelism"] == workers["completions"] >= 2
    assert workers["podFailurePolicy"]["rules"][0]["action"] == "Ignore"
    for name in ("autodiff-study-creator", "autodiff-workers", "autodiff-final"):
        c = container(m[f"Job/{name}"])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["command"] == ["sh", "-c"] and "storage=postgresql" in c["args"][0]
        assert "postgresql://" not in c["args"][0]  # the URL (with its password) comes from the Secret
        assert any(e["name"] == "AUTODIFF_OPT_DB" and "secretKeyRef" in e["valueFrom"] for e in c["env"])
    liveness = m["ConfigMap/autodiff-search"]["data"]["AUTODIFF_OPT_LIVENESS"]
    assert "storage.heartbeat_interval=" in liveness and "storage.grace_period=" in liveness
    assert m["Service/autodiff-db"]["spec"]["ports"][0]["port"] == 5432


def run_container(job: dict[str, Any], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.Popen:
    c = container(job)
    log = open(cwd / f"{job['metadata']['name']}-{env.get('JOB_COMPLETION_INDEX', 'x')}.log", "w")
    return subprocess.Popen([*c["command"], *c["args"]], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def test_each_containers_command_runs_as_a_local_process(pg_url: str, tiny_model_dir: Path, tiny_reference: Path,
                                                          tmp_path: Path) -> None:
    m = manifests()
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db")
                 if not o.startswith(("storage.", "progress="))]
    assert not any(" " in o for o in overrides)
    config = dict(m["ConfigMap/autodiff-search"]["data"])
    config.update(AUTODIFF_OPT_ARGS=" ".join(overrides), OUTPUT_ROOT=str(tmp_path / "outputs"),
                  AUTODIFF_OPT_CACHE=str(tmp_path / "outputs" / "cache"))
    env = {**cli_env(tmp_path), **config, "AUTODIFF_OPT_DB": pg_url,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `python` is this venv's

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))

    creator = run_container(m["Job/autodiff-study-creator"], env, tmp_path)
    assert creator.wait(timeout=300) == 0, logs()
    storage = cw.open_storage(pg_url, 0, 2)
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert {t.state for t in study.trials} == {TrialState.WAITING}  # baselines queued, nothing evaluated
    assert not (tmp_path / "outputs" / "seed" / "final.csv").exists()

    workers = [run_container(m["Job/autodiff-workers"], {**env, "JOB_COMPLETION_INDEX": str(i)}, tmp_path)
               for i in range(2)]  # two of the Job's pods
    assert [w.wait(timeout=300) for w in workers] == [0, 0], logs()
    final = run_container(m["Job/autodiff-final"], env, tmp_path)
    assert final.wait(timeout=300) == 0, logs()

    study = optuna.load_study(study_name=name, storage=storage)
    assert_budget_spent(study, 12, 48, 4, workers=2)  # the default sampler's 6 x 2 candidate-equivalents, shared
    for i in range(2):
        assert (tmp_path / "outputs" / f"worker-{i}").is_dir() and "Trial" in logs()
    found = sorted(p.relative_to(tmp_path / "outputs").as_posix() for p in (tmp_path / "outputs").rglob("final.csv"))
    assert found == ["final/final.csv"], found
    assert set(pd.read_csv(tmp_path / "outputs" / "final" / "final.csv").schedule) >= {"searched", "ddim_uniform"}
    assert "autodiff:final" in study.user_attrs
