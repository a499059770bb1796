"""The best schedule as JSON, with a snippet that applies it: plain diffusers where a scheduler runs the same
update on custom steps, otherwise ``autodiff_opt.apply``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autodiff_opt.core.genome import Genome
from autodiff_opt.models.families import family_named
from autodiff_opt.solvers import nfe
from autodiff_opt.specs.solvers import DPM_SOLVER, SOLVER_SPECS

_FLOW_EULER = "FlowMatchEulerDiscreteScheduler"

_HEADER = '''# Apply the searched schedule ({solver}, {nfe} NFE) with plain diffusers: {scheduler} runs the same update.
import torch
from diffusers import {scheduler}, UNet2DModel

unet = UNet2DModel.from_pretrained("{model}"{subfolder}).eval()
'''
_LOOP = '''with torch.no_grad():
    for t in scheduler.timesteps:
        eps = unet({model_input}, t{labels}).sample[:, :{channels}]
        x = scheduler.step(eps, t, x).prev_sample
images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
'''
_SETUPS = {  # diffusers scheduler (SolverSpec.scheduler) -> how it is set up on our steps, model input
    DPM_SOLVER: ('''scheduler = DPMSolverMultistepScheduler.from_pretrained("{model}"{sched_subfolder},
    algorithm_type="dpmsolver++", solver_order={order}, final_sigmas_type="zero", lower_order_final=False{clip})
scheduler.set_timesteps(timesteps={timesteps}){ddim_note}
x = torch.randn(16, *{shape}, generator=torch.Generator().manual_seed(0))
''', "x"),
    "EulerDiscreteScheduler": ('''scheduler = EulerDiscreteScheduler.from_pretrained("{model}"{sched_subfolder})
alpha_bar = scheduler.alphas_cumprod.double()
sigmas = [float(((1 - alpha_bar[t]) / alpha_bar[t]) ** 0.5) for t in {timesteps}] + [0.0]
scheduler.set_timesteps(sigmas=sigmas)
x = torch.randn(16, *{shape}, generator=torch.Generator().manual_seed(0)) * (1 + sigmas[0] ** 2) ** 0.5  # x_t / alpha
''', "scheduler.scale_model_input(x, t)"),
    "HeunDiscreteScheduler": ('''scheduler = HeunDiscreteScheduler.from_pretrained("{model}"{sched_subfolder}, clip_sample=False)
scheduler.set_timesteps(timesteps={timesteps})
sigma_max = float(scheduler.sigmas[0])
x = torch.randn(16, *{shape}, generator=torch.Generator().manual_seed(0)) * (1 + sigma_max**2) ** 0.5  # x_t / alpha
''', "scheduler.scale_model_input(x, t)"),
}
_DDIM_NOTE = "  # DPM-Solver++ of order 1 is DDIM (eta=0)"
_APPLY = '''# Apply the searched schedule ({solver}, {nfe} NFE{clip}): {reason}, so it runs with autodiff_opt.apply
# (this file is the schedule: its solver, steps and layer skipping).
from autodiff_opt.apply import generate_from_schedule, save_grid

images = generate_from_schedule("best_schedule.json", num_images=16, seed=0)  # uint8 (16, C, H, W)
save_grid(images, "samples.png")
'''


_CLIP_ARGS = ",\n    thresholding=True, sample_max_value=1.0"  # threshold s = clamp(quantile, 1, 1) = 1: x0 clamped to [-1, 1]


def diffusers_scheduler(solver: str, clip_x0: bool) -> str | None:
    """The diffusers scheduler that runs our solver's exact update on custom steps of a UNet, or None."""
    spec = SOLVER_SPECS.get(solver)
    if spec is None or spec.scheduler not in _SETUPS or (clip_x0 and not spec.clips_exactly):
        return None
    return spec.scheduler


