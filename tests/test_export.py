"""The exported diffusers snippet runs as written and gives our DDIM's samples (without x0 clipping)."""

from __future__ import annotations

from pathlib import Path

import torch

from autodiff_opt.models import load_model
from autodiff_opt.report.export import diffusers_snippet, sd_snippet
from autodiff_opt.core.genome import Genome
from autodiff_opt.solvers import ddim_sample


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
