"""search.stop and search.timeout: the convergence rule on hand-built trial histories, the stop rule on
real studies (resume, two workers, a timeout across processes), and the CLI after a SIGKILL."""

from __future__ import annotations

import math
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from autodiff_opt import preflight
from autodiff_opt.config import SearchConfig
from autodiff_opt.core.errors import ConfigError
from autodiff_opt.core.keys import BASELINE_ATTR, IMAGE_STEPS_ATTR, STOP_ATTR
from autodiff_opt.search.fidelity import ImageStepBudget
from autodiff_opt.search.study import make_storage
from cli_helpers import kill_when, load_study, run_cli, tiny_overrides
from autodiff_opt.search.stopping import (MIN_PAIRS, SearchClock, StopChoiceError, StopRule, Trace, converged_at,
                                          parse_timeout, stored_seconds, verdicts)

optuna.logging.set_verbosity(optuna.logging.WARNING)

N = 1000  # search samples; the rung is the first half
UNIT = 4 * N  # image-steps of one full candidate (K = 4)
BASELINES = (2.8, 2.7, 5.1, 10.6, 14.8)  # true FIDs of the enqueued schedules (the default run's, roughly)


def _trial(true_fid: float, noise: float, rng: np.random.Generator, baseline: str | None = None,
           prune_above: float | None = None) -> FrozenTrial:
    """A candidate scored on two halves of the samples (per-half log noise ``noise``): its FID on the first
    half (the rung) and on all samples; pruned at the rung (half the cost) when the rung FID is above
    ``prune_above``."""
    first, second = rng.normal(0.0, noise, 2)
    prefix, full = true_fid * math.exp(first), true_fid * math.exp((first + second) / 2)
    attrs: dict[str, object] = {IMAGE_STEPS_ATTR: UNIT}
    if baseline:
        attrs[BASELINE_ATTR] = baseline
    if prune_above is not None and prefix > prune_above and not baseline:
        return create_trial(state=TrialState.PRUNED, value=prefix, intermediate_values={N // 2: prefix},
                            user_attrs={IMAGE_STEPS_ATTR: UNIT // 2})
    return create_trial(value=full, intermediate_values={N // 2: prefix}, user_attrs=attrs,
                        params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)})


def _history(true_fids: list[float], noise: float, seed: int = 0, prune: bool = False) -> list[FrozenTrial]:
    rng = np.random.default_rng(seed)
    trials = [_trial(v, noise, rng, baseline=f"b{i}") for i, v in enumerate(BASELINES)]
    best = min(t.value for t in trials)
    for v in true_fids:
        trials.append(_trial(v, noise, rng, prune_above=2 * best if prune else None))
        if trials[-1].state == TrialState.COMPLETE:
            best = min(best, trials[-1].value)
    for i, t in enumerate(trials):
        t.number = i
    return trials


def _study(trials: list[FrozenTrial], storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    study = optuna.create_study(storage=storage)
    study.add_trials(trials)
    return study


# --- the rule on hand-built histories ----------------------------------------------------------------
def test_flat_history_converges_one_window_after_the_last_real_gain() -> None:
    """The best is reached by the 10th searched candidate; then only worse ones (the noise of a real objective)."""
    searched = [2.0, 1.9, 1.8, 1.75, 1.7, 1.68, 1.66, 1.65, 1.66, 1.65] + [1.7 + 0.02 * (i % 9) for i in range(80)]
    found = converged_at(_history(searched, noise=0.03), UNIT, N, patience=20)
    assert found is not None
    assert 5 + 20 <= found.spent <= 5 + 10 + 20 + 1, found  # at most one window after the plateau began
    assert found.gain <= found.noise and found.reliability >= 0.5
    assert 0.01 < found.noise < 0.05  # the per-half noise 0.03 seen on the full sample set: 0.03 / sqrt(2)


def test_improving_history_never_converges() -> None:
    """3% better every candidate-equivalent: far above the noise, so the search goes on to its budget."""
    searched = [2.0 * 0.97 ** i for i in range(90)]
    assert converged_at(_history(searched, noise=0.01), UNIT, N, patience=20) is None


def test_noisy_objective_never_converges() -> None:
    """Every candidate equally good, measured with noise far larger than any difference (a tiny num_samples):
    new 'bests' keep coming by luck, and the halves do not agree on the order, so no convergence is claimed."""
    searched = [2.0] * 150
    trials = _history(searched, noise=0.6, seed=1)
    for t in trials:  # the baselines as noisy as the rest: nothing in this objective ranks anything
        t.values = [2.0 * math.exp(np.random.default_rng(t.number).normal(0, 0.3))]
    trace = verdicts(trials, UNIT, N, patience=20)
    assert not any(v.converged for v in trace)
    assert trace[-1].reliability is not None and trace[-1].reliability < 0.5


def test_pruned_candidates_count_half_and_the_window_starts_after_the_baselines() -> None:
    searched = [1.6, 1.9, 2.0] + [4.0] * 80  # three good candidates, then only ones pruned at the rung
    trace = verdicts(_history(searched, noise=0.02, prune=True), UNIT, N, patience=10)
    assert [round(v.spent, 1) for v in trace[:10]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 8.5, 9.0]
    found = next(v for v in trace if v.converged)
    assert found.spent == pytest.approx(6 + 10)  # one window after the best (at 6), never inside the baselines


def test_a_sampler_that_prunes_nothing_is_held_through_a_flat_stretch_shorter_than_its_candidate_window() -> None:
    """TPE-like: every candidate costs one candidate-equivalent and the best improves in rare jumps: 40
    candidates without a gain, then one 10% better. A window of 20 candidate-equivalents alone stops in
    the flat stretch; with patience_candidates=60 the window reaches back 60 candidates, so the search
    runs past the jump and stops 60 candidates after it."""
    flat = [2.2 + 0.02 * (i % 7) for i in range(130)]
    searched = [2.0, 1.9, 1.8] + flat[:40] + [1.6] + flat[40:]
    jump = len(BASELINES) + 43  # the trial number of the 1.6 candidate
    trials = _history(searched, noise=0.03)
    short = converged_at(trials, UNIT, N, 20.0, 0)
    held = converged_at(trials, UNIT, N, 20.0, 60)
    assert short is not None and short.trial < jump, short
    assert held is not None and jump + 60 <= held.trial <= jump + 61, held
    assert held.best < 0.92 * short.best and held.gain <= held.noise


def test_the_candidate_window_does_not_bind_where_candidates_are_cheap() -> None:
    """Candidates pruned at the rung cost half: 10 candidate-equivalents hold more than 10 candidates, so
    patience_candidates=10 stops where the compute window alone does; 40 candidates reach further back."""
    searched = [1.6, 1.9, 2.0] + [4.0] * 80
    trials = _history(searched, noise=0.02, prune=True)
    alone = converged_at(trials, UNIT, N, 10.0, 0)
    assert alone is not None and converged_at(trials, UNIT, N, 10.0, 10) == alone
    further = converged_at(trials, UNIT, N, 10.0, 40)
    assert further is not None and further.trial == len(BASELINES) + 40 > alone.trial


def test_too_few_completed_candidates_to_measure_the_noise() -> None:
    searched = [8.0] * 60  # all pruned: only the baselines complete, fewer than MIN_PAIRS
    trace = verdicts(_history(searched, noise=0.02, prune=True), UNIT, N, patience=10)
    assert len(BASELINES) < MIN_PAIRS and not any(v.converged for v in trace)
    assert trace[-1].noise is None


def test_verdict_reads_only_the_finished_prefix_and_never_changes() -> None:
    searched = [2.0, 1.8, 1.7, 1.65] + [1.8] * 40
    trials = _history(searched, noise=0.03)
    found = converged_at(trials, UNIT, N, patience=15)
    assert found is not None
    running = trials[: found.trial]  # one trial before the stop still running: no verdict past it
    running.append(create_trial(state=TrialState.RUNNING))
    running[-1].number = found.trial
    assert converged_at(running + trials[found.trial + 1:], UNIT, N, patience=15) is None
    later = trials + [_trial(0.5, 0.03, np.random.default_rng(9))]  # a far better candidate after the stop
    later[-1].number = len(trials)
    assert converged_at(later, UNIT, N, patience=15) == found
    trace = Trace(UNIT, N, 15)  # fed piecewise (as a worker does after every trial): the same stop
    for end in range(0, len(trials) + 1, 7):
        trace.feed(trials[:end])
    trace.feed(trials)
    assert trace.first == found


# --- settings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("30m", 1800), ("1h30m", 5400), ("90s", 90), ("45", 45),
                                           (120, 120), (0.5, 0.5), (None, None), ("null", None)])
def test_timeout_durations(text: object, seconds: float | None) -> None:
    assert parse_timeout(text) == seconds


@pytest.mark.parametrize("search, message", [
    ({"stop": "never"}, "search.stop='never' is unknown: use converged or budget"),
    ({"timeout": "2 hours"}, "search.timeout='2 hours': use a duration like 2h"),
    ({"timeout": 0}, "search.timeout=0: must be positive"),
    ({"patience": 0}, "search.patience=0: candidate-equivalents, must be positive"),
    ({"patience_candidates": -1}, "search.patience_candidates=-1: a number of candidates, 0 or more"),
    ({"patience_candidates": 2.5}, "search.patience_candidates=2.5: a number of candidates, 0 or more"),
])
def test_bad_stop_settings_are_refused(search: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preflight.check_search(SearchConfig(**search))
    with pytest.raises(StopChoiceError):
        parse_timeout("soon")


# --- the rule on real studies -------------------------------------------------------------------------
def _rule(study: optuna.Study, budget: float = 200, timeout: float | None = None, clock: SearchClock | None = None,
          converge: bool = True) -> StopRule:
    return StopRule(ImageStepBudget(int(budget * UNIT), UNIT), UNIT, N, converge, 20.0, timeout, clock)


def test_stop_is_recorded_in_the_study_with_its_reason(tmp_path: Path) -> None:
    study = _study(_history([2.0, 1.7, 1.65] + [1.8] * 60, noise=0.03), storage=f"sqlite:///{tmp_path / 's.db'}")
    found = converged_at(study.trials, UNIT, N, 20.0)
    assert _rule(study).should_stop(study)
    stop = study.user_attrs[STOP_ATTR]
    assert stop["reason"] == "converged" and stop["trial"] == found.trial
    assert stop["text"].startswith(f"converged at {stop['candidates']:.1f} candidate-equivalents (trial {found.trial})")
    budget_only = _rule(study, budget=30, converge=False)
    assert budget_only.should_stop(study) and study.user_attrs[STOP_ATTR]["reason"] == "budget"
    assert not _rule(study, budget=500, converge=False).should_stop(study)


def test_timeout_counts_every_process_across_resumes(tmp_path: Path) -> None:
    """Search seconds live in the study: a resumed process (or another worker) adds to those stored."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = _study(_history([2.0] * 3, noise=0.03), storage=storage)
    now = [0.0]
    first = SearchClock(study, now=lambda: now[0])
    now[0] = 50.0
    assert not _rule(study, timeout=90, clock=first).should_stop(study)  # 50 s of 90
    first.save(force=True)
    resumed = optuna.load_study(study_name=study.study_name, storage=storage)  # the process after a restart
    later = [1000.0]
    second = SearchClock(resumed, now=lambda: later[0])
    assert stored_seconds(resumed) == pytest.approx(50.0)
    later[0] = 1030.0
    assert not _rule(resumed, timeout=90, clock=second).should_stop(resumed)  # 50 + 30
    later[0] = 1041.0
    assert _rule(resumed, timeout=90, clock=second).should_stop(resumed)  # 50 + 41 >= 90
    stop = resumed.user_attrs[STOP_ATTR]
    assert stop["reason"] == "timeout" and stop["seconds"] == pytest.approx(91.0)
    assert resumed.user_attrs["search_seconds"] == pytest.approx(91.0)


def _objective(trial: optuna.Trial) -> float:
    """A real objective on two halves of 'samples': the same (x - 0.3)^2 landscape for every worker."""
    x = trial.suggest_float("x", 0, 1)
    rng = np.random.default_rng(int(x * 1e6))
    true = 1.5 + 4 * (x - 0.3) ** 2
    first, second = rng.normal(0, 0.02, 2)
    trial.report(true * math.exp(first), N // 2)
    trial.set_user_attr(IMAGE_STEPS_ATTR, UNIT)
    return true * math.exp((first + second) / 2)


def test_two_workers_on_one_study_stop_together(tmp_path: Path) -> None:
    """Two workers (each its own storage connection, sampler and stop rule) on one study: both stop on the
    same trial's verdict, each after at most the one trial it had in flight, far below the budget."""
    url = f"sqlite:///{tmp_path / 's.db'}"  # the project's SQLite settings (WAL, a 60 s lock wait)
    study = optuna.create_study(storage=make_storage(url, None), study_name="w", sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[int, dict | BaseException | None] = {}

    def worker(seed: int) -> None:
        try:
            mine = optuna.load_study(study_name="w", storage=make_storage(url, None),
                                     sampler=optuna.samplers.RandomSampler(seed=seed))
            rule = _rule(mine, budget=400)
            mine.optimize(_objective, callbacks=[lambda s, t: s.stop() if rule.should_stop(s) else None])
            seen[seed] = rule.reason
        except BaseException as err:  # noqa: BLE001  (shown by the assertion below)
            seen[seed] = err

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    trials = study.get_trials(deepcopy=False)
    found = converged_at(trials, UNIT, N, 20.0)
    assert found is not None and len(trials) < 200
    assert all(isinstance(r, dict) for r in seen.values()) and len(seen) == 2, seen
    assert {seed: r["trial"] for seed, r in seen.items()} == {1: found.trial, 2: found.trial}
    assert {r["reason"] for r in seen.values()} == {"converged"}
    assert len([t for t in trials if t.number > found.trial]) <= 2  # at most one in flight per worker
    assert study.user_attrs[STOP_ATTR]["trial"] == found.trial


# --- the CLI: a SIGKILL and a resume stop where an uninterrupted run stops; the timeout across a resume ----
def _tiny(model: Path, reference: Path, db: Path, **extra: object) -> list[str]:
    return tiny_overrides(model, reference, db, **{
        "search.sampler": "autodiffusion", "search.num_samples": 96, "search.batch_size": 24, "search.budget": 60,
        "search.patience": 6, "search.patience_candidates": 10, "final.num_samples": 32, "final.repeats": 1, "report.grid_size": 0, **extra})


def _searched(db: Path) -> list[str]:
    """Genome keys of the trials that did not fail, in trial order."""
    from autodiff_opt.search.evolution import genome_of

    genomes = [genome_of(t) for t in load_study(db).trials if t.state != TrialState.FAIL]
    return [g.key() for g in genomes if g is not None]  # a trial killed while its genome was chosen has none


def test_sigkill_then_resume_stops_at_the_candidate_of_an_uninterrupted_run(tiny_model_dir: Path, tiny_reference: Path,
                                                                          tmp_path: Path) -> None:
    whole = run_cli(_tiny(tiny_model_dir, tiny_reference, tmp_path / "a.db"), tmp_path, tmp_path / "a")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stop = load_study(tmp_path / "a.db").user_attrs[STOP_ATTR]
    assert stop["reason"] == "converged" and stop["candidates"] < 60, stop
    assert "Search stopped: converged at" in (tmp_path / "a" / "report.html").read_text()

    db = tmp_path / "b.db"
    overrides = _tiny(tiny_model_dir, tiny_reference, db)

    def mid_search() -> bool:  # a searched candidate is being evaluated, well before the stop
        if not db.exists():
            return False
        # Optuna's own table, read with sqlite3: a poll costs milliseconds, not a load_study (~0.1 s), so the
        # short window of a tiny candidate is not missed on a fast machine
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
                states = [row[0] for row in con.execute("SELECT state FROM trials")]
        except sqlite3.Error:  # the study is being created
            return False
        # a candidate running (its genome chosen or being chosen) after three finished
        return states.count("COMPLETE") >= 3 and "RUNNING" in states

    kill_when(mid_search, overrides, tmp_path, tmp_path / "b1")
    assert len(_searched(db)) < len(_searched(tmp_path / "a.db"))
    resumed = run_cli(overrides, tmp_path, tmp_path / "b2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_study(db)
    assert any(t.state == TrialState.FAIL for t in again.trials), "the kill left no failed trial"
    assert _searched(db) == _searched(tmp_path / "a.db")  # the same candidates, the same stop
    assert again.user_attrs[STOP_ATTR]["reason"] == "converged"
    assert again.user_attrs[STOP_ATTR]["candidates"] == pytest.approx(stop["candidates"])

    seconds = stored_seconds(again)  # both processes' search time
    assert seconds > 0
    later = run_cli([*overrides, "search.stop=budget", "search.budget=500", f"search.timeout={seconds / 2:.3f}",
                     "final.enabled=false"], tmp_path, tmp_path / "b3")
    assert later.returncode == 0, later.stderr[-3000:]
    assert _searched(db) == _searched(tmp_path / "a.db"), "a trial started after the timeout"
    assert load_study(db).user_attrs[STOP_ATTR]["reason"] == "timeout"


def test_the_budget_runs_a_lost_candidates_retry_before_it_ends_the_search() -> None:
    """A worker killed near the end of the budget: its candidate, queued again by Optuna's retry callback,
    is evaluated before the budget ends the study (it used to stay WAITING, never scored)."""
    from autodiff_opt.search.study import retry_callback

    study = _study(_history([1.9, 1.8], noise=0.02))  # 7 candidate-equivalents spent
    budget = ImageStepBudget(5 * UNIT, UNIT)
    assert budget.should_stop(study)
    lost = study.ask({"x": FloatDistribution(0, 1)})
    study.tell(lost, state=TrialState.FAIL)  # what the heartbeat does to a dead worker's trial
    retry_callback(2)(study, study.trials[-1])
    assert [t.state for t in study.trials[-2:]] == [TrialState.FAIL, TrialState.WAITING]
    assert not budget.should_stop(study)
    retried = study.ask()  # a worker takes the queued retry first
    assert retried.params == lost.params
    study.tell(retried, 1.7)
    assert budget.should_stop(study)
    study.enqueue_trial({"x": 0.5})  # a queued trial that is no retry (a baseline) does not hold the study
    assert budget.should_stop(study)