_SD_SNIPPET = '''# Apply the searched schedule to a Stable Diffusion pipeline ({solver}, CFG {guidance}{skips}).
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
{skip_import}
pipe = StableDiffusionPipeline.from_pretrained("{model}")
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
    algorithm_type="dpmsolver++", solver_order={order}, final_sigmas_type="zero", lower_order_final=False)
{skip_line}image = pipe("a photo of a cat", timesteps={timesteps}, guidance_scale={guidance},
             generator=torch.Generator().manual_seed(0)).images[0]
'''
_SKIP_IMPORT = "from autodiff_opt.apply import skip_blocks\n"
_SKIP_LINE = 'skip_blocks({denoiser}, "best_schedule.json")  # the searched {units} off, per step\n'


SD_ORDERS = {n: s.dpm_order for n, s in SOLVER_SPECS.items() if s.dpm_order}  # DPM-Solver++'s solver_order


def sd_snippet(genome: Genome, model: str, solver: str, guidance: float) -> str:
    """StableDiffusionPipeline with DPM-Solver++ on the searched steps; a stage-2 schedule's skipped layers
    through ``autodiff_opt.apply.skip_blocks`` on ``pipe.unet`` (one UNet call a step, the CFG pair batched)."""
    if solver not in SD_ORDERS:
        return _APPLY.format(solver=solver, nfe=nfe(solver, genome.num_steps), clip="",
                             reason=f"no diffusers scheduler runs {solver} on custom steps")
    skip = genome.has_skips
    return _SD_SNIPPET.format(solver=solver, model=model, timesteps=list(genome.timesteps), guidance=guidance,
                              order=SD_ORDERS[solver], skips=", with skipped layers" if skip else "",
                              skip_import=_SKIP_IMPORT if skip else "",
                              skip_line=_SKIP_LINE.format(denoiser="pipe.unet", units="layers") if skip else "")


def diffusers_snippet(genome: Genome, model: str, solver: str, shape: tuple[int, ...], num_classes: int | None,
                      subfolder: str | None = None, clip_x0: bool = False) -> str:
    """Code that samples with the schedule: plain diffusers where a scheduler runs the same update on custom
    steps (DDIM and DPM-Solver++ 2M/3M: DPMSolverMultistepScheduler timesteps=; Euler: EulerDiscreteScheduler
    sigmas=; Heun: HeunDiscreteScheduler timesteps=), otherwise autodiff_opt.apply (iPNDM, UniPC, x0 clipping
    outside DPM-Solver++, layer skipping). The first comment line says which."""
    steps = list(genome.timesteps)
    scheduler = diffusers_scheduler(solver, clip_x0)
    if scheduler is None or genome.has_skips:
        reason = ("diffusers has no scheduler that skips layers" if genome.has_skips else
                  f"diffusers clips x0 for {solver} on no scheduler that takes custom steps" if clip_x0 else
                  f"no diffusers scheduler runs {solver} on custom steps")
        return _APPLY.format(solver=solver, nfe=nfe(solver, len(steps)), clip=", x0 clipped" if clip_x0 else "",
                             reason=reason)
    setup, model_input = _SETUPS[scheduler]
    order = SOLVER_SPECS[solver].dpm_order
    fields = dict(order=order, ddim_note=_DDIM_NOTE if order == 1 else "", solver=solver, nfe=nfe(solver, len(steps)),
                  scheduler=scheduler, model=model, timesteps=steps, shape=tuple(shape), channels=shape[0], model_input=model_input,
                  subfolder=f', subfolder="{subfolder}"' if subfolder else "",
                  sched_subfolder=', subfolder="scheduler"' if subfolder == "unet" else "",
                  labels=", class_labels=torch.randint(0, %d, (16,))" % num_classes if num_classes else "",
                  clip=_CLIP_ARGS if clip_x0 else "")
    return (_HEADER + setup + _LOOP).format(**fields)


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

    exact = SOLVER_SPECS[solver].scheduler == _FLOW_EULER and not clip_x0
    note = ("the same samples as the search's solver" if exact else
            f"the search ran {solver}{' with x0 clipping' if clip_x0 else ''}, which this loop approximates")
    return _FLOW_SNIPPET.format(
        note=note, model=model, times=[grid_time(i, GRID_SIZE) for i in genome.timesteps], shape=tuple(shape),
        subfolder=f', subfolder="{subfolder}"' if subfolder else "",
        sched_subfolder=', subfolder="scheduler"' if subfolder == "unet" else "",
        labels=", class_labels=torch.randint(0, %d, (16,))" % num_classes if num_classes else "",
    )


