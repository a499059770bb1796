"""Deterministic DDIM (eta=0) on an arbitrary schedule, with ADM's semantics.

x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), optionally clipped to [-1, 1], eps re-derived from the
clipped x0, then x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps; after the last step a_prev = 1, so
the output is x0. The network sees the original training time step t.
"""

from __future__ import annotations

from typing import Sequence

import torch

from autodiff_opt.models.base import EpsFn


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float, clip_x0: bool
) -> torch.Tensor:
    sqrt_ab, sqrt_1mab = alpha_bar_t**0.5, (1.0 - alpha_bar_t) ** 0.5
    x0 = (x_t - sqrt_1mab * eps) / sqrt_ab
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - sqrt_ab * x0) / sqrt_1mab
    return alpha_bar_prev**0.5 * x0 + (1.0 - alpha_bar_prev) ** 0.5 * eps


def ddim_sample(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    clip_x0: bool = True,
) -> torch.Tensor:
    """Run DDIM from x_T through the descending time steps; returns x0 (float32)."""
    x = x_T.float()
    steps = [int(t) for t in timesteps]
    for i, t in enumerate(steps):
        alpha_bar_t = float(alphas_cumprod[t])
        alpha_bar_prev = float(alphas_cumprod[steps[i + 1]]) if i + 1 < len(steps) else 1.0
        eps = eps_fn(x, t, i).float()
        x = ddim_step(x, eps, alpha_bar_t, alpha_bar_prev, clip_x0)
    return x
