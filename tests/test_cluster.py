"""A search on a real one-node SLURM cluster (tests/slurm.py) and a throwaway PostgreSQL (tests/pg.py).

`python -m autodiff_opt.cluster slurm` submits the study creator, an array of 3 CLI workers on the tiny
model and the final run. One array element is requeued (`scontrol requeue`) while it evaluates a
candidate. Checked: the budget is spent (the default sampler's candidate-equivalents), no genome evaluated twice, the
interrupted trial failed and was retried with its genome, the requeued element ran again, the final
table was written once, and no process ever held more than 2 connections (pg_stat_activity, sampled
throughout, by application_name).

The SLURM daemons missing (no apt) is a failure, not a skip: CI installs them (.ci/run).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from optuna.trial import TrialState

import cheap_worker as cw
from audit import assert_lost_worker_recovered, audit, spent
from autodiff_opt.core.keys import OWNER_ATTR
from autodiff_opt.search.space import GENOME_ATTR
from autodiff_opt.search.study import application_name
from cli_helpers import cli_env, tiny_overrides
from slurm import SlurmCluster, SlurmUnavailable, start_cluster, stop_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    try:
        cluster = start_cluster(cpus=2)
    except SlurmUnavailable as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


class ConnectionWatch(threading.Thread):
    """Samples pg_stat_activity every 0.1 s: the most connections each application_name (each process of
    ours: study.application_name) held at once, and all of them together; this process's own not counted."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.most: Counter[str] = Counter()
        self.most_total = 0
        self.done = threading.Event()
        self.own = application_name()

    def run(self) -> None:
        from sqlalchemy import text

        query = text("SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = current_database()"
                     " AND application_name LIKE 'autodiff-opt %' GROUP BY application_name")
        with self.engine.connect() as conn:
            while not self.done.is_set():
                rows = conn.execute(query).all()
                conn.commit()
                rows = [(name, count) for name, count in rows if name != self.own]  # the test's own storage
                for name, count in rows:
                    self.most[name] = max(self.most[name], count)
                self.most_total = max(self.most_total, sum(count for _, count in rows))
                self.done.wait(0.1)


def _scontrol(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *args], env=cluster.env(), capture_output=True, text=True, timeout=30)


def job_field(cluster: SlurmCluster, job: str, name: str) -> str:
    out = _scontrol(cluster, "show", "job", job).stdout
    found = re.search(rf"\b{name}=(\S+)", out)
    return found.group(1) if found else ""


def slurm_env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item and item.startswith(b"SLURM"))


