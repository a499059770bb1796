"""The VP quantities every solver reads off alpha_bar, and one model evaluation as (x0, eps).

alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma) (half log-SNR), and
EDM's sigma = sqrt((1 - alpha_bar) / alpha_bar) with x_tilde = x / alpha = x0 + sigma_edm * eps.
"""

from __future__ import annotations

import math

import torch

from autodiff_opt.models.base import EpsFn


def alpha_sigma_lambda(alpha_bar: float) -> tuple[float, float, float]:
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return alpha, sigma, math.log(alpha) - math.log(sigma)


def edm_sigma(alpha_bar: float) -> float:
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def working_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 when it is float64 (half precision is never used for the solver's state)."""
    return x if x.dtype == torch.float64 else x.float()


def predict(eps_fn: EpsFn, x: torch.Tensor, t: int, i: int, alpha_bar: float,
            clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) of the model at x_t, in x's dtype; with clip_x0, x0 is clamped to [-1, 1] and eps re-derived from it."""
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    eps = eps_fn(x, t, i).to(x.dtype)
    x0 = (x - sigma * eps) / alpha
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return x0, eps
