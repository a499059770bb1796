#!/usr/bin/env python
"""Train the embedded default assets from scratch: the digits-cnn classifier and the digits DDPM.

Writes ``<out-dir>/digits-cnn/`` (config.json + model.safetensors) and ``<out-dir>/digits-ddpm/``
(a diffusers ``UNet2DModel`` folder plus the ``DDPMScheduler`` config). The default ``--out-dir``
is the package's shipped asset folder. Data: scikit-learn's 8x8 digits, training split only
(see ``autodiff_opt.data.digits``). Runs on CUDA when present, else CPU.

    python experiments/train_digits.py                 # full run (about 23 min on 2 shared CPU cores)
    python experiments/train_digits.py --smoke --out-dir /tmp/x   # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from tqdm import tqdm

from autodiff_opt.data.digits import load_digits_images, uint8_to_model
from autodiff_opt.metrics.digits_cnn import DigitsCNN, DigitsCNNConfig, save_digits_cnn

logger = logging.getLogger("train_digits")

ASSETS_DIR = Path(__file__).resolve().parents[1] / "src" / "autodiff_opt" / "assets"
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class TrainConfig:
    seed: int
    device: torch.device
    cnn_epochs: int
    cnn_batch_size: int
    cnn_lr: float
    ddpm_steps: int
    ddpm_batch_size: int
    ddpm_lr: float
    ddpm_warmup: int
    ema_decay: float
    beta_schedule: str
    channels: tuple[int, ...]
    norm_groups: int
    threads: int
    cnn_width: int = 32
    train_subset: int | None = None  # use only the first N training images (smoke tests)


def unet_for_digits(channels: tuple[int, ...], norm_groups: int) -> UNet2DModel:
    """Tiny 8x8 epsilon UNet: plain resnet blocks at 8x8, resnet+attention at 4x4, no mid block."""
    if len(channels) < 2:
        raise ValueError("need at least two resolution levels (8x8 and 4x4)")
    down = ["DownBlock2D"] * len(channels)
    down[1] = "AttnDownBlock2D"
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=tuple(down),
        up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down)),
        mid_block_type=None,
        attention_head_dim=8,
        norm_num_groups=norm_groups,
    )


def noise_scheduler(beta_schedule: str) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill); no flips (digits are chiral)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def classifier_accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    pred = model(images).argmax(dim=1)
    return float((pred == labels).float().mean())


def train_classifier(cfg: TrainConfig) -> tuple[DigitsCNN, float]:
    """Train DigitsCNN on the training split; return it and its held-out accuracy."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    x_train, y_train = load_digits_images("train")
    x_held, y_held = load_digits_images("heldout")
    x_train, y_train = x_train[: cfg.train_subset].to(cfg.device), y_train[: cfg.train_subset].to(cfg.device)
    model = DigitsCNN(DigitsCNNConfig(width=cfg.cnn_width)).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.cnn_lr, weight_decay=5e-4)
    batches = math.ceil(len(y_train) / cfg.cnn_batch_size)
    total = cfg.cnn_epochs * batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, max(1, total // 20)))
    for _ in tqdm(range(cfg.cnn_epochs), desc="digits-cnn", unit="epoch"):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen).to(cfg.device)
        for idx in perm.split(cfg.cnn_batch_size):
            x = random_shift(uint8_to_model(x_train[idx]), gen)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model = model.cpu().eval()
    acc = classifier_accuracy(model, x_held, y_held)
    logger.info("digits-cnn held-out accuracy %.4f (%d images)", acc, len(y_held))
    return model, acc


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train_denoiser(make_model: Callable[[], torch.nn.Module], batch_loss: Callable[[torch.nn.Module], torch.Tensor],
                   lr: float, steps: int, warmup: int, ema_decay: float, device: torch.device, name: str,
                   checkpoint: Callable[[torch.nn.Module, int], None] | None = None,
                   checkpoint_every: int = 0) -> tuple[torch.nn.Module, float]:
    """The training loop of every embedded model: ``steps`` AdamW steps on ``batch_loss(model)`` (one random
    batch per call), gradient norm clipped to 1, warm-up + cosine lr, EMA weights with a warm-up decay.
    ``checkpoint(ema, step)`` is called every ``checkpoint_every`` steps (0: never) with the EMA model in eval
    mode. Returns the EMA model (on CPU, eval mode) and the smoothed loss."""
    model = make_model().to(device)
    ema = make_model().to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    logger.info("%s (%s): %d parameters", name, type(model).__name__, sum(p.numel() for p in model.parameters()))
    running = float("nan")
    bar = tqdm(range(steps), desc=name, unit="step", mininterval=2.0)
    for step in bar:
        loss = batch_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema_update(ema, model, min(ema_decay, (1.0 + step) / (10.0 + step)))
        running = loss.item() if math.isnan(running) else 0.99 * running + 0.01 * loss.item()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        if step % 1000 == 0:
            logger.info("%s step %d: smoothed loss %.4f", name, step, running)
        if checkpoint is not None and checkpoint_every > 0 and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(ema, step + 1)
    logger.info("%s final smoothed loss %.4f", name, running)
    return ema.cpu().eval(), running


