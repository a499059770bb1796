"""When the search stops: converged, the budget (a ceiling), or a wall-clock timeout across resumes.

**Convergence** (``search.stop=converged``, the default). The search has converged when the best search
FID has not improved by more than the search FID's own noise over a window that reaches back at least
``search.patience`` candidate-equivalents (compute) and at least ``search.patience_candidates`` candidates
(proposals, pruned ones included; failed ones not). The first bound is what binds for a sampler that
prunes (the default sampler proposes about three candidates per candidate-equivalent); the second binds
for one that scores every candidate on all samples (TPE, GP): those improve in rare jumps after long flat
stretches, and a window of 30 of their candidates ended them 2-9% short of their own 200-candidate result
(docs/search.md). The noise is measured on the study itself: every candidate scored on the full
sample set also has its FID on the largest rung (a prefix of the same samples, fraction f). With common
random numbers the part of the noise shared by all candidates cancels; what is left differs per
candidate, and the spread across candidates of log(FID_full / FID_prefix), scaled by sqrt(f / (1 - f)),
estimates the relative noise of one candidate's full FID (for f = 1/2: FID_full - FID_prefix is half the
difference of the two halves, whose std is the full FID's). A robust spread (1.4826 x median absolute
deviation) keeps a few odd candidates from inflating it.

An objective that cannot rank candidates never converges: the two halves of the samples (prefix and
rest, the rest's FID estimated from the full and prefix ones) must agree on the order of the candidates,
a split-half correlation of log FID of at least ``MIN_RELIABILITY``. A noisy objective (tiny
``num_samples``, a metric at its floor) fails that test and runs to the budget.

The verdict is a pure function of the stored trials: it is evaluated on every prefix of the trials in
trial-number order in which every trial has finished, and the first prefix that satisfies it is the stop.
A later trial cannot undo it, so every worker and a resumed process find the same stop. Failed trials
count nothing toward the window (a crash says nothing about convergence; a SIGKILLed candidate is
retried under a new number).

**Timeout** (``search.timeout``): search seconds (not model loading or the final evaluation) are kept in
the study, one system attribute per process, so the ceiling holds across resumes; with several workers
their seconds add up (worker-seconds: "two GPU-hours" on two GPUs is one hour of wall clock). A trial
that has started is finished; none starts after the timeout.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autodiff_opt.core.errors import ConfigError
from autodiff_opt.core.keys import (BASELINE_ATTR, IMAGE_STEPS_ATTR, PEER_COST_ATTR, SEARCH_SECONDS_ATTR,
                                   SEARCH_SECONDS_PREFIX, STOP_ATTR)
from autodiff_opt.search.storage_compat import set_study_system_attr, study_system_attrs

log = logging.getLogger(__name__)

STOPS = ("converged", "budget")
MIN_RELIABILITY = 0.5  # split-half correlation of log FID below which the objective cannot rank candidates
MIN_PAIRS = 8  # completed candidates with a prefix FID needed to measure the noise
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StopChoiceError(ConfigError):
    """search.stop, search.patience or search.timeout is wrong."""


def parse_timeout(value: Any) -> float | None:
    """'2h', '30m', '45s', '1h30m' or a number of seconds -> seconds; None/null -> no timeout."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
        if not text or parts is None or not any(parts.groups()):
            raise StopChoiceError(f"search.timeout={value!r}: use a duration like 2h, 30m, 1h30m, 90s or seconds")
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + s
    if not seconds > 0:
        raise StopChoiceError(f"search.timeout={value!r}: must be positive (or null for none)")
    return seconds


def check_stop(stop: Any, patience: Any, timeout: Any, patience_candidates: Any = 0) -> None:
    """The stop settings, checked before any work (raises StopChoiceError)."""
    if str(stop) not in STOPS:
        raise StopChoiceError(f"search.stop={stop!r} is unknown: use converged or budget")
    if patience is not None and not float(patience) > 0:
        raise StopChoiceError(f"search.patience={patience}: candidate-equivalents, must be positive")
    if patience_candidates is not None and (isinstance(patience_candidates, bool) or not isinstance(patience_candidates, int)
                                            or patience_candidates < 0):
        raise StopChoiceError(f"search.patience_candidates={patience_candidates!r}: a number of candidates, 0 or more"
                              " (0: the window is search.patience candidate-equivalents alone)")
    parse_timeout(timeout)


# --- convergence ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """The stop rule evaluated at the end of one prefix of the trials."""

    trial: int  # number of the prefix's last trial
    spent: float  # candidate-equivalents of completed and pruned candidates in the prefix (failed: none)
    best: float  # best search FID so far
    gain: float  # log(best one window earlier / best now)
    noise: float | None  # relative noise of one candidate's full FID (None: too few candidates to say)
    reliability: float | None  # split-half correlation of log FID across candidates
    converged: bool


