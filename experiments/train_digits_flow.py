#!/usr/bin/env python
"""Train the embedded rectified-flow model ``digits-flow`` from scratch on the 8x8 digits.

The network is the digits DDPM's ``UNet2DModel`` (experiments/train_digits.py, same architecture),
trained to predict the velocity of the straight path between data and noise:

    x_t = (1 - t) x0 + t noise,   v = noise - x0,   loss = || v_theta(x_t, 1000 t) - v ||^2

with t ~ U(0, 1) and the network's time input 1000 t (diffusers' SD3/Flux convention: timestep =
sigma * num_train_timesteps). Writes ``<out-dir>/digits-flow/`` (the UNet folder plus a
``FlowMatchEulerDiscreteScheduler`` config holding the model's default shift). Seeded; CUDA when
present, else CPU.

    python experiments/train_digits_flow.py                         # full run (docs/flow.md)
    python experiments/train_digits_flow.py --smoke --out-dir /tmp/x  # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import train_unet  # noqa: E402  (same network and recipe)

from autodiff_opt.data.digits import load_digits_images, uint8_to_model  # noqa: E402

logger = logging.getLogger("train_digits_flow")

ASSETS_DIR = Path(__file__).resolve().parents[1] / "src" / "autodiff_opt" / "assets"
NUM_TRAIN_TIMESTEPS = 1000


def flow_loss(model: UNet2DModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE of the predicted velocity on x_t = (1 - t) x0 + t noise (target noise - x0)."""
    tt = t.view(-1, 1, 1, 1)
    x_t = (1.0 - tt) * x0 + tt * noise
    return F.mse_loss(model(x_t, t * NUM_TRAIN_TIMESTEPS).sample, noise - x0)


def train_flow(args: argparse.Namespace, device: torch.device) -> tuple[UNet2DModel, float]:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x0_all = uint8_to_model(load_digits_images("train")[0][: args.train_subset]).to(device)

    def batch_loss(model: UNet2DModel) -> torch.Tensor:
        idx = torch.randint(0, len(x0_all), (args.batch_size,), generator=gen).to(device)
        t = torch.rand(len(idx), generator=gen).to(device)
        noise = torch.randn(x0_all[idx].shape, generator=gen).to(device)
        return flow_loss(model, x0_all[idx], t, noise)

    return train_unet(batch_loss, tuple(args.channels), args.norm_groups, args.lr, args.steps, args.warmup,
                      args.ema_decay, device, "digits-flow")


def save_flow(unet: UNet2DModel, out_dir: Path, shift: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir, safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift).save_pretrained(out_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=ASSETS_DIR, help="writes digits-flow/ here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1 is fastest on shared cores)")
    p.add_argument("--steps", type=int, default=6_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--shift", type=float, default=1.0, help="the default schedule's shift, saved in the scheduler config")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32], help="UNet block_out_channels")
    p.add_argument("--norm-groups", type=int, default=8)
    p.add_argument("--train-subset", type=int, default=None, help="only the first N training images")
    p.add_argument("--smoke", action="store_true", help="a few iterations of a tiny config (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.warmup, args.channels, args.norm_groups, args.train_subset = 3, 16, 1, [8, 16], 4, 256
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)
    logger.info("device %s, out-dir %s, args %s", device, args.out_dir, vars(args))
    t0 = time.perf_counter()
    unet, loss = train_flow(args, device)
    save_flow(unet, args.out_dir / "digits-flow", args.shift)
    summary = {"flow_final_loss": loss, "seconds": time.perf_counter() - t0}
    logger.info("done: %s", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
