"""A search on a cluster's scheduler: SLURM (through submitit) or Ray. One command starts everything.

    python -m autodiff_opt.cluster slurm --workers 16 --storage postgresql://user@dbhost/autodiff \\
        --partition gpu --gpus-per-worker 1 --time 720 -- +experiment=imagenet64

It submits three things, chained by SLURM dependencies, and returns at once:

1. the study creator (one job): `python -m autodiff_opt.cluster seed <overrides>` checks the config,
   builds the model's caches and reference statistics, creates the study and queues the baselines and
   peers, once (``runner.prepare_study``), then exits;
2. the workers (a job array of N elements, `afterok` on 1): each is the real CLI
   (`python -m autodiff_opt ... final.enabled=false`) on the shared study, in <run dir>/worker-<i>;
   a requeued element (preemption, `scontrol requeue`, a time limit reached: submitit requeues it)
   starts again and joins the study; the trial it was evaluating is failed and queued again with
   the same genome by the heartbeat (another worker) or at once by the restarted worker on the same
   host (``recovery.fail_dead_local_trials``);
3. the final run (one job, `afterok` on 1 and `afterany` on 2): the CLI once more in <run dir>: it
   finishes what dead workers left, scores the best schedule and the baselines on fresh seeds once
   and writes the report there.

On Ray (`python -m autodiff_opt.cluster ray --workers N --storage URL [--address HOST:PORT] -- ...`) the
same three stages are Ray tasks (`ray_task` running a `CliJob`), the command waits for them as the job's
driver, and a worker whose process is killed is run again by Ray (`WorkerLost`, `--max-retries`); see
docs/workers.md.

`python -m autodiff_opt.cluster seed` is that first job's entry point (a Hydra app with the CLI's
config); it is not meant to be typed.
Exit status: 0 once submitted (the job ids and the report's path are printed), 2 for bad arguments or
an unreachable storage (nothing submitted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from autodiff_opt.utils import split_overrides
from autodiff_opt.workers import (UsageError, _key, check_args, compose_config, hydra_value, last_error_line,
                                  open_storage)

log = logging.getLogger("autodiff_opt.cluster")

SHARED_STORAGE = re.compile(r"^(postgresql|postgres|mysql)(\+\w+)?://.+")


# --- what runs inside the jobs -------------------------------------------------------------------------
class WorkerLost(RuntimeError):
    """The job's command was killed by a signal (the OOM killer, a node's shutdown, `kill -9`): Ray runs
    the task again (`retry_exceptions`); an exit status, a failure the command reported, is not retried."""


@dataclass
class CliJob:
    """One command run by a SLURM job or a Ray task (pickled by submitit or Ray): its output goes to the job's
    log (or to `log`, appended, when given); a non-zero exit fails the job. `checkpoint` makes submitit
    requeue it when the time limit comes (the study is the checkpoint: the rerun joins it again). `env`
    is added to the job's environment; `die_with_parent` kills the command when the process running the
    job dies (a Ray worker lost with its node: nothing is left evaluating)."""

    command: list[str]
    name: str
    log: str | None = None
    env: dict[str, str] | None = None
    die_with_parent: bool = False

    def __call__(self, index: int | None = None) -> int:
        command = [c.replace("{index}", str(index)) for c in self.command] if index is not None else self.command
        env = {**os.environ, **(self.env or {})}
        if index is not None:
            env["AUTODIFF_OPT_WORKER"] = str(index)
        if "OMP_NUM_THREADS" not in env and env.get("SLURM_CPUS_PER_TASK"):
            env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
        label = self.name if index is None else f"{self.name} {index}"
        header = f"[autodiff-opt] {label}: {' '.join(_redact_command(command))}"
        print(header, flush=True)
        preexec = _die_with_parent if self.die_with_parent else None
        if self.log is None:
            code = subprocess.run(command, env=env, preexec_fn=preexec).returncode
        else:
            Path(self.log).parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a", buffering=1) as out:
                started = f"[autodiff-opt] started {dt.datetime.now():%Y-%m-%d %H:%M:%S} on {os.uname().nodename}"
                out.write(f"{header}\n{started}\n")
                code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      preexec_fn=preexec).returncode
        if code < 0:
            raise WorkerLost(f"{label} was killed by {signal.Signals(-code).name}")
        if code != 0:
            where = f"its log: {self.log}" if self.log else "its output is above"
            raise RuntimeError(f"{label} exited with status {code} ({where})")
        return code

    def checkpoint(self, index: int | None = None) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, index) if index is not None else \
            submitit.helpers.DelayedSubmission(self)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _redact_command(command: Sequence[str]) -> list[str]:
    from autodiff_opt.search.study import _redact

    return [f"storage.url={_redact(c.split('=', 1)[1].strip(chr(39)))}" if c.startswith("storage.url=") else c
            for c in command]


# --- the plan: commands and SLURM parameters -------------------------------------------------------------
@dataclass
class ClusterPlan:
    url: str
    study_name: str
    run_dir: Path
    log_dir: Path
    seed_command: list[str]
    worker_command: list[str]  # "{index}" stands for the array index
    final_command: list[str]
    workers: int


def make_plan(args: argparse.Namespace, overrides: list[str], cfg: Any, run_dir: Path,
              logs: str = "slurm") -> ClusterPlan:
    url = args.storage
    keys = {_key(o) for o in overrides}
    common = [*overrides, f"storage.url={hydra_value(url)}"]
    if "progress" not in keys:
        common.append("progress=false")  # a progress bar in a batch log is noise
    search = [o for o in common if _key(o) != "final.enabled"]
    python = sys.executable
    return ClusterPlan(
        url=url, study_name=str(cfg.storage.study_name), run_dir=run_dir, log_dir=run_dir / logs,
        seed_command=[python, "-m", "autodiff_opt.cluster", "seed", *search, "final.enabled=false",
                      f"hydra.run.dir={hydra_value(str(run_dir / 'seed'))}"],
        worker_command=[python, "-m", "autodiff_opt", *search, "final.enabled=false",
                        f"hydra.run.dir={hydra_value(str(run_dir / 'worker-{index}'))}"],
        final_command=[python, "-m", "autodiff_opt", *common, f"hydra.run.dir={hydra_value(str(run_dir))}"],
        workers=args.workers)


def slurm_parameters(args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for one job of the search (one task, `gpus` GPUs)."""
    params: dict[str, Any] = {"time": args.time, "nodes": 1, "ntasks_per_node": 1, "stderr_to_stdout": True,
                              "signal_delay_s": args.signal_delay}
    if gpus:
        params["gpus_per_node"] = gpus
    for name in ("partition", "account", "qos", "mem", "constraint"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    if args.cpus_per_worker:
        params["cpus_per_task"] = args.cpus_per_worker
    return params


def submit(plan: ClusterPlan, args: argparse.Namespace) -> dict[str, str]:
    """sbatch the three stages through submitit; returns their job ids (seed, workers, final)."""
    import submitit

    plan.log_dir.mkdir(parents=True, exist_ok=True)
    params = slurm_parameters(args, args.gpus_per_worker)

    def executor(name: str, **extra: Any) -> submitit.SlurmExecutor:
        ex = submitit.SlurmExecutor(folder=plan.log_dir, max_num_timeout=args.max_requeues)
        ex.update_parameters(job_name=f"autodiff-{name}", **params, **extra)
        return ex

    no_orphans = {"kill-on-invalid-dep": "yes"}  # a failed study creator cancels the rest
    seed = executor("seed").submit(CliJob(plan.seed_command, "study creator"))
    array_ex = executor("worker", dependency=f"afterok:{seed.job_id}", array_parallelism=plan.workers,
                        additional_parameters={**no_orphans, "requeue": True})
    workers = array_ex.map_array(CliJob(plan.worker_command, "worker"), list(range(plan.workers)))
    array_id = workers[0].job_id.split("_", 1)[0]
    final = executor("final", dependency=f"afterok:{seed.job_id},afterany:{array_id}",
                     additional_parameters=no_orphans).submit(CliJob(plan.final_command, "final run"))
    return {"seed": seed.job_id, "workers": array_id, "final": final.job_id}


# --- the command line -------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, overrides = split_overrides(list(argv))
    parser = argparse.ArgumentParser(prog="python -m autodiff_opt.cluster",
                                     description="Run a search on a cluster's scheduler; everything after `--`"
                                                 " is passed to every job as Hydra overrides.")
    sub = parser.add_subparsers(dest="engine", required=True)
    slurm = sub.add_parser("slurm", help="submit the study creator, a job array of workers and the final run")
    slurm.add_argument("--workers", type=int, required=True, help="number of worker jobs (array elements)")
    slurm.add_argument("--storage", required=True, help="postgresql://user@host:port/db that every node reaches")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--qos", default=None)
    slurm.add_argument("--constraint", default=None)
    slurm.add_argument("--mem", default=None, help="memory per job, e.g. 32G")
    slurm.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs per job (0: CPU jobs)")
    slurm.add_argument("--cpus-per-worker", type=int, default=None, help="CPUs per job (default: the partition's)")
    slurm.add_argument("--time", type=int, default=24 * 60, help="time limit per job in minutes (a worker that"
                       " reaches it is requeued and joins the study again)")
    slurm.add_argument("--max-requeues", type=int, default=3, help="how often a timed-out job is requeued")
    slurm.add_argument("--signal-delay", type=int, default=90, help="s before the time limit at which submitit"
                       " requeues a job")
    slurm.add_argument("--dry-run", action="store_true", help="print the commands and the jobs' settings, submit nothing")
    ray = sub.add_parser("ray", help="run the study creator, N worker tasks and the final run on a Ray cluster")
    ray.add_argument("--workers", type=int, required=True, help="number of worker tasks")
    ray.add_argument("--storage", required=True, help="postgresql://user@host:port/db that every node reaches"
                     " (a local cluster also takes journal:/path/file.log)")
    ray.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                     help="an existing cluster's head, host:port (default: $RAY_ADDRESS, else a new local cluster)")
    ray.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per task (default: 1 when the"
                     " cluster has GPUs, else 0); fractions share a GPU")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per task (what a CPU-only cluster"
                     " schedules on: give each worker as many cores as its evaluation uses)")
    ray.add_argument("--max-retries", type=int, default=3, help="how often Ray runs a lost task again")
    ray.add_argument("--dry-run", action="store_true", help="print the commands, connect to nothing")
    args = parser.parse_args(argv)
    return args, overrides