def _pair(t: FrozenTrial, num_samples: int) -> tuple[float, float] | None:
    """(log FID on the largest rung, log FID on all samples) of a completed candidate, and the rung's fraction."""
    if t.state != TrialState.COMPLETE or not t.values or not t.intermediate_values:
        return None
    step = max(t.intermediate_values)
    full, prefix = float(t.values[0]), float(t.intermediate_values[step])
    if not (0 < step < num_samples and full > 0 and prefix > 0 and math.isfinite(full) and math.isfinite(prefix)):
        return None
    return math.log(prefix), math.log(full)


def noise_and_reliability(pairs: Sequence[tuple[float, float, float]]) -> tuple[float | None, float | None]:
    """From (fraction f, log prefix FID, log full FID) per candidate: the relative noise of a full FID and
    the split-half correlation of log FID (prefix vs the rest, the rest's log FID estimated linearly)."""
    if len(pairs) < MIN_PAIRS:
        return None, None
    f = np.array([p[0] for p in pairs])
    lp, lf = np.array([p[1] for p in pairs]), np.array([p[2] for p in pairs])
    d = (lf - lp) * np.sqrt(f / (1.0 - f))
    noise = float(1.4826 * np.median(np.abs(d - np.median(d))))
    rest = (lf - f * lp) / (1.0 - f)
    if np.std(lp) == 0 or np.std(rest) == 0:
        return noise, 0.0
    return noise, float(np.corrcoef(lp, rest)[0, 1])


class Trace:
    """The rule at the end of every finished prefix of the trials (trial-number order), fed incrementally:
    each finished prefix is read once, so a check after every trial costs what the new trials cost."""

    def __init__(self, unit: float, num_samples: int, patience: float, patience_candidates: int = 0) -> None:
        self.unit, self.num_samples = unit, num_samples
        self.patience, self.patience_candidates = patience, patience_candidates
        self.count, self.spent, self.best, self.seeded = 0, 0.0, math.inf, 0.0
        self.proposed, self.seeded_proposed = 0, 0  # candidates that did not fail; how many were enqueued ones
        self.spents: list[float] = []  # after each trial, non-decreasing
        self.proposeds: list[int] = []  # after each trial, non-decreasing
        self.bests: list[float] = []
        self.pairs: list[tuple[float, float, float]] = []
        self._noise: tuple[int, tuple[float | None, float | None]] = (-1, (None, None))
        self.first: Verdict | None = None  # the first converged prefix

    def feed(self, trials: Sequence[FrozenTrial]) -> list[Verdict]:
        """Read the trials not seen yet, up to the first unfinished one; their verdicts."""
        out = []
        for t in sorted(trials, key=lambda t: t.number)[self.count:]:
            if t.state not in FINISHED or t.number != self.count:  # unfinished, or one not visible here yet
                break
            out.append(self._add(t))
            if self.first is None and out[-1].converged:
                self.first = out[-1]
        return out

    def _add(self, t: FrozenTrial) -> Verdict:
        self.count += 1
        if t.state != TrialState.FAIL:
            self.spent += float(t.user_attrs.get(IMAGE_STEPS_ATTR, 0)) / self.unit
            self.proposed += 1
        if t.state == TrialState.COMPLETE and t.values and math.isfinite(t.values[0]):
            self.best = min(self.best, float(t.values[0]))
            if (pair := _pair(t, self.num_samples)) is not None:
                self.pairs.append((max(t.intermediate_values) / self.num_samples, *pair))
        if t.user_attrs.get(BASELINE_ATTR) is not None:
            self.seeded, self.seeded_proposed = self.spent, self.proposed  # the window starts after the enqueued schedules
        self.spents.append(self.spent)
        self.proposeds.append(self.proposed)
        self.bests.append(self.best)
        return self._verdict(t.number)

    def _verdict(self, number: int) -> Verdict:
        spent, best, patience, proposed = self.spent, self.best, self.patience, self.proposed
        window = spent - patience >= self.seeded and proposed - self.patience_candidates >= self.seeded_proposed
        noise, reliability = self._noise_now() if window else (None, None)
        i = min(bisect.bisect_right(self.spents, spent - patience),  # the window's start: the earlier of the two
                bisect.bisect_right(self.proposeds, proposed - self.patience_candidates)) - 1
        then = self.bests[i] if i >= 0 else math.inf
        gain = math.log(then / best) if math.isfinite(then) and math.isfinite(best) and best > 0 else math.inf
        converged = (window and noise is not None and reliability is not None and reliability >= MIN_RELIABILITY
                     and gain <= noise)
        return Verdict(number, spent, best, gain, noise, reliability, converged)

    def _noise_now(self) -> tuple[float | None, float | None]:
        if self._noise[0] != len(self.pairs):
            self._noise = (len(self.pairs), noise_and_reliability(self.pairs))
        return self._noise[1]


def verdicts(trials: Sequence[FrozenTrial], unit: float, num_samples: int, patience: float,
             patience_candidates: int = 0) -> list[Verdict]:
    """The rule at the end of every finished prefix of the trials (trial-number order), up to the first
    unfinished trial. ``unit``: image-steps of one full candidate."""
    return Trace(unit, num_samples, patience, patience_candidates).feed(trials)


