"""search.sampler choices, the surrogate-selected evolution, multi-fidelity pruning, peers, fast FID."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.testing.pytest_samplers import BasicSamplerTestCase
from optuna.trial import TrialState

from autodiff_opt.metrics.fid import FIDStats, fast_fid, fid_from_stats
from autodiff_opt.search import coding
from autodiff_opt.search.fidelity import IMAGE_STEPS_ATTR, ParentsPruner, rung_sizes
from autodiff_opt.search.final import add_ratios
from autodiff_opt.core.genome import Genome
from autodiff_opt.search.peers import ays_schedule, best_path
from autodiff_opt.search.evolution import EvolutionConfig, genome_of
from autodiff_opt.search.sampler_choice import SAMPLERS, SamplerChoiceError, resolve
from autodiff_opt.search.space import PARENTS_ATTR, SearchSpace
from autodiff_opt.search.surrogate import GaussianProcess, embed
from autodiff_opt.search.surrogate_sampler import SurrogateConfig, AutoDiffusionSampler
from cli_helpers import compose_cfg, kill_when, run_cli, tiny_overrides
from cli_helpers import load_study as _load

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = SearchSpace(num_steps=4, num_train_timesteps=1000)
SMALL = EvolutionConfig(population=6, num_parents=3, num_mutants=2, num_crossovers=1, init_random=2)


# --- how built-in samplers see a schedule ------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12).flatmap(lambda k: st.sets(st.integers(0, 999), min_size=k, max_size=k)))
def test_fractions_round_trip_every_schedule(steps: set[int]) -> None:
    genome = Genome.from_steps(steps)
    fractions = coding.encode(genome, 1000)
    assert all(0.0 <= u <= 1.0 for u in fractions)
    assert coding.decode(fractions, 1000) == genome


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), st.sampled_from([20, 1000]))
def test_every_point_of_the_box_is_a_valid_schedule(fractions: list[float], T: int) -> None:
    genome = coding.decode(fractions, T).validate(T)  # raises on duplicates, order or range
    assert genome.num_steps == len(fractions)


def test_fractions_reach_both_ends_of_the_axis() -> None:
    assert coding.decode([1.0, 1.0, 1.0], 1000).timesteps == (999, 998, 997)
    assert coding.decode([0.0, 0.5, 0.5], 1000).timesteps == (2, 1, 0)
    assert coding.decode([0.75, 2 / 3, 0.5, 0.0], 1000).timesteps == (750, 500, 250, 0)


# --- settings ------------------------------------------------------------------------------------
def test_every_sampler_resolves_and_bad_choices_are_named() -> None:
    for name in SAMPLERS:
        setup = resolve({"sampler": name})
        assert setup.budget == setup.evolution.population * setup.generations
        assert setup.prune == (name == "autodiffusion")
    assert resolve({"sampler": "autodiffusion_paper"}).evolution == EvolutionConfig()
    assert resolve({"sampler": "autodiffusion_paper", "budget": 120}).generations == 3
    assert resolve({"sampler": "tpe", "prune": True}).prune
    with pytest.raises(SamplerChoiceError, match="search.sampler='nsga'.*autodiffusion"):
        resolve({"sampler": "nsga"})
    with pytest.raises(SamplerChoiceError, match="search.rungs"):
        resolve({"rungs": [0.5, 1.0]})


def test_stage2_with_a_builtin_sampler_is_refused_before_work() -> None:
    from autodiff_opt import preflight
    from autodiff_opt.config import SearchConfig, Stage2Config
    from autodiff_opt.core.errors import ConfigError

    with pytest.raises(ConfigError, match="needs search.sampler=autodiffusion or autodiffusion_paper: gp searches"):
        preflight.check_search(SearchConfig(sampler="gp", stage2=Stage2Config(enabled=True), peers=[]))
    preflight.check_search(SearchConfig(sampler="autodiffusion", stage2=Stage2Config(enabled=True), peers=["ays"]))


def test_rung_sizes() -> None:
    assert rung_sizes(1000, [0.5, 0.25, 0.25]) == [250, 500]
    assert rung_sizes(6, [0.1, 0.5]) == [3]  # a prefix of < 2 samples has no covariance: dropped


# --- the surrogate -----------------------------------------------------------------------------
def test_gp_interpolates_and_ranks_unseen_points_by_expected_improvement() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(40, 2))
    f = lambda p: 1.0 + 10.0 * ((p - 0.3) ** 2).sum(axis=1)  # noqa: E731  (minimum 1.0 at (0.3, 0.3))
    gp = GaussianProcess.fit(x, f(x))
    mu, sd = gp.predict(x)
    assert np.allclose(mu * gp.scale + gp.mean, np.log(f(x)), atol=0.05)
    assert sd.max() < 0.2
    near, far = np.array([[0.3, 0.31]]), np.array([[0.95, 0.95]])
    assert gp.expected_improvement(near)[0] > gp.expected_improvement(far)[0]


def test_embedding_pads_missing_steps_as_fully_skipped() -> None:
    g = Genome((900, 500), (frozenset({1}), frozenset()))
    v = embed(g, 1001, k_max=3, num_layers=4)
    assert np.allclose(v, [0.9, 0.5, 0.0, 0.25, 0.0, 1.0])
    assert np.allclose(embed(Genome((500, 0)), 1001, 2), [0.5, 0.0])


# --- the new sampler passes Optuna's own sampler test suite --------------------------------------
class TestSurrogateSamplerOptunaSuite(BasicSamplerTestCase):
    @pytest.fixture
    def sampler(self):  # type: ignore[no-untyped-def]
        return lambda: AutoDiffusionSampler(SPACE, SMALL, seed=0, surrogate=SurrogateConfig(pool_size=32))


def test_surrogate_sampler_answers_genome_params_from_its_own_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna's suite above asks for a param named "x", which no genome has: it runs the random fallback. Here
    the suite's checks run on the genome's own params (t0..t3 as suggest_genome asks them): every value is
    an int inside its distribution, it is the step of the genome the surrogate chose (never the fallback's),
    and the surrogate's GP ranks the offspring once enough candidates are done."""
    from autodiff_opt.search import surrogate_sampler as module
    from autodiff_opt.search.space import suggest_genome

    sampler = AutoDiffusionSampler(SPACE, SMALL, seed=0, surrogate=SurrogateConfig(pool_size=32))
    fallback: list[str] = []
    fits: list[int] = []
    real_fallback, real_fit = sampler._fallback.sample_independent, module.GaussianProcess.fit
    monkeypatch.setattr(sampler._fallback, "sample_independent",
                        lambda study, trial, name, dist: fallback.append(name) or real_fallback(study, trial, name, dist))
    monkeypatch.setattr(module.GaussianProcess, "fit", classmethod(lambda cls, x, v, k=None: fits.append(len(v))
                                                                   or real_fit(x, v, k)))
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: _distance_of(suggest_genome(t, SPACE)), n_trials=24)
    assert fallback == [] and fits and max(fits) >= 20  # refitted as candidates finish
    for trial in study.trials:
        genome = genome_of(trial)
        assert [trial.params[f"t{i}"] for i in range(4)] == list(genome.timesteps)
        for i in range(4):
            value, dist = trial.params[f"t{i}"], trial.distributions[f"t{i}"]
            assert isinstance(value, int) and dist.low <= value <= dist.high
    chosen = [t for t in study.trials if t.number >= 8]  # after the initial population: the surrogate's picks
    assert {t.system_attrs["autodiff:operator"] for t in chosen} - {"random", "init"}, "no bred offspring chosen"


