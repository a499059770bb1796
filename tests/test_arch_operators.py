"""Budget arithmetic and the pure stage-2 operators: properties checked with hypothesis."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autodiff_opt.arch.budget import Budget
from autodiff_opt.arch.operators import (
    JointSpace,
    crossover,
    mutate,
    mutate_skips,
    ramp_max_skip_frac,
    random_genome,
    repair,
    skip_cap,
)
from autodiff_opt.core.genome import Genome

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


def rngs(seed: int) -> list:
    return [random.Random(seed), np.random.default_rng(seed), np.random.RandomState(seed)]


@FAST
@given(space=spaces(), seed=st.integers(0, 2**31 - 1))
def test_random_genomes_fit_and_use_the_budget(space: JointSpace, seed: int) -> None:
    for rng in rngs(seed):
        genome = random_genome(space, rng)
        assert space.is_valid(genome)
        lo, hi = space.step_range()
        assert max(lo, min(hi, space.budget.limit // space.budget.full_step)) <= genome.num_steps <= hi


@FAST
@given(space=spaces(), seed=st.integers(0, 2**31 - 1))
def test_mutation_changes_the_genome_and_stays_within_budget(space: JointSpace, seed: int) -> None:
    rng = random.Random(seed)
    parent = random_genome(space, rng)
    for _ in range(5):
        child = mutate(parent, space, rng)
        if child is None:  # only when nothing at all can change
            assert space.max_skips == 0 and parent.num_steps == space.num_train_timesteps
            continue
        assert child != parent and space.is_valid(child)
        assert space.budget.cost(child) <= space.budget.limit
        parent = child


@FAST
@given(space=spaces(), seed=st.integers(0, 2**31 - 1))
def test_crossover_keeps_pairs_and_stays_within_budget(space: JointSpace, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = random_genome(space, rng), random_genome(space, rng)
    child = crossover(a, b, space, rng)
    assert child is not None and space.is_valid(child)
    assert child.num_steps <= max(a.num_steps, b.num_steps)


def test_crossover_never_splits_a_step_from_its_mask() -> None:
    space = JointSpace(1000, Budget.from_layer_count(20, 5 * 18), max_skip_frac=0.2)
    a = Genome.from_steps([990, 700, 500, 300, 10], [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}])
    b = Genome.from_steps([980, 690, 490, 290, 5], [{10, 11}, {12, 13}, {14, 15}, {16, 17}, {18, 19}])
    pairs = set(zip(a.timesteps, a.skips)) | set(zip(b.timesteps, b.skips))
    for seed in range(20):
        child = crossover(a, b, space, random.Random(seed))
        assert child is not None and child.num_steps == 5
        assert set(zip(child.timesteps, child.skips)) <= pairs
    clash = Genome.from_steps([990, 690, 500, 290, 10], b.skips)  # shares steps with a at other positions
    for seed in range(20):
        child = crossover(a, clash, space, random.Random(seed))
        assert child is not None and child.num_steps == 5 and space.is_valid(child)


@FAST
@given(space=spaces(), seed=st.integers(0, 2**31 - 1), k=st.integers(1, 20), overshoot=st.integers(0, 10))
def test_repair_makes_any_genome_fit_or_says_it_cannot(space: JointSpace, seed: int, k: int, overshoot: int) -> None:
    rng = random.Random(seed)
    k = min(k, space.num_train_timesteps)
    steps = rng.sample(range(space.num_train_timesteps), k)
    masks = [rng.sample(range(space.num_layers), min(space.num_layers - 1, rng.randint(0, overshoot))) for _ in steps]
    genome = Genome.from_steps(steps, masks)
    fixed = repair(genome, space, rng)
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
    rng = random.Random(seed)
    cap = skip_cap(num_layers, frac)
    skips = frozenset(rng.sample(range(num_layers), min(size, num_layers)))
    out = mutate_skips(skips, num_layers, cap, rng)
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
    genome = repair(Genome.from_steps(range(0, 1000, 90)), space, random.Random(0))
    assert genome is not None and genome.num_steps == 11 and budget.cost(genome) <= 10_000
    assert sum(len(m) for m in genome.skips) >= 25  # 11 x 1000 - 10000 = 1000 FLOPs to save, 40 per layer
    assert repair(Genome.from_steps(range(0, 1000, 90)), JointSpace(1000, budget, 0.0), random.Random(0)).num_steps == 10


def test_ramp_reaches_max_prun_in_five_increments() -> None:
    assert [round(ramp_max_skip_frac(g), 4) for g in range(7)] == [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1]


def test_operators_are_deterministic_given_the_seed() -> None:
    space = JointSpace(1000, Budget.from_layer_count(58, 580), 0.1)
    runs = []
    for _ in range(2):
        rng = np.random.default_rng(7)
        a = random_genome(space, rng)
        runs.append((a, mutate(a, space, rng), crossover(a, random_genome(space, rng), space, rng)))
    assert runs[0] == runs[1]
