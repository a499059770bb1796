"""AutoDiffusion's evolutionary search as an Optuna sampler, with all of its state in the storage.

Each trial is one candidate. Its genome, generation, slot, operator and parents are trial system
attributes; the parents of generation g (the top-k completed candidates of generations < g, the
authors' archive) are cached once in the study's system attributes. Nothing lives only in process
memory, so a killed run resumes and several workers can share one study.

Slots of generation 0: enqueued seeds (heuristic schedules) first, then mutants of the anchor
(uniform) schedule, the last ``init_random`` slots random. Slots of later generations: ``num_mutants``
mutants, ``num_crossovers`` crossovers, the rest random. Already-seen genomes are rejected.

Many workers: the decision in ``before_trial`` (read the trials, choose, write) runs under the study
lock (``search/lock.py``: without it two workers that interleave take one slot or draw one genome);
before it, the trial is claimed (``search/recovery.py``: a beat and the owner record). Slots follow
``next_slot``: the oldest generation's gap first, so a late failure's slot is refilled.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autodiff_opt.search import solver_gene
from autodiff_opt.search.attrs import set_trial_attrs
from autodiff_opt.search.lock import study_lock
from autodiff_opt.search.operators import JointSpace, Operator, OperatorSet
from autodiff_opt.search.recovery import beat, claim_trial
from autodiff_opt.core.errors import ConfigError
from autodiff_opt.core.genome import Genome
from autodiff_opt.search.stage2 import Stage2Policy
from autodiff_opt.search.space import (
    GENERATION_ATTR,
    GENOME_ATTR,
    OPERATOR_ATTR,
    PARENTS_ATTR,
    SLOT_ATTR,
    SOLVER_PARAM,
    STAGE_ATTR,
    SearchSpace,
    genome_from_params,
    pareto_ranks,
    step_param,
)
from autodiff_opt.core.keys import ENQUEUED_GENOME_ATTR, PARENT_CACHE_PREFIX, SENSITIVITY_ATTR, STAGE2_START_ATTR
from autodiff_opt.search.storage_compat import set_study_system_attr, study_storage, study_system_attrs, trial_id

if TYPE_CHECKING:
    from autodiff_opt.search.sensitivity import SensitivityMapper

log = logging.getLogger(__name__)


class Offspring(NamedTuple):
    """A new candidate and its lineage, as the trial records them."""

    genome: Genome
    operator: str  # the operator's name
    parents: list[int]  # trial numbers
    stage: int


@dataclass(frozen=True)
class EvolutionConfig:
    """The authors' defaults: population 50, archive of the 10 best, 25 mutants, 15 crossovers."""

    population: int = 50
    num_parents: int = 10
    num_mutants: int = 25
    mutation_prob: float = 0.25
    num_crossovers: int = 15
    init_random: int = 25
    init_mutation_prob: float = 0.1
    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.population < 1 or self.num_parents < 1:
            raise ConfigError("search.population and search.num_parents must be >= 1")
        if self.num_mutants + self.num_crossovers > self.population:
            raise ConfigError(
                f"search.num_mutants + search.num_crossovers = {self.num_mutants + self.num_crossovers}"
                f" exceeds search.population = {self.population}"
            )
        if not 0 <= self.init_random <= self.population:
            raise ConfigError(f"search.init_random={self.init_random} must be in [0, population]")


@dataclass(frozen=True)
class SamplerInputs:
    """What a sampler factory (``SamplerSpec.factory``) is given: the setting's name, the space, the resolved
    evolution, the seed, the anchor schedule, stage 2's policy and sensitivity mapper (None without stage 2),
    the surrogate's pool."""

    name: str
    space: SearchSpace
    evolution: EvolutionConfig
    seed: int
    anchor: Genome | None = None
    stage2: Stage2Policy | None = None
    sensitivity: "SensitivityMapper | None" = None
    pool_size: int = 256


def generation_of(trial: FrozenTrial) -> int | None:
    return trial.system_attrs.get(GENERATION_ATTR)


@lru_cache(maxsize=65536)
def _parsed(key: str) -> Genome:
    return Genome.from_json(key)