def test_optuna_suite_cases_on_genome_params_are_decided_by_the_surrogate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna's suite cases (a NaN objective value, fixed params through enqueue_trial, a pruned trial) on
    the genome's own params. Every trial that is not enqueued and has min_observations finished
    candidates before it is the surrogate's pick: its genome is the argmax of the GP's expected improvement
    over that decision's pool (the EI is observed, the choice is recomputed here). The NaN trial fails and
    stays out of the fit; the pruned one enters it; fixed params are the trial's genome, and params that fix
    only part of a schedule are refused with the fix (they ended in a KeyError)."""
    from autodiff_opt.core.errors import ConfigError
    from autodiff_opt.search import surrogate_sampler as module
    from autodiff_opt.search.space import suggest_genome

    picks: list[tuple[np.ndarray, np.ndarray, int]] = []  # (pool embeddings, their EI, observations fitted)
    real_ei = module.GaussianProcess.expected_improvement
    monkeypatch.setattr(module.GaussianProcess, "expected_improvement",
                        lambda gp, x: picks.append((x.copy(), real_ei(gp, x), len(gp.x))) or picks[-1][1])
    sampler = AutoDiffusionSampler(SPACE, SMALL, seed=0, surrogate=SurrogateConfig(pool_size=32))
    partial = optuna.create_study(sampler=AutoDiffusionSampler(SPACE, SMALL, seed=0))
    partial.enqueue_trial({"t0": 950, "t2": 400})
    with pytest.raises(ConfigError, match=r"fixes only part of a schedule \(t1, t3 missing\): enqueue every step"):
        partial.optimize(lambda t: _distance_of(suggest_genome(t, SPACE)), n_trials=1)
    study = optuna.create_study(sampler=sampler)
    fixed = {"t0": 950, "t1": 700, "t2": 400, "t3": 10}
    study.enqueue_trial(fixed)

    def objective(trial: optuna.Trial) -> float:
        value = _distance_of(suggest_genome(trial, SPACE))
        if trial.number == 9:
            return float("nan")
        if trial.number == 11:
            trial.report(value, 24)
            raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=20, catch=())
    enqueued = study.trials[0]
    assert genome_of(enqueued).timesteps == tuple(fixed.values()) and enqueued.params == fixed
    assert enqueued.system_attrs["autodiff:operator"] == "enqueued"
    assert study.trials[9].state == TrialState.FAIL and study.trials[11].state == TrialState.PRUNED
    assert study.best_value == min(t.value for t in study.trials if t.state == TrialState.COMPLETE)
    decided = []
    for t in study.trials[1:]:
        finished = [u for u in study.trials[: t.number] if u.state == TrialState.COMPLETE
                    or (u.state == TrialState.PRUNED and u.intermediate_values)]
        if len(finished) >= sampler.surrogate.min_observations:
            decided.append((t, len(finished)))
        else:
            assert t.system_attrs["autodiff:operator"] == "random", t.number  # too few candidates: drawn at random
    assert len(decided) == len(picks) >= 12, (len(decided), len(picks))
    for (t, observed), (pool, ei, fitted) in zip(decided, picks):
        chosen = embed(genome_of(t), SPACE.num_train_timesteps, SPACE.max_steps, solvers=SPACE.solvers)
        assert np.allclose(pool[int(np.argmax(ei))], chosen), t.number  # the trial is the EI's argmax
        assert fitted == observed, (t.number, fitted, observed)  # the NaN trial is not fitted, the pruned one is
        assert t.system_attrs["autodiff:operator"] in {"local", "mutation", "crossover", "random"}


def _distance_of(genome: Genome) -> float:
    return 1.0 + float(sum(abs(a - b) for a, b in zip(genome.timesteps, TARGET)))


TARGET = (900, 600, 300, 50)


def _distance(trial: optuna.Trial) -> float:
    from autodiff_opt.search.space import suggest_genome

    genome = suggest_genome(trial, SPACE)
    return 1.0 + float(sum(abs(a - b) for a, b in zip(genome.timesteps, TARGET)))


def test_surrogate_evolution_beats_the_papers_evolution_at_equal_candidates() -> None:
    from autodiff_opt.search.evolution import AutoDiffusionPaperSampler

    best = {}
    for name, make in (("surrogate", lambda s: AutoDiffusionSampler(SPACE, SMALL, seed=s, surrogate=SurrogateConfig(64))),
                       ("paper", lambda s: AutoDiffusionPaperSampler(SPACE, SMALL, seed=s))):
        values = []
        for seed in range(3):
            study = optuna.create_study(sampler=make(seed))
            study.optimize(_distance, n_trials=48)
            values.append(study.best_value)
            keys = [genome_of(t).key() for t in study.trials]
            assert len(keys) == len(set(keys)), "a genome was evaluated twice"
        best[name] = float(np.mean(values))
    assert best["surrogate"] < 0.5 * best["paper"], best


def test_resumed_decisions_equal_uninterrupted_ones() -> None:
    """The surrogate is a pure function of the stored trials: a new process decides the same."""
    a = optuna.create_study(sampler=AutoDiffusionSampler(SPACE, SMALL, seed=3, surrogate=SurrogateConfig(32)))
    a.optimize(_distance, n_trials=14)
    b = optuna.create_study(sampler=AutoDiffusionSampler(SPACE, SMALL, seed=3, surrogate=SurrogateConfig(32)))
    b.optimize(_distance, n_trials=8)
    b.sampler = AutoDiffusionSampler(SPACE, SMALL, seed=3, surrogate=SurrogateConfig(32))  # "restarted"
    b.optimize(_distance, n_trials=6)
    assert [genome_of(t).key() for t in a.trials] == [genome_of(t).key() for t in b.trials]


# --- pruning -------------------------------------------------------------------------------------
def test_parents_pruner_stops_only_what_cannot_enter_the_parents() -> None:
    study = optuna.create_study()
    for v in (1.0, 2.0, 3.0, 4.0):
        t = study.ask()
        t.report(v, 100)
        study.tell(t, v)
    pruner = ParentsPruner(num_parents=3)
    for value, baseline, expected in ((2.5, None, False), (3.0, None, False), (3.5, None, True), (9.0, "uniform", False)):
        t = study.ask()
        if baseline:
            t.set_user_attr("baseline", baseline)
        t.report(value, 100)
        assert pruner.prune(study, study._storage.get_trial(t._trial_id)) is expected, value
        study.tell(t, state=TrialState.FAIL)
    assert not ParentsPruner(num_parents=5).prune(study, study.trials[0])  # too few rivals to judge


@pytest.fixture(scope="module")
def tiny_experiment(tiny_model_dir: Path, tiny_reference: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from autodiff_opt.runner import build_experiment

    tmp = tmp_path_factory.mktemp("exp")
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, tmp / "unused.db",
                               **{"search.sampler": "autodiffusion", "search.num_samples": 64, "search.batch_size": 64,
                                  "search.rungs": "[0.25,0.5]", "search.peer_samples": 16, "search.peer_grid": 20})
    return build_experiment(compose_cfg(overrides, tmp))


def test_pruned_candidates_keep_their_prefix_fid_and_are_never_parents(tiny_experiment) -> None:  # type: ignore[no-untyped-def]
    from autodiff_opt import runner
    from autodiff_opt.search.fidelity import ImageStepBudget, make_pruner

    exp = tiny_experiment
    study = optuna.create_study(sampler=runner.make_sampler(exp), pruner=make_pruner(True, exp.search_setup.evolution.num_parents))
    runner.seed_study(study, exp)
    unit = len(exp.samples) * exp.space.num_steps
    stop = ImageStepBudget(30 * unit, unit)
    study.optimize(runner.make_objective(exp), callbacks=[lambda s, t: s.stop() if stop.should_stop(s) else None])
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, "nothing was pruned in 30 candidate-equivalents"
    for t in pruned:
        step = max(t.intermediate_values)
        assert step in (16, 32) and t.value == pytest.approx(t.intermediate_values[step])
        assert t.user_attrs[IMAGE_STEPS_ATTR] == step * 4
        assert t.user_attrs.get("baseline") is None
    parents = {p for t in study.trials for p in t.system_attrs.get(PARENTS_ATTR, [])}
    assert parents, "no candidate had parents"
    assert not parents & {t.number for t in pruned}, "a pruned candidate became a parent"
    assert all(t.state == TrialState.COMPLETE for t in study.trials if t.user_attrs.get("baseline"))
    assert 30 <= stop.spent(study) < 31


# --- peers ---------------------------------------------------------------------------------------
def test_best_path_is_the_exhaustive_optimum() -> None:
    rng = np.random.default_rng(1)
    G, K = 7, 3
    err = rng.uniform(size=(G, G + 1))
    start = rng.uniform(size=G)

    def cost(path: tuple[int, ...]) -> float:
        return start[path[0]] + sum(err[a, b] for a, b in zip(path, path[1:])) + err[path[-1], G]

    brute = min(itertools.combinations(range(G), K), key=cost)
    assert tuple(best_path(start, err, K)) == brute


def test_trajectory_dp_peer_is_valid_and_reproducible(tiny_experiment) -> None:  # type: ignore[no-untyped-def]
    from autodiff_opt.search.peers import trajectory_dp

    exp = tiny_experiment
    a = trajectory_dp(exp.generator, 4, num_samples=16, grid_size=20, seed=5)
    b = trajectory_dp(exp.generator, 4, num_samples=16, grid_size=20, seed=5)
    assert a.genome == b.genome and a.image_steps == 20 * 16
    a.genome.validate(1000)
    grid = {int(round(v)) for v in np.linspace(999, 0, 20)}
    assert set(a.genome.timesteps) <= grid


def test_ays_is_the_published_schedule_at_ten_steps_and_interpolates_otherwise() -> None:
    from diffusers import DDPMScheduler

    ab = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    assert ays_schedule(10, ab).timesteps == (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)
    five = ays_schedule(5, ab)
    five.validate(1000)
    assert five.timesteps[0] == 999 and five.timesteps[-1] == 24


# --- fast FID -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,n", [(64, 1000), (256, 100)])  # (256, 100): singular sample covariance
def test_fast_fid_equals_torch_fidelity(dim: int, n: int) -> None:
    rng = np.random.default_rng(dim)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    f1, f2 = rng.normal(size=(n, dim)) @ mix, rng.normal(size=(2000, dim)) @ mix * 1.2 + 0.05
    a = FIDStats(f1.mean(0), np.cov(f1, rowvar=False), n)
    ref = FIDStats(f2.mean(0), np.cov(f2, rowvar=False), 2000)
    expected = fid_from_stats(a, ref)
    assert fast_fid(a, ref) == pytest.approx(expected, rel=1e-6)
    assert fast_fid(a, ref) == pytest.approx(expected, rel=1e-6)  # with the cached square root
    other = FIDStats(ref.mu, ref.sigma * 2.0, 2000)  # a new reference is not served from the cache
    assert fast_fid(a, other) == pytest.approx(fid_from_stats(a, other), rel=1e-6)


# --- final table ---------------------------------------------------------------------------------
def test_final_ratios_name_the_best_heuristic_and_the_best_peer() -> None:
    table = pd.DataFrame({"schedule": ["searched", "ddim_uniform", "trailing", "gits_dp", "user0"],
                          "kind": ["searched", "heuristic", "heuristic", "peer", "user"],
                          "fid_final": [1.0, 2.0, 4.0, 1.6, 1.25]})
    out = add_ratios(table).set_index("schedule")
    assert out.loc["searched", "ratio_to_best_heuristic"] == pytest.approx(0.5)
    assert out.loc["searched", "ratio_to_best_peer"] == pytest.approx(1.0 / 1.6)
    assert out.loc["searched", "ratio_to_best_baseline"] == pytest.approx(0.8)


# --- every sampler through the CLI: SIGKILL, resume, refusal --------------------------------------
def _states(db: Path) -> dict[str, int]:
    import sqlite3

    try:
        with sqlite3.connect(db, timeout=30) as con:
            rows = list(con.execute("select state, count(*) from trials group by state"))
    except sqlite3.OperationalError:
        return {}
    return {state: n for state, n in rows}


def _running_with_owner(db: Path) -> int:
    """RUNNING trials whose owner and genome are recorded: killed before the owner (a window of a few statements
    inside ask), a trial is an orphan only the heartbeat rule or a later worker can free; killed before the genome,
    there is no candidate to evaluate again. The test kills after both."""
    import sqlite3

    has = "exists (select 1 from trial_system_attributes a where a.trial_id = t.trial_id and a.key = '{}')"
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return int(con.execute(f"select count(*) from trials t where t.state = 'RUNNING' and {has.format('autodiff:owner')}"
                                   f" and {has.format('autodiff:genome')}").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_resumes_after_sigkill_and_refuses_another(sampler: str, tiny_model_dir: Path,
                                                                     tiny_reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    samples, batch, budget = 120, 20, 10  # a candidate runs in 6 batches: time to be killed mid-candidate
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, db, **{
        "search.sampler": sampler, "search.num_samples": samples, "search.batch_size": batch, "search.budget": budget,
        "search.peers": "[gits_dp]", "search.peer_samples": 16, "search.peer_grid": 20, "final.num_samples": 48,
        "final.repeats": 1, "storage.study_name": "s"})
    kill_when(lambda: (s := _states(db)).get("COMPLETE", 0) >= 4 and s.get("RUNNING", 0) == 1
              and _running_with_owner(db) == 1, overrides, tmp_path, tmp_path / "run1")
    killed = _load(db)
    done_before = {t.number: genome_of(t).key() for t in killed.trials if t.state == TrialState.COMPLETE}
    interrupted = [t.number for t in killed.trials if t.state == TrialState.RUNNING]
    resumed = run_cli(overrides, tmp_path, tmp_path / "run2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = _load(db)
    for number, key in done_before.items():
        assert study.trials[number].state == TrialState.COMPLETE and genome_of(study.trials[number]).key() == key
    assert interrupted and all(study.trials[n].state == TrialState.FAIL for n in interrupted)
    if sampler.startswith("autodiffusion"):  # our samplers never evaluate a genome twice (built-ins may)
        finished = [genome_of(t).key() for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(finished) == len(set(finished)), "a finished candidate was evaluated again"
        retried = genome_of(study.trials[interrupted[0]])
        assert retried is not None and retried.key() in finished, "the interrupted candidate was not evaluated again"
    assert {t.user_attrs.get("baseline") for t in study.trials} >= {"ddim_uniform", "trailing", "gits_dp"}
    final = pd.read_csv(tmp_path / "run2" / "final.csv")
    assert set(final.kind) == {"searched", "heuristic", "peer"}
    spent = sum(t.user_attrs.get(IMAGE_STEPS_ATTR, 0) for t in study.trials if t.state != TrialState.RUNNING)
    assert spent + 20 * 16 >= budget * samples * 4, "the search stopped before its budget"
    other = "tpe" if sampler != "tpe" else "random"
    refused = run_cli([o for o in overrides if not o.startswith("search.sampler=")] + [f"search.sampler={other}"],
                      tmp_path, tmp_path / "run3", timeout=120)
    assert refused.returncode == 2 and "sampler" in refused.stderr.strip().splitlines()[-1]
    json.loads((tmp_path / "run2" / "best_schedule.json").read_text())


def test_sqlite_storage_commits_without_fsync_and_keeps_what_it_committed(tmp_path: Path) -> None:
    import sqlite3

    from autodiff_opt.search.study import make_storage

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=make_storage(url), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    with sqlite3.connect(tmp_path / "s.db") as con:
        assert con.execute("pragma journal_mode").fetchone()[0] == "wal"
    again = optuna.load_study(study_name="s", storage=url)  # a new client (another process) sees every trial
    assert [t.state for t in again.trials] == [TrialState.COMPLETE] * 3


# --- the default experiment through the CLI: what a user runs first -------------------------------------
DEFAULT_RUN = ["search.budget=12", "search.population=4", "search.num_parents=2", "search.num_mutants=2",
               "search.num_crossovers=1", "search.init_random=2", "search.num_samples=200", "search.batch_size=200",
               "final.num_samples=400", "final.repeats=2", "search.peer_samples=32", "progress=false"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The embedded model (builtin:digits-ddpm) and extractor (digits-cnn), the default sampler, peers and
    report, on a budget of 12 candidate-equivalents: (run dir, study)."""
    tmp = tmp_path_factory.mktemp("default-run")
    db = tmp / "s.db"
    proc = run_cli([*DEFAULT_RUN, f"storage.url=sqlite:///{db}"], tmp, tmp / "run", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", _load(db)


@pytest.mark.slow
def test_default_run_final_table_against_the_study_and_by_hand(default_run) -> None:  # type: ignore[no-untyped-def]
    run_dir, study = default_run
    assert study.user_attrs["autodiff:signature"]["search.sampler"] == "autodiffusion"
    assert study.user_attrs["autodiff:signature"]["model.pretrained"] == "builtin:digits-ddpm"
    assert study.user_attrs["autodiff:signature"]["metric.feature_extractor"] == "digits-cnn"
    assert study.metric_names == ["FID"] and any(t.state == TrialState.PRUNED for t in study.trials)
    final = pd.read_csv(run_dir / "final.csv").set_index("schedule")
    heuristics = ["ddim_uniform", "trailing", "quadratic", "logsnr", "karras"]
    assert list(final.index) == ["searched", *heuristics, "gits_dp"]  # ays is published for Stable Diffusion only
    assert list(final.kind) == ["searched"] + ["heuristic"] * 5 + ["peer"]
    assert final.loc["ddim_uniform", "timesteps"] == "[750, 500, 250, 0]"  # T = 1000, K = 4 by hand
    assert final.loc["trailing", "timesteps"] == "[999, 749, 499, 249]"
    assert final.loc["quadratic", "timesteps"] == "[800, 356, 89, 0]"  # round(800 i^2 / 9)
    assert (final.nfe == 4).all() and (final.skipped_layers == 0).all() and (final.cost_full_steps == 4).all()
    # each row's search FID is its trial's value in the study; the searched row is the study's best
    done = study.get_trials(states=(TrialState.COMPLETE,))
    by_steps = {tuple(genome_of(t).timesteps): t.values[0] for t in done}
    for name, row in final.iterrows():
        assert row.fid_search == pytest.approx(by_steps[tuple(json.loads(row.timesteps))], rel=1e-12), name
    assert final.loc["searched", "fid_search"] == pytest.approx(min(by_steps.values()), rel=1e-12)
    assert json.loads(final.loc["searched", "timesteps"]) == list(genome_of(study.best_trial).timesteps)
    # ratios by hand from the table's own FIDs on fresh seeds
    best_heuristic = final.loc[heuristics, "fid_final"].min()
    best_baseline = min(best_heuristic, final.loc["gits_dp", "fid_final"])
    for name, row in final.iterrows():
        assert row.ratio_to_best_baseline == pytest.approx(row.fid_final / best_baseline), name
        assert row.ratio_to_best_heuristic == pytest.approx(row.fid_final / best_heuristic), name
        assert row.ratio_to_best_peer == pytest.approx(row.fid_final / final.loc["gits_dp", "fid_final"]), name
    assert (final.fid_final_std > 0).all()  # two independent sample sets per schedule
    stored = pd.DataFrame(study.user_attrs["autodiff:final"]["rows"]).set_index("schedule")
    np.testing.assert_allclose(stored.fid_final, final.fid_final)  # what reruns and workers reuse


@pytest.mark.slow
def test_default_run_report_files_read_back_equal_the_study(default_run) -> None:  # type: ignore[no-untyped-def]
    run_dir, study = default_run
    trials = pd.read_csv(run_dir / "trials.csv").set_index("trial")
    assert list(trials.index) == [t.number for t in study.trials]
    for t in study.trials:
        assert trials.loc[t.number, "state"] == t.state.name
        if t.state == TrialState.COMPLETE:
            assert trials.loc[t.number, "fid"] == pytest.approx(t.values[0], rel=1e-12)
    generations = pd.read_csv(run_dir / "generations.csv").set_index("generation")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    gens = sorted({t.system_attrs["autodiff:generation"] for t in done})
    assert list(generations.index) == gens
    for g in gens:
        fids = [t.values[0] for t in done if t.system_attrs["autodiff:generation"] == g]
        assert generations.loc[g, "candidates"] == len(fids)
        assert generations.loc[g, "best_fid"] == pytest.approx(min(fids), rel=1e-12)
        assert generations.loc[g, "median_fid"] == pytest.approx(float(np.median(fids)), rel=1e-12)
    final = pd.read_csv(run_dir / "final.csv")
    lines = (run_dir / "final.md").read_text().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == list(final.columns) and len(lines) == 2 + len(final)
    for line, row in zip(lines[2:], final.itertuples()):
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["schedule"] == row.schedule and float(cells["fid_final"]) == pytest.approx(row.fid_final, abs=5e-4)


@pytest.mark.slow
def test_default_run_exported_schedule_and_its_snippet(default_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from autodiff_opt.apply import main as apply_main

    run_dir, study = default_run
    best = json.loads((run_dir / "best_schedule.json").read_text())
    assert best["timesteps"] == list(genome_of(study.best_trial).timesteps)
    assert best["trial"] == study.best_trial.number and best["fid_search"] == study.best_value
    assert best["skipped_layers"] == [[]] * 4 and best["skipped_layer_names"] == [[]] * 4 and best["nfe"] == 4
    assert (best["model"], best["subfolder"], best["solver"], best["clip_x0"]) == ("builtin:digits-ddpm", None, "ddim", True)
    assert best["study"] == study.study_name and best["storage"].startswith("sqlite:///")
    final = pd.read_csv(run_dir / "final.csv")
    assert [r["schedule"] for r in best["final"]] == list(final.schedule)
    np.testing.assert_allclose([r["fid_final"] for r in best["final"]], final.fid_final)
    assert "builtin:" not in best["diffusers_snippet"]
    assert f"set_timesteps(timesteps={best['timesteps']})" in best["diffusers_snippet"]
    scope: dict[str, object] = {}
    exec(compile(best["diffusers_snippet"], "snippet", "exec"), scope)  # noqa: S102 - our own generated code
    images = scope["images"]
    assert images.shape == (16, 1, 8, 8) and images.dtype.is_floating_point is False
    assert 20 < float(images.float().std()) < 128, "the snippet's samples are blank or noise"
    apply_main([str(run_dir / "best_schedule.json"), "--num-images", "9", "--device", "cpu",
                "--out", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (2 + 3 * 34, 2 + 3 * 34)  # 3 x 3 tiles of 8 x 4 px


def test_study_signature_covers_every_objective_setting_and_allows_only_the_listed_ones(tmp_path: Path) -> None:
    from autodiff_opt.runner import RESUME_MAY_CHANGE, study_signature

    base = study_signature(compose_cfg([], tmp_path), SPACE)
    for override in ("model.guidance_scale=3.0", "model.classifier_scale=2.0", "model.prompts=p.txt",
                     "dataset.max_images=100", "metric.weights_path=w.pth", "search.sampler=tpe",
                     "search.rungs=[0.5]", "precision=bf16", "search.population=12"):
        changed = study_signature(compose_cfg([override], tmp_path), SPACE)
        assert changed != base, f"{override} would silently continue a study"
    for override in ("search.budget=400", "search.generations=30", "search.batch_size=100", "model.name=other",
                     "search.stage2.max_prun=0.3", "search.stop=budget", "search.patience=10",
                     "search.timeout=2h"):  # stage-2 settings count only with stage 2 on; when to stop is no objective
        assert study_signature(compose_cfg([override], tmp_path), SPACE) == base, override
    assert "search.budget" in RESUME_MAY_CHANGE
    on = study_signature(compose_cfg(["search.stage2.enabled=true"], tmp_path), SPACE)
    assert study_signature(compose_cfg(["search.stage2.enabled=true", "search.stage2.max_prun=0.3"], tmp_path), SPACE) != on


def test_dp_peer_clips_x0_for_pixel_models_whatever_the_solver(tiny_experiment) -> None:  # type: ignore[no-untyped-def]
    import copy
    from dataclasses import replace

    from autodiff_opt.runner import peer_clip_x0

    exp = copy.copy(tiny_experiment)
    exp.cfg = replace(tiny_experiment.cfg, solver=replace(tiny_experiment.cfg.solver, clip_x0=False))
    assert exp.model.decode is None and peer_clip_x0(exp) is True
