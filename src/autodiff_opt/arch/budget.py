"""The compute budget of a candidate: pure integer arithmetic over per-layer savings, no torch.

One ``Budget`` covers both ways of counting:

* FLOPs (``Budget.from_flops``): ``full_step`` is the FLOPs of one full network evaluation,
  ``savings[j]`` what skipping layer ``j`` saves, ``limit`` = ``full_steps`` x ``full_step``
  (``full_steps=10.0`` is ten full steps, so skipping can buy an 11th step).
* Layer count, the authors' N_max (``Budget.from_layer_count``): ``full_step`` = number of layers
  L, every saving 1, ``limit`` = N_max (e.g. 580 = 10 steps x 58 layers).

A candidate's cost is the sum over its steps of ``full_step - sum(savings[j] for j in skips[i])``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Set
from dataclasses import dataclass
from typing import Literal

from autodiff_opt.core.genome import Genome

BudgetUnit = Literal["flops", "layers"]


@dataclass(frozen=True)
class Budget:
    """Cost of one full step, saving per skipped layer, and the most a candidate may cost."""

    full_step: int
    savings: tuple[int, ...]
    limit: int
    unit: BudgetUnit = "flops"

    def __post_init__(self) -> None:
        if self.full_step <= 0:
            raise ValueError(f"full_step must be positive, got {self.full_step}")
        if any(s < 0 for s in self.savings) or sum(self.savings) > self.full_step:
            raise ValueError("savings must be >= 0 and add up to at most one full step")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")

    @classmethod
    def from_flops(cls, full_step_flops: int, savings: tuple[int, ...], full_steps: float) -> "Budget":
        """A FLOPs budget of ``full_steps`` full network evaluations."""
        if full_steps <= 0:
            raise ValueError(f"budget of {full_steps} full steps: give a positive multiple of one step")
        limit = math.floor(full_steps * full_step_flops + 1e-9 * full_step_flops)
        return cls(int(full_step_flops), tuple(int(s) for s in savings), int(limit), "flops")

    @classmethod
    def from_layer_count(cls, num_layers: int, n_max: int) -> "Budget":
        """The authors' budget: at most ``n_max`` executed layers summed over all steps."""
        return cls(num_layers, (1,) * num_layers, int(n_max), "layers")

    @property
    def num_layers(self) -> int:
        return len(self.savings)

    @property
    def full_steps(self) -> float:
        """The limit in multiples of one full step."""
        return self.limit / self.full_step

    def step_cost(self, mask: Set[int]) -> int:
        """Cost of one network evaluation with the layers ``mask`` skipped."""
        return self.full_step - sum(self.savings[j] for j in mask)

    def cost(self, genome: Genome) -> int:
        """Cost of a whole candidate: sum over its steps."""
        return sum(self.step_cost(mask) for mask in genome.skips)

    def fits(self, genome: Genome) -> bool:
        return self.cost(genome) <= self.limit

    def in_full_steps(self, genome: Genome) -> float:
        """Cost of a candidate in multiples of one full step (``num_steps`` when nothing is skipped)."""
        return self.cost(genome) / self.full_step

    def best_saving(self, max_skips: int) -> int:
        """The largest saving one step can make with at most ``max_skips`` skipped layers."""
        return sum(sorted(self.savings, reverse=True)[: max(0, max_skips)])

    def max_steps(self, max_skips: int) -> int:
        """The most steps the limit affords when every step skips its best ``max_skips`` layers."""
        cheapest = self.full_step - self.best_saving(max_skips)
        return self.limit // cheapest if cheapest > 0 else sys.maxsize
