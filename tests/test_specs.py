"""The torch-free records (autodiff_opt.specs): preflight reads them before torch is imported, and every
record names code that exists and agrees with it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from autodiff_opt.specs.samplers import SAMPLER_SPECS
from autodiff_opt.specs.solvers import SOLVER_SPECS, UnknownSolverError, solver_spec


def _resolve(path: str) -> object:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_the_specs_and_preflight_import_no_torch_optuna_or_diffusers() -> None:
    code = ("import sys, autodiff_opt.specs.solvers, autodiff_opt.specs.samplers, autodiff_opt.specs.options,"
            " autodiff_opt.preflight; print(sorted(m for m in ('torch', 'optuna', 'diffusers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_every_solver_spec_names_its_function_and_the_registry_is_built_from_them() -> None:
    from autodiff_opt.solvers import FLOW_SOLVERS, SOLVERS, nfe, steps_for_nfe

    assert set(SOLVERS) == set(SOLVER_SPECS)
    assert set(FLOW_SOLVERS) == {n for n, s in SOLVER_SPECS.items() if s.flow}
    for name, spec in SOLVER_SPECS.items():
        assert SOLVERS[name] is _resolve(spec.function)
        for k in (1, 2, 5):
            assert nfe(name, k) == (2 * k - 1 if spec.evals_per_step == 2 else k)
            assert nfe(name, steps_for_nfe(name, nfe(name, k))) == nfe(name, k)  # K for its own NFE is K
    with pytest.raises(UnknownSolverError, match="unknown: use one of"):
        solver_spec("rk45")


def test_every_sampler_spec_names_its_factory() -> None:
    for spec in SAMPLER_SPECS.values():
        assert callable(_resolve(spec.factory)), spec.name
    assert [n for n, s in SAMPLER_SPECS.items() if s.genome] == ["autodiffusion", "autodiffusion_paper"]
