"""Euler and Heun on the probability-flow ODE in EDM sigma space, on any steps.

With sigma = sqrt((1 - alpha_bar) / alpha_bar) and x_tilde = x_t / alpha (Karras et al. 2022, VP models
rescaled), the ODE is d x_tilde / d sigma = eps(x_tilde, sigma), and the last step goes to sigma = 0:

    Euler: x_tilde_next = x_tilde + h * eps_i,  h = sigma_next - sigma_i  (this is DDIM, unclipped)
    Heun:  x_e = x_tilde + h * eps_i,  x_tilde_next = x_tilde + h * (eps_i + eps(x_e, sigma_next)) / 2,
           except on the last step (to sigma = 0), which is Euler.

Euler costs one evaluation per step; Heun costs two per step except the last: 2K - 1 for K steps.
The network always sees the original training step t; the corrector's evaluation uses step i + 1's
index (its layer-skip mask).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from autodiff_opt.models.base import EpsFn
from autodiff_opt.solvers.common import edm_sigma, predict, working_dtype


def _sample(eps_fn: EpsFn, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
            clip_x0: bool, heun: bool) -> torch.Tensor:
    steps = [int(t) for t in timesteps]
    alpha_bars = [float(alphas_cumprod[t]) for t in steps]
    x_tilde = working_dtype(x_T) / math.sqrt(alpha_bars[0])
    for i, (t, alpha_bar) in enumerate(zip(steps, alpha_bars)):
        x0, eps = predict(eps_fn, x_tilde * math.sqrt(alpha_bar), t, i, alpha_bar, clip_x0)
        if i + 1 == len(steps):
            return x0  # Euler to sigma = 0
        ab_next = alpha_bars[i + 1]
        h = edm_sigma(ab_next) - edm_sigma(alpha_bar)
        x_euler = x_tilde + h * eps
        if heun:
            _, eps_next = predict(eps_fn, x_euler * math.sqrt(ab_next), steps[i + 1], i + 1, ab_next, clip_x0)
            x_tilde = x_tilde + h * 0.5 * (eps + eps_next)
        else:
            x_tilde = x_euler
    return x_tilde


def euler_sample(eps_fn: EpsFn, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                 clip_x0: bool = False) -> torch.Tensor:
    """Euler in sigma space (one evaluation per step); returns x0 (float32, or float64 for a float64 x_T)."""
    return _sample(eps_fn, x_T, timesteps, alphas_cumprod, clip_x0, heun=False)


def heun_sample(eps_fn: EpsFn, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                clip_x0: bool = False) -> torch.Tensor:
    """Heun in sigma space (2K - 1 evaluations for K steps); returns x0 (float32, or float64 for a float64 x_T)."""
    return _sample(eps_fn, x_T, timesteps, alphas_cumprod, clip_x0, heun=True)
