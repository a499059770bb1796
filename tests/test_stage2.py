"""Stage 2 in the sampler: start on stall or at the configured generation, ramp, budget, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from autodiff_opt.arch.budget import Budget
from autodiff_opt.core.genome import Genome
from autodiff_opt.search.operators import skip_cap
from autodiff_opt.search.evolution import AutoDiffusionPaperSampler, EvolutionConfig, genome_of
from autodiff_opt.search.space import GENERATION_ATTR, STAGE_ATTR, SearchSpace, suggest_genome
from autodiff_opt.search.stage2 import STAGE2_START_ATTR, Stage2Policy, ramp_max_skip_frac
from autodiff_opt.search.surrogate_sampler import AutoDiffusionSampler
from cli_helpers import DEFAULT_SAMPLER, load_study, run_cli, tiny_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)

L = 20
BUDGET = Budget.from_flops(100, tuple([3] * L), full_steps=4.0)  # skipping 4 layers saves 12% of a step
SPACE = SearchSpace(4, 1000, k_min=1, k_max=5)
EVO = EvolutionConfig(population=10, num_parents=4, num_mutants=5, num_crossovers=3, init_random=4)


def objective(trial: optuna.Trial) -> float:
    g = suggest_genome(trial, SPACE)
    # more steps help, skipping costs a little quality: the best candidates buy a 5th step by skipping
    return 10.0 / g.num_steps + 0.01 * sum(len(s) for s in g.skips) + 0.001 * sum(g.timesteps) / 1000


def make_sampler(start: int = 2, patience: int = 100, cls: type = AutoDiffusionPaperSampler) -> AutoDiffusionPaperSampler:
    policy = Stage2Policy(BUDGET, max_prun=0.4, ramp_steps=2, start_generation=start, patience=patience, max_steps=5)
    return cls(SPACE, EVO, anchor=Genome((750, 500, 250, 0)), seed=0, stage2=policy)


@pytest.mark.parametrize("cls", [AutoDiffusionPaperSampler, AutoDiffusionSampler])
def test_stage2_starts_ramps_respects_budget_and_resumes(cls: type, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=url, sampler=make_sampler(cls=cls), study_name="s2")
    study.optimize(objective, n_trials=35)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert attrs[STAGE2_START_ATTR] == 2
    resumed = optuna.load_study(study_name="s2", storage=url, sampler=make_sampler(start=99, cls=cls))
    resumed.optimize(objective, n_trials=25)  # the stored start wins over the new process's setting
    for t in resumed.trials:
        g, gen = genome_of(t), t.system_attrs[GENERATION_ATTR]
        assert BUDGET.fits(g), f"trial {t.number} over budget"
        if gen < 2:
            assert not g.has_skips and t.system_attrs[STAGE_ATTR] == 1
        else:
            cap = skip_cap(L, ramp_max_skip_frac(gen - 2, 0.4, 2))
            assert all(len(m) <= cap for m in g.skips)
    later = [genome_of(t) for t in resumed.trials if t.system_attrs[GENERATION_ATTR] >= 3]
    assert any(g.has_skips for g in later) and any(g.num_steps == 5 for g in later)
    assert genome_of(resumed.best_trial).num_steps == 5  # skipping bought the extra step


def test_stage2_starts_early_when_the_best_stalls() -> None:
    flat = optuna.create_study(sampler=make_sampler(start=50, patience=1))
    flat.optimize(lambda t: float(len(suggest_genome(t, SPACE).timesteps)), n_trials=30)  # constant: stalls at once
    start = flat._storage.get_study_system_attrs(flat._study_id)[STAGE2_START_ATTR]
    assert start == 2


def _one_flat_generation(trial: optuna.Trial) -> float:
    """Best by generation (10 trials each): 5, 5 (no gain in generation 1), then 4, 3, 2: improving again."""
    suggest_genome(trial, SPACE)
    return {0: 5.0 + 0.01 * (trial.number % 10), 1: 6.0}.get(trial.number // 10, 6.0 - trial.number // 10)


@pytest.mark.parametrize("patience,expected_start", [(1, 2), (2, None)])
def test_stage2_waits_while_the_best_still_improves(patience: int, expected_start: int | None) -> None:
    """One generation without gain triggers stage 2 at patience 1; at patience 2 the best improves again in
    time (generations 2, 3, 4), so stage 1 goes on to the configured start (50: never in this run)."""
    study = optuna.create_study(sampler=make_sampler(start=50, patience=patience))
    study.optimize(_one_flat_generation, n_trials=50)
    assert [t.system_attrs[GENERATION_ATTR] for t in study.trials] == [n // 10 for n in range(50)]
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert attrs.get(STAGE2_START_ATTR) == expected_start
    stages = {t.system_attrs[STAGE_ATTR] for t in study.trials if t.system_attrs[GENERATION_ATTR] >= 2}
    assert stages == ({2} if expected_start == 2 else {1})


@pytest.mark.slow
@pytest.mark.parametrize("multi_objective", [False, True])
def test_stage2_end_to_end_through_the_cli(multi_objective: bool, tiny_model_dir: Path, tiny_reference: Path,
                                           tmp_path: Path) -> None:
    extra = {**DEFAULT_SAMPLER, "search.stage2.enabled": "true", "search.stage2.start_generation": 1,
             "search.stage2.max_prun": 0.5, "search.stage2.ramp_steps": 1, "search.generations": 3, "final.num_samples": 32,
             "search.stage2.multi_objective": str(multi_objective).lower()}
    proc = run_cli(tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db", **extra), tmp_path, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert (trials.stage == 2).sum() >= 6 and (trials.skipped_layers > 0).any()
    assert set(trials.loc[trials.generation >= 1, "stage"]) == {2} and set(trials.loc[trials.generation == 0, "stage"]) == {1}
    final = pd.read_csv(tmp_path / "run" / "final.csv")
    # the budget: K = 4 full steps; in multi-objective mode it only bounds the cost at k_max = 4 + 1 full steps
    assert (final.cost_full_steps <= (5.0 if multi_objective else 4.0) + 1e-9).all(), final
    assert (final.loc[final.skipped_layers == 0, "cost_full_steps"] == final.loc[final.skipped_layers == 0, "nfe"]).all()
    assert ((final.cost_full_steps < final.nfe) == (final.skipped_layers > 0)).all()  # skipping saves compute
    if multi_objective:  # the trials' second objective is the cost the final table reports
        done = trials[trials.state == "COMPLETE"]
        by_steps = {str(json.loads(r.timesteps)): r.cost_full_steps for r in done.itertuples() if r.skipped_layers == 0}
        for row in final[(final.kind == "searched") & (final.skipped_layers == 0)].itertuples():
            assert by_steps[str(json.loads(row.timesteps))] == pytest.approx(row.cost_full_steps, abs=1e-3)

    best = json.loads((tmp_path / "run" / "best_schedule.json").read_text())
    from autodiff_opt.apply import generate_from_schedule, schedule_genome
    from autodiff_opt.arch import discover_layers
    from autodiff_opt.models import load_model

    names = [layer.name for layer in discover_layers(load_model(best["model"]).denoiser)]
    assert best["skipped_layer_names"] == [[names[i] for i in ids] for ids in best["skipped_layers"]]
    images = generate_from_schedule(best, num_images=4, device="cpu")
    assert images.shape == (4, 1, 8, 8) and images.dtype == torch.uint8
    # the skipped layers are applied: without them the samples differ (the winner's, else the best skipping trial's)
    skipping = best
    if not any(best["skipped_layers"]):
        done_trials = load_study(tmp_path / "s.db").get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        trial = min((t for t in done_trials if genome_of(t).has_skips), key=lambda t: t.values[0])
        masks = genome_of(trial).skips
        skipping = {**best, "timesteps": list(genome_of(trial).timesteps), "skipped_layers": [sorted(m) for m in masks],
                    "skipped_layer_names": [[names[i] for i in sorted(m)] for m in masks]}
    masked = generate_from_schedule(skipping, num_images=4, device="cpu")
    plain = generate_from_schedule({**skipping, "skipped_layers": None, "skipped_layer_names": None}, num_images=4,
                                   device="cpu")
    assert schedule_genome(skipping).has_skips and not torch.equal(masked, plain)
    if multi_objective:  # the front by hand from trials.csv; the final table holds min(6, its size) of its points
        points = list(zip(done.fid, done.cost_full_steps.round(3)))  # the final table rounds the cost
        front = {(f, c) for f, c in points if not any(g <= f and d <= c and (g, d) != (f, c) for g, d in points)}
        searched = final[final.kind == "searched"]
        shown = {(f, c) for f, c in zip(searched.fid_search, searched.cost_full_steps) if (f, c) in front}
        assert len(shown) >= min(6, len(front)), (front, searched)
        for row in searched[searched.schedule.str.startswith("searched_pareto_")].itertuples():
            assert (row.fid_search, row.cost_full_steps) in front
            assert row.schedule == f"searched_pareto_{row.cost_full_steps:.2f}"


def test_a_max_prun_that_allows_no_skip_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """The authors' max_prun=0.1 on the digits UNet's 9 layers: floor(0.9) = 0 layers a step, so stage 2 can
    skip nothing; the run says so and names the smallest value that skips one layer."""
    from autodiff_opt.search.stage2 import warn_if_no_skips

    with caplog.at_level("WARNING", logger="autodiff_opt.search.stage2"):
        assert warn_if_no_skips(0.1, 9)
    assert "max_prun=0.1 of 9 layers lets no step skip a layer" in caplog.text and "at least 0.111" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="autodiff_opt.search.stage2"):
        assert not warn_if_no_skips(0.12, 9) and not warn_if_no_skips(0.1, 10) and not warn_if_no_skips(0.1, 0)
    assert not caplog.text