def check(args: argparse.Namespace, overrides: list[str]) -> tuple[list[str], Path | None]:
    shared = args.engine == "slurm" or bool(getattr(args, "address", None))
    if shared and not SHARED_STORAGE.match(args.storage):
        raise UsageError(f"--storage={args.storage}: the workers run on several machines: use a database server"
                         " every node reaches, postgresql://user@host:port/db")
    gpus = args.gpus_per_worker
    if (gpus is not None and gpus < 0) or (args.cpus_per_worker is not None and args.cpus_per_worker <= 0):
        raise UsageError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    if args.engine == "slurm" and args.time < 1:
        raise UsageError(f"--time={args.time}: give the time limit per job in minutes (>= 1)")
    if args.engine == "ray" and args.max_retries < 0:
        raise UsageError(f"--max-retries={args.max_retries}: give 0 or more")
    args.devices = ""
    _, kept, run_dir = check_args(args, overrides)
    if gpus and _device(kept) == "cpu":
        raise UsageError("device=cpu with GPU jobs: pass --gpus-per-worker 0 for CPU jobs")
    return kept, run_dir


def _device(overrides: list[str]) -> str | None:
    given = [o.split("=", 1)[1] for o in overrides if _key(o) == "device"]
    return given[-1] if given else None


def _print_plan(plan: ClusterPlan, args: argparse.Namespace) -> None:
    print(f"# SLURM settings per job: {slurm_parameters(args, args.gpus_per_worker)}")
    print("# study creator\n" + " ".join(_redact_command(plan.seed_command)))
    print(f"# workers 0..{plan.workers - 1} (array)\n" + " ".join(_redact_command(plan.worker_command)))
    print("# final run\n" + " ".join(_redact_command(plan.final_command)))


