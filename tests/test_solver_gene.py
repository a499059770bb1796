"""The solver as a gene (search.solvers): operators, NFE budget, and the CLI end to end with resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from optuna.trial import FrozenTrial, TrialState

from audit import EVALUATED, assert_budget_spent
from autodiff_opt.config import to_config
from autodiff_opt.core.genome import Genome
from autodiff_opt.search.operators import JointSpace, OperatorSet
from autodiff_opt.search.evolution import genome_of
from autodiff_opt.search.solver_gene import child_solver, fit_to_solver
from autodiff_opt.search.space import SearchSpace
from autodiff_opt.solvers import nfe
from cli_helpers import compose_cfg, run_cli, tiny_overrides
from cli_helpers import load_study as _load

SOLVERS = ("ddim", "heun", "dpmpp_3m")


def test_space_gives_each_solver_the_steps_of_the_nfe_budget() -> None:
    space = SearchSpace(6, 1000, solvers=SOLVERS)
    assert [space.steps_for(s) for s in SOLVERS] == [6, 3, 6] and space.max_steps == 6
    assert nfe("heun", space.steps_for("heun")) == 5 <= 6
    assert SearchSpace(6, 1000).steps_for("heun") == 6  # without the gene K is search.num_steps
    heun_only = SearchSpace(4, 1000, solvers=("heun",))
    assert (heun_only.min_steps, heun_only.max_steps, heun_only.variable_k) == (2, 2, False)


def test_fit_to_solver_keeps_masks_with_their_steps() -> None:
    rng = np.random.default_rng(0)
    g = Genome.from_steps([900, 600, 300, 100], [[1], [2], [3], [4]], solver="ddim")
    short = fit_to_solver(g, "heun", 2, 1000, rng)
    assert short.solver == "heun" and short.num_steps == 2
    assert all({900: {1}, 600: {2}, 300: {3}, 100: {4}}[t] == set(m) for t, m in zip(short.timesteps, short.skips))
    long = fit_to_solver(short, "ddim", 5, 1000, rng)
    assert long.num_steps == 5 and set(short.timesteps) <= set(long.timesteps) and long.solver == "ddim"
    long.validate(1000)


def test_child_solver_follows_the_operator() -> None:
    a, b = Genome((9, 5), solver="ddim"), Genome((8, 4), solver="dpmpp_3m")
    ops = OperatorSet.build(JointSpace.without_skipping(1000, 3, 6), anchor=a)
    draws = [child_solver(ops.crossover, [a, b], SOLVERS, 0.25, np.random.default_rng(i)) for i in range(200)]
    assert set(draws) == {"ddim", "dpmpp_3m"}
    assert {child_solver(ops.local, [a], SOLVERS, 0.25, np.random.default_rng(i)) for i in range(50)} == {"ddim"}
    mutants = [child_solver(ops.mutation, [a], SOLVERS, 0.25, np.random.default_rng(i)) for i in range(400)]
    assert 0.15 < np.mean([m != "ddim" for m in mutants]) < 0.35 and set(mutants) == set(SOLVERS)
    for op in (ops.random, ops.anchor):
        assert {child_solver(op, [], SOLVERS, 0.25, np.random.default_rng(i)) for i in range(100)} == set(SOLVERS)


def test_genome_key_carries_the_solver_only_when_it_is_a_gene() -> None:
    plain = Genome((9, 5))
    assert "solver" not in plain.key() and Genome.from_json(plain.key()) == plain
    gene = plain.with_solver("heun")
    assert gene.key() != plain.key() and Genome.from_json(gene.key()) == gene


@pytest.mark.parametrize("override,message", [
    ("search.solvers=[ddim,plms]", "['plms'] unknown"),
    ("search.solvers=[ddim,ddim]", "lists a solver twice"),
    ("search.solvers=[ddim,heun] search.schedules=[[900,500,100]]", "take [2, 4] at NFE"),
])
def test_bad_solver_lists_are_refused_before_work(override: str, message: str, tiny_model_dir: Path,
                                                  tiny_reference: Path, tmp_path: Path) -> None:
    from autodiff_opt.preflight import ConfigError, validate

    cfg = compose_cfg([*tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db"), *override.split()], tmp_path)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(to_config(cfg))


def test_builtin_sampler_with_solvers_is_refused(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    from autodiff_opt.preflight import ConfigError, validate

    over = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db") if not o.startswith("search.sampler=")]
    cfg = compose_cfg([*over, "search.sampler=tpe", "search.solvers=[ddim,heun]"], tmp_path)
    with pytest.raises(ConfigError, match="needs search.sampler=autodiffusion"):
        validate(to_config(cfg))


@pytest.mark.slow
def test_cli_searches_the_solver_with_the_steps_and_resumes(tiny_model_dir: Path, tiny_reference: Path,
                                                           tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    gene = {"search.solvers": "[ddim,heun,dpmpp_3m]", "search.population": 5, "search.num_parents": 3,
            "search.num_mutants": 2, "search.num_crossovers": 2, "search.init_random": 1, "solver.clip_x0": "false",
            "search.baselines": "[trailing]", "search.num_samples": 32, "search.batch_size": 32,
            "final.num_samples": 32, "final.repeats": 1, "storage.study_name": "gene"}  # a deliberate resume
    first = run_cli(tiny_overrides(tiny_model_dir, tiny_reference, db, **gene, **{"search.generations": 1,
                                                                                  "final.enabled": "false"}),
                    tmp_path, tmp_path / "run1", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert_budget_spent(_load(db), 5, 32, 4, nfe=_nfe)  # population 5 x 1 generation: 5 candidate-equivalents
    first_trials = len(_load(db).trials)

    resumed = run_cli(tiny_overrides(tiny_model_dir, tiny_reference, db, **gene, **{"search.generations": 2}),
                      tmp_path, tmp_path / "run2", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = _load(db)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert_budget_spent(study, 10, 32, 4, nfe=_nfe)  # the budget is in NFE x samples: Heun's candidates cost 3/4
    assert len(study.trials) > first_trials  # the resume continued the study
    by_number, bred = {t.number: t for t in study.trials}, Counter()
    for t in study.get_trials(states=EVALUATED):
        g = genome_of(t)
        assert t.params["solver"] == g.solver in SOLVERS  # the gene is a trial param (the dashboard shows it)
        assert g.num_steps == {"ddim": 4, "heun": 2, "dpmpp_3m": 4}[g.solver] and t.user_attrs["nfe"] <= 4
        parents = [genome_of(by_number[n]).solver for n in t.system_attrs["autodiff:parents"]]
        operator = t.system_attrs["autodiff:operator"]
        if operator in ("crossover", "local"):  # the solver comes from a parent (local moves: the only one)
            assert g.solver in parents and (operator == "crossover" or parents == [g.solver]), (operator, parents)
        bred[operator] += bool(parents)
    assert bred["local"] + bred["crossover"] >= 1, bred  # the surrogate chose children that inherit the solver
    baselines = {t.user_attrs["baseline"]: genome_of(t) for t in done if "baseline" in t.user_attrs}
    assert set(baselines) == {f"trailing@{s}" for s in SOLVERS}
    assert baselines["trailing@heun"].timesteps == (999, 499)
    keys = [genome_of(t).key() for t in done]
    assert len(keys) == len(set(keys))

    final = pd.read_csv(tmp_path / "run2" / "final.csv")
    assert {"solver", "nfe"} <= set(final.columns) and set(final.solver) <= set(SOLVERS)
    assert final.set_index("schedule").loc["trailing@heun", "nfe"] == 3
    best = json.loads((tmp_path / "run2" / "best_schedule.json").read_text())
    best_genome = genome_of(min(done, key=lambda t: (t.values[0], t.number)))
    assert best["solver"] == best_genome.solver and best["timesteps"] == list(best_genome.timesteps)
    assert best["diffusers_scheduler"] in best["diffusers_snippet"].splitlines()[0]

    other = run_cli(tiny_overrides(tiny_model_dir, tiny_reference, db, **{**gene, "search.solvers": "[ddim,ipndm]"}),
                    tmp_path, tmp_path / "run3", timeout=900)
    assert other.returncode == 2 and "search.solvers" in other.stderr


def _nfe(trial: FrozenTrial) -> int:
    """Network evaluations per sample of a candidate at search.num_steps=4 as an NFE budget (Heun: 2K - 1)."""
    return {"ddim": 4, "heun": 3, "dpmpp_3m": 4}[genome_of(trial).solver]


def test_registering_a_solver_leaves_a_resumed_studys_decisions_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The surrogate's solver one-hot spans the solvers the study searches (its stored search space), not the
    solver registry: a solver registered between two runs of a study changes neither the embedding nor the
    next decisions."""
    import optuna

    from autodiff_opt import solvers as registry
    from autodiff_opt.search.evolution import EvolutionConfig
    from autodiff_opt.search.space import suggest_genome
    from autodiff_opt.search.surrogate import embed
    from autodiff_opt.search.surrogate_sampler import SurrogateConfig, AutoDiffusionSampler

    space = SearchSpace(6, 1000, solvers=SOLVERS)
    evolution = EvolutionConfig(population=6, num_parents=3, num_mutants=2, num_crossovers=1, init_random=2)

    def objective(trial: optuna.Trial) -> float:
        genome = suggest_genome(trial, space)
        return 1.0 + sum(abs(t - 150 * i) for i, t in enumerate(reversed(genome.timesteps))) + 40.0 * (genome.solver == "heun")

    def sampler() -> AutoDiffusionSampler:
        return AutoDiffusionSampler(space, evolution, seed=3, surrogate=SurrogateConfig(32))

    genome = Genome.from_steps((900, 500, 100), None, "heun")
    code = embed(genome, 1000, space.max_steps, solvers=space.solvers)
    assert code.shape == (space.max_steps + len(SOLVERS),) and code[space.max_steps:].sum() == 1.0
    uninterrupted = optuna.create_study(sampler=sampler())
    uninterrupted.optimize(objective, n_trials=14)
    resumed = optuna.create_study(sampler=sampler())
    resumed.optimize(objective, n_trials=9)
    monkeypatch.setitem(registry.SOLVERS, "aaa_registered_later", registry.SOLVERS["ddim"])  # sorts first
    assert np.array_equal(embed(genome, 1000, space.max_steps, solvers=space.solvers), code)
    resumed.sampler = sampler()  # a new process, with the larger registry
    resumed.optimize(objective, n_trials=5)
    keys = [[genome_of(t).key() for t in s.trials] for s in (uninterrupted, resumed)]
    assert keys[0] == keys[1] and len({genome_of(t).solver for t in resumed.trials}) > 1
