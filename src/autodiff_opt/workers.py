"""N local worker processes on one study, then the final evaluation and report once.

    python -m autodiff_opt.workers --workers 4 --storage postgresql://user@host/db \\
        --devices cuda:0,cuda:1,cuda:2,cuda:3 -- +experiment=cifar10 search.num_steps=4

Each worker is the real CLI (`python -m autodiff_opt`) with `storage.url=URL`, its own `device=` when
--devices is given (round robin), `final.enabled=false`, `progress=false` and its own Hydra run
directory (<run dir>/worker-<i>, output in <run dir>/worker-<i>.log). The first worker starts alone
until it has created the study and queued the baselines (so reference statistics and converted
models are built once, and the baselines are queued once); then the others join. When all workers
have exited, one more CLI run in <run dir> finds the search done (or finishes what dead workers
left), runs the final evaluation once and writes the report.

Exit status: 2 for bad arguments or an unreachable storage (nothing started), the first worker's
status when every worker failed (no final run), else the final run's status. Ctrl-C stops the
workers (their running trials are marked failed and re-queued on resume) and exits 130.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence
from autodiff_opt.utils import split_overrides
from autodiff_opt.core.keys import SEEDED_ATTR

log = logging.getLogger("autodiff_opt.workers")

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_/\-+.%*@?|:]*$")


class UsageError(ValueError):
    """Bad arguments: one line on stderr, exit 2, nothing started."""


@dataclass
class Worker:
    index: int
    device: str | None
    run_dir: Path
    log_path: Path
    command: list[str]
    proc: subprocess.Popen | None = None
    log_file: IO[str] | None = None
    returncode: int | None = None
    started: float = 0.0
    ended: float = 0.0

    def describe(self) -> str:
        code = self.returncode
        what = "running" if code is None else "exit 0" if code == 0 else \
            f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        device = f" on {self.device}" if self.device else ""
        return f"worker {self.index}{device}: {what} after {self.ended - self.started:.0f}s (log: {self.log_path})"


@dataclass
class Plan:
    url: str
    study_name: str
    overrides: list[str]  # the user's, without hydra.run.dir
    base_dir: Path
    workers: list[Worker] = field(default_factory=list)
    final_command: list[str] = field(default_factory=list)


def hydra_value(value: str) -> str:
    """A value as a Hydra override accepts it: quoted when it has characters Hydra would parse."""
    if _SAFE_VALUE.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, overrides = split_overrides(list(argv))
    parser = argparse.ArgumentParser(
        prog="python -m autodiff_opt.workers",
        description="Run N local workers of `python -m autodiff_opt` on one study, then the final evaluation once.",
        epilog="Everything after `--` is passed to every worker as Hydra overrides.")
    parser.add_argument("--workers", type=int, required=True, help="number of worker processes (>= 1)")
    parser.add_argument("--storage", required=True,
                        help="shared storage: postgresql://user@host/db (several machines), journal:/path/file.log"
                             " or sqlite:///file.db (one machine)")
    parser.add_argument("--devices", default=os.environ.get("AUTODIFF_OPT_DEVICES", ""),
                        help="comma-separated devices given to workers round robin, e.g. cuda:0,cuda:1"
                             " (default: $AUTODIFF_OPT_DEVICES, for `make workers`)")
    parser.add_argument("--start-timeout", type=float, default=6 * 3600.0,
                        help="seconds to wait for the first worker to create the study before giving up")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    return args, overrides


def check_args(args: argparse.Namespace, overrides: list[str]) -> tuple[list[str], list[str], Path | None]:
    """Validated (devices, user overrides without hydra.run.dir, run dir given by the user)."""
    if args.workers < 1:
        raise UsageError(f"--workers={args.workers}: give at least 1 worker")
    url = args.storage
    if not re.match(r"^(journal:.+|sqlite:///.+|(postgresql|postgres|mysql)(\+\w+)?://.+)$", url) or ":memory:" in url:
        raise UsageError(f"--storage={url}: use postgresql://user@host:port/db, journal:/path/to/file.log or"
                         " sqlite:///path/to/file.db (an in-memory storage cannot be shared by processes)")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for device in devices:
        if not re.match(r"^(cpu|cuda(:\d+)?|mps|auto)$", device):
            raise UsageError(f"--devices: {device!r} is not a device; use e.g. cuda:0,cuda:1 or cpu")
    run_dir: Path | None = None
    kept = []
    for override in overrides:
        key = _key(override)
        if key == "storage.url":
            raise UsageError("pass the storage with --storage URL, not as storage.url=... after `--`")
        if key == "device" and devices:
            raise UsageError("give devices either with --devices or as device=... after `--`, not both")
        if key == "hydra.run.dir":
            run_dir = Path(override.split("=", 1)[1].strip("'\""))
            continue
        if key.startswith("hydra.sweep") or override.startswith(("-m", "--multirun")):
            raise UsageError(f"{override}: multirun is not supported by the worker launcher")
        kept.append(override)
    if url.startswith("sqlite") and args.workers > 1:
        log.warning("SQLite serialises writers and is meant for one process: prefer journal:/path for several"
                    " local workers, postgresql:// for several machines")
    return devices, kept, run_dir


def compose_config(overrides: list[str], url: str):
    """The config every worker will see (validates the overrides before anything starts)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from autodiff_opt import CONFIG_DIR
    from autodiff_opt.config import register_configs

    register_configs()  # the structured defaults (base_config, base_storage, ...) the YAML files extend
    usable = [o for o in overrides if not _key(o).startswith("hydra")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=[*usable, f"storage.url={hydra_value(url)}"])
    except Exception as err:  # Hydra's parse/composition errors: the user's overrides are wrong
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"the overrides after `--` do not compose: {first}") from err
    finally:
        GlobalHydra.instance().clear()


