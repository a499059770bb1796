"""The evolution's operators: one set for both stages, small typed objects with one method each.

A ``JointSpace`` says what a valid candidate is: distinct descending time steps in [0, T-1], K in its
step range, at most ``max_skips`` skipped layers per step, and cost within its ``Budget`` when it has
one. Stage 1 is the joint space without skipping (``JointSpace.without_skipping``: no budget, cap 0);
stage 2 adds the budget and the ramped cap (search/stage2.py). In the spirit of Optuna's
``optuna.samplers.nsgaii.BaseCrossover``, an operator is built for one space and has one method:

- ``Initialization.__call__(rng)``: ``RandomGenome``, ``AnchorMutants`` (mutants of the anchor schedule)
- ``Mutation.__call__(genome, rng)``: ``StepMutation`` (the authors' mutation of steps, and of masks
  where the space skips), ``LocalMove`` (Gaussian moves of every step)
- ``Crossover.__call__(a, b, rng)``: ``UniformCrossover`` of (step, mask) pairs

Every operator draws from the ``numpy.random.Generator`` it is given (never the global one) and
returns a valid genome of its space, or ``None`` when it could not make one. Its ``name`` is what a
trial records as its operator (``autodiff:operator``, shown in reports and lineage).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from autodiff_opt.core.genome import Genome
from autodiff_opt.search.skip_prior import SkipPrior, weighted_index

if TYPE_CHECKING:
    from autodiff_opt.arch.budget import Budget

Rng = np.random.Generator
T = TypeVar("T")
Step = tuple[int, frozenset[int]]
LOCAL_SCALES = (0.01, 0.03, 0.08)  # std of a local move, as a fraction of T


# --- random numbers ------------------------------------------------------------------------------

def _below(rng: Rng, n: int) -> int:
    """Uniform integer in [0, n)."""
    return int(rng.integers(n))


def _chance(rng: Rng, p: float) -> bool:
    return float(rng.random()) < p


def _pick(rng: Rng, items: Sequence[T]) -> T:
    return items[_below(rng, len(items))]


def _sample(rng: Rng, items: Sequence[T], k: int) -> list[T]:
    """``k`` distinct items in random order (partial Fisher-Yates)."""
    pool = list(items)
    for i in range(k):
        j = i + _below(rng, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def _pick_layer(rng: Rng, layers: Sequence[int], weights: np.ndarray | None, inverse: bool = False) -> int:
    """One of ``layers``: uniform, or by the prior's weights (their inverse to pick a layer to drop)."""
    if weights is None:
        return _pick(rng, layers)
    w = weights[list(layers)]
    return layers[weighted_index(rng, 1.0 / w if inverse else w)]


def _sample_layers(rng: Rng, num_layers: int, k: int, weights: np.ndarray | None) -> list[int]:
    """``k`` distinct layers: uniform, or drawn one by one by the prior's weights."""
    if weights is None:
        return _sample(rng, range(num_layers), k)
    chosen: list[int] = []
    for _ in range(k):
        chosen.append(_pick_layer(rng, [j for j in range(num_layers) if j not in chosen], weights))
    return chosen


# --- the space -----------------------------------------------------------------------------------

def skip_cap(num_layers: int, max_skip_frac: float) -> int:
    """Most layers one step may skip: ``floor(max_skip_frac * L)``."""
    return min(num_layers, math.floor(max_skip_frac * num_layers + 1e-9))


@dataclass(frozen=True)
class JointSpace:
    """What a valid candidate is; without a budget nothing is skipped (stage 1)."""

    num_train_timesteps: int
    budget: Budget | None = None
    max_skip_frac: float = 0.1
    min_steps: int = 1
    max_steps: int | None = None
    prior: SkipPrior | None = None  # stage 2's sensitivity prior: which layers masks favour (None: uniform)

    def layer_weights(self, t: int) -> np.ndarray | None:
        return self.prior.row(t) if self.prior is not None else None

    @classmethod
    def without_skipping(cls, num_train_timesteps: int, min_steps: int, max_steps: int) -> "JointSpace":
        """Stage 1: K in [min_steps, max_steps], no masks, no budget."""
        return cls(num_train_timesteps, None, 0.0, min_steps, max_steps)

    @property
    def num_layers(self) -> int:
        return self.budget.num_layers if self.budget is not None else 0

    @property
    def max_skips(self) -> int:
        return skip_cap(self.num_layers, self.max_skip_frac)

    def step_range(self) -> tuple[int, int]:
        """(fewest, most) steps a candidate may have: the most is what the budget affords with skipping."""
        most = self.num_train_timesteps
        if self.budget is not None:
            most = min(most, self.budget.max_steps(self.max_skips))
        if self.max_steps is not None:
            most = min(most, self.max_steps)
        return self.min_steps, most

    def is_valid(self, genome: Genome) -> bool:
        lo, hi = self.step_range()
        steps = genome.timesteps
        return (
            lo <= len(steps) <= hi
            and len(set(steps)) == len(steps)
            and all(0 <= t < self.num_train_timesteps for t in steps)
            and all(a > b for a, b in zip(steps, steps[1:]))
            and all(len(m) <= self.max_skips and all(0 <= j < self.num_layers for j in m) for m in genome.skips)
            and (self.budget is None or self.budget.fits(genome))
        )


