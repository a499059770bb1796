"""Stage 2's per-step sensitivity map as data, and the prior the operators draw skipped layers from.

``SensitivityMap.delta[i][j]`` is the FID change (on a prefix of the search samples, the search seeds)
when layer ``j`` alone is skipped at step ``i`` of the stage-1 best schedule ``timesteps``. The prior
weighs a (time step, layer) pair by ``exp(-(delta - min) / std)`` over the whole map, a candidate's time
step read at the map's nearest step: harmless skips are drawn often, harmful ones rarely.
Pure numpy (the computation is in search/sensitivity.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class SensitivityMap:
    timesteps: tuple[int, ...]
    delta: tuple[tuple[float, ...], ...]  # [step][layer]: FID with the layer skipped at that step minus base_fid
    base_fid: float
    num_samples: int  # the prefix of the search samples it was computed on
    image_steps: int  # what it cost, counted in the search budget
    trial: int | None = None  # the stage-1 best trial it was computed on

    def to_json(self) -> dict[str, Any]:
        return {"timesteps": list(self.timesteps), "delta": [list(r) for r in self.delta], "base_fid": self.base_fid,
                "num_samples": self.num_samples, "image_steps": self.image_steps, "trial": self.trial}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SensitivityMap":
        return cls(tuple(int(t) for t in data["timesteps"]), tuple(tuple(math.inf if v is None else float(v) for v in r) for r in data["delta"]),
                   float(data["base_fid"]), int(data["num_samples"]), int(data["image_steps"]), data.get("trial"))

    @property
    def num_layers(self) -> int:
        return len(self.delta[0]) if self.delta else 0


@dataclass(frozen=True, eq=False)
class SkipPrior:
    """Positive weights per (map step, layer); ``row(t)`` those of the map step nearest to ``t``."""

    timesteps: tuple[int, ...]
    weights: np.ndarray  # [step][layer]

    @classmethod
    def from_map(cls, smap: SensitivityMap) -> "SkipPrior":
        delta = np.asarray(smap.delta, dtype=float)
        finite = delta[np.isfinite(delta)]
        if finite.size == 0:
            return cls(smap.timesteps, np.ones_like(delta))
        delta = np.where(np.isfinite(delta), delta, finite.max())  # a skip that broke sampling: the worst seen
        scale = max(float(finite.std()), 1e-12)
        return cls(smap.timesteps, np.exp(-(delta - float(finite.min())) / scale))

    def row(self, t: int) -> np.ndarray:
        i = int(np.argmin([abs(t - s) for s in self.timesteps]))
        return self.weights[i]


def weighted_index(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """An index drawn with probability proportional to ``weights`` (one uniform draw)."""
    cum = np.cumsum(np.asarray(weights, dtype=float))
    return int(min(np.searchsorted(cum, float(rng.random()) * cum[-1], side="right"), len(cum) - 1))
