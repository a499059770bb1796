"""A search on a real one-node Ray cluster (tests/ray_cluster.py) and a throwaway PostgreSQL (tests/pg.py).

`python -m autodiff_opt.cluster ray --address HEAD` runs the study creator, 2 CLI workers on the tiny model
and the final run as Ray tasks on a head started by the test (`ray start --head`, 2 CPUs). The process
of a worker evaluating a candidate (found by the trial's owner record) is SIGKILLed. Checked: Ray ran the
task again, the budget is spent (candidate-equivalents), no genome evaluated twice, the interrupted trial
failed and was retried with its genome, the final table was written once, the password never printed,
and no process ever held more than 2 connections (pg_stat_activity, sampled throughout).

Ray missing is a failure, not a skip: CI installs the `ray` extra.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from optuna.trial import TrialState

import cheap_worker as cw
from audit import assert_lost_worker_recovered, spent
from autodiff_opt.core.keys import OWNER_ATTR
from autodiff_opt.search.space import GENOME_ATTR
from cli_helpers import cli_env, tiny_overrides
from ray_cluster import RayHead, RayUnavailable, start_head, stop_head
from test_cluster import ConnectionWatch

pytestmark = pytest.mark.slow
BUDGET, SAMPLES, STEPS = 12, 144, 4  # tiny_overrides' budget (population 6 x 2 generations), search.num_samples, K


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    try:
        head = start_head(cli_env(tmp_path_factory.mktemp("ray")), num_cpus=2)
    except RayUnavailable as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield head
    finally:
        stop_head(head)


def find_victim(storage: optuna.storages.BaseStorage) -> tuple[int, str, int] | None:
    """A trial being evaluated by a live process early in the budget (its retry must run): (number, genome, pid)."""
    names = optuna.get_all_study_names(storage)
    if not names:
        return None
    study = optuna.load_study(study_name=names[0], storage=storage)
    if spent(study, SAMPLES, STEPS) > 3:  # the two baselines and at most one more candidate-equivalent
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_ATTR)
        if GENOME_ATTR in t.system_attrs and owner \
                and t.datetime_start.timestamp() >= owner[3] - 1 and Path(f"/proc/{owner[1]}").exists():
            return t.number, t.system_attrs[GENOME_ATTR], int(owner[1])
    return None


def test_ray_tasks_survive_a_killed_worker(ray_head: RayHead, pg_url: str, tiny_model_dir: Path,
                                           tiny_reference: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db", **{
        "search.num_samples": SAMPLES, "search.batch_size": 24, "storage.heartbeat_interval": 1,
        "storage.grace_period": 10}) if not o.startswith("storage.url=")]  # a candidate takes a few seconds
    run_dir = tmp_path / "run"
    watch = ConnectionWatch(pg_url)
    watch.start()
    driver = subprocess.Popen([sys.executable, "-m", "autodiff_opt.cluster", "ray", "--workers", "2", "--storage",
                               pg_url, "--address", ray_head.address, "--max-retries", "2", "--",
                               *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                              env=ray_head.env(cli_env(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        storage = cw.open_storage(pg_url, 0, 2)
        victim, deadline = None, time.monotonic() + 180
        while victim is None:  # a worker evaluating a candidate of the budget: kill its process
            assert driver.poll() is None, driver.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no worker was seen evaluating a candidate"
            time.sleep(0.1)
            victim = find_victim(storage)
        number, genome, pid = victim
        os.kill(pid, signal.SIGKILL)
        killed_wall = time.time()
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        watch.done.set()
        watch.join(10)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run_dir / "ray").glob("*.log")))
    assert driver.returncode == 0, out[-3000:] + logs
    assert pg_url.split("@")[0].split(":")[-1] not in out + logs  # the password is never printed
    assert f"report (once the final run ends): {run_dir / 'report.html'}" in out
    assert f"task logs: {run_dir / 'ray'}" in out

    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    retry = assert_lost_worker_recovered(study, number, genome, run_dir, BUDGET, SAMPLES, STEPS, workers=2)
    starts = {p.name: len(re.findall(r"^\[autodiff-opt\] worker \d", p.read_text(), re.M))
              for p in (run_dir / "ray").glob("worker-*.log")}
    assert sorted(starts.values()) == [1, 2], starts  # Ray ran the killed worker's task again, once
    assert (run_dir / "ray" / "seed.log").read_text().count("[autodiff-opt] study creator") == 1
    assert len(watch.most) >= 3 and max(watch.most.values()) <= 2, watch.most  # seed, workers, final: <= 2 each
    print("most connections at once, all processes:", watch.most_total, dict(watch.most))
    print(f"kill -> retry started: {retry.datetime_start.timestamp() - killed_wall:.1f}s")


@pytest.mark.parametrize("args,message", [
    (["--workers", "2", "--storage", "journal:x.log", "--address", "127.0.0.1:1"], "use a database server"),
    (["--workers", "0", "--storage", "postgresql://u@h/db"], "at least 1 worker"),
    (["--workers", "2", "--storage", "postgresql://u@h/db", "--max-retries", "-1"], "--max-retries=-1"),
    (["--workers", "2", "--storage", "postgresql://u@h/db", "--gpus-per-worker", "1", "--", "device=cpu"],
     "--gpus-per-worker 0"),
    (["--workers", "2", "--storage", "postgresql://u@h/db", "--", "search.num_stepz=3"], "num_stepz"),
    (["--workers", "2", "--storage", "postgresql://nobody:pw@127.0.0.1:1/none"], "cannot be opened"),
])
def test_ray_command_refuses_bad_arguments_before_starting(args: list[str], message: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from autodiff_opt import cluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "connect_ray", None)  # nothing may be started or joined
    assert cluster.main(["ray", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "pw@" not in err[0]
    assert not (tmp_path / "outputs").exists()


def test_ray_unreachable_address_is_one_line(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from autodiff_opt import cluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    port = __import__("ray_cluster")._free_port()  # nothing listens there
    assert cluster.main(["ray", "--workers", "1", "--storage", pg_url, "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}"), err
    assert pg_url.split("@")[0].split(":")[-1] not in err[0]
