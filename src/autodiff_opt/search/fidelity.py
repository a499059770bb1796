"""Multi-fidelity on common random numbers, and a search budget counted in image-steps.

A candidate is scored on growing prefixes of the fixed sample set (the rungs, e.g. 250 -> 500 ->
1,000). FID is biased upwards at small N, but every candidate on a prefix sees the same noise and the
same N, so the bias is shared and the ranking on a prefix is usable. ``ParentsPruner`` stops a
candidate whose prefix FID is worse than the k-th best completed candidate's FID on that prefix: it
would not enter the k parents. Baselines are never pruned (the final table needs their full FID).

The budget is spent image-steps (samples x network evaluations, pruned and failed candidates
included, plus what a peer schedule and stage 2's sensitivity map cost to compute), in units of one full
candidate.
"""

from __future__ import annotations

import logging
from typing import Sequence

import optuna
from optuna.pruners import BasePruner
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState
from autodiff_opt.core.keys import BASELINE_ATTR, IMAGE_STEPS_ATTR, PEER_COST_ATTR, RETRY_OF_ATTR, SENSITIVITY_COST_ATTR
from autodiff_opt.search.storage_compat import study_system_attrs

log = logging.getLogger(__name__)



def rung_sizes(num_samples: int, fractions: Sequence[float]) -> list[int]:
    """Prefix sizes (ascending, distinct, each >= 2 and < num_samples) for the given fractions."""
    sizes = sorted({int(round(f * num_samples)) for f in fractions if 0.0 < f < 1.0})
    return [n for n in sizes if 2 <= n < num_samples]


class ParentsPruner(BasePruner):
    """Prune at a rung when the candidate's FID is worse than the k-th best completed candidate's there."""

    def __init__(self, num_parents: int, min_completed: int | None = None) -> None:
        self.num_parents = num_parents
        self.min_completed = min_completed if min_completed is not None else num_parents

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or trial.user_attrs.get(BASELINE_ATTR) is not None:
            return False
        value = trial.intermediate_values[step]
        rivals = sorted(t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        if step in t.intermediate_values)
        if len(rivals) < max(self.num_parents, self.min_completed):
            return False
        return value > rivals[self.num_parents - 1]


def spent_image_steps(study: Study) -> int:
    """Image-steps of every finished candidate (complete, pruned, failed) and of the peer schedules."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    attrs = study_system_attrs(study)
    peers = int(attrs.get(PEER_COST_ATTR, 0)) + int(attrs.get(SENSITIVITY_COST_ATTR, 0))
    return peers + sum(int(t.user_attrs.get(IMAGE_STEPS_ATTR, 0)) for t in trials)


class ImageStepBudget:
    """Stop once the spent image-steps reach ``total`` (workers each stop at their next check), unless a lost
    candidate's retry is queued: it is evaluated first (a worker killed near the end of the budget would
    otherwise leave its candidate queued and never scored; at most one candidate past the budget per lost
    one)."""

    def __init__(self, total: int, candidate_image_steps: int) -> None:
        self.total = total
        self.unit = candidate_image_steps

    @property
    def candidates(self) -> float:
        return self.total / self.unit

    def spent(self, study: Study) -> float:
        """Candidate-equivalents spent so far."""
        return spent_image_steps(study) / self.unit

    def should_stop(self, study: Study) -> bool:
        if spent_image_steps(study) < self.total:
            return False
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return not any(RETRY_OF_ATTR in t.system_attrs for t in waiting)


def make_pruner(enabled: bool, num_parents: int) -> optuna.pruners.BasePruner:
    return ParentsPruner(num_parents) if enabled else optuna.pruners.NopPruner()