def _checked(genome: Genome, space: JointSpace) -> Genome:
    if not space.is_valid(genome):  # a bug in an operator, never the caller's input
        raise AssertionError(f"operator produced an invalid genome {genome.to_json()}")
    return genome


def _fresh_timestep(rng: Rng, used: Set[int], num_train_timesteps: int) -> int | None:
    """A time step not in ``used``, uniform over the free ones; ``None`` when all are used."""
    free = num_train_timesteps - len(used)
    if free <= 0:
        return None
    if len(used) * 2 < num_train_timesteps:
        while True:
            t = _below(rng, num_train_timesteps)
            if t not in used:
                return t
    return _pick(rng, [t for t in range(num_train_timesteps) if t not in used])


def _genome(steps: Sequence[Step]) -> Genome:
    return Genome.from_steps([t for t, _ in steps], [m for _, m in steps])


# --- skip-set mutation ---------------------------------------------------------------------------

def mutate_skips(skips: Set[int], num_layers: int, max_skips: int, rng: Rng,
                 weights: np.ndarray | None = None) -> frozenset[int]:
    """Add, drop or swap one skipped layer, keeping at most ``max_skips``; the set always changes
    unless no change is possible (``max_skips == 0`` and nothing skipped). A set over the cap is
    cut down to it. With ``weights`` (the sensitivity prior's row) a layer is added by its weight and
    dropped by its inverse."""
    cap = min(max_skips, num_layers)
    mask = set(skips)
    if len(mask) > cap:
        return frozenset(_sample(rng, sorted(mask), cap))
    moves = [m for m, ok in (("add", len(mask) < cap), ("drop", bool(mask)), ("swap", 0 < len(mask) < num_layers)) if ok]
    if not moves:
        return frozenset(mask)
    move = _pick(rng, moves)
    if move in ("drop", "swap"):
        mask.remove(_pick_layer(rng, sorted(mask), weights, inverse=True))
    if move in ("add", "swap"):
        outside = [j for j in range(num_layers) if j not in mask and j not in skips]
        mask.add(_pick_layer(rng, outside, weights))
    return frozenset(mask)


# --- repair to the space -------------------------------------------------------------------------

def _trim_masks(steps: list[Step], cap: int, rng: Rng) -> list[Step]:
    return [(t, m if len(m) <= cap else frozenset(_sample(rng, sorted(m), cap))) for t, m in steps]


def _add_random_skips(steps: list[Step], space: JointSpace, budget: Budget, rng: Rng) -> list[Step]:
    """Skip random extra layers in random steps with room until the budget fits or no room is left."""
    cap = space.max_skips
    cost = sum(budget.step_cost(m) for _, m in steps)
    while cost > budget.limit:
        roomy = [i for i, (_, m) in enumerate(steps) if len(m) < cap]
        if not roomy:
            break
        if space.prior is not None:  # the (step, layer) pair by the prior's weight
            i, j = _weighted_pair(rng, steps, roomy, space)
            t, m = steps[i]
            steps[i] = (t, m | {j})
            cost -= budget.savings[j]
            continue
        i = _pick(rng, roomy)
        t, m = steps[i]
        j = _pick(rng, [j for j in range(space.num_layers) if j not in m])
        steps[i] = (t, m | {j})
        cost -= budget.savings[j]
    return steps


def _weighted_pair(rng: Rng, steps: list[Step], roomy: list[int], space: JointSpace) -> tuple[int, int]:
    pairs = [(i, j) for i in roomy for j in range(space.num_layers) if j not in steps[i][1]]
    rows = {i: space.layer_weights(steps[i][0]) for i in roomy}
    return pairs[weighted_index(rng, [float(rows[i][j]) for i, j in pairs])]  # type: ignore[index]


def _best_swap(mask: frozenset[int], space: JointSpace, budget: Budget) -> frozenset[int] | None:
    """``mask`` with its cheapest skipped layer swapped for the dearest unskipped one, if that saves more."""
    savings = budget.savings
    outside = [j for j in range(space.num_layers) if j not in mask]
    if not mask or not outside:
        return None
    worst, best = min(mask, key=lambda j: savings[j]), max(outside, key=lambda j: savings[j])
    return mask - {worst} | {best} if savings[best] > savings[worst] else None