def test_slurm_array_survives_a_requeued_worker(slurm: SlurmCluster, pg_url: str, tiny_model_dir: Path,
                                                tiny_reference: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db", **{
        "search.num_samples": 240, "search.batch_size": 24, "storage.heartbeat_interval": 1,
        "storage.grace_period": 10}) if not o.startswith("storage.url=")]  # a candidate takes a few seconds
    run_dir = tmp_path / "run"
    watch = ConnectionWatch(pg_url)
    watch.start()
    env = {**cli_env(tmp_path), "SLURM_CONF": str(slurm.conf)}
    submitted = subprocess.run([sys.executable, "-m", "autodiff_opt.cluster", "slurm", "--workers", "3", "--storage",
                                pg_url, "--gpus-per-worker", "0", "--cpus-per-worker", "1", "--time", "10", "--",
                                *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    out = submitted.stdout
    assert pg_url.split("@")[0].split(":")[-1] not in out + submitted.stderr  # the password is never printed
    ids = re.search(r"study creator: job (\d+); workers: job array (\d+) \(3 elements\); final run: job (\d+)", out)
    assert ids, out
    seed_id, array_id, final_id = ids.groups()
    assert f"report (once job {final_id} ends): {run_dir / 'report.html'}" in out

    storage = cw.open_storage(pg_url, 0, 2)
    victim, deadline = None, time.monotonic() + 240
    while victim is None:  # a worker evaluating a candidate of the budget: requeue its array element
        assert time.monotonic() < deadline, f"no worker was seen evaluating a candidate; {job_field(slurm, final_id, 'JobState')}"
        time.sleep(0.1)
        names = optuna.get_all_study_names(storage)
        if not names:
            continue
        study = optuna.load_study(study_name=names[0], storage=storage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get(OWNER_ATTR)
            if GENOME_ATTR in t.system_attrs and owner and spent(study, 240, 4) <= 3 \
                    and t.datetime_start.timestamp() >= owner[3] - 1 and Path(f"/proc/{owner[1]}").exists():
                victim = (t.number, t.system_attrs[GENOME_ATTR], slurm_env_of(int(owner[1])))
                break
    number, genome, job_env = victim
    element = f"{job_env['SLURM_ARRAY_JOB_ID']}_{job_env['SLURM_ARRAY_TASK_ID']}"
    assert job_env["SLURM_ARRAY_JOB_ID"] == array_id
    requeue = _scontrol(slurm, "requeue", element)
    assert requeue.returncode == 0, requeue.stderr
    requeued_at, requeued_wall = time.monotonic(), time.time()
    # slurmctld holds a requeued job back (Reason=BeginTime, about 2 min): let it start at once
    while job_field(slurm, element, "JobState") != "PENDING":
        assert time.monotonic() - requeued_at < 60, job_field(slurm, element, "JobState")
        time.sleep(0.2)
    release = _scontrol(slurm, "update", f"JobId={element}", "StartTime=now")
    assert release.returncode == 0, release.stderr

    deadline = time.monotonic() + 420  # 190 s at a load average of 10
    while job_field(slurm, final_id, "JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        assert time.monotonic() < deadline, "the final run did not end"
        time.sleep(0.5)
    watch.done.set()
    watch.join(10)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run_dir / "slurm").glob("*.out")))
    assert job_field(slurm, final_id, "JobState") == "COMPLETED", logs
    assert job_field(slurm, seed_id, "JobState") == "COMPLETED", logs
    assert job_field(slurm, element, "Restarts") == "1", logs

    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    retry = assert_lost_worker_recovered(study, number, genome, run_dir, 12, 240, 4, workers=3)
    element_log = (run_dir / "slurm" / f"{element}_0_log.out").read_text()
    assert element_log.count("[autodiff-opt] worker ") == 2, element_log[-3000:]  # it started again
    assert len(watch.most) >= 3 and max(watch.most.values()) <= 2, watch.most  # seed, workers, final: <= 2 each
    for job in (seed_id, *(f"{array_id}_{i}" for i in range(3)), final_id):  # where the time goes (pytest -s)
        print(job, job_field(slurm, job, "StartTime"), job_field(slurm, job, "EndTime"))
    print("most connections at once, all processes:", watch.most_total, dict(watch.most))
    print(f"requeue -> retry started: {retry.datetime_start.timestamp() - requeued_wall:.1f}s")


def test_sixteen_workers_stay_under_postgresqls_default_max_connections(pg_url: str, tmp_path: Path) -> None:
    """16 worker processes (the real sampler, study lock and heartbeats; a sleeping objective) on one study:
    each holds at most 2 connections at any time, all of them together at most 32 of the server's 100."""
    import sqlalchemy

    with sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool).connect() as conn:
        max_connections = int(conn.execute(sqlalchemy.text("SHOW max_connections")).scalar())
    assert max_connections == 100  # PostgreSQL's default, which the throwaway server keeps
    population = 16
    cw.create(cw.open_storage(pg_url, 0, 2), "s", population)
    watch = ConnectionWatch(pg_url)
    watch.start()
    worker = Path(cw.__file__)
    procs = [subprocess.Popen([sys.executable, str(worker), "--storage", pg_url, "--study", "s", "--worker", str(i),
                               "--population", str(population), "--generations", "2", "--sleep", "0.3",
                               "--heartbeat", "1", "--grace", "60", "--ready", str(tmp_path / "ready"), "--parties", "16"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for i in range(16)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    watch.done.set()
    watch.join(10)
    assert [p.returncode for p in procs] == [0] * 16, "\n".join(o[-1500:] for o in outs)
    study = optuna.load_study(study_name="s", storage=cw.open_storage(pg_url, 0, 2))
    a = audit(study, 2)
    assert a.generations_complete(population, 2) and a.duplicate_genomes == 0, a
    assert len(watch.most) == 16 and max(watch.most.values()) <= 2, watch.most
    assert 16 <= watch.most_total <= 32 < max_connections, watch.most_total
    print("16 workers: most connections per worker", max(watch.most.values()), "; all at once", watch.most_total)


@pytest.mark.parametrize("args,message", [
    (["--workers", "2", "--storage", "journal:x.log"], "use a database server every node reaches"),
    (["--workers", "2", "--storage", "sqlite:///x.db"], "use a database server every node reaches"),
    (["--workers", "0", "--storage", "postgresql://u@h/db"], "at least 1 worker"),
    (["--workers", "2", "--storage", "postgresql://u@h/db", "--time", "0"], "--time=0"),
    (["--workers", "2", "--storage", "postgresql://u@h/db", "--", "search.num_stepz=3"], "num_stepz"),
    (["--workers", "2", "--storage", "postgresql://u@h/db", "--", "storage.url=sqlite:///a.db"], "--storage URL"),
    (["--workers", "2", "--storage", "postgresql://nobody:pw@127.0.0.1:1/none"], "cannot be opened"),
])
def test_slurm_command_refuses_bad_arguments_before_submitting(args: list[str], message: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from autodiff_opt import cluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cluster, "submit", None)  # nothing may be submitted
    assert cluster.main(["slurm", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "pw@" not in err[0]
    assert not (tmp_path / "outputs").exists()


def test_slurm_dry_run_prints_the_three_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from autodiff_opt import cluster

    monkeypatch.chdir(tmp_path)
    assert cluster.main(["slurm", "--workers", "4", "--storage", "postgresql://u:secret@h/db", "--partition", "gpu",
                         "--dry-run", "--", "search.num_steps=6", f"hydra.run.dir={tmp_path / 'r'}"]) == 0
    out = capsys.readouterr().out
    assert "secret" not in out and "storage.url=postgresql://***@h/db" in out
    lines = out.splitlines()
    seed, worker, final = lines[2], lines[4], lines[6]
    assert "-m autodiff_opt.cluster seed" in seed and "final.enabled=false" in seed
    assert f"hydra.run.dir={tmp_path / 'r' / 'worker-{index}'}" in worker.replace("'", "")
    assert "final.enabled=false" in worker and "final.enabled" not in final
    assert final.endswith(f"hydra.run.dir={tmp_path / 'r'}")
    assert "'gpus_per_node': 1" in lines[0] and "'partition': 'gpu'" in lines[0]