def open_storage(url: str, cfg) -> "optuna.storages.BaseStorage":  # noqa: F821
    from autodiff_opt.search.study import StudyError, make_storage

    try:
        return make_storage(url, cfg.storage.heartbeat_interval, cfg.storage.grace_period,
                            cfg.storage.max_retry)
    except StudyError as err:
        raise UsageError(str(err)) from err


def plan(args: argparse.Namespace, overrides: list[str], cfg, base_dir: Path, devices: list[str]) -> Plan:
    url = args.storage
    user_keys = {_key(o) for o in overrides}
    common = [*overrides, f"storage.url={hydra_value(url)}"]
    if "progress" not in user_keys:
        common.append("progress=false")  # N progress bars in one terminal garble each other
    from autodiff_opt.runner import study_name_of

    result = Plan(url, study_name_of(cfg), overrides, base_dir)
    for i in range(args.workers):
        device = devices[i % len(devices)] if devices else None
        run_dir = base_dir / f"worker-{i}"
        extra = [f"device={device}"] if device else []
        command = [sys.executable, "-m", "autodiff_opt", *[o for o in common if _key(o) != "final.enabled"], *extra,
                   "final.enabled=false", f"hydra.run.dir={hydra_value(str(run_dir))}"]
        result.workers.append(Worker(i, device, run_dir, base_dir / f"worker-{i}.log", command))
    final_extra = [f"device={devices[0]}"] if devices else []
    result.final_command = [sys.executable, "-m", "autodiff_opt", *common, *final_extra,
                            f"hydra.run.dir={hydra_value(str(base_dir))}"]
    return result


