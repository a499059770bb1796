"""Wall-clock speed-up of masked vs full UNet evaluations, next to the FLOPs ratio, in one run.

Models: (a) the embedded digits DDPM (``src/autodiff_opt/assets/digits-ddpm``; a random UNet of the
same config when the folder has no weights yet), (b) a random ADM-ImageNet-64-sized ``UNet2DModel``
(192 ch x (1,2,3,4), 3 resnets per level, attention at 32/16/8, scale-shift norm, 1000 classes,
6 output channels, resnet up/down-sampling: the paper's 58 layers). Masks skip 10/25/50% of the
layers, drawn with a fixed seed. Timing: torch.inference_mode, warm-up runs, then configurations
measured round-robin and the median taken. CUDA when available, else CPU with small batches.

    python experiments/bench_skip.py                     # both models, auto device
    python experiments/bench_skip.py --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from autodiff_opt.arch import LayerSkipper, example_inputs, measure_layer_costs

log = logging.getLogger("bench_skip")
ROOT = Path(__file__).resolve().parents[1]
DIGITS_DIR = ROOT / "src" / "autodiff_opt" / "assets" / "digits-ddpm"

ADM64 = dict(
    sample_size=64, in_channels=3, out_channels=6, block_out_channels=(192, 384, 576, 768), layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
    num_class_embeds=1000, attention_head_dim=64, norm_num_groups=32,
)


@dataclass
class Row:
    model: str
    mask: str
    skipped: int
    flops_ratio: float
    time_s: float
    time_ratio: float
    min_ratio: float


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _digits_config_from_training_script() -> dict[str, Any]:
    """The config experiments/train_digits.py would train with its defaults."""
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "experiments" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    args = module.parse_args([])
    return dict(module.unet_for_digits(tuple(args.channels), args.norm_groups).config)


def load_digits() -> tuple[UNet2DModel, str]:
    """The shipped digits UNet, or a random one of the same config (the label says which)."""
    if (DIGITS_DIR / "config.json").is_file() and _has_weights(DIGITS_DIR):
        return UNet2DModel.from_pretrained(DIGITS_DIR), "digits-ddpm (shipped weights)"
    if (DIGITS_DIR / "config.json").is_file():
        config = UNet2DModel.load_config(DIGITS_DIR)
        source = "digits-ddpm config.json, random weights (no weights shipped yet)"
    else:
        config = _digits_config_from_training_script()
        source = "train_digits.py default config, random weights (asset folder not there yet)"
    torch.manual_seed(0)
    return UNet2DModel.from_config(config), source


def adm64() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**ADM64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(unet: torch.nn.Module, inputs: dict[str, Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    unet(**inputs)
    _sync(device)
    return time.perf_counter() - start


def random_mask(num_layers: int, fraction: float, seed: int) -> frozenset[int]:
    k = max(1, round(fraction * num_layers))
    return frozenset(random.Random(seed).sample(range(num_layers), k))


def bench_model(label: str, unet: UNet2DModel, device: torch.device, batch: int, fractions: list[float],
                warmup: int, repeats: int, seed: int) -> tuple[list[Row], float]:
    """Rows for full, empty mask and each fraction, and the GFLOP of one full image-step."""
    unet = unet.to(device).eval()
    skipper = LayerSkipper(unet)
    costs = measure_layer_costs(unet, skipper, example_inputs(unet))
    inputs = example_inputs(unet, batch_size=batch)
    masks: dict[str, frozenset[int]] = {"full": frozenset(), "empty mask": frozenset()}
    masks |= {f"skip {f:.0%}": random_mask(skipper.num_layers, f, seed) for f in fractions}
    times: dict[str, list[float]] = {name: [] for name in masks}
    with torch.inference_mode():
        for name, mask in masks.items():
            with skipper.skipping(mask):
                for _ in range(warmup):
                    _time_once(unet, inputs, device)
        for _ in range(repeats):  # round-robin, so drift of a shared machine hits every mask alike
            for name, mask in masks.items():
                if name == "full":
                    times[name].append(_time_once(unet, inputs, device))
                else:
                    with skipper.skipping(mask):
                        times[name].append(_time_once(unet, inputs, device))
    rows = [
        Row(label, name, len(mask), costs.step_flops(mask) / costs.full_step, statistics.median(times[name]),
            statistics.median(t / f for t, f in zip(times[name], times["full"])),  # per-round ratio: drift cancels
            min(times[name]) / min(times["full"]))
        for name, mask in masks.items()
    ]
    return rows, costs.full_step / 1e9


def print_rows(title: str, rows: list[Row], full_gflops: float) -> None:
    print(f"\n{title}  ({full_gflops:.3g} GFLOP per image-step)")
    print(f"{'mask':<12}{'layers':>7}{'FLOPs ratio':>13}{'time/forward':>14}{'time ratio':>12}{'(min)':>8}"
          f"{'speed-up':>10}{'ideal':>8}")
    for r in rows:
        print(f"{r.mask:<12}{r.skipped:>7}{r.flops_ratio:>13.3f}{r.time_s * 1e3:>12.2f}ms"
              f"{r.time_ratio:>12.3f}{r.min_ratio:>8.3f}{1 / r.time_ratio:>9.2f}x{1 / r.flops_ratio:>7.2f}x")
    print("time ratio = median over rounds of t(mask)/t(full) measured back to back; (min) = min t(mask) / min t(full);"
          " ideal = 1 / FLOPs ratio; 'empty mask' = the skipper attached with nothing skipped (noise floor)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.10, 0.25, 0.50])
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--warmup", type=int, default=None, help="warm-up forwards per mask (default 1 CPU, 3 CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed forwards per mask (default CPU: 15 digits, 3 ADM; CUDA: 20)")
    p.add_argument("--digits-batch", type=int, default=None, help="default 256 CPU, 1024 CUDA")
    p.add_argument("--adm-batch", type=int, default=None, help="default 1 CPU, 32 CUDA")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-adm", action="store_true", help="only the digits model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    def repeats(cpu_default: int) -> int:
        return args.repeats if args.repeats is not None else (20 if cuda else cpu_default)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench_skip: torch {torch.__version__}, device {name}, warm-up {warmup}, mask seed {args.seed}")
    jobs = [("digits", load_digits, args.digits_batch or (1024 if cuda else 256), repeats(15))]
    if not args.no_adm:
        jobs.append(("adm64", lambda: (adm64(), "ADM-ImageNet-64-sized UNet2DModel, random weights"),
                     args.adm_batch or (32 if cuda else 1), repeats(3)))
    for short, build, batch, n in jobs:
        unet, source = build()
        start = time.perf_counter()
        rows, full_gflops = bench_model(short, unet, device, batch, args.fractions, warmup, n, args.seed)
        print_rows(f"[{short}] {source}; batch {batch}; median of {n}; {time.perf_counter() - start:.0f}s",
                   rows, full_gflops)
        del unet
    sys.stdout.flush()


if __name__ == "__main__":
    main()
