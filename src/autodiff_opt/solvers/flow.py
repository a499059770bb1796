"""Rectified-flow solvers and schedules on a fine grid of times (velocity-predicting models).

A flow model interpolates x_t = (1 - t) x0 + t noise and predicts the velocity v = noise - x0;
sampling integrates dx/dt = v from t = 1 (pure noise) down to t = 0.

The genome stays a tuple of distinct integers: index i of a grid of N points (N = 1000, the
length of the model's ``alphas_cumprod``) means the time

    t_i = (i + 1) / N,    i = 0 .. N - 1,   so t in {0.001, 0.002, ..., 1.0}

and steps in sampling order are descending indices. After the last listed time every solver
integrates to t = 0 (as the VP solvers go to alpha_bar = 1). A flow model's ``alphas_cumprod`` is
the VP-equivalent alpha_bar(t) = (1 - t)^2 / ((1 - t)^2 + t^2) at the grid times (x_t / sqrt((1-t)^2
+ t^2) is a VP state with that alpha_bar); the flow solvers only use its length.

Solvers (``solver.name``), each ``(velocity_fn, x_T, timesteps, alphas_cumprod, clip_x0)``:

- ``flow_euler``: x_s = x_t + (s - t) v(x_t, t). 1 network evaluation a step. It is DDIM (eta = 0)
  in the flow's parametrisation.
- ``flow_heun``: Heun's second-order method (EDM's deterministic sampler): an Euler predictor to
  s, then x_s = x_t + (s - t) (v(x_t, t) + v(x_pred, s)) / 2; the last step, to t = 0, is Euler.
  2K - 1 network evaluations for K times.
- ``flow_ab2``: two-step Adams-Bashforth on the variable grid (second order, 1 evaluation a step):
  x_s = x_t + h ((1 + r/2) v_t - (r/2) v_prev), h = s - t, r = h / h_prev; the first step is Euler.

``clip_x0`` replaces the velocity by the one of the clipped data estimate,
v_c = (x_t - clamp(x_t - t v, -1, 1)) / t, before each update (pixel models; never for latents).

Heuristic schedules (``search.baselines``), K times descending from 1, mapped to distinct grid
indices (nearest grid point, collisions pushed apart):

- ``flow_uniform``: equal steps in t, t_i = 1 - i / K (the last step, to 0, the same size).
- ``flow_default``: what diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(K) runs for the
  model, with its shift s: t = shift(linspace(1, t_min, K)) with shift(t) = s t / (1 + (s - 1) t) and
  t_min = shift(1 / N) for a static shift (1 / N with dynamic shifting). This is SD3's schedule
  (s = 3) and Flux's (s = e^mu of the image size).
- ``flow_shifted``: equal steps in t shifted once: shift(1 - i / K) (SD3 paper, eq. 23).
- ``flow_karras``: Karras et al.'s rho = 7 spacing between flow_default's ends (diffusers'
  use_karras_sigmas for flows).
- ``flow_beta``: Beta(0.6, 0.6) quantiles between flow_default's ends (Lee et al. 2024, "Beta
  sampling is all you need"; diffusers' use_beta_sigmas).
- ``flow_lq``: Movie Gen's linear-quadratic schedule: the first K // 2 steps at the 1 / N spacing of a
  fine schedule, the rest quadratic in the step index to t = 0 with a continuous slope.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from autodiff_opt.models.base import DiffusionModel, ModelLoadError
from autodiff_opt.models.flow import (FLOW_PREDICTION, GRID_SIZE, grid_index, grid_time,  # noqa: F401 (the grid,
                                      vp_alphas_cumprod)  # defined with the flow model, re-exported for solver users)
from autodiff_opt.solvers.schedules import make_distinct
from autodiff_opt.specs.solvers import solver_mismatch

VelocityFn = Callable[[torch.Tensor, int, int], torch.Tensor]
def _times(timesteps: Sequence[int], alphas_cumprod: torch.Tensor) -> list[float]:
    n = int(alphas_cumprod.shape[0])
    return [grid_time(i, n) for i in timesteps] + [0.0]


def clipped_velocity(x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """The velocity whose data estimate x - t v is clamped to [-1, 1]."""
    return (x - (x - t * v).clamp(-1.0, 1.0)) / t


def _velocity(fn: VelocityFn, x: torch.Tensor, index: int, t: float, step: int, clip_x0: bool) -> torch.Tensor:
    v = fn(x, index, step).float()
    return clipped_velocity(x, v, t) if clip_x0 else v


def flow_step(x: torch.Tensor, v: torch.Tensor, t: float, s: float, clip_x0: bool = False) -> torch.Tensor:
    """One Euler step of the flow from time t to time s (the clipped velocity when clip_x0)."""
    return x + (s - t) * (clipped_velocity(x, v, t) if clip_x0 else v)


def flow_euler_sample(velocity_fn: VelocityFn, x_T: torch.Tensor, timesteps: Sequence[int],
                      alphas_cumprod: torch.Tensor, clip_x0: bool = False) -> torch.Tensor:
    """Euler from x_T through the descending grid indices to t = 0; returns x0 (float32)."""
    x, steps = x_T.float(), [int(i) for i in timesteps]
    times = _times(steps, alphas_cumprod)
    for k, index in enumerate(steps):
        v = _velocity(velocity_fn, x, index, times[k], k, clip_x0)
        x = x + (times[k + 1] - times[k]) * v
    return x


def flow_heun_sample(velocity_fn: VelocityFn, x_T: torch.Tensor, timesteps: Sequence[int],
                     alphas_cumprod: torch.Tensor, clip_x0: bool = False) -> torch.Tensor:
    """Heun (2nd order) on the descending grid indices, Euler on the last step to t = 0; 2K - 1 evaluations."""
    x, steps = x_T.float(), [int(i) for i in timesteps]
    times = _times(steps, alphas_cumprod)
    for k, index in enumerate(steps):
        h = times[k + 1] - times[k]
        v = _velocity(velocity_fn, x, index, times[k], k, clip_x0)
        x_pred = x + h * v
        if k + 1 == len(steps):
            return x_pred
        v_pred = _velocity(velocity_fn, x_pred, steps[k + 1], times[k + 1], k + 1, clip_x0)
        x = x + h * 0.5 * (v + v_pred)
    return x


def flow_ab2_sample(velocity_fn: VelocityFn, x_T: torch.Tensor, timesteps: Sequence[int],
                    alphas_cumprod: torch.Tensor, clip_x0: bool = False) -> torch.Tensor:
    """Two-step Adams-Bashforth with variable steps (Euler first); one evaluation a step."""
    x, steps = x_T.float(), [int(i) for i in timesteps]
    times = _times(steps, alphas_cumprod)
    v_prev: torch.Tensor | None = None
    h_prev = 0.0
    for k, index in enumerate(steps):
        h = times[k + 1] - times[k]
        v = _velocity(velocity_fn, x, index, times[k], k, clip_x0)
        if v_prev is None:
            x = x + h * v
        else:
            r = h / h_prev
            x = x + h * ((1.0 + 0.5 * r) * v - 0.5 * r * v_prev)
        v_prev, h_prev = v, h
    return x


# ---- heuristic schedules: K times in (0, 1], descending ----

def shift_time(t: np.ndarray | float, shift: float) -> np.ndarray:
    """SD3's time shift s t / (1 + (s - 1) t) (Flux's exponential shift with s = e^mu is the same map)."""
    t = np.asarray(t, dtype=np.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def _default_ends(n: int, shift: float, dynamic: bool) -> tuple[float, float]:
    t_min = 1.0 / n if dynamic else float(shift_time(1.0 / n, shift))
    return 1.0, float(shift_time(t_min, shift))


def _flow_uniform(k: int, n: int, shift: float, dynamic: bool) -> np.ndarray:
    return 1.0 - np.arange(k) / k


def _flow_default(k: int, n: int, shift: float, dynamic: bool) -> np.ndarray:
    t_min = 1.0 / n if dynamic else float(shift_time(1.0 / n, shift))
    return shift_time(np.linspace(1.0, t_min, k), shift)


def _flow_shifted(k: int, n: int, shift: float, dynamic: bool) -> np.ndarray:
    return shift_time(1.0 - np.arange(k) / k, shift)


def _flow_karras(k: int, n: int, shift: float, dynamic: bool, rho: float = 7.0) -> np.ndarray:
    hi, lo = _default_ends(n, shift, dynamic)
    ramp = np.linspace(0.0, 1.0, k)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _flow_beta(k: int, n: int, shift: float, dynamic: bool, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    from scipy.stats import beta

    hi, lo = _default_ends(n, shift, dynamic)
    return lo + beta.ppf(1.0 - np.linspace(0.0, 1.0, k), a, b) * (hi - lo)


def _flow_lq(k: int, n: int, shift: float, dynamic: bool) -> np.ndarray:
    linear = k // 2
    if linear == 0:
        return np.array([1.0])
    tau = linear / n  # progress 1 - t after the linear part: the fine schedule's first `linear` steps
    i = np.arange(k, dtype=np.float64)
    slope, rest = tau / linear, k - linear
    curve = (1.0 - tau - slope * rest) / rest**2
    progress = np.where(i <= linear, slope * i, tau + slope * (i - linear) + curve * (i - linear) ** 2)
    return 1.0 - progress


FLOW_HEURISTICS: dict[str, Callable[..., np.ndarray]] = {
    "flow_uniform": _flow_uniform, "flow_default": _flow_default, "flow_shifted": _flow_shifted,
    "flow_karras": _flow_karras, "flow_beta": _flow_beta, "flow_lq": _flow_lq,
}


def flow_times(name: str, num_steps: int, num_grid: int = GRID_SIZE, shift: float = 1.0,
               dynamic_shift: bool = False) -> list[float]:
    """The named flow heuristic's K times (descending, before rounding to the grid)."""
    if name not in FLOW_HEURISTICS:
        raise ValueError(f"unknown flow schedule {name!r}: use one of {sorted(FLOW_HEURISTICS)}")
    if not 1 <= num_steps <= num_grid:
        raise ValueError(f"num_steps={num_steps} must be in [1, {num_grid}]")
    return [float(t) for t in FLOW_HEURISTICS[name](num_steps, num_grid, float(shift), dynamic_shift)]


def flow_heuristic_schedule(name: str, num_steps: int, num_grid: int = GRID_SIZE, shift: float = 1.0,
                            dynamic_shift: bool = False) -> list[int]:
    """The named flow heuristic as K distinct grid indices, descending (sampling order)."""
    times = flow_times(name, num_steps, num_grid, shift, dynamic_shift)
    return make_distinct([grid_index(t, num_grid) for t in times if math.isfinite(t)], num_grid)


def check_solver(solver: str, model: DiffusionModel) -> None:
    """Raise ModelLoadError when the solver does not fit the model's kind (flow vs. noise prediction)."""
    problem = solver_mismatch(solver, model.prediction_type == FLOW_PREDICTION)
    if problem:
        raise ModelLoadError(problem)
