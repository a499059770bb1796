"""The exported snippet runs as written and gives our solver's samples: with the diffusers scheduler that runs
the same update where one exists, otherwise through autodiff_opt.apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autodiff_opt.models import load_model
from autodiff_opt.generate import SampleSet
from autodiff_opt.report.export import diffusers_scheduler, diffusers_snippet, sd_snippet
from autodiff_opt.core.genome import Genome
from autodiff_opt.solvers import SOLVERS, ddim_sample
from autodiff_opt.utils import to_uint8


def test_snippet_runs_and_matches_our_unclipped_ddim(tiny_model_dir: Path) -> None:
    genome = Genome((901, 540, 222, 17))
    code = diffusers_snippet(genome, str(tiny_model_dir), "ddim", (1, 8, 8), None)
    scope: dict[str, object] = {}
    exec(compile(code, "snippet", "exec"), scope)  # noqa: S102 - our own generated code
    images, x = scope["images"], scope["x"]
    assert isinstance(images, torch.Tensor) and images.shape == (16, 1, 8, 8) and images.dtype == torch.uint8
    model = load_model(str(tiny_model_dir))
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ddim_sample(model.eps_fn(), x_T, genome.timesteps, model.alphas_cumprod, clip_x0=False)
    torch.testing.assert_close(ours, x.float(), atol=1e-4, rtol=1e-3)


def test_sd_snippet_names_the_steps() -> None:
    code = sd_snippet(Genome((999, 600, 300, 10)), "CompVis/stable-diffusion-v1-4", "dpmpp_2m", 7.5)
    assert "timesteps=[999, 600, 300, 10]" in code and "solver_order=2" in code
    compile(code, "sd_snippet", "exec")


@pytest.mark.parametrize("solver,scheduler,clip_x0", [("dpmpp_3m", "DPMSolverMultistepScheduler", False),
                                                      ("euler", "EulerDiscreteScheduler", False),
                                                      ("heun", "HeunDiscreteScheduler", False),
                                                      ("ddim", "DPMSolverMultistepScheduler", True),
                                                      ("dpmpp_2m", "DPMSolverMultistepScheduler", True)])
def test_snippet_names_the_scheduler_and_reproduces_our_solver(tiny_model_dir: Path, solver: str, scheduler: str,
                                                               clip_x0: bool) -> None:
    genome = Genome((901, 540, 222, 17))
    code = diffusers_snippet(genome, str(tiny_model_dir), solver, (1, 8, 8), None, clip_x0=clip_x0)
    assert code.splitlines()[0].endswith(f"{scheduler} runs the same update.") and diffusers_scheduler(solver, clip_x0) == scheduler
    scope: dict[str, object] = {}
    exec(compile(code, "snippet", "exec"), scope)  # noqa: S102 - our own generated code
    model = load_model(str(tiny_model_dir))
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = SOLVERS[solver](model.eps_fn(), x_T, genome.timesteps, model.alphas_cumprod, clip_x0=clip_x0)
    torch.testing.assert_close(ours, scope["x"].float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("solver,clip_x0", [("ipndm", False), ("unipc", False), ("euler", True)])
def test_snippet_without_a_diffusers_scheduler_runs_apply_and_reproduces_our_solver(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, solver: str, clip_x0: bool) -> None:
    genome = Genome((901, 540, 222, 17))
    code = diffusers_snippet(genome, str(tiny_model_dir), solver, (1, 8, 8), None, clip_x0=clip_x0)
    assert diffusers_scheduler(solver, clip_x0) is None and "autodiff_opt.apply" in code.splitlines()[0]
    doc = {"model": str(tiny_model_dir), "solver": solver, "clip_x0": clip_x0, "timesteps": list(genome.timesteps),
           "skipped_layers": [[] for _ in genome.timesteps]}
    (tmp_path / "best_schedule.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(code, "snippet", "exec"), scope)  # noqa: S102 - our own generated code
    model = load_model(str(tiny_model_dir))
    x_T = SampleSet.draw(16, (1, 8, 8), None, 0).noise
    with torch.no_grad():
        ours = SOLVERS[solver](model.eps_fn(), x_T, genome.timesteps, model.alphas_cumprod, clip_x0=clip_x0)
    assert torch.equal(scope["images"], to_uint8(ours)) and (tmp_path / "samples.png").exists()
