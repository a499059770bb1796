"""Stage-1 evolution operators on time steps; every child keeps K distinct steps, each with its mask."""

from __future__ import annotations

import numpy as np

from autodiff_opt.core.genome import Genome


def random_genome(num_steps: int, num_train_timesteps: int, rng: np.random.Generator) -> Genome:
    """K distinct time steps drawn uniformly from [0, T-1]."""
    steps = rng.choice(num_train_timesteps, size=num_steps, replace=False)
    return Genome.from_steps(int(t) for t in steps)


def _unused_step(used: set[int], num_train_timesteps: int, rng: np.random.Generator) -> int:
    while True:
        t = int(rng.integers(num_train_timesteps))
        if t not in used:
            return t


def mutate(genome: Genome, prob: float, num_train_timesteps: int, rng: np.random.Generator) -> Genome:
    """Replace each step with probability `prob` by a step not already in the candidate; masks stay by position."""
    steps = list(genome.timesteps)
    used = set(steps)
    for i in range(len(steps)):
        if rng.random() < prob:
            used.discard(steps[i])
            steps[i] = _unused_step(used, num_train_timesteps, rng)
            used.add(steps[i])
    return Genome.from_steps(steps, [sorted(s) for s in genome.skips])


def crossover(a: Genome, b: Genome, num_train_timesteps: int, rng: np.random.Generator) -> Genome:
    """Uniform crossover: each position (step and its mask) from either parent; the child has a's K.

    A step already taken by an earlier position is replaced by the other parent's step there, or else by
    an unused random step, so the child never silently loses a step (a defect of the authors' code).
    Positions beyond b's K (parents of another solver's K, search/solver_gene.py) come from a.
    """
    steps: list[int] = []
    masks: list[list[int]] = []
    for i in range(a.num_steps):
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        for parent in (first, second):
            if i < parent.num_steps and parent.timesteps[i] not in steps:
                steps.append(parent.timesteps[i])
                masks.append(sorted(parent.skips[i]))
                break
        else:
            steps.append(_unused_step(set(steps), num_train_timesteps, rng))
            masks.append(sorted(a.skips[i]))
    return Genome.from_steps(steps, masks)


def perturb(genome: Genome, scale: float, num_train_timesteps: int, rng: np.random.Generator) -> Genome:
    """Local mutation: every step moves by a Gaussian of std `scale` x T, then colliding steps are pushed apart."""
    from autodiff_opt.solvers.schedules import make_distinct

    moved = [int(round(t + rng.normal(0.0, scale * num_train_timesteps))) for t in genome.timesteps]
    steps = make_distinct(moved, num_train_timesteps)
    return Genome.from_steps(steps, [sorted(s) for s in genome.skips])