def converged_at(trials: Sequence[FrozenTrial], unit: float, num_samples: int, patience: float,
                 patience_candidates: int = 0) -> Verdict | None:
    """The first prefix at which the search had converged, or None."""
    return next((v for v in verdicts(trials, unit, num_samples, patience, patience_candidates) if v.converged), None)


# --- time ------------------------------------------------------------------------------------------
def process_key() -> str:
    return f"{SEARCH_SECONDS_PREFIX}{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


def stored_seconds(study: Study, skip: str | None = None) -> float:
    """Search seconds of every process so far (all but ``skip``)."""
    attrs = study_system_attrs(study)
    return sum(float(v) for k, v in attrs.items() if k.startswith(SEARCH_SECONDS_PREFIX) and k != skip)


class SearchClock:
    """This process's search seconds, kept in the study (written at most every ``every`` seconds)."""

    def __init__(self, study: Study, now: Callable[[], float] = time.monotonic, every: float = 5.0) -> None:
        self.study, self.now, self.every = study, now, every
        self.key, self.t0 = process_key(), now()
        self.before = stored_seconds(study)  # other processes' (earlier runs, other workers at start)
        self.written = -math.inf

    def mine(self) -> float:
        return self.now() - self.t0

    def total(self) -> float:
        """Every process's seconds: others' as stored, this one's as now."""
        return stored_seconds(self.study, skip=self.key) + self.mine()

    def save(self, force: bool = False) -> None:
        if force or self.now() - self.written >= self.every:
            set_study_system_attr(self.study, self.key, round(self.mine(), 3))
            self.written = self.now()


# --- the rule a search runs under ------------------------------------------------------------------
class StopRule:
    """Budget (the ceiling, today's rule), convergence (search.stop=converged) and timeout, in one check.

    ``budget`` is fidelity.ImageStepBudget or progress.SearchBudget (anything with ``should_stop``);
    ``should_stop`` writes the reason to the study the first time it says yes.
    """

    def __init__(self, budget: Any, unit: float, num_samples: int, converge: bool, patience: float,
                 timeout: float | None, clock: SearchClock | None = None, patience_candidates: int = 0) -> None:
        self.budget, self.unit, self.num_samples = budget, unit, num_samples
        self.converge, self.patience, self.timeout = converge, patience, timeout
        self.clock: SearchClock | None = clock
        self.reason: dict[str, Any] | None = None
        self.trace = Trace(unit, num_samples, patience, patience_candidates)

    def _converged(self, study: Study) -> Verdict | None:
        if not self.converge:
            return None
        if self.trace.first is None:
            self.trace.feed(study.get_trials(deepcopy=False))
        return self.trace.first

    def check(self, study: Study, after_trial: bool = True) -> dict[str, Any] | None:
        """The reason to stop now, or None (the budget's check may wait for other workers' last trials).
        ``after_trial=False`` (before any): a process that runs no trial writes no search seconds."""
        if self.clock is not None:
            if after_trial:
                self.clock.save()
            if self.timeout is not None and self.clock.total() >= self.timeout:
                return self._record(study, "timeout", f"timeout: {self.clock.total():.0f}s of search"
                                    f" (search.timeout={self.timeout:.0f}s)")
        verdict = self._converged(study)
        if verdict is not None:
            return self._record(study, "converged", "converged at {spent:.1f} candidate-equivalents (trial"
                                f" {verdict.trial}): best FID {verdict.best:.4g} improved by {100 * verdict.gain:.2f}%"
                                f" in its window ({self._window()}), noise {100 * (verdict.noise or 0):.2f}%", verdict)
        if self.budget.should_stop(study):
            return self._record(study, "budget", "budget: every candidate-equivalent of search.budget spent")
        return None

    def _window(self) -> str:
        cands = self.trace.patience_candidates
        return f">= {self.patience:g} candidate-equivalents" + (f" and >= {cands} candidates" if cands else "")

    def should_stop(self, study: Study, after_trial: bool = True) -> bool:
        return self.check(study, after_trial) is not None

    def finish(self) -> None:
        """This process's last search seconds, if it searched."""
        if self.clock is not None and self.clock.written > -math.inf:
            self.clock.save(force=True)

    def _record(self, study: Study, reason: str, text: str, verdict: Verdict | None = None) -> dict[str, Any]:
        trials = study.get_trials(deepcopy=False, states=FINISHED)
        last = verdict.trial if verdict else max((t.number for t in trials), default=-1)
        spent = (sum(int(t.user_attrs.get(IMAGE_STEPS_ATTR, 0)) for t in trials if t.number <= last)
                 + int(study_system_attrs(study).get(PEER_COST_ATTR, 0))) / self.unit
        seconds = self.clock.total() if self.clock is not None else None
        record = {"reason": reason, "text": text.replace("{spent:.1f}", f"{spent:.1f}"), "trial": last,
                  "candidates": round(spent, 2), "seconds": round(seconds, 1) if seconds is not None else None}
        if self.reason != record:
            self.finish()
            study.set_user_attr(STOP_ATTR, record)
            if seconds is not None:
                study.set_user_attr(SEARCH_SECONDS_ATTR, round(seconds, 1))
            log.info("search stops: %s", record["text"])
        self.reason = record
        return record
