"""Stage 2's per-step sensitivity map: computed once per study, when stage 2 starts, and kept in it.

For each step i of the stage-1 best schedule and each skippable layer j, the FID on a prefix of the
search samples (``search.stage2.sensitivity_fraction`` of them, the search seeds) with layer j alone skipped at step i, minus the
FID of the schedule without skips on that prefix. Its image-steps (1 + K x L evaluations of the prefix)
are counted in the search budget next to the peer schedules' (search/fidelity.py). The map is a study
system attribute: a resumed study and every worker read the same one. The samplers turn it into the
operators' prior (search/skip_prior.py) when ``search.stage2.sensitivity`` is on.

Workers: the map is computed outside the study lock (it takes minutes; others would time out waiting)
by a worker that sees stage 2 due and no map, and stored under the lock unless another worker stored
one first (the same stage-1 best gives the same map; a duplicate's cost is then not counted).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autodiff_opt.core.genome import Genome
from autodiff_opt.core.keys import SENSITIVITY_ATTR, SENSITIVITY_COST_ATTR
from autodiff_opt.generate import ImageGenerator, NonFiniteSamples, SampleSet
from autodiff_opt.metrics.fid import FIDScorer, FIDStats
from autodiff_opt.search.lock import study_lock
from autodiff_opt.search.objective import evaluate
from autodiff_opt.search.skip_prior import SensitivityMap, SkipPrior
from autodiff_opt.search.space import GENOME_ATTR, STAGE_ATTR
from autodiff_opt.search.storage_compat import set_study_system_attr, study_system_attrs

log = logging.getLogger(__name__)


def single_skip(genome: Genome, step: int, layer: int) -> Genome:
    """``genome`` (without its masks) with ``layer`` alone skipped at step index ``step``."""
    masks = [frozenset({layer}) if i == step else frozenset() for i in range(genome.num_steps)]
    return Genome(genome.timesteps, tuple(masks), genome.solver)


def compute_map(generator: ImageGenerator, scorer: FIDScorer, reference: FIDStats, prefix: SampleSet,
                genome: Genome, num_layers: int, trial: int | None = None) -> SensitivityMap:
    """The map of ``genome``'s steps x ``num_layers`` layers on the samples ``prefix``."""
    plain = Genome(genome.timesteps, solver=genome.solver)
    base = evaluate(generator, scorer, reference, prefix, plain)["fid"]
    rows = []
    for i in range(plain.num_steps):
        row = []
        for j in range(num_layers):
            try:
                fid = evaluate(generator, scorer, reference, prefix, single_skip(plain, i, j))["fid"]
            except NonFiniteSamples:
                fid = math.inf
            row.append(fid - base)
        rows.append(tuple(row))
    evaluations = 1 + plain.num_steps * num_layers
    cost = evaluations * len(prefix) * generator.nfe(plain)  # a skip's cheaper step counted as a full one
    log.info("sensitivity map: %d steps x %d layers on %d samples (FID %.4g without skips), %d image-steps",
             plain.num_steps, num_layers, len(prefix), base, cost)
    return SensitivityMap(plain.timesteps, tuple(rows), float(base), len(prefix), int(cost), trial)


def stored_map(study: optuna.Study) -> SensitivityMap | None:
    data = study_system_attrs(study).get(SENSITIVITY_ATTR)
    return SensitivityMap.from_json(data) if data is not None else None


def store_map(study: optuna.Study, smap: SensitivityMap) -> SensitivityMap:
    """Store ``smap`` and its cost unless a map is stored already; returns the stored one."""
    with study_lock(study):
        current = stored_map(study)
        if current is not None:
            return current
        data = smap.to_json()
        data["delta"] = [[v if math.isfinite(v) else None for v in row] for row in data["delta"]]  # JSON has no inf
        set_study_system_attr(study, SENSITIVITY_ATTR, data)
        set_study_system_attr(study, SENSITIVITY_COST_ATTR, smap.image_steps)
        return smap


def stage1_best(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The best completed candidate without skipped layers (stage 1's best)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and np.isfinite(t.values[0])
            and GENOME_ATTR in t.system_attrs and t.system_attrs.get(STAGE_ATTR, 1) == 1
            and not Genome.from_json(t.system_attrs[GENOME_ATTR]).has_skips]
    return min(done, key=lambda t: (t.values[0], t.number)) if done else None


class SensitivityMapper:
    """What a sampler needs: ``ensure`` computes and stores the map once, ``prior`` serves it."""

    def __init__(self, generator: ImageGenerator, scorer: FIDScorer, reference: FIDStats, samples: SampleSet,
                 num_samples: int, num_layers: int) -> None:
        self.generator, self.scorer, self.reference = generator, scorer, reference
        self.prefix = samples.slice(0, min(num_samples, len(samples)))
        self.num_layers = num_layers
        self._prior: SkipPrior | None = None

    def ensure(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> SensitivityMap | None:
        smap = stored_map(study)
        if smap is not None:
            return smap
        best = stage1_best(trials)
        if best is None:
            log.warning("sensitivity map: no completed stage-1 candidate to compute it on")
            return None
        genome = Genome.from_json(best.system_attrs[GENOME_ATTR])
        return store_map(study, compute_map(self.generator, self.scorer, self.reference, self.prefix, genome,
                                            self.num_layers, best.number))

    def prior(self, study: optuna.Study) -> SkipPrior | None:
        """The stored map as the operators' prior (None before it exists)."""
        if self._prior is None:
            smap = stored_map(study)
            self._prior = SkipPrior.from_map(smap) if smap is not None else None
        return self._prior
