"""One worker process on a shared study: the real AutoDiffusionPaperSampler, a pure-Python objective.

Used by tests/test_workers.py and experiments/bench_storage.py to run several workers on one
PostgreSQL or journal study without loading a diffusion model. The objective sleeps a fixed time
(standing in for generation + FID) and returns the distance of the genome to a known schedule.

    python tests/cheap_worker.py --storage URL --study NAME --population 8 --generations 4 --sleep 0.1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# The sampler imports neither torch nor autodiff_opt.arch, so a worker starts in about 1 s.
import optuna  # noqa: E402

from autodiff_opt.core.genome import Genome  # noqa: E402
from autodiff_opt.search.progress import SearchBudget  # noqa: E402
from autodiff_opt.search.evolution import AutoDiffusionPaperSampler, EvolutionConfig  # noqa: E402
from autodiff_opt.search.space import SearchSpace, genome_params, suggest_genome  # noqa: E402
from autodiff_opt.search.study import journal_storage, make_storage  # noqa: E402

SPACE = SearchSpace(num_steps=4, num_train_timesteps=1000)
TARGET = (900, 600, 300, 50)
ANCHOR = Genome((750, 500, 250, 0))
BASELINES = (Genome((999, 749, 499, 249)), Genome((800, 600, 400, 200)))


def evolution(population: int) -> EvolutionConfig:
    """The authors' proportions at a small population: half mutants, 30% crossovers, half of gen 0 random."""
    return EvolutionConfig(population=population, num_parents=max(2, population // 4), num_mutants=population // 2,
                           num_crossovers=(3 * population) // 10, init_random=population // 2)


def distance(genome: Genome) -> float:
    return float(sum(abs(a - b) for a, b in zip(genome.timesteps, TARGET)))


def open_storage(url: str, heartbeat: int, grace: int) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        return journal_storage(url[len("journal:"):], heartbeat or None, grace, max_retry=3)
    return make_storage(url, heartbeat or None, grace, max_retry=3)


class RendezvousSampler(AutoDiffusionPaperSampler):
    """The real sampler, paused after choosing its slot until `parties` workers have chosen one (at most
    `pause` s): the interleaving in which workers race for one slot, made certain for a test."""

    def __init__(self, population: int, rendezvous: Path, name: str, parties: int, pause: float,
                 lock_timeout: float | None) -> None:
        super().__init__(SPACE, evolution(population), anchor=ANCHOR, seed=0, lock_timeout=lock_timeout)
        self.rendezvous, self.name, self.parties, self.pause = rendezvous, name, parties, pause

    def _next_slot(self, trials):  # type: ignore[no-untyped-def]
        choice = super()._next_slot(trials)
        self.rendezvous.mkdir(parents=True, exist_ok=True)
        (self.rendezvous / self.name).touch()
        deadline = time.monotonic() + self.pause
        while len(list(self.rendezvous.iterdir())) < self.parties and time.monotonic() < deadline:
            time.sleep(0.01)
        return choice


def make_sampler(population: int, lock: bool, seed: int = 0, rendezvous: str | None = None, name: str = "",
                 pause: float = 4.0) -> AutoDiffusionPaperSampler:
    """The real sampler; `lock=False` decides without the study lock (the race it prevents)."""
    timeout = 120.0 if lock else None
    if rendezvous:
        return RendezvousSampler(population, Path(rendezvous), name, 2, pause, timeout)
    return AutoDiffusionPaperSampler(SPACE, evolution(population), anchor=ANCHOR, seed=seed, lock_timeout=timeout)


def create(storage: optuna.storages.BaseStorage, name: str, population: int) -> optuna.Study:
    """The study as the CLI's first worker leaves it: created, the heuristic schedules queued."""
    study = optuna.create_study(storage=storage, study_name=name, sampler=make_sampler(population, False),
                                direction="minimize", load_if_exists=True)
    for genome in BASELINES:
        study.enqueue_trial(genome_params(genome, SPACE), skip_if_exists=True)
    return study


def command(url: str, study: str, args: argparse.Namespace, *extra: str) -> list[str]:
    """This worker's command line for a launcher ({index} is the worker's index); ``args`` carries the benches'
    population, generations, sleep and grace."""
    return [sys.executable, str(Path(__file__).resolve()), "--storage", url, "--study", study, "--worker", "{index}",
            "--population", str(args.population), "--generations", str(args.generations), "--sleep", str(args.sleep),
            "--heartbeat", "1", "--grace", str(args.grace), *extra]


def wait_for_slow_trial(storage: optuna.storages.BaseStorage, study: str) -> optuna.trial.FrozenTrial:
    """The running trial marked slow (``--slow-trial``), once some worker has started it."""
    while True:
        time.sleep(0.05)
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
        except KeyError:  # the study is not created yet
            continue
        slow = next((t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("slow")), None)
        if slow is not None:
            return slow


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.1, help="seconds per candidate")
    p.add_argument("--lock", action=argparse.BooleanOptionalAction, default=True, help="the sampler's study lock")
    p.add_argument("--heartbeat", type=int, default=1, help="heartbeat interval in s (0: none)")
    p.add_argument("--grace", type=int, default=4, help="s without a beat before a trial is stale (> storage latency)")
    p.add_argument("--stop", choices=("budget", "complete"), default="budget",
                   help="budget: SearchBudget; complete: the runner's rule (stop once COMPLETE >= P*G)")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--slow-trial", type=int, default=-1, help="this worker's n-th trial (0-based) sleeps --slow-sleep")
    p.add_argument("--slow-sleep", type=float, default=60.0)
    p.add_argument("--max-trials", type=int, default=10_000, help="a bound on this worker's loop")
    p.add_argument("--ready", metavar="DIR", help="start optimizing once --parties workers are ready in DIR (max 60 s)")
    p.add_argument("--parties", type=int, default=1)
    p.add_argument("--ask-once", metavar="DIR", help="ask one trial, meeting another worker in DIR between the"
                   " sampler's read and write; print its generation, slot and genome")
    p.add_argument("--pause", type=float, default=4.0, help="--ask-once: wait at most this long for the other worker")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"worker {args.worker} %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    storage = open_storage(args.storage, args.heartbeat, args.grace)
    sampler = make_sampler(args.population, args.lock, rendezvous=args.ask_once, name=str(args.worker), pause=args.pause)
    study = optuna.load_study(study_name=args.study, storage=storage, sampler=sampler)
    if args.ask_once:
        trial = study.ask()
        attrs = study._storage.get_trial_system_attrs(trial._trial_id)
        print(json.dumps([attrs["autodiff:generation"], attrs["autodiff:slot"], attrs["autodiff:genome"]]), flush=True)
        return 0
    total = args.population * args.generations
    done = {"n": 0}

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("worker", args.worker)
        genome = suggest_genome(trial, SPACE)
        slow = done["n"] == args.slow_trial
        done["n"] += 1
        if slow:
            trial.set_user_attr("slow", True)
        time.sleep(args.slow_sleep if slow else args.sleep)
        return distance(genome)

    def stop_when_complete(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) >= total:
            study.stop()

    stop = SearchBudget(args.population, args.generations, poll=0.2, drain_timeout=args.drain_timeout) \
        if args.stop == "budget" else stop_when_complete
    if args.ready:  # workers start together, whatever their import times
        Path(args.ready).mkdir(parents=True, exist_ok=True)
        (Path(args.ready) / str(args.worker)).touch()
        deadline = time.monotonic() + 60
        while len(list(Path(args.ready).iterdir())) < args.parties and time.monotonic() < deadline:
            time.sleep(0.01)
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=args.max_trials, callbacks=[stop], catch=(Exception,), gc_after_trial=False)
    print(json.dumps({"worker": args.worker, "trials": done["n"], "seconds": round(time.perf_counter() - t0, 3),
                      "lock_wait": round(sampler.lock_wait_seconds, 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
