#!/usr/bin/env python
"""Train the two deep embedded models on the 8x8 digits: ``digits-dit`` and ``digits-deep``.

Both are epsilon-prediction DDPMs with the digits DDPM's cosine noise schedule and training recipe
(experiments/train_digits.py: AdamW, warm-up + cosine lr, gradient clipping, EMA weights), deep enough
that skipping one layer at one step is a small change, as in the large models the method targets:

- ``digits-dit``: a class-conditional diffusion transformer, diffusers' ``DiTTransformer2DModel``
  (adaLN-zero blocks, 10 classes + the null class, label dropout 0.1 so classifier-free guidance works),
  12 blocks of width 64 on 2x2 pixel patches (16 tokens). Saved as a ``DiTPipeline`` folder
  (model_index.json, transformer/, scheduler/) in pixel space: its ``vae`` entry is null, so samples
  are images, not latents.
- ``digits-deep``: an unconditional ``UNet2DModel`` over three resolutions (8x8, 4x4, 2x2), two resnets
  per block, self-attention at 4x4 and 2x2 and a mid block: 28 skippable layers.

An EMA checkpoint is written to the output folders every ``--checkpoint-every`` steps, so a run
stopped early leaves a usable model. Seeded; CUDA when present, else CPU.

    python experiments/train_deep.py --model dit     # writes src/autodiff_opt/assets/digits-dit/ (46 min here)
    python experiments/train_deep.py --model deep    # writes src/autodiff_opt/assets/digits-deep/ (56 min here)
    python experiments/train_deep.py --model both --smoke --out-dir /tmp/x   # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import NUM_TRAIN_TIMESTEPS, noise_scheduler, train_denoiser  # noqa: E402

from autodiff_opt.data.digits import load_digits_images, uint8_to_model  # noqa: E402

logger = logging.getLogger("train_deep")

ASSETS_DIR = Path(__file__).resolve().parents[1] / "src" / "autodiff_opt" / "assets"
NUM_CLASSES = 10


def dit_for_digits(width: int = 64, layers: int = 12, head_dim: int = 16, patch: int = 2) -> DiTTransformer2DModel:
    """Pixel-space DiT for 8x8 grayscale digits: ``layers`` adaLN-zero blocks, 10 classes + null."""
    return DiTTransformer2DModel(num_attention_heads=width // head_dim, attention_head_dim=head_dim, in_channels=1,
                                 out_channels=1, num_layers=layers, sample_size=8, patch_size=patch,
                                 num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=1)


def deep_unet_for_digits(channels: tuple[int, ...] = (16, 32, 32), layers_per_block: int = 2,
                         norm_groups: int = 8) -> UNet2DModel:
    """8x8 -> 4x4 -> 2x2 UNet: plain resnets at 8x8, resnet + attention below, UNetMidBlock2D."""
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(channels) - 1)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=channels,
                       layers_per_block=layers_per_block, down_block_types=down,
                       up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down)),
                       attention_head_dim=8, norm_num_groups=norm_groups)


def ddpm_batch_loss(scheduler: DDPMScheduler, batch_size: int, seed: int, device: torch.device,
                    conditional: bool, subset: int | None) -> Callable[[torch.nn.Module], torch.Tensor]:
    """MSE on epsilon for uniform t in [0, T), random training images (with their labels when conditional)."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_images("train")
    x0_all, y_all = uint8_to_model(images[:subset]).to(device), labels[:subset].to(device)
    alpha_bar = scheduler.alphas_cumprod.to(device)

    def batch_loss(model: torch.nn.Module) -> torch.Tensor:
        idx = torch.randint(0, len(x0_all), (batch_size,), generator=gen).to(device)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=gen).to(device)
        eps = torch.randn(x0_all[idx].shape, generator=gen).to(device)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0_all[idx] + (1.0 - ab).sqrt() * eps
        if conditional:  # the DiT's label embedding drops 10% of labels to the null class while training
            return F.mse_loss(model(x_t, timestep=t, class_labels=y_all[idx]).sample, eps)
        return F.mse_loss(model(x_t, t).sample, eps)

    return batch_loss


def save_dit(transformer: DiTTransformer2DModel, scheduler: DDPMScheduler, out_dir: Path) -> None:
    """A DiTPipeline folder in pixel space (vae: null), DDIM scheduler config with the training betas."""
    pipe = DiTPipeline(transformer=transformer, vae=None, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.save_pretrained(out_dir, safe_serialization=True)


def save_unet(unet: UNet2DModel, scheduler: DDPMScheduler, out_dir: Path) -> None:
    unet.save_pretrained(out_dir, safe_serialization=True)
    scheduler.save_pretrained(out_dir)


MODELS: dict[str, tuple[str, Callable[..., torch.nn.Module], Callable[..., None], bool, int, float]] = {
    # name: (asset folder, builder, saver, class-conditional, default steps, default peak lr): the shipped runs
    "dit": ("digits-dit", dit_for_digits, save_dit, True, 5_000, 1.5e-3),
    "deep": ("digits-deep", deep_unet_for_digits, save_unet, False, 9_000, 2e-3),
}


def train_one(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    folder, build, save, conditional, default_steps, default_lr = MODELS[kind]
    steps, lr = args.steps or default_steps, args.lr or default_lr
    out = args.out_dir / folder
    torch.manual_seed(args.seed)
    scheduler = noise_scheduler("squaredcos_cap_v2")
    make = (lambda: build(layers=2)) if (args.smoke and kind == "dit") else (
        (lambda: build(channels=(8, 16, 16), layers_per_block=1, norm_groups=4)) if args.smoke else build)
    loss_fn = ddpm_batch_loss(scheduler, args.batch_size, args.seed + 1, device, conditional,
                              256 if args.smoke else None)

    def checkpoint(ema: torch.nn.Module, step: int) -> None:
        save(ema, scheduler, out)
        logger.info("%s: EMA checkpoint at step %d written to %s", folder, step, out)

    t0 = time.perf_counter()
    model, loss = train_denoiser(make, loss_fn, lr, steps, args.warmup, args.ema_decay, device, folder,
                                 checkpoint, args.checkpoint_every)
    save(model, scheduler, out)
    return {f"{kind}_final_loss": loss, f"{kind}_seconds": time.perf_counter() - t0,
            f"{kind}_parameters": float(sum(p.numel() for p in model.parameters()))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("dit", "deep", "both"), default="both")
    p.add_argument("--out-dir", type=Path, default=ASSETS_DIR, help="writes digits-dit/ and/or digits-deep/ here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--steps", type=int, default=None, help="AdamW steps (default: 5,000 for dit, 9,000 for deep)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1.5e-3 dit, 2e-3 deep)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="a few iterations of tiny configs (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.warmup, args.checkpoint_every = 3, 16, 1, 2
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)
    logger.info("device %s, out-dir %s, %s", device, args.out_dir, vars(args))
    summary: dict[str, float] = {}
    for kind in (("dit", "deep") if args.model == "both" else (args.model,)):
        summary.update(train_one(kind, args, device))
    logger.info("done: %s", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