def train_unet(batch_loss: Callable[[UNet2DModel], torch.Tensor], channels: tuple[int, ...], norm_groups: int,
               lr: float, steps: int, warmup: int, ema_decay: float, device: torch.device,
               name: str) -> tuple[UNet2DModel, float]:
    """``train_denoiser`` on the digits UNet (the digits DDPM and the digits flow)."""
    unet, running = train_denoiser(lambda: unet_for_digits(channels, norm_groups), batch_loss,  # type: ignore[arg-type]
                                   lr, steps, warmup, ema_decay, device, name)
    return unet, running  # type: ignore[return-value]


def train_ddpm(cfg: TrainConfig) -> tuple[UNet2DModel, DDPMScheduler, float]:
    """Epsilon-prediction DDPM on the training split with AdamW, warm-up + cosine lr, and EMA weights."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    x0_all = uint8_to_model(load_digits_images("train")[0][: cfg.train_subset]).to(cfg.device)
    scheduler = noise_scheduler(cfg.beta_schedule)
    alpha_bar = scheduler.alphas_cumprod.to(cfg.device)

    def batch_loss(model: UNet2DModel) -> torch.Tensor:
        idx = torch.randint(0, len(x0_all), (cfg.ddpm_batch_size,), generator=gen).to(cfg.device)
        x0 = x0_all[idx]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(idx),), generator=gen).to(cfg.device)
        eps = torch.randn(x0.shape, generator=gen).to(cfg.device)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
        return F.mse_loss(model(x_t, t).sample, eps)

    unet, running = train_unet(batch_loss, cfg.channels, cfg.norm_groups, cfg.ddpm_lr, cfg.ddpm_steps, cfg.ddpm_warmup,
                               cfg.ema_decay, cfg.device, "digits-ddpm")
    return unet, scheduler, running


def save_ddpm(unet: UNet2DModel, scheduler: DDPMScheduler, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir, safe_serialization=True)
    scheduler.save_pretrained(out_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=ASSETS_DIR, help="writes digits-cnn/ and digits-ddpm/ here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (the model is tiny: a second thread gains little and stalls on shared cores)",
    )
    p.add_argument("--only", choices=("both", "cnn", "ddpm"), default="both")
    p.add_argument("--cnn-epochs", type=int, default=60)
    p.add_argument("--cnn-batch-size", type=int, default=64)
    p.add_argument("--cnn-lr", type=float, default=2e-3)
    p.add_argument("--ddpm-steps", type=int, default=20_000)
    p.add_argument("--ddpm-batch-size", type=int, default=128)
    p.add_argument("--ddpm-lr", type=float, default=2e-3)
    p.add_argument("--ddpm-warmup", type=int, default=500)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--beta-schedule", choices=("linear", "squaredcos_cap_v2"), default="squaredcos_cap_v2")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32], help="UNet block_out_channels")
    p.add_argument("--norm-groups", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="a few iterations of a tiny config (tests)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> TrainConfig:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cfg = TrainConfig(
        seed=args.seed,
        device=device,
        cnn_epochs=args.cnn_epochs,
        cnn_batch_size=args.cnn_batch_size,
        cnn_lr=args.cnn_lr,
        ddpm_steps=args.ddpm_steps,
        ddpm_batch_size=args.ddpm_batch_size,
        ddpm_lr=args.ddpm_lr,
        ddpm_warmup=args.ddpm_warmup,
        ema_decay=args.ema_decay,
        beta_schedule=args.beta_schedule,
        channels=tuple(args.channels),
        norm_groups=args.norm_groups,
        threads=args.threads,
    )
    if args.smoke:
        cfg.cnn_epochs, cfg.ddpm_steps, cfg.ddpm_batch_size, cfg.ddpm_warmup = 1, 3, 16, 1
        cfg.channels, cfg.norm_groups, cfg.cnn_width, cfg.train_subset = (8, 16), 4, 8, 256
    return cfg


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = make_config(args)
    torch.set_num_threads(cfg.threads)
    logger.info("device %s, out-dir %s, config %s", cfg.device, args.out_dir, cfg)
    summary: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.only in ("both", "cnn"):
        cnn, acc = train_classifier(cfg)
        save_digits_cnn(cnn, args.out_dir / "digits-cnn")
        summary.update(cnn_heldout_accuracy=acc, cnn_seconds=time.perf_counter() - t0)
    t1 = time.perf_counter()
    if args.only in ("both", "ddpm"):
        unet, scheduler, loss = train_ddpm(cfg)
        save_ddpm(unet, scheduler, args.out_dir / "digits-ddpm")
        summary.update(ddpm_final_loss=loss, ddpm_seconds=time.perf_counter() - t1)
    summary["total_seconds"] = time.perf_counter() - t0
    logger.info("done: %s", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
