"""The default sampler: AutoDiffusion's two-stage evolution with offspring pre-selected by a surrogate.

Per candidate, the operators of the evolution (search/operators.py: local Gaussian moves, the authors'
mutation, crossover, random genomes, over steps and, in stage 2, masks) make a pool of unseen offspring
of the current best candidates, and a Gaussian process fitted on every finished candidate picks the
one with the largest expected improvement. Only that one is evaluated. Generations, slots, stage 2's
start and ramp, and every decision's record stay as in ``AutoDiffusionPaperSampler``: all in the storage.

Pruned candidates (multi-fidelity) join the fit with their prefix FID moved to full-sample scale by the
median log ratio that completed candidates show between that prefix and the full set; they are never
parents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from optuna.study import Study
from threadpoolctl import threadpool_limits
from optuna.trial import FrozenTrial, TrialState

from autodiff_opt.core.genome import Genome
from autodiff_opt.search.operators import Initialization, Operator, OperatorSet
from autodiff_opt.search.evolution import AutoDiffusionPaperSampler, EvolutionConfig, Offspring, SamplerInputs, genome_of
from autodiff_opt.search.stage2 import Stage2Policy
from autodiff_opt.search.space import SearchSpace
from autodiff_opt.search.surrogate import GaussianProcess, embed

if TYPE_CHECKING:
    from autodiff_opt.search.sensitivity import SensitivityMapper

log = logging.getLogger(__name__)

KERNEL_EVERY = 10  # observations between two picks of the GP's kernel setting


@dataclass(frozen=True)
class SurrogateConfig:
    pool_size: int = 256  # offspring scored by the surrogate per candidate
    min_observations: int = 4  # below this many finished candidates, offspring are drawn without the surrogate
    max_observations: int = 200  # the fit uses the best this many (the GP is cubic in it)


def observations(trials: Sequence[FrozenTrial]) -> list[tuple[Genome, float]]:
    """(genome, FID at full-sample scale) of every completed and pruned candidate with a finite value,
    in trial order."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and np.isfinite(t.values[0])]
    offsets: dict[int, float] = {}
    for step in {s for t in trials if t.state == TrialState.PRUNED for s in t.intermediate_values}:
        ratios = [np.log(t.values[0] / t.intermediate_values[step]) for t in done
                  if step in t.intermediate_values and t.values[0] > 0 and t.intermediate_values[step] > 0]
        offsets[step] = float(np.median(ratios)) if ratios else 0.0
    out: list[tuple[Genome, float]] = []
    for t in sorted(trials, key=lambda t: t.number):
        if (g := genome_of(t)) is None:
            continue
        if t.state == TrialState.COMPLETE and t.values and np.isfinite(t.values[0]):
            out.append((g, float(t.values[0])))
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            step = max(t.intermediate_values)
            value = float(t.intermediate_values[step])
            if np.isfinite(value):
                out.append((g, value * float(np.exp(offsets.get(step, 0.0))) if value > 0 else value))
    return out


