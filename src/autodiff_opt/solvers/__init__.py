"""Samplers that take any strictly descending list of integer time steps in [0, T-1]."""

from __future__ import annotations

from typing import Callable

import torch

from autodiff_opt.models.base import EpsFn
from autodiff_opt.solvers.ddim import ddim_sample
from autodiff_opt.solvers.dpm_solver import dpmpp_2m_sample
from autodiff_opt.solvers.flow import FLOW_HEURISTICS, FLOW_SOLVERS, flow_heuristic_schedule, flow_nfe
from autodiff_opt.solvers.schedules import HEURISTICS, heuristic_schedule

SolverFn = Callable[..., torch.Tensor]

SOLVERS: dict[str, SolverFn] = {"ddim": ddim_sample, "dpmpp_2m": dpmpp_2m_sample}
SOLVERS.update(FLOW_SOLVERS)  # rectified-flow solvers (velocity models): solvers/flow.py


def get_solver(name: str) -> SolverFn:
    if name not in SOLVERS:
        raise ValueError(f"solver.name={name!r} is unknown: use one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def nfe(solver: str, num_steps: int) -> int:
    """Network evaluations of a schedule of num_steps time steps (one per step, but 2K - 1 for flow_heun)."""
    get_solver(solver)
    if solver in FLOW_SOLVERS:
        return flow_nfe(solver, num_steps)
    return num_steps


__all__ = ["EpsFn", "FLOW_HEURISTICS", "FLOW_SOLVERS", "HEURISTICS", "SOLVERS", "ddim_sample", "dpmpp_2m_sample", "flow_heuristic_schedule", "get_solver",
           "heuristic_schedule", "nfe"]