def _upgrade_until_fit(steps: list[Step], space: JointSpace, budget: Budget, rng: Rng) -> list[Step] | None:
    """Swap skipped layers for ones that save more, in random steps, until the budget fits."""
    while sum(budget.step_cost(m) for _, m in steps) > budget.limit:
        swaps = [(i, _best_swap(m, space, budget)) for i, (_, m) in enumerate(steps)]
        swaps = [(i, m) for i, m in swaps if m is not None]
        if not swaps:
            return None
        i, mask = _pick(rng, swaps)
        steps[i] = (steps[i][0], mask)
    return steps


def repair(genome: Genome, space: JointSpace, rng: Rng) -> Genome | None:
    """Make ``genome`` fit ``space``: trim masks over the cap, drop random steps while even the
    cheapest masks cannot fit the budget (or K exceeds the range), skip random layers (within the
    cap) until it fits, and if every step is at the cap, swap skipped layers for ones that save more
    until it fits. Returns ``genome`` itself when already valid, ``None`` when no valid genome can be
    made (fewer than ``min_steps`` steps would fit)."""
    if space.is_valid(genome):
        return genome
    genome.validate(space.num_train_timesteps)  # repair fixes cost and masks, never bad time steps
    bad = sorted({j for m in genome.skips for j in m if not 0 <= j < space.num_layers})
    if bad and space.budget is not None:
        raise ValueError(f"layer ids {bad} outside 0..{space.num_layers - 1}")
    lo, hi = space.step_range()
    steps = _trim_masks(list(zip(genome.timesteps, genome.skips)), space.max_skips, rng)
    while len(steps) > max(hi, 0):
        steps.pop(_below(rng, len(steps)))
    if len(steps) < lo:
        return None
    if space.budget is not None:
        fitted = _upgrade_until_fit(_add_random_skips(steps, space, space.budget, rng), space, space.budget, rng)
        if fitted is None:
            return None
        steps = fitted
    return _checked(_genome(steps), space)


# --- the operators -------------------------------------------------------------------------------

class Operator(ABC):
    """An evolution operator of one space; ``name`` is what the trial records."""

    name: ClassVar[str]
    arity: ClassVar[int]  # parents it takes


class Initialization(Operator):
    arity = 0

    @abstractmethod
    def __call__(self, rng: Rng) -> Genome | None: ...


class Mutation(Operator):
    arity = 1

    @abstractmethod
    def __call__(self, genome: Genome, rng: Rng) -> Genome | None: ...


class Crossover(Operator):
    arity = 2

    @abstractmethod
    def __call__(self, a: Genome, b: Genome, rng: Rng) -> Genome | None: ...


