"""Budget arithmetic and the one operator set of both stages (search/operators.py): properties checked
with hypothesis."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autodiff_opt.arch.budget import Budget
from autodiff_opt.core.genome import Genome
from autodiff_opt.search.operators import (
    AnchorMutants,
    Crossover,
    Initialization,
    JointSpace,
    LocalMove,
    Mutation,
    OperatorSet,
    RandomGenome,
    StepMutation,
    UniformCrossover,
    mutate_skips,
    repair,
    skip_cap,
)
from autodiff_opt.search.stage2 import ramp_max_skip_frac

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def spaces(draw: st.DrawFn) -> JointSpace:
    """A random but satisfiable space: L layers with random savings, a budget of 1-12 full steps."""
    num_layers = draw(st.integers(3, 40))
    full_step = draw(st.integers(10_000, 10**9))
    weights = draw(st.lists(st.floats(0.05, 1.0), min_size=num_layers, max_size=num_layers))
    share = draw(st.floats(0.3, 0.95))  # share of a step the layers hold
    savings = tuple(int(full_step * share * w / sum(weights)) for w in weights)
    if draw(st.booleans()):
        budget = Budget.from_flops(full_step, savings, draw(st.floats(1.0, 12.0)))
    else:
        budget = Budget.from_layer_count(num_layers, draw(st.integers(num_layers, 12 * num_layers)))
    return JointSpace(num_train_timesteps=draw(st.sampled_from([20, 50, 1000])), budget=budget,
                      max_skip_frac=draw(st.floats(0.0, 0.6)))


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_genome(space: JointSpace, gen: np.random.Generator) -> Genome:
    return RandomGenome(space)(gen)


@FAST
@given(space=spaces(), seed=st.integers(0, 2**31 - 1))
def test_random_genomes_fit_and_use_the_budget(space: JointSpace, seed: int) -> None:
    gen = rng(seed)
    for _ in range(3):
        genome = random_genome(space, gen)
        assert space.is_valid(genome)
        lo, hi = space.step_range()
        assert max(lo, min(hi, space.budget.limit // space.budget.full_step)) <= genome.num_steps <= hi


@FAST
@given(space=spaces(), seed=st.integers(0, 2**31 - 1))
def test_mutation_changes_the_genome_and_stays_within_budget(space: JointSpace, seed: int) -> None:
    gen = rng(seed)
    parent = random_genome(space, gen)
    for _ in range(5):
        child = StepMutation(space)(parent, gen)
        if child is None:  # only when nothing at all can change
            assert space.max_skips == 0 and parent.num_steps == space.num_train_timesteps
            continue
        assert child != parent and space.is_valid(child)
        assert space.budget.cost(child) <= space.budget.limit
        parent = child


@FAST
@given(space=spaces(), seed=st.integers(0, 2**31 - 1))
def test_crossover_keeps_pairs_and_stays_within_budget(space: JointSpace, seed: int) -> None:
    gen = rng(seed)
    a, b = random_genome(space, gen), random_genome(space, gen)
    child = UniformCrossover(space)(a, b, gen)
    assert child is not None and space.is_valid(child)
    assert child.num_steps <= max(a.num_steps, b.num_steps)


def test_crossover_never_splits_a_step_from_its_mask() -> None:
    space = JointSpace(1000, Budget.from_layer_count(20, 5 * 18), max_skip_frac=0.2)
    a = Genome.from_steps([990, 700, 500, 300, 10], [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}])
    b = Genome.from_steps([980, 690, 490, 290, 5], [{10, 11}, {12, 13}, {14, 15}, {16, 17}, {18, 19}])
    pairs = set(zip(a.timesteps, a.skips)) | set(zip(b.timesteps, b.skips))
    for seed in range(20):
        child = UniformCrossover(space)(a, b, rng(seed))
        assert child is not None and child.num_steps == 5
        assert set(zip(child.timesteps, child.skips)) <= pairs
    clash = Genome.from_steps([990, 690, 500, 290, 10], b.skips)  # shares steps with a at other positions
    for seed in range(20):
        child = UniformCrossover(space)(a, clash, rng(seed))
        assert child is not None and child.num_steps == 5 and space.is_valid(child)


@FAST
@given(space=spaces(), seed=st.integers(0, 2**31 - 1), k=st.integers(1, 20), overshoot=st.integers(0, 10))
def test_repair_makes_any_genome_fit_or_says_it_cannot(space: JointSpace, seed: int, k: int, overshoot: int) -> None:
    gen = rng(seed)
    k = min(k, space.num_train_timesteps)
    steps = gen.choice(space.num_train_timesteps, size=k, replace=False)
    masks = [gen.choice(space.num_layers, size=min(space.num_layers - 1, int(gen.integers(overshoot + 1))), replace=False)
             for _ in steps]
    genome = Genome.from_steps(steps, masks)
    fixed = repair(genome, space, gen)
    lo, hi = space.step_range()
    if fixed is None:
        assert hi < lo
        return
    assert space.is_valid(fixed)
    assert set(fixed.timesteps) <= set(genome.timesteps)
    assert fixed.num_steps == min(k, hi)
    if space.is_valid(genome):
        assert fixed is genome


@FAST
@given(num_layers=st.integers(1, 60), frac=st.floats(0.0, 1.0), size=st.integers(0, 60), seed=st.integers(0, 10**6))
def test_skip_set_mutation_really_changes_within_the_cap(num_layers: int, frac: float, size: int, seed: int) -> None:
    gen = rng(seed)
    cap = skip_cap(num_layers, frac)
    skips = frozenset(int(j) for j in gen.choice(num_layers, size=min(size, num_layers), replace=False))
    out = mutate_skips(skips, num_layers, cap, gen)
    assert len(out) <= cap and all(0 <= j < num_layers for j in out)
    if cap > 0 or skips:
        assert out != skips
    else:
        assert out == skips


def test_budget_counts_flops_and_layers() -> None:
    flops = Budget.from_flops(1000, (100, 200, 300), 10.0)
    genome = Genome((900, 500, 100), (frozenset({2}), frozenset(), frozenset({0, 1})))
    assert flops.limit == 10_000 and flops.full_steps == 10.0
    assert flops.cost(genome) == 700 + 1000 + 700
    assert flops.in_full_steps(genome) == pytest.approx(2.4)
    assert flops.max_steps(1) == 10_000 // 700
    layers = Budget.from_layer_count(58, 580)
    genome = Genome(tuple(range(990, 979, -1)), tuple(frozenset(range(6)) if i < 6 else frozenset(range(5)) for i in range(11)))
    assert layers.cost(genome) == 11 * 58 - 6 * 6 - 5 * 5 and layers.fits(genome)  # 11 steps in the 10-step budget
    assert not layers.fits(Genome(tuple(range(990, 979, -1))))


def test_an_eleventh_step_needs_skipping() -> None:
    budget = Budget.from_flops(1000, (40,) * 10, 10.0)
    space = JointSpace(1000, budget, max_skip_frac=0.3)
    genome = repair(Genome.from_steps(range(0, 1000, 90)), space, rng(0))
    assert genome is not None and genome.num_steps == 11 and budget.cost(genome) <= 10_000
    assert sum(len(m) for m in genome.skips) >= 25  # 11 x 1000 - 10000 = 1000 FLOPs to save, 40 per layer
    assert repair(Genome.from_steps(range(0, 1000, 90)), JointSpace(1000, budget, 0.0), rng(0)).num_steps == 10


def test_ramp_reaches_max_prun_in_five_increments() -> None:
    assert [round(ramp_max_skip_frac(g), 4) for g in range(7)] == [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1]


def test_operators_are_deterministic_given_the_seed() -> None:
    space = JointSpace(1000, Budget.from_layer_count(58, 580), 0.1)
    runs = []
    for _ in range(2):
        gen = rng(7)
        a = random_genome(space, gen)
        runs.append((a, StepMutation(space)(a, gen), UniformCrossover(space)(a, random_genome(space, gen), gen),
                     LocalMove(space)(a, gen)))
    assert runs[0] == runs[1]


# --- stage 1: the same operators on the joint space without skipping ------------------------------
STAGE1 = JointSpace.without_skipping(1000, 4, 4)


def test_stage1_is_the_joint_space_without_skipping() -> None:
    assert (STAGE1.max_skips, STAGE1.num_layers, STAGE1.step_range()) == (0, 0, (4, 4))
    masked = Genome.from_steps([900, 600, 300, 10], [[1], [2], [], []])
    assert not STAGE1.is_valid(masked) and STAGE1.is_valid(Genome((900, 600, 300, 10)))
    assert repair(masked, STAGE1, rng(0)) == Genome((900, 600, 300, 10))  # masks are dropped, steps kept
    ops = OperatorSet.build(STAGE1, anchor=Genome((750, 500, 250, 0)))
    for op in (ops.random, ops.anchor, ops.mutation, ops.crossover, ops.local):
        assert op is not None
        parents = [Genome((900, 600, 300, 10)), Genome((901, 601, 301, 11))][: op.arity]
        for seed in range(30):
            child = op(*parents, rng(seed))
            assert child is not None and STAGE1.is_valid(child) and not child.has_skips and child.num_steps == 4


def test_operators_are_typed_and_named_as_trials_record_them() -> None:
    ops = OperatorSet.build(STAGE1, anchor=Genome((750, 500, 250, 0)))
    kinds = {ops.random: Initialization, ops.anchor: Initialization, ops.mutation: Mutation, ops.local: Mutation,
             ops.crossover: Crossover}
    assert all(isinstance(op, kind) for op, kind in kinds.items())
    assert [op.name for op in kinds] == ["random", "anchor_mutation", "mutation", "local", "crossover"]
    assert [op.arity for op in kinds] == [0, 0, 1, 1, 2]
    assert isinstance(ops.anchor, AnchorMutants) and ops.anchor.mutation.p_step == 0.1


def test_stage1_crossover_takes_each_position_from_either_parent() -> None:
    a, b = Genome((900, 600, 300, 10)), Genome((900, 601, 300, 11))
    cross, gen = UniformCrossover(STAGE1), rng(0)
    picked: Counter[tuple[int, str]] = Counter()
    for _ in range(200):
        child = cross(a, b, gen)
        assert child is not None and len(set(child.timesteps)) == 4
        for i, t in enumerate(child.timesteps):  # no step recurs at another position: position i is a's or b's
            assert t in (a.timesteps[i], b.timesteps[i]), (i, t)
            picked[(i, "a" if t == a.timesteps[i] else "b")] += 1
    assert all(picked[(i, "b")] > 40 for i in (1, 3)) and all(picked[(i, "a")] > 40 for i in range(4)), picked


def test_stage1_mutation_always_changes_and_replaces_steps_with_its_probability() -> None:
    a, gen = Genome((900, 600, 300, 10)), rng(1)
    changed = Counter()
    for p in (0.0, 0.5, 1.0):
        for _ in range(200):
            child = StepMutation(STAGE1, p_step=p)(a, gen)
            assert child is not None and child != a and STAGE1.is_valid(child)
            changed[p] += len(set(a.timesteps) - set(child.timesteps))
    assert changed[0.0] == 200  # a mutant never equals its parent: with p_step 0 exactly one step moves
    assert 1.8 < changed[0.5] / 200 < 2.4 and changed[1.0] > 0.98 * 800  # a drawn step may be one just freed


def test_local_moves_stay_near_the_parent() -> None:
    a, gen = Genome((900, 600, 300, 10)), rng(2)
    moves = [np.abs(np.subtract(LocalMove(STAGE1)(a, gen).timesteps, a.timesteps)).max() for _ in range(200)]
    assert np.median(moves) < 100 and max(moves) < 500