def enqueued_genome(trial: FrozenTrial, space: SearchSpace) -> Genome | None:
    """The genome of an enqueued trial: the one the seeding stored with it, else (a trial a user enqueued
    with ``study.enqueue_trial(params)``) read from the params Optuna fixed for it."""
    stored = trial.user_attrs.get(ENQUEUED_GENOME_ATTR)
    if stored is not None:
        return Genome.from_json(stored)
    fixed = trial.system_attrs.get("fixed_params")  # Optuna's own record of enqueue_trial's params
    if fixed is None:
        return None
    solver = fixed.get(SOLVER_PARAM) if space.solvers else None
    wanted = [step_param(i) for i in range(int(fixed.get("num_steps", space.steps_for(solver))))]
    if missing := [name for name in wanted if name not in fixed]:
        raise ConfigError(f"study.enqueue_trial({fixed}) fixes only part of a schedule ({', '.join(missing)} missing):"
                          f" enqueue every step, {', '.join(wanted)}; this sampler chooses whole genomes")
    return genome_from_params(fixed, space, trial.user_attrs.get("skips"))


def next_slot(trials: Sequence[FrozenTrial], population: int) -> tuple[int, int]:
    """The lowest free slot of the oldest generation that has one; a new generation when all are full.

    Looking only at the newest generation is the same thing with one worker, but with N workers a
    candidate of generation g can fail after generation g+1 has begun: its slot would never be refilled
    and generation g would end one short. Here the oldest gap is refilled first (with generation g's
    cached parents, so the candidate is one generation g would have had).
    """
    counts: Counter[int] = Counter()
    used: dict[int, set[int]] = {}
    for t in trials:
        generation = t.system_attrs.get(GENERATION_ATTR)
        if t.state == TrialState.FAIL or generation is None:
            continue
        counts[generation] += 1
        used.setdefault(generation, set()).add(t.system_attrs.get(SLOT_ATTR))
    newest = max(counts) if counts else 0
    for generation in range(newest + 1):
        if counts[generation] < population:
            taken = used.get(generation, set())
            return generation, next(s for s in range(population + len(taken) + 1) if s not in taken)
    return newest + 1, 0


def genome_of(trial: FrozenTrial) -> Genome | None:
    """The trial's genome: its one home is the system attribute the sampler (or objective) wrote."""
    stored = trial.system_attrs.get(GENOME_ATTR)
    if stored is None:
        return None
    return _parsed(stored) if isinstance(stored, str) else Genome.from_json(stored)


