"""Workers as Ray tasks: candidates per minute for 1 and 2 tasks, and the cost of a killed worker.

    .venv/bin/python experiments/bench_ray.py            # needs the ray extra and Debian's PostgreSQL

Starts a throwaway one-node Ray cluster (tests/ray_cluster.py, `--num-cpus` declared, default 2) and
PostgreSQL server (tests/pg.py), and runs tests/cheap_worker.py (the real AutoDiffusionPaperSampler, study
lock, heartbeats and the 2-connection pool; an objective that sleeps `--sleep` s) as Ray tasks, each
wrapped as `python -m autodiff_opt.cluster ray` wraps the CLI (`cluster.ray_task` running a `CliJob`).

(a) N = 1, 2 workers on a new study (population x generations candidates): candidates per minute between
    the first trial's start and the last one's end, the ratio to ideal (N x 60 / sleep), and the time
    from submitting the tasks to the first trial (Ray's scheduling and the worker's start-up).
(b) A killed worker: 2 tasks; while task 0 is in a slow trial its process is SIGKILLed. Reported: kill ->
    Ray's retry of the task running again (its process's first trial), kill -> the trial failed (by the
    other worker's heartbeat check: cheap_worker does not run the CLI's same-host recovery) -> its retry
    started (same genome).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

import cheap_worker as cw  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

import pg  # noqa: E402  (tests/pg.py)
import ray_cluster  # noqa: E402  (tests/ray_cluster.py)
from audit import audit  # noqa: E402
from autodiff_opt.cluster import CliJob, WorkerLost, ray_task  # noqa: E402
from autodiff_opt.core.keys import RETRY_OF_ATTR  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def submit(ray, command: list[str], index: int, log: Path, retries: int = 2):  # noqa: ANN001, ANN201
    remote = ray.remote(ray_task).options(num_cpus=1, num_gpus=0, max_retries=retries, retry_exceptions=[WorkerLost])
    return remote.remote(CliJob(command, "worker", log=str(log)), index)


def throughput(ray, server, n: int, args: argparse.Namespace, folder: Path) -> dict[str, float]:  # noqa: ANN001
    url = pg.create_database(server)
    cw.create(cw.open_storage(url, 0, 2), "s", args.population)
    submitted = time.time()
    ray.get([submit(ray, cw.command(url, "s", args), i, folder / f"t{n}-{i}.log") for i in range(n)])
    study = optuna.load_study(study_name="s", storage=cw.open_storage(url, 0, 2))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    first = min(t.datetime_start.timestamp() for t in done)
    span = max(t.datetime_complete.timestamp() for t in done) - first
    a = audit(study, args.generations)
    return {"workers": n, "candidates": len(done), "seconds": span, "per_min": 60 * len(done) / span,
            "ideal_ratio": (len(done) / span) / (n / args.sleep), "to_first_trial_s": first - submitted,
            "duplicate_genomes": a.duplicate_genomes, "full": a.generations_complete(args.population, args.generations)}


def killed_worker(ray, server, args: argparse.Namespace, folder: Path) -> dict[str, float]:  # noqa: ANN001
    url = pg.create_database(server)
    cw.create(cw.open_storage(url, 0, 2), "s", args.population)
    slow = submit(ray, cw.command(url, "s", args, "--slow-trial", "2", "--slow-sleep", "600"), 0,
                  folder / "slow.log", retries=1)
    other = submit(ray, cw.command(url, "s", args), 1, folder / "other.log")
    storage = cw.open_storage(url, 0, 2)
    victim = cw.wait_for_slow_trial(storage, "s")
    pid = int(victim.user_attrs["pid"])
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    retry = rerun = None
    while retry is None or retry.datetime_start is None or rerun is None:
        time.sleep(0.05)
        trials = optuna.load_study(study_name="s", storage=storage).get_trials(deepcopy=False)
        retry = next((t for t in trials if t.system_attrs.get(RETRY_OF_ATTR) == victim.number), None)
        rerun = rerun or next((t for t in trials if t.user_attrs.get("worker") == 0 and t.user_attrs.get("pid") != pid
                               and t.datetime_start is not None), None)
    failed = trials[victim.number].datetime_complete.timestamp()
    ray.cancel(slow, force=True)  # the rerun would sleep in its own slow trial
    ray.get(other)
    return {"grace_s": args.grace, "kill_to_task_running_again_s": rerun.datetime_start.timestamp() - killed,
            "kill_to_trial_failed_s": failed - killed,
            "kill_to_retry_started_s": retry.datetime_start.timestamp() - killed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sleep", type=float, default=0.5, help="seconds per candidate")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--grace", type=int, default=10, help="storage.grace_period of the workers")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs the Ray head declares")
    args = p.parse_args()
    server = pg.start_server()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    head = ray_cluster.start_head(env, num_cpus=args.num_cpus)
    os.environ.update(head.env({}))  # before Ray is imported: its core reads the token once
    import ray

    folder = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        ray.init(address=head.address, logging_level="WARNING", log_to_driver=False)
        print("| workers | candidates | seconds | candidates/min | ratio to ideal | submit to first trial s | genomes twice |")
        print("|---|---|---|---|---|---|---|")
        for n in (int(x) for x in args.workers.split(",")):
            r = throughput(ray, server, n, args, folder)
            assert r["full"], r
            print(f"| {n} | {r['candidates']} | {r['seconds']:.1f} | {r['per_min']:.0f} | {r['ideal_ratio']:.2f} |"
                  f" {r['to_first_trial_s']:.1f} | {r['duplicate_genomes']} |", flush=True)
        print(killed_worker(ray, server, args, folder))
    finally:
        ray.shutdown()
        ray_cluster.stop_head(head)
        pg.stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
