"""Faults inside a search: NaN samples, CUDA out-of-memory, a setup where every candidate fails.

The NaN model is a real diffusers folder: a tiny UNet whose time embedding overflows to inf for every
t above a threshold (one hidden unit reads the lowest-frequency sinusoid of t, which grows with t, with
a weight of 1e30 and a bias that puts its zero at the threshold), so schedules with a step above it give
NaN samples and the others are ordinary. OOM needs a GPU to happen for real; here the UNet's forward is
replaced by a test double that raises torch.cuda.OutOfMemoryError above a batch size.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.metrics.fid import FIDScorer
from autodiff_opt.metrics.reference import reference_statistics
from autodiff_opt.models.loading import load_model
from autodiff_opt.core.genome import Genome
from autodiff_opt.core.keys import OWNER_ATTR
from autodiff_opt.search.objective import FAIL_REASON_ATTR, Objective
from autodiff_opt.search.evolution import AutoDiffusionPaperSampler, EvolutionConfig, count_by_generation, genome_of
from autodiff_opt.search.space import GENOME_ATTR, SearchSpace, genome_params
from audit import EVALUATED, assert_budget_spent
from cli_helpers import PAPER_SAMPLER, run_cli, tiny_overrides
from conftest import make_tiny_unet

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAN_ABOVE = 900  # time steps above this give NaN


def save_exploding_model(folder: Path, nan_above: float | None) -> Path:
    """A tiny UNet that is finite for t <= nan_above and NaN above it (None: NaN at every t)."""
    from diffusers import DDPMScheduler

    unet = make_tiny_unet()
    half = unet.time_proj.num_channels // 2
    lowest = math.exp(-math.log(10000) * (half - 1) / (half - unet.time_proj.downscale_freq_shift))
    sin_index = 2 * half - 1 if unet.time_proj.flip_sin_to_cos else half - 1  # sin(t * lowest frequency)
    big = 1e30
    with torch.no_grad():
        first, second = unet.time_embedding.linear_1, unet.time_embedding.linear_2
        first.weight[0].zero_()
        first.weight[0, sin_index] = big
        first.bias[0] = big if nan_above is None else -big * math.sin(nan_above * lowest)
        second.weight[:, 0] = 1e20  # SiLU(huge) * 1e20 = inf, then inf - inf = NaN in the resnets
    unet.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_exploding_model(tmp_path_factory.mktemp("nan-unet"), NAN_ABOVE)


def _load(db: Path) -> optuna.Study:
    url = f"sqlite:///{db}"
    return optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)


def test_the_exploding_model_is_nan_only_above_its_threshold(nan_model_dir: Path) -> None:
    model = load_model(str(nan_model_dir))
    x = torch.randn(2, 1, 8, 8)
    for t, finite in ((0, True), (500, True), (NAN_ABOVE - 1, True), (NAN_ABOVE + 1, False), (999, False)):
        eps = model.eps_fn()(x, t, 0)
        assert bool(torch.isfinite(eps).all()) is finite, t


@pytest.mark.slow
def test_nan_candidates_fail_with_their_reason_and_the_search_goes_on(nan_model_dir: Path, tiny_reference: Path,
                                                                      tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    overrides = tiny_overrides(nan_model_dir, tiny_reference, db, **{"final.enabled": "false",
                                                                     "search.init_random": 4})
    proc = run_cli(overrides, tmp_path, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _load(db)
    assert_budget_spent(study, 12, 48, 4)  # failed candidates count what they generated; the budget was still spent
    failed = study.get_trials(states=(TrialState.FAIL,))
    trailing = [t for t in study.trials if t.user_attrs.get("baseline") == "trailing"]
    assert trailing and trailing[0].state == TrialState.FAIL  # (999, 749, 499, 249) has a step above 900
    assert failed, "no candidate had a step above the threshold"
    for t in failed:
        assert max(genome_of(t).timesteps) > NAN_ABOVE
        reason = t.user_attrs[FAIL_REASON_ATTR]
        assert reason.startswith("NonFiniteSamples:") and "NaN" in reason and str(max(genome_of(t).timesteps)) in reason
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert max(genome_of(t).timesteps) <= NAN_ABOVE and math.isfinite(t.value)


@pytest.mark.slow
def test_a_nan_baseline_does_not_lose_the_final_report(nan_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    proc = run_cli(tiny_overrides(nan_model_dir, tiny_reference, db, **{"search.generations": 1}), tmp_path, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd

    final = pd.read_csv(tmp_path / "run" / "final.csv").set_index("schedule")
    assert math.isnan(final.loc["trailing", "fid_final"]) and math.isfinite(final.loc["searched", "fid_final"])


@pytest.mark.slow
def test_failure_guard_stops_a_broken_setup_and_keeps_finished_trials(tiny_model_dir: Path, tiny_reference: Path,
                                                                      tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    db = tmp_path / "s.db"
    first = run_cli(tiny_overrides(model, tiny_reference, db, **{"search.generations": 1, "final.enabled": "false"}),
                    tmp_path, tmp_path / "r1")
    assert first.returncode == 0, first.stderr[-3000:]
    finished = {t.number: (genome_of(t).key(), t.value, t.state) for t in _load(db).trials}  # complete or pruned
    assert {t.state for t in _load(db).trials} <= set(EVALUATED) and assert_budget_spent(_load(db), 6, 48, 4)
    # the same folder now holds weights that give NaN at every t: the setup broke, not the candidates
    save_exploding_model(tmp_path / "broken", None)
    shutil.copy(tmp_path / "broken" / "diffusion_pytorch_model.safetensors", model / "diffusion_pytorch_model.safetensors")
    second = run_cli(tiny_overrides(model, tiny_reference, db, **{"search.generations": 3,
                                                                  "search.max_consecutive_failures": 3}),
                     tmp_path, tmp_path / "r2")
    assert second.returncode == 2  # a user-fixable setup error: one line, not a traceback
    assert "3 candidates failed in a row" in second.stderr.strip().splitlines()[-1]
    assert "3 candidates failed in a row" in second.stderr and "NonFiniteSamples" in second.stderr
    study = _load(db)
    for number, kept in finished.items():  # finished work is kept as it was
        t = study.trials[number]
        assert (genome_of(t).key(), t.value, t.state) == kept
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 3 and len(study.trials) == len(finished) + 3
    assert all(t.user_attrs[FAIL_REASON_ATTR].startswith("NonFiniteSamples") for t in failed)
    assert not (tmp_path / "r2" / "final.csv").exists()


# --- CUDA out of memory (test double) -----------------------------------------------------------------------
class OOMAbove:
    """Replaces unet.forward: raises torch.cuda.OutOfMemoryError for batches above `limit` (or at time steps
    in `always`), records every batch size it was called with, else runs the real forward."""

    def __init__(self, unet: torch.nn.Module, limit: int, always: frozenset[int] = frozenset()) -> None:
        self.forward, self.limit, self.always, self.sizes = unet.forward, limit, always, []
        unet.forward = self

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.sizes.append(int(sample.shape[0]))
        if sample.shape[0] > self.limit or int(timestep.flatten()[0]) in self.always:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test double, batch {sample.shape[0]})")
        return self.forward(sample, timestep, *args, **kwargs)


def test_out_of_memory_halves_the_batch_and_gives_the_same_images(tiny_model_dir: Path) -> None:
    genome = Genome((750, 500, 250, 0))
    samples = SampleSet.draw(20, (1, 8, 8), None, seed=3)
    reference = ImageGenerator(load_model(str(tiny_model_dir)), batch_size=8).generate(genome, samples)
    model = load_model(str(tiny_model_dir))
    double = OOMAbove(model.denoiser, limit=8)
    generator = ImageGenerator(model, batch_size=32)
    images = generator.generate(genome, samples)
    assert generator.batch_size == 8
    assert double.sizes[:2] == [20, 16] and set(double.sizes[2:]) == {8, 4}  # 32 -> 16 -> 8, then 8, 8, 4
    assert torch.equal(images, reference)


def test_out_of_memory_at_batch_one_fails_only_that_candidate(tiny_model_dir: Path, tiny_reference: Path,
                                                              tmp_path: Path) -> None:
    model = load_model(str(tiny_model_dir))
    double = OOMAbove(model.denoiser, limit=10**6, always=frozenset({999}))
    space = SearchSpace(4, model.num_train_timesteps)
    scorer = FIDScorer("test-randconv", batch_size=64)
    reference = reference_statistics(str(tiny_reference), scorer, tmp_path / "cache")
    objective = Objective(ImageGenerator(model, batch_size=8), scorer, reference,
                          SampleSet.draw(8, model.sample_shape, None, seed=0), space)
    study = optuna.create_study(sampler=AutoDiffusionPaperSampler(space, EvolutionConfig(population=4, num_parents=2,
                                num_mutants=2, num_crossovers=1, init_random=2), seed=0))
    for steps in ((999, 749, 499, 249), (750, 500, 250, 0)):
        study.enqueue_trial(genome_params(Genome(steps), space))
    study.optimize(objective, n_trials=4, catch=(Exception,))
    oom, *rest = study.trials
    assert oom.state == TrialState.FAIL
    assert oom.user_attrs[FAIL_REASON_ATTR].startswith("OutOfMemoryError: CUDA out of memory")
    assert 1 in double.sizes  # halved all the way down before giving up
    assert [t.state for t in rest] == [TrialState.COMPLETE] * 3
    assert objective.generator.batch_size == 8 and double.sizes[-1] == 8  # later candidates run at full batch


# --- a crash loop: killed again and again, restarted each time, the study still completes -------------------
def _running_of(db: Path, pid: int) -> list[int]:
    """Numbers of the RUNNING trials of process `pid` that hold a candidate (read straight from SQLite)."""
    import json
    import sqlite3

    query = ("select t.number, a.value_json from trials t join trial_system_attributes a on a.trial_id = t.trial_id"
             " join trial_system_attributes g on g.trial_id = t.trial_id where t.state = 'RUNNING' and a.key = ?"
             " and g.key = ?")
    try:
        with sqlite3.connect(db, timeout=30) as con:
            rows = list(con.execute(query, (OWNER_ATTR, GENOME_ATTR)))
    except sqlite3.OperationalError:  # not created yet
        return []
    return [number for number, owner in rows if json.loads(owner)[1] == pid]


def _complete_count(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(db, timeout=30) as con:
            return int(con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
def test_a_crash_loop_still_completes_the_study(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    """SIGKILL the run mid-candidate, restart it, three times; then let it finish. The authors' EA (the one
    end-to-end run of it: its generations are whole, so each killed slot must be refilled). The grace period is an hour,
    so a dead trial never goes stale here: only the restart's own check (this host, pid gone) can free its
    slot, and a restart that waited for the heartbeat would hang. Kills follow the study's state (a new
    candidate finished in this round and another is running), not the clock."""
    import signal
    import subprocess

    from cli_helpers import cli_command, cli_env

    db = tmp_path / "s.db"
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, db, **{
        **PAPER_SAMPLER, "search.num_samples": 144, "search.batch_size": 24, "search.generations": 3,
        "final.enabled": "false", "storage.heartbeat_interval": 1, "storage.grace_period": 3600})
    dead: list[int] = []  # trials RUNNING in a process when it was killed
    for round_ in range(3):
        done = _complete_count(db)
        log = open(tmp_path / f"round-{round_}.log", "w")
        proc = subprocess.Popen(cli_command(overrides, tmp_path / f"run{round_}"), cwd=tmp_path, env=cli_env(tmp_path),
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (_complete_count(db) > done and _running_of(db, proc.pid)):
            assert proc.poll() is None, (tmp_path / f"round-{round_}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"round {round_} made no progress: " + (
                tmp_path / f"round-{round_}.log").read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        dead += _running_of(db, proc.pid)
        if round_:  # the restart failed the previous round's dead trial at once, and said so
            assert "of dead processes on this host and queued them again" in (tmp_path / f"round-{round_}.log").read_text()
    assert len(dead) == 3, dead
    last = run_cli(overrides, tmp_path, tmp_path / "last")
    assert last.returncode == 0, last.stderr[-3000:]
    study = _load(db)
    assert count_by_generation(study) == {0: 6, 1: 6, 2: 6}
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.FAIL}
    assert sorted(t.number for t in study.trials if t.state == TrialState.FAIL) == sorted(dead)
    for number in dead:  # each killed candidate was evaluated again, with its genome and slot
        retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE, number
        assert genome_of(retry[0]).key() == genome_of(study.trials[number]).key()
