"""Samplers that take any strictly descending list of integer time steps in [0, T-1]."""

from __future__ import annotations

from typing import Callable

import torch

from autodiff_opt.models.base import EpsFn
from autodiff_opt.solvers.ddim import ddim_sample
from autodiff_opt.solvers.dpm_solver import dpmpp_2m_sample
from autodiff_opt.solvers.schedules import HEURISTICS, heuristic_schedule

SolverFn = Callable[..., torch.Tensor]

SOLVERS: dict[str, SolverFn] = {"ddim": ddim_sample, "dpmpp_2m": dpmpp_2m_sample}


def get_solver(name: str) -> SolverFn:
    if name not in SOLVERS:
        raise ValueError(f"solver.name={name!r} is unknown: use one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def nfe(solver: str, num_steps: int) -> int:
    """Network evaluations of a schedule of num_steps time steps (one per step for these solvers)."""
    get_solver(solver)
    return num_steps


__all__ = ["EpsFn", "HEURISTICS", "SOLVERS", "ddim_sample", "dpmpp_2m_sample", "get_solver", "heuristic_schedule", "nfe"]
