"""The end of a search and its progress: the callback `study.optimize` calls after every trial.

``Progress`` shows the candidates done (a bar on a terminal, a log line per population in a file),
stops a study whose candidates all fail, and asks the stop rule after every trial. The stop rule is
``fidelity.ImageStepBudget`` (image-steps spent) or, for whole generations (the authors' evolution),
``SearchBudget``: it ends a worker's loop once every slot of generations 0..G-1 is taken, and waits
(bounded) for the trials still running elsewhere instead of starting generation G; while it waits it
fails stale trials, so a dead worker's candidate is retried by a live one.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import optuna
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from autodiff_opt.core.errors import SearchAborted
from autodiff_opt.core.keys import GENERATION_ATTR
from autodiff_opt.search.fidelity import ImageStepBudget
from autodiff_opt.search.space import fid_of

if TYPE_CHECKING:
    from autodiff_opt.search.stopping import StopRule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetStatus:
    complete: int  # COMPLETE trials of generations < G
    assigned: int  # trials of generations < G that hold a slot (not FAIL), plus queued trials without one yet
    waiting: int  # WAITING trials (queued baselines, retries of stale trials)
    running: int  # RUNNING trials of generations < G
    beyond: int  # trials (not FAIL) of generations >= G: the sampler has moved past the budget


def budget_status(trials: Sequence[FrozenTrial], population: int, generations: int) -> BudgetStatus:
    complete = assigned = waiting = running = beyond = 0
    for t in trials:
        generation = t.system_attrs.get(GENERATION_ATTR)
        waiting += t.state == TrialState.WAITING
        if t.state == TrialState.FAIL:
            continue
        if generation is None:
            assigned += t.state == TrialState.WAITING
        elif generation < generations:
            assigned += 1
            complete += t.state == TrialState.COMPLETE
            running += t.state == TrialState.RUNNING
        else:
            beyond += 1
    return BudgetStatus(complete, assigned, waiting, running, beyond)


class SearchBudget:
    """A study.optimize callback: stop once generations 0..G-1 are complete, without starting generation G.

    While slots are free it lets the worker go on. Once every slot is taken but trials of other workers
    still run, it waits for them (polling every `poll` seconds, at most `drain_timeout`), failing stale
    ones meanwhile, and returns as soon as a trial is queued (a retry of a dead worker's candidate) so
    that this worker evaluates it. A worker that started generation G by a race (`beyond`) also waits.
    """

    def __init__(self, population: int, generations: int, poll: float = 1.0, drain_timeout: float = 3600.0) -> None:
        self.total = population * generations
        self.population, self.generations = population, generations
        self.poll, self.drain_timeout = poll, drain_timeout

    def _status(self, study: Study) -> BudgetStatus:
        return budget_status(study.get_trials(deepcopy=False), self.population, self.generations)

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        if self.should_stop(study):
            study.stop()

    def should_stop(self, study: Study) -> bool:
        """False at once while there is work; else waits (bounded) for other workers' trials."""
        status = self._status(study)
        deadline = time.monotonic() + self.drain_timeout
        while True:
            if status.complete >= self.total:
                break
            if status.assigned < self.total and not status.beyond:
                return False  # free slots: the sampler fills them
            if status.waiting:
                return False  # a queued trial (a retry) to evaluate
            if not status.running:
                # a slot freed late in an older generation: the sampler only fills its newest one
                log.warning("search budget: %d of %d candidates complete and nothing left running: stopping",
                            status.complete, self.total)
                break
            if time.monotonic() > deadline:
                log.warning("search budget: %d trial(s) still running elsewhere after %.0fs: this worker stops",
                            status.running, self.drain_timeout)
                break
            time.sleep(self.poll)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            status = self._status(study)
        return True


class Progress:
    """Progress over candidates (a bar on a terminal, a log line per `every` candidates in a file), and a
    guard that stops a study whose candidates all fail."""

    def __init__(self, budget: SearchBudget | ImageStepBudget, done: float, max_failures: int, enabled: bool,
                 every: int = 10, stop: "SearchBudget | ImageStepBudget | StopRule | None" = None) -> None:
        self.total = budget.candidates if isinstance(budget, ImageStepBudget) else budget.total
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=round(self.total, 1), initial=round(done, 1), desc="candidates", unit="cand",
                        disable=not (enabled and self.tty))
        self.log_lines = enabled and not self.tty
        self.budget, self.max_failures, self.failures = budget, max_failures, 0
        self.stop = stop if stop is not None else budget  # the budget, or stopping.StopRule around it
        self.best, self.done, self.every = float("inf"), done, every
        self.next_line, self.t0, self.done0 = (done // every + 1) * every, time.perf_counter(), done

    def _advance(self, trial: FrozenTrial) -> None:
        if isinstance(self.budget, ImageStepBudget):  # pruned candidates count the part they cost
            step = trial.user_attrs.get("image_steps", 0) / self.budget.unit
        else:
            step = 1.0 if trial.state == TrialState.COMPLETE else 0.0
        step = max(0.0, min(step, self.total - self.done))
        self.done += step
        self.bar.update(round(step, 3))
        if self.log_lines and self.done >= self.next_line:
            self.next_line = (self.done // self.every + 1) * self.every
            elapsed = time.perf_counter() - self.t0
            rate = (self.done - self.done0) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            log.info("search: %.1f/%.0f candidates, best FID %.4g, %.2f candidates/s, ETA %.0fs",
                     self.done, self.total, self.best, rate, eta)

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE:
            self.failures = 0
            self.best = min(self.best, fid_of(trial) if fid_of(trial) is not None else self.best)
        self._advance(trial)
        if trial.state == TrialState.COMPLETE:
            self.bar.set_postfix(best=f"{self.best:.3f}", gen=trial.system_attrs.get("autodiff:generation"), refresh=False)
        elif trial.state == TrialState.FAIL:
            self.failures += 1
            if self.failures >= self.max_failures:
                study.stop()
                raise SearchAborted(
                    f"{self.failures} candidates failed in a row (last: {trial.user_attrs.get('fail_reason')}):"
                    " the setup is broken, not the candidates; finished trials are kept in the study"
                )
        if self.stop.should_stop(study):  # converged, timeout, or the budget (which waits for others' last trials)
            study.stop()
