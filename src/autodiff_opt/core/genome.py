"""The genome of one candidate: K sampling time steps, per step a set of skipped layers, and the solver
when the search chooses it (``search.solvers``; None: the configured ``solver.name``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from autodiff_opt.core.errors import GenomeError


@dataclass(frozen=True)
class Genome:
    """Time steps in sampling order (strictly descending) and, per step, the ids of skipped layers.

    ``skips[i]`` belongs to ``timesteps[i]``: the pairing travels with the step through every
    operator, so a mask is never applied to another step by rank. ``solver`` is the solver gene.
    """

    timesteps: tuple[int, ...]
    skips: tuple[frozenset[int], ...] = field(default=())
    solver: str | None = None

    def __post_init__(self) -> None:
        if not self.skips:
            object.__setattr__(self, "skips", tuple(frozenset() for _ in self.timesteps))
        if len(self.skips) != len(self.timesteps):
            raise GenomeError(
                f"genome has {len(self.timesteps)} time steps but {len(self.skips)} skip masks"
            )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def has_skips(self) -> bool:
        return any(self.skips)

    @classmethod
    def from_steps(
        cls, steps: Iterable[int], skips: Sequence[Iterable[int]] | None = None, solver: str | None = None
    ) -> "Genome":
        """Build from steps in any order; masks, when given, follow their steps through the sort."""
        steps = [int(t) for t in steps]
        masks = [frozenset(int(i) for i in s) for s in skips] if skips is not None else [frozenset()] * len(steps)
        if len(masks) != len(steps):
            raise GenomeError(f"{len(steps)} time steps but {len(masks)} skip masks")
        order = sorted(range(len(steps)), key=lambda i: -steps[i])
        return cls(tuple(steps[i] for i in order), tuple(masks[i] for i in order), solver)

    def with_solver(self, solver: str | None) -> "Genome":
        return Genome(self.timesteps, self.skips, solver)

    def validate(self, num_train_timesteps: int) -> "Genome":
        """Raise GenomeError unless the steps are distinct, strictly descending and in [0, T-1]."""
        validate_timesteps(self.timesteps, num_train_timesteps)
        return self

    def key(self) -> str:
        """A canonical string: equal genomes have equal keys (used to reject already-seen ones)."""
        return json.dumps(self.to_json())

    def to_json(self) -> dict[str, Any]:
        """Steps and masks, and the solver only when it is a gene (keys of older studies stay as they were)."""
        out: dict[str, Any] = {"timesteps": list(self.timesteps), "skips": [sorted(s) for s in self.skips]}
        if self.solver is not None:
            out["solver"] = self.solver
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> "Genome":
        if isinstance(data, str):
            data = json.loads(data)
        return cls(
            tuple(int(t) for t in data["timesteps"]),
            tuple(frozenset(int(i) for i in s) for s in data.get("skips") or [[] for _ in data["timesteps"]]),
            data.get("solver"),
        )


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> None:
    """Check a user- or search-given schedule; the message names the problem and the fix."""
    steps = list(timesteps)
    if len(steps) < 1:
        raise GenomeError("the schedule is empty: give at least one time step")
    if len(steps) > num_train_timesteps:
        raise GenomeError(
            f"{len(steps)} steps requested but the model has only T={num_train_timesteps} time steps: use K <= T"
        )
    bad = [t for t in steps if not (0 <= t < num_train_timesteps)]
    if bad:
        raise GenomeError(f"time steps {bad} are outside [0, {num_train_timesteps - 1}]: use integers in that range")
    if len(set(steps)) != len(steps):
        dup = sorted({t for t in steps if steps.count(t) > 1})
        raise GenomeError(f"time steps {dup} appear more than once: each step must be distinct")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise GenomeError(f"time steps {steps} are not strictly descending: sort them in sampling order (high t first)")