def _worker_env(index: int, num_workers: int, on_cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["AUTODIFF_OPT_WORKER"] = str(index)
    if on_cpu and "OMP_NUM_THREADS" not in env:  # N CPU workers share the cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_workers))
    return env


def start(worker: Worker, num_workers: int) -> None:
    worker.log_path.parent.mkdir(parents=True, exist_ok=True)
    worker.log_file = open(worker.log_path, "a", buffering=1)
    worker.log_file.write(f"$ {' '.join(worker.command)}\n")
    on_cpu = worker.device is None or worker.device == "cpu"
    worker.proc = subprocess.Popen(worker.command, stdout=worker.log_file, stderr=subprocess.STDOUT,
                                   env=_worker_env(worker.index, num_workers, on_cpu), start_new_session=True)
    worker.started = time.monotonic()
    log.info("worker %d started (pid %d%s), log %s", worker.index, worker.proc.pid,
             f", {worker.device}" if worker.device else "", worker.log_path)


def write_roster(p: "Plan") -> None:
    """<run dir>/workers.json: index, pid, device and log of every started worker (to watch or stop one)."""
    import json

    roster = [{"worker": w.index, "pid": w.proc.pid, "device": w.device, "log": str(w.log_path)}
              for w in p.workers if w.proc is not None]
    tmp = p.base_dir / "workers.json.tmp"
    tmp.write_text(json.dumps(roster, indent=1))
    tmp.replace(p.base_dir / "workers.json")


def poll(worker: Worker) -> bool:
    """True once the worker has exited (and records how)."""
    if worker.proc is None or worker.returncode is not None:
        return worker.returncode is not None
    code = worker.proc.poll()
    if code is None:
        return False
    worker.returncode, worker.ended = code, time.monotonic()
    if worker.log_file:
        worker.log_file.close()
    (log.info if code == 0 else log.warning)("%s", worker.describe())
    return True


def study_seeded(storage, study_name: str) -> bool:
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return False
    return bool(storage.get_study_system_attrs(study_id).get(SEEDED_ATTR))


def last_error_line(path: Path) -> str:
    """The worker's own error ('error: ...' and its indented continuation lines), else its log's last line."""
    try:
        lines = [line.rstrip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if not starts:
        return lines[-1].strip() if lines else ""
    i = starts[-1]
    block = [lines[i][len("error: "):]]
    block += [line.strip() for line in lines[i + 1:] if line.startswith((" ", "\t"))]
    return " / ".join(block)


class _Stop(Exception):
    pass


def _interrupt(workers: list[Worker], grace: float = 30.0) -> None:
    """SIGINT to every live worker (Optuna marks its running trial failed), SIGKILL after `grace` s."""
    live = [w for w in workers if w.proc is not None and not poll(w)]
    for w in live:
        try:
            os.killpg(w.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(poll(w) for w in live):
        time.sleep(0.2)
    for w in live:
        if not poll(w):
            log.warning("worker %d did not stop in %.0fs: killing it", w.index, grace)
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait(timeout=30)
            poll(w)


def run_workers(p: Plan, storage, start_timeout: float, interval: float = 1.0) -> None:
    """Start worker 0, wait until the study is seeded (or worker 0 ends), start the rest, wait for all."""
    first, rest = p.workers[0], p.workers[1:]
    start(first, len(p.workers))
    write_roster(p)
    if rest and not study_seeded(storage, p.study_name):
        log.info("waiting for worker 0 to create study %s and queue the baselines", p.study_name)
        deadline = time.monotonic() + start_timeout
        while not study_seeded(storage, p.study_name):
            if poll(first):
                if first.returncode != 0:
                    return  # it failed before the study existed: the others would fail the same way
                break  # it finished everything alone: the others find the search done
            if time.monotonic() > deadline:
                raise UsageError(f"study {p.study_name} was not created within --start-timeout={start_timeout:.0f}s;"
                                 f" see {first.log_path}")
            time.sleep(interval)
    for w in rest:
        start(w, len(p.workers))
    write_roster(p)
    while not all(poll(w) for w in p.workers):
        time.sleep(interval)


def recover_orphans(url: str, storage, study_name: str) -> None:
    """A journal file has no heartbeat in the CLI: once every local worker is gone, RUNNING trials are orphans."""
    if not url.startswith("journal:"):
        return  # RDB storages: the final run fails stale trials by heartbeat and retries them
    import optuna

    from autodiff_opt.search.recovery import fail_orphaned_trials

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return
    fail_orphaned_trials(study)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        devices, overrides, run_dir = check_args(args, overrides)
        cfg = compose_config(overrides, args.storage)
        base_dir = run_dir or Path("outputs") / "workers" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        p = plan(args, overrides, cfg, base_dir.resolve(), devices)
        if args.dry_run:
            for w in p.workers:
                print(" ".join(w.command))
            print(" ".join(p.final_command))
            return 0
        storage = open_storage(args.storage, cfg)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("%d worker(s) on study %s in %s; run directory %s", args.workers, p.study_name, args.storage, p.base_dir)

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_workers(p, storage, args.start_timeout)
    except _Stop as stop:
        log.warning("%s: stopping the workers; rerun the same command to resume the study", stop)
        _interrupt(p.workers)
        return 130
    except UsageError as err:
        _interrupt(p.workers)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    log.info("workers done:\n  %s", "\n  ".join(w.describe() for w in p.workers if w.proc is not None))
    started = [w for w in p.workers if w.proc is not None]
    failed = [w for w in started if w.returncode != 0]
    for w in failed:
        log.warning("worker %d: %s", w.index, last_error_line(w.log_path))
    if len(failed) == len(started):
        code = next((w.returncode for w in failed if w.returncode == 2), failed[0].returncode)
        print(f"error: {'every worker' if len(started) > 1 else 'worker 0'} failed; worker 0 says:"
              f" {last_error_line(p.workers[0].log_path)}", file=sys.stderr)
        return code if code and code > 0 else 1
    recover_orphans(p.url, storage, p.study_name)
    log.info("final run (evaluation on fresh seeds and report, once) in %s", p.base_dir)
    try:
        final = subprocess.run(p.final_command)
    except KeyboardInterrupt:
        log.warning("interrupted during the final run: rerun the same command to finish it")
        return 130
    return final.returncode


if __name__ == "__main__":
    sys.exit(main())
