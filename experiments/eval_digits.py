#!/usr/bin/env python
"""Quality figures of the embedded digits assets (the numbers in docs/digits.md).

Prints: the classifier's held-out accuracy; the real-vs-real FID floor (held-out vs training
images); FID of samples from uniform DDIM at several step counts against the training images;
the UNet's FLOPs per image-step and its image-steps per second at batch 500.

Uniform DDIM is diffusers' DDIMScheduler with timestep_spacing="leading", steps_offset=0,
set_alpha_to_one=True, clip_sample=True, eta=0 (the paper's baseline: {750, 500, 250, 0} at K=4).
FID uses torch-fidelity with the digits-cnn feature extractor. All noise comes from fixed seeds.

    python experiments/eval_digits.py                          # full table, 2,000 samples per K
    python experiments/eval_digits.py --grid docs/digits_samples.png
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from autodiff_opt.data.digits import UInt8ImageDataset, load_digits_images, model_to_uint8
from autodiff_opt.metrics.digits_cnn import (
    DIGITS_CNN_FEATURE_LAYER,
    DIGITS_CNN_NAME,
    load_digits_cnn,
    register_digits_cnn,
)

logger = logging.getLogger("eval_digits")

ASSETS_DIR = Path(__file__).resolve().parents[1] / "src" / "autodiff_opt" / "assets"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_ddpm(path: Path, device: torch.device) -> tuple[UNet2DModel, DDPMScheduler]:
    unet = UNet2DModel.from_pretrained(path).to(device).eval()
    return unet, DDPMScheduler.from_pretrained(path)


def uniform_ddim(ddpm: DDPMScheduler, num_steps: int) -> DDIMScheduler:
    """The paper's uniform DDIM: leading spacing, no offset, last step to alpha_bar = 1, x0 clipped."""
    ddim = DDIMScheduler.from_config(
        ddpm.config,
        timestep_spacing="leading",
        steps_offset=0,
        set_alpha_to_one=True,
        clip_sample=True,
        prediction_type="epsilon",
    )
    ddim.set_timesteps(num_steps)
    return ddim


@torch.inference_mode()
def ddim_sample(
    unet: UNet2DModel,
    ddpm: DDPMScheduler,
    num_steps: int,
    num_samples: int,
    seed: int,
    batch_size: int = 500,
) -> torch.Tensor:
    """``num_samples`` uint8 images (N, 1, 8, 8) from deterministic uniform DDIM (eta=0)."""
    device = next(unet.parameters()).device
    ddim = uniform_ddim(ddpm, num_steps)
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, unet.config.in_channels, size, size), generator=gen)
    out = []
    for x in noise.split(batch_size):
        x = x.to(device)
        for t in ddim.timesteps:
            eps = unet(x, t.to(device)).sample
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
        out.append(model_to_uint8(x).cpu())
    return torch.cat(out)


def fid(images_a: torch.Tensor, images_b: torch.Tensor, cnn_dir: Path | None = None) -> float:
    """FID between two uint8 image sets in digits-cnn feature space (via torch-fidelity)."""
    register_digits_cnn()
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(images_a),
        input2=UInt8ImageDataset(images_b),
        fid=True,
        feature_extractor=DIGITS_CNN_NAME,
        feature_layer_fid=DIGITS_CNN_FEATURE_LAYER,
        feature_extractor_weights_path=None if cnn_dir is None else str(cnn_dir),
        cuda=torch.cuda.is_available(),
        batch_size=500,
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])


def flops_per_image_step(unet: UNet2DModel) -> float:
    device = next(unet.parameters()).device
    x = torch.zeros(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(x, torch.tensor([500], device=device))
    return float(counter.get_total_flops())


@torch.inference_mode()
def image_steps_per_second(unet: UNet2DModel, batch_size: int = 500, repeats: int = 10) -> float:
    """Median throughput of one network evaluation on a batch (image-steps per second)."""
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    x = torch.randn(batch_size, unet.config.in_channels, size, size, device=device)
    t = torch.full((batch_size,), 500, device=device)
    unet(x, t)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        unet(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def save_grid(images: torch.Tensor, path: Path, scale: int = 8, pad: int = 2) -> None:
    """Save uint8 (64, 1, 8, 8) images as an 8x8 grid upscaled with nearest neighbour."""
    from PIL import Image

    n = images.shape[0]
    cols = int(round(n**0.5))
    rows = (n + cols - 1) // cols
    big = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
    cell = big.shape[-1] + pad
    canvas = torch.full((rows * cell + pad, cols * cell + pad), 128.0)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * cell : pad + r * cell + big.shape[-2], pad + c * cell : pad + c * cell + big.shape[-1]] = big[
            i, 0
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.to(torch.uint8).numpy()).save(path)  # 2-D uint8 -> mode "L"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets-dir", type=Path, default=ASSETS_DIR, help="holds digits-ddpm/ and digits-cnn/")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 6, 10, 25, 100])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=Path, default=None, help="also save 64 samples of 100-step DDIM here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cnn_dir, ddpm_dir = args.assets_dir / "digits-cnn", args.assets_dir / "digits-ddpm"
    unet, ddpm = load_ddpm(ddpm_dir, device)
    x_train, _ = load_digits_images("train")
    x_held, y_held = load_digits_images("heldout")

    cnn = load_digits_cnn(cnn_dir)
    with torch.inference_mode():
        acc = float((cnn(x_held).argmax(1) == y_held).float().mean())
    results: dict[str, float] = {"cnn_heldout_accuracy": acc}
    results["fid_floor_heldout_vs_train"] = fid(x_held, x_train, cnn_dir)
    for k in tqdm(args.steps, desc="uniform DDIM", unit="K"):
        samples = ddim_sample(unet, ddpm, k, args.num_samples, args.seed, args.batch_size)
        results[f"fid_ddim_{k}"] = fid(samples, x_train, cnn_dir)
    k_max = max(args.steps)
    matched = ddim_sample(unet, ddpm, k_max, len(x_held), args.seed + 1, args.batch_size)
    results["fid_ddim_max_matched_n"] = fid(matched, x_train, cnn_dir)
    results["params"] = float(sum(p.numel() for p in unet.parameters()))
    results["flops_per_image_step"] = flops_per_image_step(unet)
    results["image_steps_per_s_batch500"] = image_steps_per_second(unet, 500)
    if args.grid is not None:
        save_grid(ddim_sample(unet, ddpm, 100, 64, args.seed, 64), args.grid)

    print(f"device: {device}, beta_schedule: {ddpm.config.beta_schedule}")
    print(f"digits-cnn held-out accuracy: {acc * 100:.2f}% ({len(y_held)} images)")
    print(f"FID floor, held-out ({len(x_held)}) vs train ({len(x_train)}): {results['fid_floor_heldout_vs_train']:.3f}")
    print(f"| uniform DDIM steps (NFE) | FID vs train, {args.num_samples} samples | ratio to floor |")
    print("|---|---|---|")
    for k in args.steps:
        v = results[f"fid_ddim_{k}"]
        print(f"| {k} | {v:.3f} | {v / results['fid_floor_heldout_vs_train']:.2f} |")
    print(
        f"FID of {len(x_held)} samples ({k_max}-step DDIM, same count as the floor): "
        f"{results['fid_ddim_max_matched_n']:.3f}"
    )
    print(f"UNet parameters: {int(results['params'])}")
    print(f"FLOPs per image-step (batch 1): {results['flops_per_image_step'] / 1e6:.2f} M")
    print(f"image-steps/s at batch 500 on {device}: {results['image_steps_per_s_batch500']:.0f}")
    return results


if __name__ == "__main__":
    main()
