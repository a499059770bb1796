"""Workers as SLURM jobs: candidates per minute for 1, 2, 4 array elements, and a preemption's cost.

    .venv/bin/python experiments/bench_cluster.py            # as root, with Debian's SLURM and PostgreSQL

Starts a throwaway one-node SLURM cluster (tests/slurm.py, 4 CPUs declared) and PostgreSQL server
(tests/pg.py), and submits tests/cheap_worker.py (the real AutoDiffusionPaperSampler, study lock, heartbeats
and the 2-connection pool; an objective that sleeps `--sleep` s) through submitit, wrapped as
autodiff_opt.cluster wraps the CLI (`CliJob`).

(a) N = 1, 2, 4 workers as one job array on a new study (population x generations candidates):
    candidates per minute between the first trial's start and the last one's end, the ratio to ideal
    (N x 60 / sleep), and the time from sbatch to the first trial (scheduling and start-up).
(b) Preemption: 2 workers; while worker 0 is in a slow trial its job is requeued (`scontrol requeue`).
    Reported: requeue -> the trial failed (by the other worker's heartbeat check) -> its retry started
    (same genome), and SLURM's hold on the requeued job (EligibleTime - requeue time).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

import cheap_worker as cw  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

import pg  # noqa: E402  (tests/pg.py)
import slurm  # noqa: E402  (tests/slurm.py)
from audit import audit  # noqa: E402
from autodiff_opt.cluster import CliJob  # noqa: E402
from autodiff_opt.core.keys import RETRY_OF_ATTR  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def executor(folder: Path, name: str):  # noqa: ANN201
    import submitit

    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(job_name=name, time=30, nodes=1, ntasks_per_node=1, cpus_per_task=1, stderr_to_stdout=True)
    return ex


def throughput(server, n: int, args: argparse.Namespace, folder: Path) -> dict[str, float]:  # noqa: ANN001
    url = pg.create_database(server)
    cw.create(cw.open_storage(url, 0, 2), "s", args.population)
    submitted = time.time()
    jobs = executor(folder, f"bench-{n}").map_array(CliJob(cw.command(url, "s", args), "worker"), list(range(n)))
    for job in jobs:
        job.wait()
    study = optuna.load_study(study_name="s", storage=cw.open_storage(url, 0, 2))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    first = min(t.datetime_start.timestamp() for t in done)
    span = max(t.datetime_complete.timestamp() for t in done) - first
    a = audit(study, args.generations)
    return {"workers": n, "candidates": len(done), "seconds": span, "per_min": 60 * len(done) / span,
            "ideal_ratio": (len(done) / span) / (n / args.sleep), "to_first_trial_s": first - submitted,
            "duplicate_genomes": a.duplicate_genomes, "full": a.generations_complete(args.population, args.generations)}


def _field(cluster: slurm.SlurmCluster, job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=cluster.env(), capture_output=True, text=True).stdout
    found = re.search(rf"\b{name}=(\S+)", out)
    return found.group(1) if found else ""


def preemption(server, cluster: slurm.SlurmCluster, args: argparse.Namespace, folder: Path) -> dict[str, float]:  # noqa: ANN001
    url = pg.create_database(server)
    cw.create(cw.open_storage(url, 0, 2), "s", args.population)
    slow = executor(folder, "bench-slow").submit(CliJob(cw.command(url, "s", args, "--slow-trial", "2",
                                                                        "--slow-sleep", "600"), "worker"), 0)
    other = executor(folder, "bench-other").submit(CliJob(cw.command(url, "s", args), "worker"), 1)
    storage = cw.open_storage(url, 0, 2)
    victim = cw.wait_for_slow_trial(storage, "s")
    requeued = time.time()
    subprocess.run(["scontrol", "requeue", slow.job_id], env=cluster.env(), check=True)
    retry = None
    while retry is None or retry.datetime_start is None:
        time.sleep(0.05)
        trials = optuna.load_study(study_name="s", storage=storage).get_trials(deepcopy=False)
        retry = next((t for t in trials if t.system_attrs.get(RETRY_OF_ATTR) == victim.number), None)
    failed = trials[victim.number].datetime_complete.timestamp()
    while _field(cluster, slow.job_id, "JobState") != "PENDING":
        time.sleep(0.1)
    eligible = time.mktime(time.strptime(_field(cluster, slow.job_id, "EligibleTime"), "%Y-%m-%dT%H:%M:%S"))
    subprocess.run(["scancel", slow.job_id], env=cluster.env())
    other.wait()
    return {"grace_s": args.grace, "requeue_to_trial_failed_s": failed - requeued,
            "requeue_to_retry_started_s": retry.datetime_start.timestamp() - requeued,
            "slurm_hold_of_requeued_job_s": eligible - requeued}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sleep", type=float, default=0.5, help="seconds per candidate")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--grace", type=int, default=10, help="storage.grace_period of the workers")
    p.add_argument("--workers", default="1,2,4")
    args = p.parse_args()
    server = pg.start_server()
    cluster = slurm.start_cluster(cpus=4)
    folder = cluster.root / "jobs"
    try:
        print("| workers | candidates | seconds | candidates/min | ratio to ideal | sbatch to first trial s | genomes twice |")
        print("|---|---|---|---|---|---|---|")
        for n in (int(x) for x in args.workers.split(",")):
            r = throughput(server, n, args, folder)
            assert r["full"], r
            print(f"| {n} | {r['candidates']} | {r['seconds']:.1f} | {r['per_min']:.0f} | {r['ideal_ratio']:.2f} |"
                  f" {r['to_first_trial_s']:.1f} | {r['duplicate_genomes']} |", flush=True)
        print(preemption(server, cluster, args, folder))
    finally:
        slurm.stop_cluster(cluster)
        pg.stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
