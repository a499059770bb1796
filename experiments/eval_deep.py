#!/usr/bin/env python
"""Quality figures of the deep embedded models (docs/digits.md), through the package's own loaders.

Each model is built as ``python -m autodiff_opt +experiment=digits_dit`` (or ``digits_deep``) builds it (the
pipeline / UNet folder loader, the DDIM solver, the digits-cnn FID against the training images), and
scored on fresh seeds: FID of uniform DDIM at several step counts (``--steps``), the digits-cnn
classifier's mean confidence (max softmax) on 100-step samples next to its confidence on the held-out
real images, for the class-conditional DiT the fraction of samples classified as the class they were
drawn for, the FLOPs per image-step and the number of skippable units. ``--grid`` writes 8x8 sample grids.

    python experiments/eval_deep.py [--models digits-dit,digits-deep] [--samples 2000] [--grid docs/]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_digits import save_grid  # noqa: E402

from autodiff_opt.arch.layers import discover_layers  # noqa: E402
from autodiff_opt.cli import compose_config  # noqa: E402
from autodiff_opt.core.genome import Genome  # noqa: E402
from autodiff_opt.data.digits import load_digits_images  # noqa: E402
from autodiff_opt.generate import SampleSet  # noqa: E402
from autodiff_opt.metrics.digits_cnn import load_digits_cnn  # noqa: E402
from autodiff_opt.runner import build_experiment, heuristic_steps  # noqa: E402
from autodiff_opt.search.objective import evaluate  # noqa: E402

log = logging.getLogger("eval_deep")
EXPERIMENTS = {"digits-dit": "digits_dit", "digits-deep": "digits_deep", "digits": None}
SEED = 2_000_003  # fresh: neither the search's (0) nor the final stage's (1,000,003)


@torch.no_grad()
def confidence(images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """digits-cnn's mean max-softmax on uint8 images (and its accuracy against ``labels``)."""
    cnn = load_digits_cnn().eval()
    probs = torch.softmax(cnn(images), dim=1)
    out = {"confidence": float(probs.max(dim=1).values.mean())}
    if labels is not None:
        out["label_agreement"] = float((probs.argmax(dim=1) == labels.cpu()).float().mean())
    return out


def experiment(model: str, samples: int) -> Any:
    overrides = [f"+experiment={EXPERIMENTS[model]}"] if EXPERIMENTS.get(model) else []
    return build_experiment(compose_config([*overrides, f"search.num_samples={samples}", "progress=false",
                                            "output_dir=/tmp/eval_deep"]))


def evaluate_model(model: str, steps: list[int], samples: int, grid_dir: Path | None) -> dict[str, Any]:
    exp = experiment(model, samples)
    fresh = SampleSet.draw(samples, exp.model.sample_shape, exp.model.num_classes, SEED)
    T = exp.model.num_train_timesteps
    out: dict[str, Any] = {"model": model, "skippable_units": len(discover_layers(exp.model.denoiser)),
                           "parameters": sum(p.numel() for p in exp.model.denoiser.parameters())}
    from autodiff_opt.arch.flops import count_step_flops

    probe = fresh.slice(0, 1)
    one_step = Genome.from_steps([T // 2])
    out["flops_per_image_step"] = count_step_flops(lambda: exp.generator.denoise(one_step, probe.noise, probe.class_labels))[0]
    for k in steps:
        genome = Genome.from_steps(heuristic_steps("ddim_uniform", k, T, exp.model.alphas_cumprod))
        out[f"fid_ddim_{k}"] = evaluate(exp.generator, exp.scorer, exp.reference, fresh, genome)["fid"]
        log.info("%s: uniform DDIM %d steps: FID %.3f", model, k, out[f"fid_ddim_{k}"])
    genome = Genome.from_steps(heuristic_steps("ddim_uniform", max(steps), T, exp.model.alphas_cumprod))
    images = exp.generator.generate(genome, fresh)
    out.update(confidence(images, fresh.class_labels))
    if grid_dir is not None:
        save_grid(images[:64], grid_dir / f"{model}_samples.png")
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-dit,digits-deep", help="also: digits (the default model)")
    p.add_argument("--steps", default="4,10,100")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--grid", type=Path, default=None, help="folder for MODEL_samples.png")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    real = confidence(load_digits_images("heldout")[0])
    log.info("held-out real images: digits-cnn confidence %.4f", real["confidence"])
    rows = [evaluate_model(m, [int(s) for s in args.steps.split(",")], args.samples, args.grid)
            for m in args.models.split(",") if m]
    for row in rows:
        row["real_confidence"] = real["confidence"]
    print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