_PIPELINE_HEADER = '''# Apply the searched schedule in diffusers' own {pipeline} ({solver}, {nfe} NFE{skips}).
import torch
from diffusers import {pipeline}, {scheduler}
{skip_import}
pipe = {pipeline}.from_pretrained("{model}")
'''
_FLOW_PIPELINE = '''# the searched times are final: the scheduler must not shift them again (shift=1, no dynamic shifting)
config = {{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}}
config.update(shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
              use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=False)
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
{skip_line}images = pipe(["a photo of a cat"], sigmas={times}, num_inference_steps={k},{size_arg}{guidance_arg}
              generator=torch.Generator().manual_seed(0)).images
'''
_DIT_PIPELINE = '''pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
    solver_order={order}, final_sigmas_type="zero", lower_order_final=False)
# DiTPipeline asks its scheduler for num_inference_steps evenly spaced steps: pin it to the searched ones
pinned = pipe.scheduler.set_timesteps
pipe.scheduler.set_timesteps = lambda num_inference_steps=None, device=None: pinned(timesteps={timesteps}, device=device)
{skip_line}images = pipe(class_labels=[207, 360, 387, 974], num_inference_steps={k}, guidance_scale={guidance},
              generator=torch.Generator().manual_seed(0)).images
'''
def apply_snippet(genome: Genome, solver: str, clip_x0: bool, reason: str) -> str:
    """The snippet that samples the schedule file with ``autodiff_opt.apply`` (``reason``: why not diffusers)."""
    return _APPLY.format(solver=solver, nfe=nfe(solver, genome.num_steps), clip=", x0 clipped" if clip_x0 else "",
                         reason=reason)


def pipeline_snippet(kind: str, genome: Genome, model: str, solver: str, guidance: float, clip_x0: bool,
                     image_size: int | None = None) -> str:
    """Code that runs the schedule in the model's own diffusers pipeline (the ``kind`` family's
    ``pipeline_class``): a flow (SD3, Flux) with ``sigmas=`` on a scheduler that does not shift them again (at
    the searched ``image_size``, ``model.image_size``; None: the pipeline's default), a VP model (DiT) with
    DPM-Solver++ pinned to the steps; skipped blocks through ``autodiff_opt.apply.skip_blocks``. Other solvers
    (or x0 clipping) go through autodiff_opt.apply."""
    from autodiff_opt.solvers.flow import GRID_SIZE, grid_time

    family = family_named(kind)
    pipeline, flow = family.pipeline_class, bool(family.flow)
    exact = SOLVER_SPECS[solver].scheduler == _FLOW_EULER if flow else solver in SD_ORDERS
    if not exact or clip_x0:
        reason = (f"{pipeline} runs no {solver} on custom steps" if not exact else
                  "the pipeline does not clip x0")
        return _APPLY.format(solver=solver, nfe=nfe(solver, genome.num_steps), clip=", x0 clipped" if clip_x0 else "",
                             reason=reason)
    skip = genome.has_skips
    fields = dict(pipeline=pipeline, solver=solver, nfe=nfe(solver, genome.num_steps), model=model,
                  skips=", with skipped blocks" if skip else "",
                  scheduler="FlowMatchEulerDiscreteScheduler" if flow else "DPMSolverMultistepScheduler",
                  skip_import=_SKIP_IMPORT if skip else "",
                  skip_line=_SKIP_LINE.format(denoiser="pipe.transformer", units="blocks") if skip else "",
                  k=genome.num_steps, guidance=guidance, timesteps=list(genome.timesteps),
                  guidance_arg=f" guidance_scale={guidance},",
                  size_arg=f" height={image_size}, width={image_size}," if image_size else "",
                  times=[grid_time(i, GRID_SIZE) for i in genome.timesteps], order=SD_ORDERS.get(solver, 1))
    body = _FLOW_PIPELINE if flow else _DIT_PIPELINE
    return (_PIPELINE_HEADER + body).format(**fields)


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
