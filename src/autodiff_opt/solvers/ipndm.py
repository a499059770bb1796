"""iPNDM: Adams-Bashforth on the noise prediction in PNDM's pseudo-linear (DDIM) form, on any steps.

In EDM coordinates x_tilde = x_t / alpha = x0 + sigma * eps with sigma = sqrt((1 - alpha_bar) / alpha_bar),
the DDIM transfer is linear: x_tilde_next = x_tilde + (sigma_next - sigma) * eps. iPNDM (Zhang & Chen,
DEIS) puts the Adams-Bashforth combination of the last n eps into it, with the fixed coefficients

    n=1: eps_i                          n=3: (23 eps_i - 16 eps_{i-1} + 5 eps_{i-2}) / 12
    n=2: (3 eps_i - eps_{i-1}) / 2      n=4: (55 eps_i - 59 eps_{i-1} + 37 eps_{i-2} - 9 eps_{i-3}) / 24

and n = min(i + 1, max_order): the first steps warm up at lower order, so no extra evaluation is spent.
The last step goes to sigma = 0 (alpha_bar = 1), so the output is x0; one evaluation per step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from autodiff_opt.models.base import EpsFn
from autodiff_opt.solvers.common import edm_sigma, predict, working_dtype

ADAMS_BASHFORTH: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def ipndm_sample(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    clip_x0: bool = False,
    max_order: int = 4,
) -> torch.Tensor:
    """Run iPNDM from x_T through the descending time steps; returns x0 (float32, or float64 for a float64 x_T)."""
    steps = [int(t) for t in timesteps]
    alpha_bars = [float(alphas_cumprod[t]) for t in steps]
    x_tilde = working_dtype(x_T) / math.sqrt(alpha_bars[0])
    history: list[torch.Tensor] = []  # eps, newest first
    for i, (t, alpha_bar) in enumerate(zip(steps, alpha_bars)):
        sigma = edm_sigma(alpha_bar)
        _, eps = predict(eps_fn, x_tilde * math.sqrt(alpha_bar), t, i, alpha_bar, clip_x0)
        history = [eps, *history][:max_order]
        d = sum(c * e for c, e in zip(ADAMS_BASHFORTH[len(history) - 1], history))
        sigma_next = edm_sigma(alpha_bars[i + 1]) if i + 1 < len(steps) else 0.0
        x_tilde = x_tilde + (sigma_next - sigma) * d
    return x_tilde
