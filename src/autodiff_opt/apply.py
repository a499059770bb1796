"""Apply an exported schedule (steps + per-step skipped layers) to its model in one call.

    python -m autodiff_opt.apply outputs/.../best_schedule.json --num-images 64 --out samples.png

In a diffusers pipeline (DiT, SD3, Flux: one denoiser call per step, the CFG pair batched),
``skip_blocks(pipe.transformer, "best_schedule.json")`` skips the schedule's blocks at each step.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from autodiff_opt.arch.layers import Layer, discover_layers, ids_from_names
from autodiff_opt.arch.skip import LayerSkipper
from autodiff_opt.core.genome import Genome
from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.models.base import DiffusionModel
from autodiff_opt.models.loading import load_model
from autodiff_opt.utils import pick_device

log = logging.getLogger(__name__)


def read_schedule(schedule: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A schedule file's contents (or the dict itself)."""
    return schedule if isinstance(schedule, dict) else json.loads(Path(schedule).read_text())


def skip_units(doc: dict[str, Any]) -> str:
    """The units the schedule's layer names refer to (transformers: blocks or sub_blocks)."""
    return str(doc.get("model_config", {}).get("skip_units", "blocks"))


def _genome_on(doc: dict[str, Any], layers: Sequence[Layer]) -> Genome:
    """The schedule's genome with its skipped layers given by name mapped to ``layers``' ids (stable across
    processes); the stored ids when the file names none."""
    names = doc.get("skipped_layer_names")
    if names and any(names):
        return Genome.from_steps(doc["timesteps"], [sorted(ids_from_names(layers, n)) for n in names])
    return Genome.from_steps(doc["timesteps"], doc.get("skipped_layers"))


def schedule_genome(doc: dict[str, Any], model_unet: torch.nn.Module | None = None, units: str = "blocks") -> Genome:
    """The genome of a schedule file; skipped layers by name when a model is given, else the stored ids."""
    if model_unet is None:
        return Genome.from_steps(doc["timesteps"], doc.get("skipped_layers"))
    return _genome_on(doc, discover_layers(model_unet, units))  # type: ignore[arg-type]


class StepSkips:
    """The schedule's per-step skipped layers on a denoiser that a pipeline calls once per step: call i of
    a K-step run is step i mod K (a forward pre-hook switches the mask). ``remove()`` restores the model."""

    def __init__(self, unet: torch.nn.Module, genome: Genome, skipper: LayerSkipper) -> None:
        self.genome, self.skipper, self.calls = genome, skipper, 0
        skipper.gate()
        self._handle = unet.register_forward_pre_hook(self._before)

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        self.skipper.set_skipped(self.genome.skips[self.calls % self.genome.num_steps])
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()
        self.skipper.clear()


def skip_blocks(unet: torch.nn.Module, schedule: str | Path | dict[str, Any]) -> StepSkips:
    """Skip the schedule's layers (by name) per step in any pipeline that calls ``unet`` once per step."""
    doc = read_schedule(schedule)
    layers = discover_layers(unet, skip_units(doc))  # type: ignore[arg-type]
    return StepSkips(unet, _genome_on(doc, layers), LayerSkipper(unet, layers))


def _load(doc: dict[str, Any], device: torch.device) -> DiffusionModel:
    """The schedule's model: rebuilt from its model settings (any kind the runs load), or a UNet folder."""
    if doc.get("model_config"):
        from dataclasses import fields

        from autodiff_opt.config import ModelConfig
        from autodiff_opt.models.factory import build_model

        known = {f.name for f in fields(ModelConfig)}  # skip_units (and any setting no longer read) left out
        settings = {k: v for k, v in doc["model_config"].items() if k in known}
        return build_model(ModelConfig(**settings), device)
    return load_model(doc["model"], subfolder=doc.get("subfolder"), device=device)


def generate_from_schedule(schedule: str | Path | dict[str, Any], num_images: int = 16, seed: int = 0,
                           device: str = "auto", batch_size: int = 64) -> torch.Tensor:
    """uint8 images (N, C, H, W) sampled with the schedule's steps, solver and layer skipping."""
    doc = read_schedule(schedule)
    model = _load(doc, pick_device(device))
    generator = ImageGenerator(model, doc.get("solver", "ddim"), bool(doc.get("clip_x0", True)), batch_size,
                               units=skip_units(doc))  # type: ignore[arg-type]
    genome = _genome_on(doc, generator.runtime.layers).validate(model.num_train_timesteps)
    samples = SampleSet.draw(num_images, model.sample_shape, model.num_classes, seed)
    return generator.generate(genome, samples)


def save_grid(images: torch.Tensor, path: str | Path, scale: int = 4) -> None:
    from torchvision.utils import save_image

    grid = images.float().div(255).repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    save_image(grid, str(path), nrow=int(len(images) ** 0.5) or 1, padding=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("schedule", type=Path)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("samples.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    images = generate_from_schedule(args.schedule, args.num_images, args.seed, args.device)
    save_grid(images, args.out)
    log.info("wrote %d images to %s", len(images), args.out)


if __name__ == "__main__":
    main()
