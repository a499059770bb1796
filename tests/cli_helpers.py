"""Running the real CLI in a subprocess on a tiny model, as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna

TESTS_DIR = Path(__file__).resolve().parent
REPORT_FINAL_SEED = 4242  # final.seed and report.grid_size of the report_run fixture (conftest.py)
REPORT_GRID = 4
DEFAULT_SAMPLER = {"search.sampler": "autodiffusion"}  # what a user's run searches with, and tiny_overrides' default
PAPER_SAMPLER = {"search.sampler": "autodiffusion_paper"}  # the authors' EA: whole generations of search.population


def tiny_overrides(model_dir: Path, reference: Path, db: Path, **extra: object) -> list[str]:
    """A tiny run of the default sampler: a budget of population x generations = 12 candidate-equivalents
    (pruned candidates cost their prefix), stopped by the budget or the convergence rule."""
    base = {
        "model.pretrained": str(model_dir), "dataset.reference": str(reference),
        "metric.feature_extractor": "test-randconv", "imports": "[randconv_extractor]",
        **DEFAULT_SAMPLER, "search.peers": "[]",
        "search.num_samples": 48, "search.batch_size": 48, "search.population": 6, "search.generations": 2,
        "search.num_parents": 3, "search.num_mutants": 3, "search.num_crossovers": 1, "search.init_random": 2,
        "search.baselines": "[ddim_uniform,trailing]", "storage.url": f"sqlite:///{db}",
        "storage.heartbeat_interval": 1, "storage.grace_period": 2, "final.num_samples": 64, "progress": "false",
        "device": "cpu",
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def cli_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["AUTODIFF_OPT_CACHE"] = str(tmp / "cache")
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def cli_command(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "autodiff_opt", *overrides, f"hydra.run.dir={run_dir}"]


def run_cli(overrides: list[str], tmp: Path, run_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(overrides, run_dir), cwd=tmp, env=cli_env(tmp), capture_output=True,
                          text=True, timeout=timeout)


def kill_when(ready: Callable[[], bool], overrides: list[str], tmp: Path, run_dir: Path, timeout: float = 240) -> None:
    """Start the CLI, SIGKILL it as soon as ready() (the run must not end before that), wait for it to die.
    A run that never gets ready within ``timeout`` is killed too, and the test fails saying so."""
    proc = subprocess.Popen(cli_command(overrides, run_dir), cwd=tmp, env=cli_env(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    reached = False
    try:
        while not reached and time.monotonic() < deadline:
            reached = ready()
            if not reached:
                assert proc.poll() is None, "the run ended before it could be killed"
                time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert reached, f"the run was not ready to be killed within {timeout:.0f} s"


def load_study(db: Path) -> optuna.Study:
    """The (only) study in a SQLite file."""
    url = f"sqlite:///{db}"
    return optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)


def compose_cfg(overrides: list[str], output_dir: Path):  # type: ignore[no-untyped-def]
    """The composed config of the real app, in-process (what `python -m autodiff_opt ...` would run)."""
    from autodiff_opt.cli import compose_config

    return compose_config([*overrides, f"output_dir={output_dir}"])
