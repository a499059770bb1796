"""Stage 2 of the evolution: time steps and per-step skipped layers together, under a compute budget.

The stage starts once the best candidate did not improve for ``patience`` generations, or at
``start_generation`` at the latest; the start is stored in the study, so every worker and every
resumed run agrees on it. In stage-2 generation j (from 0) the most layers a step may skip is
``max_prun * min(j + 1, ramp_steps) / ramp_steps`` of all layers (the authors' ramp).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autodiff_opt.core.keys import STAGE2_START_ATTR
from autodiff_opt.search.operators import JointSpace, skip_cap
from autodiff_opt.search.space import GENERATION_ATTR
from autodiff_opt.search.storage_compat import set_study_system_attr, study_system_attrs

if TYPE_CHECKING:
    from autodiff_opt.arch.budget import Budget

log = logging.getLogger(__name__)


def ramp_max_skip_frac(stage2_generation: int, max_prun: float = 0.1, increments: int = 5) -> float:
    """The authors' ramp: in stage 2's generation g (from 0) the cap is ``max_prun * min(g+1, n) / n``."""
    return max_prun * min(stage2_generation + 1, increments) / increments


@dataclass(frozen=True)
class Stage2Policy:
    budget: Budget
    max_prun: float = 0.1
    ramp_steps: int = 5
    start_generation: int = 5
    patience: int = 1
    min_steps: int = 1
    max_steps: int | None = None
    mask_mutation_prob: float = 0.25

    def start(self, study: optuna.Study, trials: Sequence[FrozenTrial], generation: int) -> int | None:
        """The generation stage 2 started at (deciding it now if this generation triggers it), or None."""
        stored = study_system_attrs(study).get(STAGE2_START_ATTR)
        if stored is not None:
            return int(stored)
        if not self.due(trials, generation):
            return None
        set_study_system_attr(study, STAGE2_START_ATTR, generation)
        return generation

    def due(self, trials: Sequence[FrozenTrial], generation: int) -> bool:
        """Whether stage 2 starts at ``generation`` (when it has not started before); reads only."""
        return generation >= 1 and (generation >= self.start_generation or self._stalled(trials, generation))

    def _stalled(self, trials: Sequence[FrozenTrial], generation: int) -> bool:
        """True when the best of generations < g equals the best of generations < g - patience."""
        if generation <= self.patience:
            return False
        now = _best_before(trials, generation)
        then = _best_before(trials, generation - self.patience)
        return now is not None and then is not None and now >= then

    def space(self, num_train_timesteps: int, stage2_generation: int) -> JointSpace:
        frac = ramp_max_skip_frac(stage2_generation, self.max_prun, self.ramp_steps)
        return JointSpace(num_train_timesteps, self.budget, frac, self.min_steps, self.max_steps)


def _best_before(trials: Sequence[FrozenTrial], generation: int) -> float | None:
    values = [t.values[0] for t in trials if t.state == TrialState.COMPLETE and t.values
              and np.isfinite(t.values[0]) and (t.system_attrs.get(GENERATION_ATTR) or 0) < generation]
    return min(values) if values else None


def warn_if_no_skips(max_prun: float, num_layers: int) -> bool:
    """Warn (and return True) when ``search.stage2.max_prun`` lets no step skip a single layer: stage 2 would
    then search time steps only. The authors' 0.1 is meant for networks with dozens of layers."""
    if num_layers == 0 or skip_cap(num_layers, max_prun) > 0:
        return False
    log.warning("stage 2: search.stage2.max_prun=%g of %d layers lets no step skip a layer (floor(%g x %d) = 0),"
                " so stage 2 searches time steps only; set search.stage2.max_prun to at least %.3g to skip one",
                max_prun, num_layers, max_prun, num_layers, 1.0 / num_layers)
    return True
