"""DPM-Solver++(2M) on an arbitrary schedule of integer time steps (our own, checked against diffusers).

With lambda_t = log(alpha_t / sigma_t), alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t):
  step 0 (first order):  x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) x0_t
  later (second order):  D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,  r = h_prev / h
The last evaluation goes to sigma = 0, so the output is that step's x0 (diffusers' final_sigmas_type="zero").
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from autodiff_opt.models.base import EpsFn


def _alpha_sigma_lambda(alpha_bar: float) -> tuple[float, float, float]:
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return alpha, sigma, math.log(alpha) - math.log(sigma)


def dpmpp_2m_sample(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    clip_x0: bool = False,
) -> torch.Tensor:
    """Multistep DPM-Solver++ of order 2 (first order on the first step); returns x0 (float32)."""
    x = x_T.float()
    steps = [int(t) for t in timesteps]
    x0_prev: torch.Tensor | None = None
    lambda_prev = 0.0
    for i, t in enumerate(steps):
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(float(alphas_cumprod[t]))
        x0 = (x - sigma_t * eps_fn(x, t, i).float()) / alpha_t
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if i + 1 == len(steps):
            return x0
        alpha_s, sigma_s, lambda_s = _alpha_sigma_lambda(float(alphas_cumprod[steps[i + 1]]))
        h = lambda_s - lambda_t
        if x0_prev is None:
            d = x0
        else:
            r = (lambda_t - lambda_prev) / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
        x0_prev, lambda_prev = x0, lambda_t
    return x
