"""The best schedule as JSON, with a snippet that applies it with plain diffusers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autodiff_opt.core.genome import Genome

_SNIPPET = '''# Apply the searched schedule with plain diffusers ({solver}).
import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{model}"{subfolder}).eval()
scheduler = DPMSolverMultistepScheduler.from_pretrained("{model}"{sched_subfolder},
    algorithm_type="dpmsolver++", solver_order={order}, final_sigmas_type="zero", lower_order_final=True)
scheduler.set_timesteps(timesteps={timesteps})
x = torch.randn(16, *{shape}, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in scheduler.timesteps:
        eps = unet(x, t{labels}).sample[:, :{channels}]
        x = scheduler.step(eps, t, x).prev_sample
images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
'''


_SD_SNIPPET = '''# Apply the searched schedule to a Stable Diffusion pipeline ({solver}, CFG {guidance}).
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{model}")
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
    algorithm_type="dpmsolver++", solver_order={order}, final_sigmas_type="zero", lower_order_final=True)
image = pipe("a photo of a cat", timesteps={timesteps}, guidance_scale={guidance}).images[0]
'''


def sd_snippet(genome: Genome, model: str, solver: str, guidance: float) -> str:
    return _SD_SNIPPET.format(solver=solver, model=model, timesteps=list(genome.timesteps), guidance=guidance,
                              order=1 if solver == "ddim" else 2)


def diffusers_snippet(genome: Genome, model: str, solver: str, shape: tuple[int, ...], num_classes: int | None,
                      subfolder: str | None = None) -> str:
    """DPM-Solver++ with order 1 is DDIM (eta=0); order 2 is DPM-Solver++(2M) (without x0 clipping)."""
    return _SNIPPET.format(
        solver=solver, model=model, timesteps=list(genome.timesteps), shape=tuple(shape), channels=shape[0],
        order=1 if solver == "ddim" else 2,
        subfolder=f', subfolder="{subfolder}"' if subfolder else "",
        sched_subfolder=', subfolder="scheduler"' if subfolder == "unet" else "",
        labels=", class_labels=torch.randint(0, %d, (16,))" % num_classes if num_classes else "",
    )


_FLOW_SNIPPET = '''# Apply the searched times with plain diffusers (flow Euler; {note}).
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{model}"{subfolder}).eval()
# shift=1 and no dynamic shifting: the searched times are run as given, not shifted again
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("{model}"{sched_subfolder}, shift=1.0,
    use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False)
scheduler.set_timesteps(sigmas={times})
x = torch.randn(16, *{shape}, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in scheduler.timesteps:
        v = unet(x, t.expand(len(x)){labels}).sample
        x = scheduler.step(v, t, x).prev_sample
images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
'''


def flow_snippet(genome: Genome, model: str, solver: str, shape: tuple[int, ...], num_classes: int | None,
                 clip_x0: bool, subfolder: str | None = None) -> str:
    """FlowMatchEulerDiscreteScheduler on the searched times (the grid index i is t = (i + 1) / 1000)."""
    from autodiff_opt.solvers.flow import GRID_SIZE, grid_time

    exact = solver == "flow_euler" and not clip_x0
    note = ("the same samples as the search's solver" if exact else
            f"the search ran {solver}{' with x0 clipping' if clip_x0 else ''}, which this loop approximates")
    return _FLOW_SNIPPET.format(
        note=note, model=model, times=[grid_time(i, GRID_SIZE) for i in genome.timesteps], shape=tuple(shape),
        subfolder=f', subfolder="{subfolder}"' if subfolder else "",
        sched_subfolder=', subfolder="scheduler"' if subfolder == "unet" else "",
        labels=", class_labels=torch.randint(0, %d, (16,))" % num_classes if num_classes else "",
    )


def export_schedule(path: str | Path, genome: Genome, info: dict[str, Any], layer_names: list[str] | None = None) -> dict[str, Any]:
    """Write the schedule JSON: steps, per-step skipped layers (ids and names), and how it was found."""
    doc: dict[str, Any] = {
        "timesteps": list(genome.timesteps),
        "skipped_layers": [sorted(s) for s in genome.skips],
        **info,
    }
    if layer_names is not None:
        doc["skipped_layer_names"] = [[layer_names[i] for i in sorted(s)] for s in genome.skips]
    Path(path).write_text(json.dumps(doc, indent=2))
    return doc
