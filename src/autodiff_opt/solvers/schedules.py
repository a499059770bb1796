"""Heuristic K-step schedules, mapped to distinct integer training time steps in sampling order.

- ddim_uniform: the DDIM paper's "leading" spacing, {0, T/K, ..., (K-1)T/K} (AutoDiffusion's baseline)
- trailing:     T-1, T-1-T/K, ... (starts at the noisiest step)
- quadratic:    DDIM's quadratic spacing t_i = (i * sqrt(0.8 T)/(K-1))^2
- logsnr:       uniform in log-SNR lambda = log(alpha_bar / (1 - alpha_bar)), K of K+1 grid points from lambda_min
- karras:       Karras et al. rho=7 spacing in sigma = sqrt((1 - alpha_bar)/alpha_bar), sigma_max to sigma(0)

For the last two the noisy end is sigma_max = min(sigma(T-1), 80) (EDM's choice): cosine schedules reach
sigma ~ 1e3 at t = T-1, which would put several steps on the same nearly pure-noise time step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

ScheduleFn = Callable[[int, torch.Tensor], list[float]]


def _ddim_uniform(k: int, alphas_cumprod: torch.Tensor) -> list[float]:
    T = alphas_cumprod.shape[0]
    return [float(i * (T // k)) for i in range(k)]


def _trailing(k: int, alphas_cumprod: torch.Tensor) -> list[float]:
    T = alphas_cumprod.shape[0]
    return list(np.round(np.arange(T, 0, -T / k)) - 1)[:k]


def _quadratic(k: int, alphas_cumprod: torch.Tensor) -> list[float]:
    T = alphas_cumprod.shape[0]
    if k == 1:
        return [0.0]
    return list(np.linspace(0.0, np.sqrt(0.8 * T), k) ** 2)


def _nearest_t(values: np.ndarray, targets: np.ndarray) -> list[float]:
    """Index of the nearest entry of a monotone per-t curve for each target value."""
    return [float(np.argmin(np.abs(values - v))) for v in targets]


SIGMA_MAX = 80.0


def _logsnr(k: int, alphas_cumprod: torch.Tensor) -> list[float]:
    ab = alphas_cumprod.double().numpy()
    lam = np.log(ab) - np.log1p(-ab)
    lam_min = max(lam[-1], -2.0 * np.log(SIGMA_MAX))
    grid = np.linspace(lam_min, lam[0], k + 1)[:k]
    return _nearest_t(lam, grid)


def _karras(k: int, alphas_cumprod: torch.Tensor, rho: float = 7.0) -> list[float]:
    ab = alphas_cumprod.double().numpy()
    sigma = np.sqrt((1 - ab) / ab)
    if k == 1:
        return [float(len(ab) - 1)]
    ramp = np.linspace(0.0, 1.0, k)
    lo, hi = sigma[0] ** (1 / rho), min(sigma[-1], SIGMA_MAX) ** (1 / rho)
    targets = (hi + ramp * (lo - hi)) ** rho
    return _nearest_t(sigma, targets)


HEURISTICS: dict[str, ScheduleFn] = {
    "ddim_uniform": _ddim_uniform,
    "trailing": _trailing,
    "quadratic": _quadratic,
    "logsnr": _logsnr,
    "karras": _karras,
}


def make_distinct(steps: list[int], T: int) -> list[int]:
    """Sort descending and push colliding steps down (then up) until all K are distinct in [0, T-1]."""
    out: list[int] = []
    for t in sorted((min(max(int(s), 0), T - 1) for s in steps), reverse=True):
        if out and t >= out[-1]:
            t = out[-1] - 1
        out.append(t)
    if out and out[-1] < 0:  # ran below zero: shift the tail up from 0
        for i in range(len(out) - 1, -1, -1):
            floor = len(out) - 1 - i
            if out[i] >= floor:
                break
            out[i] = floor
    return out


def heuristic_schedule(name: str, num_steps: int, alphas_cumprod: torch.Tensor) -> list[int]:
    """The named heuristic as K distinct integer steps, descending (sampling order)."""
    if name not in HEURISTICS:
        raise ValueError(f"unknown heuristic schedule {name!r}: use one of {sorted(HEURISTICS)}")
    T = int(alphas_cumprod.shape[0])
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps} must be in [1, {T}]")
    raw = HEURISTICS[name](num_steps, alphas_cumprod)
    return make_distinct([int(round(v)) for v in raw], T)