@dataclass(frozen=True)
class RandomGenome(Initialization):
    """K drawn uniformly between the steps the budget buys at full cost and the most it buys with
    skipping (or ``num_steps``; without a budget the most steps of the range), random distinct time
    steps, random masks of up to ``max_skips`` layers, then repaired to the budget."""

    space: JointSpace
    num_steps: int | None = None
    name: ClassVar[str] = "random"

    def __call__(self, rng: Rng) -> Genome:
        space = self.space
        lo, hi = space.step_range()
        if hi < lo:
            raise ValueError(f"the budget affords at most {hi} steps, fewer than min_steps={lo}")
        if self.num_steps is not None:
            k = self.num_steps
        elif space.budget is None:
            k = hi
        else:
            full = min(max(lo, space.budget.limit // space.budget.full_step), hi)
            k = full + _below(rng, hi - full + 1)
        if not lo <= k <= hi:
            raise ValueError(f"num_steps={k} outside the affordable range [{lo}, {hi}]")
        times = _sample(rng, range(space.num_train_timesteps), k)
        if space.max_skips > 0:
            masks = [frozenset(_sample_layers(rng, space.num_layers, _below(rng, space.max_skips + 1),
                                              space.layer_weights(t))) for t in times]
        else:
            masks = [frozenset()] * k
        genome = repair(_genome(list(zip(times, masks))), space, rng)
        assert genome is not None  # k <= hi guarantees the best masks fit
        return genome


@dataclass(frozen=True)
class StepMutation(Mutation):
    """Replace each time step with prob ``p_step`` (by one not in the genome; its mask stays paired
    with it) and, where the space skips, mutate each mask with prob ``p_mask``; at least one gene
    changes. The child is repaired to the space; ``None`` when ``max_tries`` attempts gave no valid
    child different from the parent."""

    space: JointSpace
    p_step: float = 0.25
    p_mask: float = 0.25
    max_tries: int = 10
    name: ClassVar[str] = "mutation"

    def __call__(self, genome: Genome, rng: Rng) -> Genome | None:
        for _ in range(self.max_tries):
            child = repair(self._once(genome, rng), self.space, rng)
            if child is not None and child != genome:
                return child
        return None

    def _once(self, genome: Genome, rng: Rng) -> Genome:
        space = self.space
        skipping = space.max_skips > 0
        steps = list(zip(genome.timesteps, genome.skips))
        used = set(genome.timesteps)
        changed = False
        for i, (t, m) in enumerate(steps):
            if _chance(rng, self.p_step):
                new_t = _fresh_timestep(rng, used, space.num_train_timesteps)
                if new_t is not None:
                    used.discard(t)
                    used.add(new_t)
                    t, changed = new_t, True
            if (skipping or m) and _chance(rng, self.p_mask):
                new_m = mutate_skips(m, space.num_layers, space.max_skips, rng, space.layer_weights(t))
                m, changed = new_m, changed or new_m != steps[i][1]
            steps[i] = (t, m)
        if not changed:  # force one real change: a mask when the cap allows, else a time step
            i = _below(rng, len(steps))
            t, m = steps[i]
            if skipping or m:
                steps[i] = (t, mutate_skips(m, space.num_layers, space.max_skips, rng, space.layer_weights(t)))
            else:
                new_t = _fresh_timestep(rng, used, space.num_train_timesteps)
                steps[i] = (t if new_t is None else new_t, m)
        return _genome(steps)


@dataclass(frozen=True)
class LocalMove(Mutation):
    """Every step moves by a Gaussian of std s x T (s drawn from ``scales``), colliding steps are pushed
    apart and masks stay by position; where the space skips, the masks mutate too with prob 1/2
    (``StepMutation`` with ``p_step=0``). Repaired to the space."""

    space: JointSpace
    scales: tuple[float, ...] = LOCAL_SCALES
    p_mask: float = 0.25
    name: ClassVar[str] = "local"

    def __call__(self, genome: Genome, rng: Rng) -> Genome | None:
        from autodiff_opt.solvers.schedules import make_distinct

        T = self.space.num_train_timesteps
        scale = float(rng.choice(self.scales))
        moved = [int(round(t + rng.normal(0.0, scale * T))) for t in genome.timesteps]
        child = Genome.from_steps(make_distinct(moved, T), genome.skips)
        if self.space.max_skips > 0 and _chance(rng, 0.5):
            child = StepMutation(self.space, p_step=0.0, p_mask=self.p_mask)(child, rng) or child
        return repair(child, self.space, rng)


@dataclass(frozen=True)
class UniformCrossover(Crossover):
    """Per-position uniform crossover: the child has the length of a parent drawn at random, and
    position i (in sampling order) takes parent a's (time step, mask) pair with prob ``p``, else
    b's; a pair never splits. A time step already in the child is replaced by the other parent's
    pair at i, else by a fresh time step with the same mask (K never shrinks silently). Repaired to
    the space; ``None`` if that is impossible."""

    space: JointSpace
    p: float = 0.5
    name: ClassVar[str] = "crossover"

    def __call__(self, a: Genome, b: Genome, rng: Rng) -> Genome | None:
        length = len(a.timesteps) if _chance(rng, 0.5) else len(b.timesteps)
        used: set[int] = set()
        steps: list[Step] = []
        for i in range(length):
            pairs = [(g.timesteps[i], g.skips[i]) for g in (a, b) if i < len(g.timesteps)]
            if len(pairs) == 2 and not _chance(rng, self.p):
                pairs.reverse()
            t, m = next((pair for pair in pairs if pair[0] not in used), (None, pairs[0][1]))
            if t is None:
                t = _fresh_timestep(rng, used, self.space.num_train_timesteps)
                if t is None:
                    break
            used.add(t)
            steps.append((t, m))
        return repair(_genome(steps), self.space, rng)


@dataclass(frozen=True)
class AnchorMutants(Initialization):
    """Mutants of one fixed schedule (generation 0's uniform anchor)."""

    anchor: Genome
    mutation: Mutation
    name: ClassVar[str] = "anchor_mutation"

    def __call__(self, rng: Rng) -> Genome | None:
        return self.mutation(self.anchor, rng)


@dataclass(frozen=True)
class OperatorSet:
    """The operators of one space: what the samplers draw children with."""

    space: JointSpace
    random: RandomGenome
    mutation: StepMutation
    crossover: UniformCrossover
    local: LocalMove
    anchor: AnchorMutants | None = None

    @classmethod
    def build(cls, space: JointSpace, mutation_prob: float = 0.25, mask_mutation_prob: float = 0.25,
              anchor: Genome | None = None, anchor_mutation_prob: float = 0.1) -> "OperatorSet":
        mutants = None
        if anchor is not None:
            mutants = AnchorMutants(anchor, StepMutation(space, anchor_mutation_prob, mask_mutation_prob))
        return cls(space, RandomGenome(space), StepMutation(space, mutation_prob, mask_mutation_prob),
                   UniformCrossover(space), LocalMove(space, p_mask=mask_mutation_prob), mutants)
