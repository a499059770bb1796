"""Samplers that take any strictly descending list of integer time steps in [0, T-1].

Every solver is ``fn(eps_fn, x_T, timesteps, alphas_cumprod, clip_x0=...) -> x0``; the model's prediction
type is already converted to eps by ``DiffusionModel.eps_fn``. ``nfe(solver, K)`` is what K steps cost.
"""

from __future__ import annotations

from typing import Callable

import torch

from autodiff_opt.models.base import EpsFn
from autodiff_opt.solvers.ddim import ddim_sample
from autodiff_opt.solvers.dpm_solver import dpmpp_2m_sample, dpmpp_3m_sample
from autodiff_opt.solvers.edm import euler_sample, heun_sample
from autodiff_opt.solvers.ipndm import ipndm_sample
from autodiff_opt.solvers.flow import FLOW_HEURISTICS, FLOW_SOLVERS, flow_heuristic_schedule, flow_nfe
from autodiff_opt.solvers.schedules import HEURISTICS, heuristic_schedule
from autodiff_opt.solvers.unipc import unipc_sample

SolverFn = Callable[..., torch.Tensor]

SOLVERS: dict[str, SolverFn] = {
    "ddim": ddim_sample,
    "dpmpp_2m": dpmpp_2m_sample,
    "dpmpp_3m": dpmpp_3m_sample,
    "ipndm": ipndm_sample,
    "unipc": unipc_sample,
    "euler": euler_sample,
    "heun": heun_sample,
}
EVALS_PER_STEP = {"heun": 2}  # the rest: one network evaluation per step
SOLVERS.update(FLOW_SOLVERS)  # rectified-flow solvers (velocity models): solvers/flow.py


def get_solver(name: str) -> SolverFn:
    if name not in SOLVERS:
        raise ValueError(f"solver.name={name!r} is unknown: use one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def nfe(solver: str, num_steps: int) -> int:
    """Network evaluations of K = num_steps time steps: K, or 2K - 1 for Heun (its last step is Euler; flow_heun too)."""
    get_solver(solver)
    if solver in FLOW_SOLVERS:
        return flow_nfe(solver, num_steps)
    per_step = EVALS_PER_STEP.get(solver, 1)
    return per_step * num_steps - (per_step - 1) if num_steps > 0 else 0


def steps_for_nfe(solver: str, budget: int) -> int:
    """The most time steps K whose nfe(solver, K) fits the budget (at least 1): K = (NFE + 1) // 2 for Heun."""
    get_solver(solver)
    per_step = 2 if solver == "flow_heun" else EVALS_PER_STEP.get(solver, 1)
    return max(1, (budget + per_step - 1) // per_step)


__all__ = ["EpsFn", "FLOW_HEURISTICS", "FLOW_SOLVERS", "HEURISTICS", "SOLVERS", "ddim_sample", "dpmpp_2m_sample",
           "dpmpp_3m_sample", "euler_sample", "flow_heuristic_schedule", "get_solver", "heun_sample", "heuristic_schedule",
           "ipndm_sample", "nfe", "steps_for_nfe", "unipc_sample"]
