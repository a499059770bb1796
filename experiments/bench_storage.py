"""Storage benchmark for many workers: sampler+storage overhead per trial, scaling with workers, races.

    .venv/bin/python experiments/bench_storage.py              # starts a throwaway PostgreSQL server
    .venv/bin/python experiments/bench_storage.py --pg-url postgresql://user@host/db --trials 1000

(a) Overhead per trial with a no-op objective, `--trials` trials in one process, the storage opened as
    the CLI opens it (heartbeat every 5 s): SQLite file, PostgreSQL, journal file, in memory for reference. The
    sampler reads every trial at each ask, so the cost grows with the study: first and last 10% shown.
(b) Throughput of 1, 2, 4 worker processes (tests/cheap_worker.py: the real AutoDiffusionPaperSampler, an
    objective that sleeps `--sleep` s) on PostgreSQL: candidates per minute and the ratio to ideal
    scaling (N workers x 60/sleep). Workers start together after their imports (a file barrier).
(c) Races across workers: genomes evaluated twice, slots taken twice, candidates past the last
    generation, for the sampler without and with its study lock, with that sleep and with 0.01 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

import cheap_worker as cw  # noqa: E402  (loads the sampler without torch)
import optuna  # noqa: E402

from audit import audit  # noqa: E402  (tests/audit.py)
from autodiff_opt.search.space import suggest_genome  # noqa: E402
from autodiff_opt.search.study import make_storage  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def new_database(server_url: str) -> str:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"bench_{uuid.uuid4().hex[:10]}"
    con = psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                          dbname=url.database or "postgres", autocommit=True)
    with con.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    con.close()
    return str(url.set(database=name).render_as_string(hide_password=False))


def overhead(kind: str, url: str | None, trials: int, population: int, locked: bool) -> dict[str, float]:
    if kind == "memory":
        storage = optuna.storages.InMemoryStorage()
    else:  # as the CLI opens it: heartbeat every 5 s (RDB, and journal files through HeartbeatJournalStorage)
        storage = make_storage(url, heartbeat_interval=5, grace_period=20)
    sampler = cw.make_sampler(population, lock=locked)
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=f"bench-{kind}")
    times: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        return cw.distance(suggest_genome(trial, cw.SPACE))

    def clock(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        times.append(time.perf_counter())

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials, callbacks=[clock], gc_after_trial=False)
    steps = [b - a for a, b in zip([t0, *times[:-1]], times)]
    tenth = max(1, trials // 10)
    a = audit(study)
    return {"total_s": times[-1] - t0, "ms_per_trial": 1000 * (times[-1] - t0) / trials,
            "first10_ms": 1000 * sum(steps[:tenth]) / tenth, "last10_ms": 1000 * sum(steps[-tenth:]) / tenth,
            "duplicates": a.duplicate_genomes}


def run_workers(url: str, workers: int, population: int, generations: int, sleep: float, locked: bool,
                tmp: Path) -> dict[str, float]:
    study = cw.create(cw.open_storage(url, 0, 20), "s", population)
    ready = tmp / f"ready-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "cheap_worker.py"), "--storage", url, "--study", "s",
                               "--worker", str(i), "--population", str(population), "--generations", str(generations),
                               "--sleep", str(sleep), "--heartbeat", "5", "--grace", "20", "--ready", str(ready),
                               "--parties", str(workers), "--lock" if locked else "--no-lock"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    a = audit(optuna.load_study(study_name="s", storage=cw.open_storage(url, 0, 20)), generations)
    seconds = max(r["seconds"] for r in results)
    done = sum(a.complete_by_generation.values())
    rate = 60 * done / seconds
    return {"workers": workers, "candidates": done, "seconds": seconds, "per_min": rate,
            "ideal_ratio": rate / (workers * 60 / sleep), "duplicate_genomes": a.duplicate_genomes,
            "duplicate_slots": a.duplicate_slots, "overshoot": a.overshoot,
            "generations_exact": a.generations_complete(population, generations),
            "lock_wait_s": sum(r["lock_wait"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg-url", help="a PostgreSQL server URL (a new database is created per run); default: a throwaway server")
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--population", type=int, default=50)
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--scaling-population", type=int, default=16)
    p.add_argument("--scaling-generations", type=int, default=5)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    p.add_argument("--storages", default="memory,sqlite,postgresql,journal", help="part (a): which storages")
    args = p.parse_args()
    skip = set(args.skip.split(","))

    server = None
    if not args.pg_url:
        import pg  # tests/pg.py

        server = pg.start_server(durable=True)  # fsync on: the figures of a real server
        args.pg_url = pg.url(server)
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    print(f"# bench_storage  python {platform.python_version()}, optuna {optuna.__version__}, {os.cpu_count()} CPUs,"
          f" load {os.getloadavg()[0]:.1f}")
    try:
        if "a" not in skip:
            print(f"\n## (a) sampler + storage overhead, {args.trials} trials, no-op objective, population {args.population}")
            print("| storage | sampler | total s | ms/trial | first 10% ms/trial | last 10% ms/trial |")
            print("|---|---|---|---|---|---|")
            for kind in args.storages.split(","):
                for locked in (False, True):
                    url = {"sqlite": f"sqlite:///{tmp / uuid.uuid4().hex}.db", "journal": f"journal:{tmp / uuid.uuid4().hex}.log",
                           "postgresql": new_database(args.pg_url) if kind == "postgresql" else None}.get(kind)
                    r = overhead(kind, url, args.trials, args.population, locked)
                    print(f"| {kind} | {'locked' if locked else 'bare'} | {r['total_s']:.1f} | {r['ms_per_trial']:.1f}"
                          f" | {r['first10_ms']:.1f} | {r['last10_ms']:.1f} |", flush=True)
        if "b" not in skip:
            pop, gens = args.scaling_population, args.scaling_generations
            print(f"\n## (b) throughput on PostgreSQL, objective sleeps {args.sleep}s, {pop}x{gens} candidates,"
                  " the sampler with its study lock")
            print("| workers | candidates | seconds | candidates/min | ratio to ideal | lock wait s (all workers) |")
            print("|---|---|---|---|---|---|")
            for n in [int(x) for x in args.workers.split(",")]:
                r = run_workers(new_database(args.pg_url), n, pop, gens, args.sleep, True, tmp)
                print(f"| {n} | {r['candidates']} | {r['seconds']:.1f} | {r['per_min']:.0f} | {r['ideal_ratio']:.2f}"
                      f" | {r['lock_wait_s']:.2f} |", flush=True)
        if "c" not in skip:
            pop, gens = args.scaling_population, args.scaling_generations
            n = max(int(x) for x in args.workers.split(","))
            print(f"\n## (c) races with {n} workers on PostgreSQL, {pop}x{gens} candidates")
            print("| sampler | sleep s | duplicate genomes | duplicate slots | past last generation | generations exact |")
            print("|---|---|---|---|---|---|")
            for sleep in (args.sleep, 0.01):
                for locked in (False, True):
                    r = run_workers(new_database(args.pg_url), n, pop, gens, sleep, locked, tmp)
                    print(f"| {'locked' if locked else 'bare'} | {sleep} | {r['duplicate_genomes']} | {r['duplicate_slots']}"
                          f" | {r['overshoot']} | {r['generations_exact']} |", flush=True)
    finally:
        if server is not None:
            pg.stop_server(server)


if __name__ == "__main__":
    main()
