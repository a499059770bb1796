"""Samplers that take any strictly descending list of integer time steps in [0, T-1].

The solvers are listed once, as ``SolverSpec`` records in ``autodiff_opt.specs.solvers`` (torch-free,
so preflight reads them too). Every solver is ``fn(eps_fn, x_T, timesteps, alphas_cumprod, clip_x0=...) -> x0``; the model's prediction
type is already converted to eps by ``DiffusionModel.eps_fn``. ``nfe(solver, K)`` is what K steps cost.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from autodiff_opt.models.base import EpsFn
from autodiff_opt.solvers.ddim import ddim_sample
from autodiff_opt.solvers.dpm_solver import dpmpp_2m_sample, dpmpp_3m_sample
from autodiff_opt.solvers.edm import euler_sample, heun_sample
from autodiff_opt.solvers.ipndm import ipndm_sample
from autodiff_opt.solvers.flow import FLOW_HEURISTICS, flow_heuristic_schedule
from autodiff_opt.solvers.schedules import HEURISTICS, heuristic_schedule
from autodiff_opt.solvers.unipc import unipc_sample
from autodiff_opt.specs.solvers import FLOW_SOLVER_NAMES, SOLVER_SPECS

SolverFn = Callable[..., torch.Tensor]


def _load(path: str) -> SolverFn:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


SOLVERS: dict[str, SolverFn] = {name: _load(spec.function) for name, spec in SOLVER_SPECS.items()}  # specs/solvers.py
FLOW_SOLVERS: dict[str, SolverFn] = {name: SOLVERS[name] for name in FLOW_SOLVER_NAMES}  # velocity models: flow.py


def get_solver(name: str) -> SolverFn:
    if name not in SOLVERS:
        raise ValueError(f"solver.name={name!r} is unknown: use one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def nfe(solver: str, num_steps: int) -> int:
    """Network evaluations of K = num_steps time steps: K, or 2K - 1 for Heun (its last step is Euler; flow_heun too)."""
    get_solver(solver)
    return SOLVER_SPECS[solver].nfe(num_steps)


def steps_for_nfe(solver: str, budget: int) -> int:
    """The most time steps K whose nfe(solver, K) fits the budget (at least 1): K = (NFE + 1) // 2 for Heun."""
    get_solver(solver)
    return SOLVER_SPECS[solver].steps_for_nfe(budget)


__all__ = ["EpsFn", "FLOW_HEURISTICS", "FLOW_SOLVERS", "HEURISTICS", "SOLVERS", "ddim_sample", "dpmpp_2m_sample",
           "dpmpp_3m_sample", "euler_sample", "flow_heuristic_schedule", "get_solver", "heun_sample", "heuristic_schedule",
           "ipndm_sample", "nfe", "steps_for_nfe", "unipc_sample"]
