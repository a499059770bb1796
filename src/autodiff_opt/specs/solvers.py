"""``SolverSpec``: one record per solver, read by preflight, ``solvers/`` (the functions), the NFE
arithmetic and the export (docs/architecture.md, "Adding a solver").

The function itself is named by its import path, so this module imports no torch: a solver is one
module under ``solvers/`` (``fn(eps_fn, x_T, timesteps, alphas_cumprod, clip_x0=...) -> x0``; a flow
solver gets the velocity instead) plus one line in ``SOLVER_SPECS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from autodiff_opt.core.errors import ConfigError

DPM_SOLVER = "DPMSolverMultistepScheduler"


@dataclass(frozen=True)
class SolverSpec:
    """A solver: what it costs, what models it integrates, and how diffusers runs it (if it does)."""

    name: str
    function: str  # "module:attribute" of the sampling function
    order: int  # order of accuracy (documentation and the report)
    evals_per_step: int = 1  # network evaluations a step; with 2, the last step is Euler (2K - 1 in all)
    flow: bool = False  # integrates a rectified flow (velocity prediction), not a VP noise prediction
    scheduler: str | None = None  # the diffusers scheduler that runs the same update on custom steps
    dpm_order: int | None = None  # DPM-Solver++ solver_order when ``scheduler`` is DPMSolverMultistepScheduler

    def nfe(self, num_steps: int) -> int:
        """Network evaluations of K = num_steps steps: K, or 2K - 1 with two evaluations a step."""
        per_step = self.evals_per_step
        return per_step * num_steps - (per_step - 1) if num_steps > 0 else 0

    def steps_for_nfe(self, budget: int) -> int:
        """The most steps K whose nfe(K) fits the budget (at least 1): (NFE + 1) // 2 for Heun."""
        per_step = self.evals_per_step
        return max(1, (budget + per_step - 1) // per_step)

    @property
    def clips_exactly(self) -> bool:
        """diffusers' thresholding with sample_max_value=1 is clamp(x0, -1, 1) exactly (DPM-Solver++ only)."""
        return self.scheduler == DPM_SOLVER


SOLVER_SPECS: dict[str, SolverSpec] = {s.name: s for s in (
    SolverSpec("ddim", "autodiff_opt.solvers.ddim:ddim_sample", 1, scheduler=DPM_SOLVER, dpm_order=1),
    SolverSpec("dpmpp_2m", "autodiff_opt.solvers.dpm_solver:dpmpp_2m_sample", 2, scheduler=DPM_SOLVER, dpm_order=2),
    SolverSpec("dpmpp_3m", "autodiff_opt.solvers.dpm_solver:dpmpp_3m_sample", 3, scheduler=DPM_SOLVER, dpm_order=3),
    SolverSpec("ipndm", "autodiff_opt.solvers.ipndm:ipndm_sample", 4),
    SolverSpec("unipc", "autodiff_opt.solvers.unipc:unipc_sample", 3),
    SolverSpec("euler", "autodiff_opt.solvers.edm:euler_sample", 1, scheduler="EulerDiscreteScheduler"),
    SolverSpec("heun", "autodiff_opt.solvers.edm:heun_sample", 2, evals_per_step=2, scheduler="HeunDiscreteScheduler"),
    SolverSpec("flow_euler", "autodiff_opt.solvers.flow:flow_euler_sample", 1, flow=True,
               scheduler="FlowMatchEulerDiscreteScheduler"),
    SolverSpec("flow_heun", "autodiff_opt.solvers.flow:flow_heun_sample", 2, evals_per_step=2, flow=True),
    SolverSpec("flow_ab2", "autodiff_opt.solvers.flow:flow_ab2_sample", 2, flow=True),
)}
FLOW_SOLVER_NAMES: tuple[str, ...] = tuple(n for n, s in SOLVER_SPECS.items() if s.flow)


class UnknownSolverError(ConfigError):
    """A solver name that no SolverSpec has (a ``ConfigError``: the CLI prints one line and exits 2)."""


def solver_spec(name: str) -> SolverSpec:
    """The record of ``name``; UnknownSolverError naming the known ones."""
    if name not in SOLVER_SPECS:
        raise UnknownSolverError(f"solver.name={name!r} is unknown: use one of {sorted(SOLVER_SPECS)}")
    return SOLVER_SPECS[name]


def solver_mismatch(solver: str, is_flow: bool) -> str | None:
    """Why a solver cannot run on this kind of model (None when it can)."""
    flow = solver_spec(solver).flow if solver in SOLVER_SPECS else False
    if is_flow and not flow:
        return (f"solver.name={solver} integrates noise-prediction (VP) models, and this model is a rectified flow"
                f" (velocity prediction): use solver={' or solver='.join(sorted(FLOW_SOLVER_NAMES))}")
    if not is_flow and flow:
        return (f"solver.name={solver} integrates rectified flows, and this model predicts noise (a VP diffusion"
                " model): use solver=ddim or solver=dpmpp_2m")
    return None
