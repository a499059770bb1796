"""The solver gene (``search.solvers``): the search picks the solver together with the steps.

The budget is in network evaluations: with ``search.solvers`` set, ``search.num_steps`` is the NFE of
every candidate, and a candidate with solver s has K = steps_for_nfe(s, NFE) steps, the most whose
nfe(s, K) fits (one per step for most solvers; Heun costs 2K - 1, so it gets K = (NFE + 1) // 2 steps:
3 steps for NFE 5 or 6, 2 for NFE 4). A child takes its solver from its parents:

- mutation: the parent's solver, switched to another listed one with probability ``search.mutation_prob``
- crossover: either parent's solver, at random
- local moves (the surrogate's perturbations): the parent's solver
- random genomes and mutants of the anchor schedule: a solver drawn uniformly

and its steps are then fitted to that solver's K (random steps dropped, or unused random steps added).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from autodiff_opt.core.genome import Genome
from autodiff_opt.search.operators import Crossover, LocalMove, Mutation, Operator


def fit_to_solver(genome: Genome, solver: str, num_steps: int, num_train_timesteps: int,
                  rng: np.random.Generator) -> Genome:
    """The genome with this solver and exactly num_steps steps (masks follow their steps)."""
    steps, masks = list(genome.timesteps), [sorted(s) for s in genome.skips]
    if len(steps) > num_steps:
        keep = sorted(int(i) for i in rng.choice(len(steps), size=num_steps, replace=False))
        steps, masks = [steps[i] for i in keep], [masks[i] for i in keep]
    while len(steps) < num_steps:
        t = int(rng.integers(num_train_timesteps))
        if t not in steps:
            steps.append(t)
            masks.append([])
    return Genome.from_steps(steps, masks, solver)


def child_solver(op: Operator, parents: Sequence[Genome], solvers: Sequence[str], switch_prob: float,
                 rng: np.random.Generator) -> str:
    """The solver a child of this operator inherits (see the module docstring)."""
    inherited = [p.solver if p.solver in solvers else solvers[0] for p in parents]
    if isinstance(op, Crossover) and len(inherited) >= 2:
        return inherited[int(rng.integers(2))]
    if isinstance(op, Mutation) and inherited:
        others = [s for s in solvers if s != inherited[0]]
        if not isinstance(op, LocalMove) and others and rng.random() < switch_prob:
            return others[int(rng.integers(len(others)))]
        return inherited[0]
    return solvers[int(rng.integers(len(solvers)))]