class AutoDiffusionPaperSampler(BaseSampler):
    """Two-stage evolutionary sampler (stage 1: time steps; stage 2 adds per-step layer skipping)."""

    def __init__(
        self,
        space: SearchSpace,
        evolution: EvolutionConfig | None = None,
        anchor: Genome | None = None,
        seed: int | None = None,
        stage2: "Stage2Policy | None" = None,
        *,
        lock_timeout: float | None = 120.0,
        sensitivity: "SensitivityMapper | None" = None,
    ) -> None:
        """`lock_timeout`: seconds to wait for the study lock; None decides without it (only to show the race).
        `sensitivity`: computes stage 2's sensitivity map when stage 2 is due, and its prior guides the masks."""
        self.space = space
        self.sensitivity = sensitivity
        self.evolution = evolution or EvolutionConfig()
        self.anchor = anchor
        self._seed = seed if seed is not None else int(np.random.SeedSequence().entropy % (2**31))
        self.stage2 = stage2
        self._fallback = RandomSampler(seed=self._seed)
        self._chosen: dict[int, Genome] = {}  # trial id -> the genome this process wrote (storage stays the truth)
        self.lock_timeout = lock_timeout
        self.lock_wait_seconds = 0.0  # time spent waiting for the study lock in this process (for benchmarks)

    def chosen_genome(self, trial_id: int) -> Genome | None:
        """The genome before_trial stored for a running trial of this process (saves a storage read)."""
        return self._chosen.get(trial_id)

    # --- Optuna's sampler interface -------------------------------------------------------
    def reseed_rng(self) -> None:
        """Called per worker process by Optuna: every worker draws its own candidates."""
        self._seed = int(np.random.SeedSequence().entropy % (2**31))
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        genome = self._chosen.get(trial_id(trial)) or genome_of(trial)
        if genome is not None:
            if param_name == "num_steps":
                return genome.num_steps
            if param_name == SOLVER_PARAM and genome.solver is not None:
                return genome.solver
            for i, t in enumerate(genome.timesteps):
                if param_name == step_param(i):
                    return t
        log.debug("param %s is not part of the genome: sampled at random", param_name)
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        claim_trial(study, trial)  # a beat and the owner record, before anything here can wait
        if GENOME_ATTR in trial.system_attrs:  # a retry of a stale trial: same genome, same slot, no lock
            self._remember(trial_id(trial), genome_of(trial))
            return
        if any(d != StudyDirection.MINIMIZE for d in study.directions):
            raise ConfigError("AutoDiffusionPaperSampler minimises FID (and cost): create the study with direction='minimize'")
        if self.sensitivity is not None and self.stage2 is not None:
            self._ensure_sensitivity(study)
        if self.lock_timeout is None:
            self._decide(study, trial)
            return
        t0 = time.perf_counter()
        with study_lock(study, self.lock_timeout):
            self.lock_wait_seconds += time.perf_counter() - t0
            self._decide(study, trial)
        if time.perf_counter() - t0 > 1.0:  # a long wait or choice: beat again before Optuna's heartbeat thread starts
            beat(study, trial)

    def _decide(self, study: Study, trial: FrozenTrial) -> None:
        """Read the trials, choose generation, slot and genome, write them: the section the lock guards."""
        trials = study.get_trials(deepcopy=False)
        generation, slot = self._next_slot(trials)
        # seeded by the trial's place among the trials that did not fail: with no failure it is the trial's
        # number, and a killed candidate (failed, retried under a new number) shifts no later decision
        place = sum(1 for t in trials if t.number < trial.number and t.state != TrialState.FAIL)
        rng = np.random.default_rng([self._seed, place])
        genome = enqueued_genome(trial, self.space)
        if genome is not None:
            child = Offspring(genome, "enqueued", [], 2 if genome.has_skips else 1)
        else:
            seen = {t.system_attrs[GENOME_ATTR] for t in trials if GENOME_ATTR in t.system_attrs}
            child = self._make(study, trials, generation, slot, seen, rng)
        attrs = {GENOME_ATTR: child.genome.key(), GENERATION_ATTR: generation, SLOT_ATTR: slot,
                 OPERATOR_ATTR: child.operator, PARENTS_ATTR: child.parents, STAGE_ATTR: child.stage}
        set_trial_attrs(study_storage(study), trial_id(trial), system=attrs)
        self._remember(trial_id(trial), child.genome)

    def _ensure_sensitivity(self, study: Study) -> None:
        """Stage 2 started or due at the next slot and no map yet: compute it (outside the lock, see
        search/sensitivity.py), so the first stage-2 candidate already draws from its prior."""
        attrs = study_system_attrs(study)
        if SENSITIVITY_ATTR in attrs or self.sensitivity is None or self.stage2 is None:
            return
        trials = study.get_trials(deepcopy=False)
        generation, _ = self._next_slot(trials)
        if STAGE2_START_ATTR in attrs or self.stage2.due(trials, generation):
            self.sensitivity.ensure(study, trials)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._chosen.pop(trial_id(trial), None)

    def _remember(self, trial_id: int, genome: Genome | None) -> None:
        if genome is not None:
            if len(self._chosen) > 1024:  # trials that never reached after_trial (killed threads)
                self._chosen.clear()
            self._chosen[trial_id] = genome

    # --- generations ----------------------------------------------------------------------
    def _next_slot(self, trials: Sequence[FrozenTrial]) -> tuple[int, int]:
        """The lowest free slot of the oldest generation with one (failed trials free their slot)."""
        return next_slot(trials, self.evolution.population)

    def parents(self, study: Study, trials: Sequence[FrozenTrial], generation: int) -> list[FrozenTrial]:
        """Top-k completed candidates of earlier generations, fixed (cached in storage) per generation."""
        key = f"{PARENT_CACHE_PREFIX}{generation}"
        cached = study_system_attrs(study).get(key)
        by_number = {t.number: t for t in trials}
        if cached is not None:
            return [by_number[n] for n in cached if n in by_number]
        done = [t for t in trials if t.state == TrialState.COMPLETE and (generation_of(t) or 0) < generation
                and t.values and all(np.isfinite(v) for v in t.values)]
        if len(study.directions) > 1:  # multi-objective: Pareto rank first, then FID
            ranks = pareto_ranks(done)
            top = sorted(done, key=lambda t: (ranks[t.number], t.values[0], t.number))
        else:
            top = sorted(done, key=lambda t: (t.values[0], t.number))
        top = top[: self.evolution.num_parents]
        set_study_system_attr(study, key, [t.number for t in top])
        return top

    def _operators(self, study: Study, trials: Sequence[FrozenTrial], generation: int) -> tuple[int, OperatorSet]:
        """This generation's stage and operators: stage 2's space (budget, ramped cap) once it started,
        else stage 1's, the same space without skipping."""
        T = self.space.num_train_timesteps
        start = self.stage2.start(study, trials, generation) if self.stage2 else None
        if self.stage2 and start is not None and generation >= start:
            stage, space = 2, self.stage2.space(T, generation - start)
            prior = self.sensitivity.prior(study) if self.sensitivity is not None else None
            space = dataclasses.replace(space, prior=prior) if prior is not None else space
        else:  # K is fixed in stage 1 (the solver gene's range with search.solvers)
            lo, hi = (self.space.min_steps, self.space.max_steps) if self.space.solvers else (self.space.num_steps,) * 2
            stage, space = 1, JointSpace.without_skipping(T, lo, hi)
        p_mask = self.stage2.mask_mutation_prob if self.stage2 else 0.25
        evo = self.evolution
        return stage, OperatorSet.build(space, evo.mutation_prob, p_mask, self.anchor, evo.init_mutation_prob)

    def _make(self, study: Study, trials: Sequence[FrozenTrial], generation: int, slot: int,
              seen: set[str], rng: np.random.Generator) -> Offspring:
        evo = self.evolution
        parents = self.parents(study, trials, generation) if generation > 0 else []
        stage, ops = self._operators(study, trials, generation)
        op = self._operator(ops, generation, slot, len(parents))
        for _ in range(evo.max_attempts):
            genome, used = self._breed(op, parents, rng)
            if genome is not None and genome.key() not in seen:
                return Offspring(genome, op.name, used, stage)
        fallback: Operator = ops.mutation if parents else ops.random
        log.debug("operator %s gave only seen genomes in %d attempts: %s instead", op.name, evo.max_attempts, fallback.name)
        while True:
            genome, used = self._breed(fallback, parents, rng)
            if genome is not None and genome.key() not in seen:
                return Offspring(genome, fallback.name, used, stage)
            fallback = ops.random

    def _operator(self, ops: OperatorSet, generation: int, slot: int, num_parents: int) -> Operator:
        evo = self.evolution
        if generation == 0:
            mutant_slots = evo.population - evo.init_random
            return ops.anchor if ops.anchor is not None and slot < mutant_slots else ops.random
        if num_parents >= 1 and slot < evo.num_mutants:
            return ops.mutation
        if num_parents >= 2 and slot < evo.num_mutants + evo.num_crossovers:
            return ops.crossover
        return ops.random

    def _breed(self, op: Operator, parents: Sequence[FrozenTrial], rng: np.random.Generator) -> tuple[Genome | None, list[int]]:
        """One child of ``op`` and the trial numbers of its parents, drawn uniformly from ``parents``.

        With search.solvers the child's solver comes from its parents (search/solver_gene.py) and its
        steps are fitted to that solver.
        """
        if op.arity == 2:
            chosen = [parents[int(i)] for i in rng.choice(len(parents), size=2, replace=False)]
        else:
            chosen = [parents[int(rng.integers(len(parents)))]] if op.arity == 1 else []
        genomes = [genome_of(t) or self._params_genome(t) for t in chosen]
        child: Genome | None = op(*genomes, rng)  # type: ignore[operator]  # the arity says which call
        if child is not None and self.space.solvers:
            solver = solver_gene.child_solver(op, genomes, self.space.solvers, self.evolution.mutation_prob, rng)
            child = solver_gene.fit_to_solver(child, solver, self.space.steps_for(solver), self.space.num_train_timesteps, rng)
        return child, [t.number for t in chosen]

    def _params_genome(self, trial: FrozenTrial) -> Genome:
        return genome_from_params(trial.params, self.space)


def count_by_generation(study: optuna.Study) -> dict[int, int]:
    """Completed candidates per generation (for reports and tests)."""
    counts: Counter[int] = Counter()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        g = generation_of(t)
        if g is not None:
            counts[g] += 1
    return dict(sorted(counts.items()))


def make_sampler(inputs: SamplerInputs) -> AutoDiffusionPaperSampler:
    """``search.sampler=autodiffusion_paper``: the authors' evolution (specs/samplers.py)."""
    return AutoDiffusionPaperSampler(inputs.space, inputs.evolution, anchor=inputs.anchor, seed=inputs.seed,
                                stage2=inputs.stage2, sensitivity=inputs.sensitivity)