class AutoDiffusionSampler(AutoDiffusionPaperSampler):
    """Two-stage evolution whose offspring are chosen by expected improvement under a GP on all candidates."""

    def __init__(self, space: SearchSpace, evolution: EvolutionConfig | None = None, anchor: Genome | None = None,
                 seed: int | None = None, stage2: Stage2Policy | None = None,
                 surrogate: SurrogateConfig | None = None, sensitivity: "SensitivityMapper | None" = None) -> None:
        super().__init__(space, evolution, anchor, seed, stage2, sensitivity=sensitivity)
        self.surrogate = surrogate or SurrogateConfig()
        self._kernels: dict[tuple[int, int, int | None, int], tuple[float, float]] = {}  # a cache, not state

    def _make(self, study: Study, trials: Sequence[FrozenTrial], generation: int, slot: int,
              seen: set[str], rng: np.random.Generator) -> Offspring:
        with threadpool_limits(1):  # matrices of a few hundred rows: BLAS threads only add contention
            return self._choose(study, trials, generation, slot, seen, rng)

    def _choose(self, study: Study, trials: Sequence[FrozenTrial], generation: int, slot: int,
                seen: set[str], rng: np.random.Generator) -> Offspring:
        if len(study.directions) > 1:  # Pareto search: the authors' operators (one surrogate per objective is not built)
            return super()._make(study, trials, generation, slot, seen, rng)
        stage, ops = self._operators(study, trials, generation)
        data = observations(trials)
        if len(data) < self.surrogate.min_observations:
            return self._unseen(ops.random, stage, seen, rng)
        pool = self._pool(ops, self._best_trials(trials), seen, rng)
        if not pool:
            return self._unseen(ops.random, stage, seen, rng)
        fit = sorted(data, key=lambda gv: gv[1])[: self.surrogate.max_observations]
        k_max, layers = self._embedding_shape()
        x = np.stack([embed(g, self.space.num_train_timesteps, k_max, layers, self.space.solvers) for g, _ in fit])
        model = GaussianProcess.fit(x, [v for _, v in fit], self._kernel(data, k_max, layers))
        cand = np.stack([embed(g, self.space.num_train_timesteps, k_max, layers, self.space.solvers) for g, _, _ in pool])
        genome, operator, used = pool[int(np.argmax(model.expected_improvement(cand)))]
        return Offspring(genome, operator, used, stage)

    def _kernel(self, data: list[tuple[Genome, float]], k_max: int, layers: int | None) -> tuple[float, float]:
        """The kernel setting, picked by likelihood on the first multiple of KERNEL_EVERY observations.

        A pure function of the stored trials (so a resumed study decides as an uninterrupted one),
        re-picked every KERNEL_EVERY observations instead of at every decision.
        """
        n = (len(data) // KERNEL_EVERY) * KERNEL_EVERY or len(data)
        subset = sorted(data[:n], key=lambda gv: gv[1])[: self.surrogate.max_observations]  # of the first n
        key = (n, k_max, layers, hash(tuple(g.key() for g, _ in subset)))
        if key not in self._kernels:
            x = np.stack([embed(g, self.space.num_train_timesteps, k_max, layers, self.space.solvers) for g, _ in subset])
            self._kernels[key] = GaussianProcess.fit(x, [v for _, v in subset]).kernel
        return self._kernels[key]

    def _embedding_shape(self) -> tuple[int, int | None]:
        if self.stage2 is None:
            return self.space.max_steps, None
        return self.space.max_steps, self.stage2.budget.num_layers

    def _best_trials(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The current top-k completed candidates (steady state: every finished candidate counts at once)."""
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and np.isfinite(t.values[0])
                and genome_of(t) is not None]
        return sorted(done, key=lambda t: (t.values[0], t.number))[: self.evolution.num_parents]

    def _pool(self, ops: OperatorSet, parents: list[FrozenTrial], seen: set[str],
              rng: np.random.Generator) -> list[tuple[Genome, str, list[int]]]:
        """Unseen offspring: a quarter of each kind (local, mutation, crossover, random)."""
        kinds: list[Operator] = [ops.local, ops.mutation, ops.crossover, ops.random]
        if len(parents) < 2:
            kinds = [ops.local, ops.mutation, ops.random] if parents else [ops.random]
        pool: dict[str, tuple[Genome, str, list[int]]] = {}
        for i in range(self.surrogate.pool_size):
            op = kinds[i % len(kinds)]
            child, used = self._breed(op, parents, rng)
            if child is not None and (key := child.key()) not in seen and key not in pool:
                pool[key] = (child, op.name, used)
        return list(pool.values())

    def _unseen(self, op: Initialization, stage: int, seen: set[str], rng: np.random.Generator) -> Offspring:
        while True:
            genome, _ = self._breed(op, [], rng)
            if genome is not None and genome.key() not in seen:
                return Offspring(genome, op.name, [], stage)


def make_sampler(inputs: SamplerInputs) -> AutoDiffusionSampler:
    """``search.sampler=autodiffusion`` (the default): the surrogate-guided evolution (specs/samplers.py)."""
    return AutoDiffusionSampler(inputs.space, inputs.evolution, anchor=inputs.anchor, seed=inputs.seed,
                                     stage2=inputs.stage2, surrogate=SurrogateConfig(pool_size=inputs.pool_size),
                                     sensitivity=inputs.sensitivity)


SurrogateEvolutionSampler = AutoDiffusionSampler  # the class's name before it was named after its setting (deprecated)