def slurm_main(args: argparse.Namespace, overrides: list[str]) -> int:
    from autodiff_opt.search.study import _redact

    overrides, run_dir = check(args, overrides)
    cfg = compose_config(overrides, args.storage)
    base = (run_dir or Path("outputs") / "cluster" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    plan = make_plan(args, overrides, cfg, base)
    if args.dry_run:
        _print_plan(plan, args)
        return 0
    open_storage(args.storage, cfg)  # unreachable or wrong credentials: refused before anything is submitted
    try:
        ids = submit(plan, args)
    except Exception as err:  # sbatch refused (unknown partition, no SLURM here): one line, nothing left behind
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UsageError(f"sbatch refused the jobs ({first}): check --partition/--account/--qos and that"
                         " this machine can submit SLURM jobs") from err
    print(f"study {plan.study_name} in {_redact(plan.url)}")
    print(f"study creator: job {ids['seed']}; workers: job array {ids['workers']} ({plan.workers} elements);"
          f" final run: job {ids['final']}")
    print(f"job logs: {plan.log_dir}")
    print(f"report (once job {ids['final']} ends): {plan.run_dir / 'report.html'}"
          f" (and final.csv, final.md, best_schedule.json)")
    print(f"watch: squeue -j {ids['seed']},{ids['workers']},{ids['final']}")
    return 0


# --- Ray ----------------------------------------------------------------------------------------------------
FORWARDED_ENV = ("AUTODIFF_OPT_", "HF_")  # the driver's settings the tasks' commands see (cache folder, offline hub)


def ray_task(job: CliJob, index: int | None = None) -> int:
    """What a Ray task runs: the job's command with the node's own Python, killed if the task's process dies."""
    return replace(job, command=[sys.executable, *job.command[1:]], die_with_parent=True)(index)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise UsageError("Ray is not installed: pip install 'autodiff-opt[ray]'") from err
    return ray


def connect_ray(ray: Any, address: str | None) -> None:
    """Join the cluster at `address`, or start a local one on 127.0.0.1 (no dashboard) for this command."""
    if address and not _reachable(address):
        raise UsageError(f"cannot reach the Ray cluster at {address}: nothing answers there; check --address"
                         " (host:port of `ray start --head`) or $RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING)
    except Exception as err:  # ConnectionError, a timeout: one line, nothing started
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot reach the Ray cluster at {address or '(local)'}: {first}; check --address"
                         " (host:port of `ray start --head`) or $RAY_ADDRESS") from err


def _reachable(address: str, timeout: float = 10.0) -> bool:
    """Whether host:port accepts a TCP connection (ray.init would retry an unreachable head for minutes)."""
    import socket

    found = re.match(r"^(?:ray://)?\[?([^\]]+?)\]?:(\d+)$", address)
    if not found:
        return True  # "auto" and the like: ray.init finds the cluster itself
    try:
        with socket.create_connection((found.group(1), int(found.group(2))), timeout=timeout):
            return True
    except OSError:
        return False


def task_resources(args: argparse.Namespace, overrides: list[str], cluster: dict[str, float]) -> dict[str, float]:
    """num_gpus and num_cpus of every task: --gpus-per-worker, else 1 GPU when the cluster has any (and the
    overrides do not ask for device=cpu)."""
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 and _device(overrides) != "cpu" else 0.0
    if gpus > cluster.get("GPU", 0) or args.cpus_per_worker > cluster.get("CPU", 0):
        raise UsageError(f"each task asks for {gpus:g} GPU(s) and {args.cpus_per_worker:g} CPU(s), more than the"
                         f" cluster has ({cluster.get('GPU', 0):g} GPUs, {cluster.get('CPU', 0):g} CPUs): lower"
                         " --gpus-per-worker / --cpus-per-worker")
    return {"num_gpus": gpus, "num_cpus": args.cpus_per_worker}


def _task_error(err: BaseException) -> str:
    """The last line of a failed task's error (Ray wraps it in its traceback)."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def run_on_ray(ray: Any, plan: ClusterPlan, resources: dict[str, float], max_retries: int) -> int:
    """The study creator, then the N workers, then (unless every worker failed) the final run, as Ray tasks."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    remote = ray.remote(ray_task)

    def submit(command: list[str], name: str, log: str, index: int | None = None) -> Any:
        job = CliJob(command, name, log=str(plan.log_dir / log), env=env)
        return remote.options(name=f"autodiff-{name.replace(' ', '-')}", max_retries=max_retries,
                              retry_exceptions=[WorkerLost], **resources).remote(job, index)

    def once(command: list[str], name: str, log: str) -> bool:
        """The study creator or the final run: one task; False (the error printed) when it failed."""
        try:
            ray.get(submit(command, name, log))
            return True
        except ray.exceptions.RayError as err:
            print(f"error: the {name} failed ({_task_error(err)}): {last_error_line(plan.log_dir / log)}", file=sys.stderr)
            return False

    if not once(plan.seed_command, "study creator", "seed.log"):
        return 1
    log.info("study %s ready; starting %d worker task(s)", plan.study_name, plan.workers)
    workers = [submit(plan.worker_command, "worker", f"worker-{i}.log", i) for i in range(plan.workers)]
    failed = []
    for i, ref in enumerate(workers):
        try:
            ray.get(ref)
            log.info("worker %d done", i)
        except ray.exceptions.RayError as err:
            failed.append(i)
            log.warning("worker %d failed (%s): %s", i, _task_error(err),
                        last_error_line(plan.log_dir / f"worker-{i}.log"))
    if len(failed) == plan.workers:
        print(f"error: every worker failed; worker 0 says: {last_error_line(plan.log_dir / 'worker-0.log')}",
              file=sys.stderr)
        return 1
    log.info("final run (evaluation on fresh seeds and report, once) in %s", plan.run_dir)
    return 0 if once(plan.final_command, "final run", "final.log") else 1


def ray_main(args: argparse.Namespace, overrides: list[str]) -> int:
    from autodiff_opt.search.study import _redact

    overrides, run_dir = check(args, overrides)
    cfg = compose_config(overrides, args.storage)
    base = (run_dir or Path("outputs") / "cluster" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    plan = make_plan(args, overrides, cfg, base, logs="ray")
    if args.dry_run:
        print("# study creator\n" + " ".join(_redact_command(plan.seed_command)))
        print(f"# workers 0..{plan.workers - 1} (Ray tasks)\n" + " ".join(_redact_command(plan.worker_command)))
        print("# final run\n" + " ".join(_redact_command(plan.final_command)))
        return 0
    ray = import_ray()
    storage = open_storage(args.storage, cfg)  # unreachable or wrong credentials: refused before anything starts
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()  # the driver waits for hours: it holds no connection meanwhile
    del storage
    connect_ray(ray, args.address)
    try:
        resources = task_resources(args, overrides, ray.cluster_resources())
        print(f"study {plan.study_name} in {_redact(plan.url)}")
        print(f"Ray cluster {args.address or '(local, 127.0.0.1)'}: study creator, {plan.workers} worker task(s),"
              f" final run; each {resources['num_gpus']:g} GPU(s), {resources['num_cpus']:g} CPU(s),"
              f" up to {args.max_retries} retries")
        print(f"task logs: {plan.log_dir}")
        print(f"report (once the final run ends): {plan.run_dir / 'report.html'}"
              " (and final.csv, final.md, best_schedule.json)", flush=True)
        return run_on_ray(ray, plan, resources, args.max_retries)
    except KeyboardInterrupt:
        log.warning("interrupted: the tasks are cancelled; rerun the same command to resume the study")
        return 130
    finally:
        ray.shutdown()


def seed_main(overrides: list[str]) -> int:
    """The study creator's job: a Hydra app with the CLI's config that stops after seeding the study."""
    import hydra
    from omegaconf import DictConfig

    from autodiff_opt import CONFIG_DIR
    from autodiff_opt.config import register_configs

    register_configs()  # the structured defaults the YAML files extend
    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
    def _seed(cfg: DictConfig) -> None:
        from autodiff_opt.core.errors import USER_ERRORS
        from autodiff_opt.runner import prepare_study

        try:
            study, _ = prepare_study(cfg)
        except USER_ERRORS as err:
            log.error("%s", err)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        waiting = len([t for t in study.trials if t.state.name == "WAITING"])
        log.info("study %s ready: %d trial(s) queued (baselines, peers), %d in all", study.study_name, waiting,
                 len(study.trials))

    sys.argv = [sys.argv[0], *overrides]
    _seed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["seed"]:
        return seed_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        args, overrides = parse_args(argv)
        return ray_main(args, overrides) if args.engine == "ray" else slurm_main(args, overrides)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # Ray and submitit pickle CliJob by reference: the module's own name, not __main__
    from autodiff_opt.cluster import main as _main

    sys.exit(_main())
