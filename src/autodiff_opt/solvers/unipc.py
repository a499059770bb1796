"""UniPC (Zhao et al. 2023) with B(h) = e^{-h} - 1 ("bh2"), data prediction, on any steps.

From s0 (lambda_0, data prediction m0, earlier m_k at lambda_k) to t (h = lambda_t - lambda_0),
with r_k = (lambda_k - lambda_0)/h, D_k = (m_k - m0)/r_k and hphi = e^{-h} - 1:
    x_t = (sigma_t/sigma_0) x_0 - alpha_t hphi m0 - alpha_t B(h) sum_k rho_k D_k
The weights solve R rho = b with R[n, k] = r_k^n and b_n = g_n n! / B(h), where g_1 = hphi/(-h) - 1 and
g_{n+1} = g_n/(-h) - 1/(n+1)!. UniP-p (predictor) uses the p - 1 earlier outputs (rho = 1/2 for p = 2);
UniC-p (corrector) adds D_t = m_t - m0 with r = 1 (rho = 1/2 for p = 1): m_t is the model output at the
predicted x_t, which the next step needs anyway, so the corrector costs no evaluation; the final step has
no corrector (it would need one more). The step from grid point i to i + 1 uses order
min(order, i + 1, K - i) as diffusers does (lower_order_final, which a zero final sigma needs there): the
step into the last point is at most second order, and the last evaluation returns its x0. One evaluation
per step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from autodiff_opt.models.base import EpsFn
from autodiff_opt.solvers.common import alpha_sigma_lambda, predict, working_dtype


def _weights(rks: list[float], h: float, corrector: bool) -> list[float]:
    """rho of UniP-p (p = len(rks) + 1) or UniC-p (p = len(rks) + 1, with r = 1 appended)."""
    p = len(rks) + 1
    if corrector and p == 1:
        return [0.5]
    if not corrector and p == 2:
        return [0.5]
    if not corrector and p == 1:
        return []
    hh = -h
    b_h = math.expm1(hh)
    g, factorial, b = math.expm1(hh) / hh - 1.0, 1, []
    for n in range(1, p + 1):
        b.append(g * factorial / b_h)
        factorial *= n + 1
        g = g / hh - 1.0 / factorial
    r = [*rks, 1.0] if corrector else list(rks)
    size = p if corrector else p - 1
    R = torch.tensor([[rk**n for rk in r] for n in range(size)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b[:size], dtype=torch.float64)).tolist()


def _step(x: torch.Tensor, ms: list[torch.Tensor], lams: list[float], sigma_0: float, alpha_t: float,
          sigma_t: float, lambda_t: float, m_t: torch.Tensor | None = None) -> torch.Tensor:
    """UniP (m_t None) or UniC of order len(ms) from the sample x at lams[0] (ms, lams: newest first)."""
    h = lambda_t - lams[0]
    rks = [(lam - lams[0]) / h for lam in lams[1:]]
    ds = [(m - ms[0]) / rk for m, rk in zip(ms[1:], rks)]
    if m_t is not None:
        ds.append(m_t - ms[0])
    rhos = _weights(rks, h, corrector=m_t is not None)
    x_t = (sigma_t / sigma_0) * x - alpha_t * math.expm1(-h) * ms[0]
    if rhos:
        x_t = x_t - alpha_t * math.expm1(-h) * sum(rho * d for rho, d in zip(rhos, ds))
    return x_t


def unipc_sample(eps_fn: EpsFn, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                 clip_x0: bool = False, order: int = 3) -> torch.Tensor:
    """UniPC-p with bh2 (p = order, 3 as diffusers recommends for unconditional models); returns x0 (float32, or float64 for a float64 x_T)."""
    x = working_dtype(x_T)
    steps = [int(t) for t in timesteps]
    K = len(steps)
    ms: list[torch.Tensor] = []  # data predictions, newest first
    lams: list[float] = []
    x_prev, sigma_prev, order_prev = x, 1.0, 0
    for i, t in enumerate(steps):
        alpha_bar = float(alphas_cumprod[t])
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(alpha_bar)
        x0, _ = predict(eps_fn, x, t, i, alpha_bar, clip_x0)
        if i + 1 == K:
            return x0
        if i > 0:  # UniC: correct x_t with the output at the predicted x_t (reused by the next predictor)
            x = _step(x_prev, ms[:order_prev], lams[:order_prev], sigma_prev, alpha_t, sigma_t, lambda_t, m_t=x0)
        ms, lams = [x0, *ms][:order], [lambda_t, *lams][:order]
        order_prev = min(order, i + 1, K - i)
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(float(alphas_cumprod[steps[i + 1]]))
        x_prev, sigma_prev = x, sigma_t
        x = _step(x, ms[:order_prev], lams[:order_prev], sigma_t, alpha_s, sigma_s, lambda_s)
    return x
