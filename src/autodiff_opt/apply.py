"""Apply an exported schedule (steps + per-step skipped layers) to its model in one call.

    python -m autodiff_opt.apply outputs/.../best_schedule.json --num-images 64 --out samples.png
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.arch.skip import step_wrapper_for
from autodiff_opt.models.loading import load_model
from autodiff_opt.core.genome import Genome
from autodiff_opt.utils import pick_device

log = logging.getLogger(__name__)


def schedule_genome(doc: dict[str, Any], model_unet: torch.nn.Module | None = None) -> Genome:
    """The genome of a schedule file; skipped layers by name when present (stable across processes)."""
    names = doc.get("skipped_layer_names")
    if names and model_unet is not None and any(names):
        from autodiff_opt.arch import discover_layers, ids_from_names

        layers = discover_layers(model_unet)
        return Genome.from_steps(doc["timesteps"], [sorted(ids_from_names(layers, n)) for n in names])
    return Genome.from_steps(doc["timesteps"], doc.get("skipped_layers"))


def generate_from_schedule(schedule: str | Path | dict[str, Any], num_images: int = 16, seed: int = 0,
                           device: str = "auto", batch_size: int = 64) -> torch.Tensor:
    """uint8 images (N, C, H, W) sampled with the schedule's steps, solver and layer skipping."""
    doc = json.loads(Path(schedule).read_text()) if not isinstance(schedule, dict) else schedule
    model = load_model(doc["model"], subfolder=doc.get("subfolder"), device=pick_device(device))
    genome = schedule_genome(doc, model.unet).validate(model.num_train_timesteps)
    generator = ImageGenerator(model, doc.get("solver", "ddim"), doc.get("clip_x0", True), batch_size,
                               step_wrapper=step_wrapper_for(model))
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
