"""Multistep DPM-Solver++ (2M and 3M) on an arbitrary schedule of integer time steps (checked against diffusers).

With lambda_t = log(alpha_t / sigma_t), alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), the step
from t to s (h = lambda_s - lambda_t) on the data predictions m0 (at t), m1, m2 (at the two earlier steps):
  order 1:  x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) m0
  order 2:  the same with D = (1 + 1/(2 r0)) m0 - 1/(2 r0) m1,  r0 = h0 / h, h0 = lambda_t - lambda_t1
  order 3:  D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, r1 = h1/h,
            D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1)/(r0 + r1),
            x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) m0 + alpha_s ((e^{-h} - 1)/h + 1) D1
                  - alpha_s ((e^{-h} - 1 + h)/h^2 - 1/2) D2
Step i uses order min(order, i + 1) (warm start). The last evaluation goes to sigma = 0, so the output is
that step's x0 (diffusers' final_sigmas_type="zero"); one evaluation per step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from autodiff_opt.models.base import EpsFn
from autodiff_opt.solvers.common import alpha_sigma_lambda, predict, working_dtype


def _update(x: torch.Tensor, ms: list[torch.Tensor], lams: list[float], sigma_t: float,
            alpha_s: float, sigma_s: float, lambda_s: float) -> torch.Tensor:
    """One DPM-Solver++ step of order len(ms) (ms, lams: newest first)."""
    h = lambda_s - lams[0]
    phi = math.expm1(-h)
    x_s = (sigma_s / sigma_t) * x - alpha_s * phi * ms[0]
    if len(ms) == 2:
        r0 = (lams[0] - lams[1]) / h
        x_s = x_s - alpha_s * phi * (0.5 / r0) * (ms[0] - ms[1])
    elif len(ms) == 3:
        r0, r1 = (lams[0] - lams[1]) / h, (lams[1] - lams[2]) / h
        d1_0, d1_1 = (ms[0] - ms[1]) / r0, (ms[1] - ms[2]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x_s = x_s + alpha_s * (phi / h + 1.0) * d1 - alpha_s * ((phi + h) / h**2 - 0.5) * d2
    return x_s


def dpmpp_multistep_sample(eps_fn: EpsFn, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                           clip_x0: bool = False, order: int = 2) -> torch.Tensor:
    """Multistep DPM-Solver++ of the given order (1-3) with lower-order warm start; returns x0 (float32, or float64 for a float64 x_T)."""
    x = working_dtype(x_T)
    steps = [int(t) for t in timesteps]
    ms: list[torch.Tensor] = []
    lams: list[float] = []
    for i, t in enumerate(steps):
        alpha_bar = float(alphas_cumprod[t])
        _, sigma_t, lambda_t = alpha_sigma_lambda(alpha_bar)
        x0, _ = predict(eps_fn, x, t, i, alpha_bar, clip_x0)
        if i + 1 == len(steps):
            return x0
        ms, lams = [x0, *ms][:order], [lambda_t, *lams][:order]
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(float(alphas_cumprod[steps[i + 1]]))
        x = _update(x, ms, lams, sigma_t, alpha_s, sigma_s, lambda_s)
    return x


def dpmpp_2m_sample(eps_fn: EpsFn, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                    clip_x0: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M): second order, first order on the first step."""
    return dpmpp_multistep_sample(eps_fn, x_T, timesteps, alphas_cumprod, clip_x0, order=2)


def dpmpp_3m_sample(eps_fn: EpsFn, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                    clip_x0: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M): third order after a first- and a second-order step."""
    return dpmpp_multistep_sample(eps_fn, x_T, timesteps, alphas_cumprod, clip_x0, order=3)
