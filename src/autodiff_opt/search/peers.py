"""Peer schedules from other methods, scored next to the heuristics: a trajectory dynamic program and AYS.

``trajectory_dp`` (GITS-style): run a fine teacher (DDIM on ``grid`` steps, ``num_samples`` samples)
once, keep the state x_g and the network output eps_g at every grid point, and score every possible
jump g -> h by the L2 distance of one first-order (DDIM) step from the teacher's x_g to the teacher's
x_h; starting at grid point g costs the distance of the initial noise to x_g (so, unlike GITS, the
path need not start at T - 1: on the embedded model a start fixed there scores FID 3.1 against 1.6). A dynamic program
then finds the K-step path of least total error. The jumps reuse the teacher's eps, so the whole peer
costs ``grid x num_samples`` image-steps. On a rectified flow the first-order step is flow Euler on the
velocity (DDIM in the flow's parametrisation). For multistep solvers the first-order error is the proxy
(their first step is DDIM); the found steps are then run with the configured solver.

``ays``: the published Align-Your-Steps schedule for Stable Diffusion (diffusers' ``AysSchedules``), at
K = 10 as published and log-linearly interpolated in sigma for other K, as its authors suggest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.core.genome import Genome
from autodiff_opt.models.base import DiffusionModel
from autodiff_opt.solvers.ddim import ddim_step
from autodiff_opt.solvers.flow import flow_step, grid_time
from autodiff_opt.solvers.schedules import make_distinct

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerSchedule:
    name: str
    genome: Genome
    image_steps: int  # what computing it cost, in network evaluations x samples
    seconds: float = 0.0


def first_order_step(model: DiffusionModel) -> Callable[[torch.Tensor, torch.Tensor, int, int | None, bool], torch.Tensor]:
    """The model's first-order jump from grid step t to step s (None: the end): DDIM on eps, or flow Euler on
    the velocity of a rectified flow (the same update in the flow's parametrisation)."""
    ab = model.alphas_cumprod
    n = int(ab.shape[0])
    if model.prediction_type == "flow":
        return lambda x, out, t, s, clip: flow_step(x, out, grid_time(t, n), grid_time(s, n) if s is not None else 0.0, clip)
    return lambda x, out, t, s, clip: ddim_step(x, out, float(ab[t]), float(ab[s]) if s is not None else 1.0, clip)


def _teacher(generator: ImageGenerator, samples: SampleSet, grid: list[int],
             clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """States (G+1, N, ...) at each grid point and at the end, and eps (G, N, ...) at each grid point."""
    step = first_order_step(generator.model)
    genome = Genome(tuple(grid))
    states, epss = [], []
    for start in range(0, len(samples), generator.batch_size):
        part = samples.slice(start, min(start + generator.batch_size, len(samples)))
        noise, labels = generator.padded(part.noise, part.class_labels)  # a compiled model keeps one shape
        eps_fn = generator.eps_for(genome, labels)
        x = noise.to(generator.device).float()
        xs, es = [], []
        with torch.no_grad():
            for i, t in enumerate(grid):
                eps = eps_fn(x, t, i).float()
                xs.append(x[:len(part)].cpu())
                es.append(eps[:len(part)].cpu())
                x = step(x, eps, t, grid[i + 1] if i + 1 < len(grid) else None, clip_x0)
        xs.append(x[:len(part)].cpu())
        states.append(torch.stack(xs))
        epss.append(torch.stack(es))
    return torch.cat(states, 1), torch.cat(epss, 1), samples.noise.float()


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the per-sample L2 distance (per element, so it does not grow with resolution)."""
    return float((a - b).flatten(1).pow(2).mean(1).sqrt().mean())


def jump_errors(states: torch.Tensor, epss: torch.Tensor, grid: list[int], alphas_cumprod: torch.Tensor,
                clip_x0: bool, step: Callable[..., torch.Tensor] | None = None) -> np.ndarray:
    """err[g, h] = distance of one first-order step (DDIM by default) from the teacher's x_g to its x_h (h = G: the end)."""
    if step is None:
        step = lambda x, out, t, s, clip: ddim_step(x, out, float(alphas_cumprod[t]),  # noqa: E731
                                                    float(alphas_cumprod[s]) if s is not None else 1.0, clip)
    G = len(grid)
    err = np.full((G, G + 1), np.inf)
    for g in range(G):
        for h in range(g + 1, G + 1):
            x = step(states[g], epss[g], grid[g], grid[h] if h < G else None, clip_x0)
            err[g, h] = distance(x, states[h])
    return np.where(np.isfinite(err), err, np.inf)  # an overflowing jump (x0 / sqrt(alpha_bar) at t ~ T) is never taken


def best_path(start_cost: np.ndarray, err: np.ndarray, num_steps: int) -> list[int]:
    """Grid indices g_1 < ... < g_K minimising start_cost[g_1] + sum err[g_i, g_{i+1}] + err[g_K, end]."""
    G = err.shape[0]
    if num_steps > G:
        raise ValueError(f"the teacher grid has {G} points, fewer than K={num_steps}: raise search.peer_grid")
    cost = np.full((num_steps, G), np.inf)
    back = np.zeros((num_steps, G), dtype=int)
    cost[0] = start_cost
    for k in range(1, num_steps):
        for h in range(k, G):
            total = cost[k - 1, :h] + err[:h, h]
            back[k, h] = int(np.argmin(total))
            cost[k, h] = total[back[k, h]]
    last = int(np.argmin(cost[-1] + err[:, G]))
    path = [last]
    for k in range(num_steps - 1, 0, -1):
        path.append(int(back[k, path[-1]]))
    return path[::-1]


def trajectory_dp(generator: ImageGenerator, num_steps: int, num_samples: int = 256, grid_size: int = 100,
                  seed: int = 0, clip_x0: bool = True) -> PeerSchedule:
    """The GITS-style schedule of K steps for this model, on its own seed (never the search's samples)."""
    import time

    t0 = time.perf_counter()
    model = generator.model
    T = model.num_train_timesteps
    grid = sorted({int(round(v)) for v in np.linspace(T - 1, 0, min(grid_size, T))}, reverse=True)
    samples = SampleSet.draw(num_samples, model.sample_shape, model.num_classes, seed)
    states, epss, noise = _teacher(generator, samples, grid, clip_x0)
    err = jump_errors(states, epss, grid, model.alphas_cumprod, clip_x0, first_order_step(model))
    start = np.array([distance(noise, states[g]) for g in range(len(grid))])
    start = np.where(np.isfinite(start), start, np.inf)
    path = best_path(start, err, num_steps)
    genome = Genome(tuple(grid[g] for g in path))
    seconds = time.perf_counter() - t0
    log.info("trajectory-DP peer: %s from a %d-point teacher on %d samples (%.1fs)", list(genome.timesteps),
             len(grid), num_samples, seconds)
    return PeerSchedule("gits_dp", genome, len(grid) * num_samples, seconds)


def ays_schedule(num_steps: int, alphas_cumprod: torch.Tensor, key: str = "StableDiffusionTimesteps") -> Genome:
    """The published AYS time steps (K = 10), log-linearly interpolated in sigma to K steps."""
    from diffusers.schedulers import AysSchedules

    published = [int(t) for t in AysSchedules[key]]
    T = int(alphas_cumprod.shape[0])
    if num_steps == len(published):
        return Genome(tuple(make_distinct(published, T)))
    ab = alphas_cumprod.double().numpy()
    log_sigma = 0.5 * (np.log1p(-ab) - np.log(ab))
    pub = log_sigma[published]
    xs = np.linspace(0.0, 1.0, len(pub))
    target = np.interp(np.linspace(0.0, 1.0, num_steps), xs, pub)
    steps = [int(np.argmin(np.abs(log_sigma - v))) for v in target]
    return Genome(tuple(make_distinct(steps, T)))
