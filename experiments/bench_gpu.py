"""The fast path, measured: image-steps/s and the fraction of the roofline for eager, compiled and
compiled + CUDA graphs, on ADM-64 (the +experiment=imagenet64 UNet, random weights: no download) and on
the embedded digits model; then the time split of one candidate (generation, features, FID formula).

Roofline = peak matmul FLOP/s of the run's dtype, measured here, / FLOPs of one image-step (one UNet
evaluation of one image, counted with FlopCounterMode by arch/flops.py, the cost model of stage 2).

    python experiments/bench_gpu.py                        # CUDA: batch 512, bf16, 5,000-sample candidate
    python experiments/bench_gpu.py --device cpu --threads 1 --models digits --modes eager,compiled,whole \\
        --batch 8 --batches 4 --steps 2 --candidate-samples 64 --matmul-size 1024   # CPU (docs/gpu.md)

Modes: eager; compiled (compile=default: each skippable layer compiled, skipping a runtime switch);
graphs (the same with CUDA graphs, mode reduce-overhead; CUDA only); whole and whole-graphs (the whole
UNet compiled, what stage-1 studies use; it would recompile for every stage-2 mask). Compilation time is
the first batch's time minus a steady batch's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import sync, time_candidate  # noqa: E402  (one candidate timed as bench_eval times it)

from autodiff_opt.arch.flops import count_flops, example_inputs
from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.metrics.fid import FIDScorer, FIDStats, fast_fid
from autodiff_opt.models.base import DiffusionModel
from autodiff_opt.models.loading import load_model
from autodiff_opt.core.genome import Genome
from autodiff_opt.solvers import heuristic_schedule
from autodiff_opt.utils import PRECISIONS, pick_device

MODES = ("eager", "compiled", "graphs", "whole", "whole-graphs")


def adm64(device: torch.device) -> DiffusionModel:
    """The converted ADM ImageNet-64 UNet (models/adm preset imagenet64) with random weights."""
    from diffusers import UNet2DModel

    from autodiff_opt.models.adm import adm_alphas_cumprod, unet2d_config, unet_preset

    cfg = unet_preset("imagenet64")
    torch.manual_seed(0)
    unet = UNet2DModel(**unet2d_config(cfg)).to(device).eval().requires_grad_(False)
    return DiffusionModel("adm64-random", unet, adm_alphas_cumprod(cfg.noise_schedule, cfg.diffusion_steps),
                          "epsilon", (cfg.in_channels, cfg.image_size, cfg.image_size), num_classes=cfg.num_classes,
                          learned_sigma=cfg.learn_sigma)


def digits(device: torch.device) -> DiffusionModel:
    return load_model("builtin:digits-ddpm", device=device)


MODELS: dict[str, Callable[[torch.device], DiffusionModel]] = {"adm64": adm64, "digits": digits}


def peak_matmul(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul in dtype (the best of `repeats`)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_image_step(model: DiffusionModel) -> int:
    """FLOPs of one UNet evaluation at batch 1 (the cost model's full step)."""
    total, _ = count_flops(model.denoiser, example_inputs(model.denoiser, batch_size=1))
    return total


def make_generator(model: DiffusionModel, mode: str, args: argparse.Namespace) -> ImageGenerator:
    scope = "unet" if mode.startswith("whole") else "layers"
    return ImageGenerator(model, "ddim", True, args.batch, args.precision, compile="off" if mode == "eager" else "default",
                          cuda_graphs=mode.endswith("graphs"), compile_backend=args.compile_backend, compile_scope=scope)


def time_mode(name: str, mode: str, device: torch.device, genome: Genome, args: argparse.Namespace
              ) -> tuple[dict[str, Any], ImageGenerator]:
    model = MODELS[name](device)
    generator = make_generator(model, mode, args)
    samples = SampleSet.draw(args.batch * args.batches, model.sample_shape, model.num_classes, 0)
    sync(device)
    t0 = time.perf_counter()
    generator.generate(genome, samples.slice(0, args.batch))  # compiles (lazily) on the first call
    sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    generator.generate(genome, samples)
    sync(device)
    seconds = time.perf_counter() - t0
    image_steps = len(samples) * genome.num_steps
    return {"model": name, "mode": mode, "batch": args.batch, "image_steps_per_s": image_steps / seconds,
            "compile_s": max(0.0, first - seconds / args.batches)}, generator


def count_recompiles(name: str, device: torch.device, genome: Genome, num_masks: int, backend: str,
                     seed: int = 0) -> dict[str, int]:
    """Graphs compiled by dynamo (torch._dynamo.utils.counters) for one plain candidate, then for
    ``num_masks`` candidates with random per-step masks: gated layers vs hooks under a whole-UNet compile."""
    from torch._dynamo.utils import counters

    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    for variant in ("gated", "hooks"):
        torch._dynamo.reset()
        counters.clear()
        model = MODELS[name](device)
        generator = ImageGenerator(model, "ddim", True, 4, "fp32", compile="default", compile_backend=backend,
                                   compile_scope="layers" if variant == "gated" else "unet")
        skipper = generator.runtime.skipper
        samples = SampleSet.draw(4, model.sample_shape, model.num_classes, 0)
        generator.generate(genome, samples)
        out[f"{variant}_first"] = int(counters["stats"]["unique_graphs"])
        for _ in range(num_masks):
            masks = tuple(frozenset(int(j) for j in rng.choice(skipper.num_layers, 2, replace=False))
                          for _ in genome.timesteps)
            generator.generate(Genome(genome.timesteps, masks), samples)
        out[f"{variant}_after_masks"] = int(counters["stats"]["unique_graphs"])
    return out


def random_inception_weights(folder: Path) -> str:
    """torch-fidelity's Inception with random weights, saved as a state dict (timing only, no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls, loader = fe.FeatureExtractorInceptionV3, fe.load_state_dict_from_url
    original = cls.load_state_dict
    cls.load_state_dict, fe.load_state_dict_from_url = (lambda self, *a, **k: None), (lambda *a, **k: {})
    try:
        net = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, fe.load_state_dict_from_url = original, loader
    path = folder / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def scorer_for(name: str, device: torch.device, args: argparse.Namespace, folder: Path) -> FIDScorer:
    if name == "digits":
        return FIDScorer("digits-cnn", device=device, batch_size=args.feature_batch)
    weights = args.inception_weights or random_inception_weights(folder)
    return FIDScorer("inception-v3-compat", weights_path=weights, device=device, batch_size=args.feature_batch)


def candidate_split(generator: ImageGenerator, scorer: FIDScorer, genome: Genome, n: int) -> dict[str, float]:
    """Seconds of one n-sample candidate: generation, features and their statistics, FID formula (the
    reference's square root cached, as in a study)."""
    model, device = generator.model, generator.device
    samples = SampleSet.draw(n, model.sample_shape, model.num_classes, 1)
    dim = scorer.feature_dim(model.sample_shape)
    ref_feats = np.random.default_rng(0).normal(size=(dim + 64, dim))
    reference = FIDStats(ref_feats.mean(0), np.cov(ref_feats, rowvar=False), dim + 64)
    fast_fid(reference, reference, device)  # the first call computes the reference's square root, once per study
    t = time_candidate(generator, scorer, genome, samples, reference, lambda a, ref: fast_fid(a, ref, device))
    return {"samples": n, "generation_s": t["generate"], "features_s": t["features"], "fid_formula_s": t["fid"],
            "total_s": sum(t.values()), "feature_dim": dim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="adm64,digits")
    parser.add_argument("--modes", default="eager,compiled,graphs,whole,whole-graphs", help=f"comma-separated from {MODES}")
    parser.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 (default: bf16)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--batches", type=int, default=3, help="batches timed per mode after the first")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--matmul-size", type=int, default=None, help="default 8192 on CUDA, 1024 on CPU")
    parser.add_argument("--candidate-samples", type=int, default=5000)
    parser.add_argument("--candidate-mode", default=None, help="the mode of the candidate split (default: fastest)")
    parser.add_argument("--feature-batch", type=int, default=500)
    parser.add_argument("--inception-weights", default=None, help="torch-fidelity's file (default: random weights)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    parser.add_argument("--recompiles", type=int, default=0, help="count recompilations over this many masked"
                        " candidates (digits model) and stop")
    parser.add_argument("--recompile-backend", default="aot_eager", help="torch.compile backend of --recompiles")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a busy machine)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = pick_device(args.device)
    args.precision = args.precision or "bf16"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recompiles:
        ab = digits(torch.device("cpu")).alphas_cumprod
        genome = Genome(tuple(heuristic_schedule("trailing", args.steps, ab)))
        r = count_recompiles("digits", device, genome, args.recompiles, args.recompile_backend)
        print(f"graphs compiled (digits, backend {args.recompile_backend}, {args.steps} steps, 2 random layers"
              f" skipped per step): gated layers {r['gated_first']} for the first candidate, +"
              f"{r['gated_after_masks'] - r['gated_first']} over {args.recompiles} masked candidates; hooks under a"
              f" whole-UNet compile {r['hooks_first']}, +{r['hooks_after_masks'] - r['hooks_first']}")
        return
    modes = [m for m in args.modes.split(",") if m and (not m.endswith("graphs") or device.type == "cuda")]
    dtype = PRECISIONS[args.precision] or torch.float32
    n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    peak = peak_matmul(dtype, device, n)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; precision {args.precision}; peak {dtype} matmul ({n}^2): {peak / 1e12:.3f} TFLOP/s")
    print(f"{'model':7} {'mode':9} {'batch':>5} {'GFLOP/img-step':>14} {'img-steps/s':>11} {'roofline':>9}"
          f" {'fraction':>8} {'compile s':>9}")
    rows, splits = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            flops = flops_per_image_step(MODELS[name](torch.device("cpu")))
            roofline = peak / flops
            ab = MODELS[name](torch.device("cpu")).alphas_cumprod
            genome = Genome(tuple(heuristic_schedule("trailing", args.steps, ab)))
            generators = {}
            for mode in modes:
                row, generators[mode] = time_mode(name, mode, device, genome, args)
                row.update({"gflop_per_image_step": flops / 1e9, "roofline_image_steps_per_s": roofline,
                            "fraction": row["image_steps_per_s"] / roofline})
                rows.append(row)
                print(f"{name:7} {mode:9} {row['batch']:>5} {flops / 1e9:>14.4g} {row['image_steps_per_s']:>11.1f}"
                      f" {roofline:>9.1f} {row['fraction']:>8.1%} {row['compile_s']:>9.1f}", flush=True)
            best = args.candidate_mode or max((r for r in rows if r["model"] == name),
                                              key=lambda r: r["image_steps_per_s"])["mode"]
            split = {"model": name, "mode": best, **candidate_split(generators[best], scorer_for(name, device, args, Path(tmp)),
                                                                 genome, args.candidate_samples)}
            splits.append(split)
    print(f"\none candidate ({args.steps} steps; features: Inception for adm64, digits-cnn for digits):")
    print(f"{'model':7} {'mode':9} {'samples':>7} {'generation s':>12} {'features s':>10} {'FID formula s':>13} {'total s':>8}")
    for s in splits:
        print(f"{s['model']:7} {s['mode']:9} {s['samples']:>7} {s['generation_s']:>12.3f} {s['features_s']:>10.3f}"
              f" {s['fid_formula_s']:>13.3f} {s['total_s']:>8.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"device": where, "precision": args.precision, "peak_flops": peak,
                                        "rows": rows, "candidates": splits}, indent=1))


if __name__ == "__main__":
    main()
