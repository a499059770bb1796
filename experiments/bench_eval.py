"""One candidate evaluation, measured: image-steps per second and the share of time in generation,
features and the FID formula, on CPU and on CUDA when present.

    python experiments/bench_eval.py [--model builtin:digits-ddpm] [--samples 1000] [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.metrics.fid import FIDScorer, FIDStats, fid_from_stats
from autodiff_opt.metrics.reference import reference_statistics
from autodiff_opt.models.loading import load_model
from autodiff_opt.core.genome import Genome
from autodiff_opt.solvers import heuristic_schedule


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidate(generator: ImageGenerator, scorer: FIDScorer, genome: Genome, samples: SampleSet,
                   reference: FIDStats, formula: Callable[[FIDStats, FIDStats], float] = fid_from_stats
                   ) -> dict[str, float]:
    """Seconds of one candidate's parts: generation, features with their statistics, the FID formula."""
    device = generator.device
    sync(device)
    t0 = time.perf_counter()
    images = generator.generate(genome, samples)
    sync(device)
    t1 = time.perf_counter()
    stats = scorer.statistics(images)
    sync(device)
    t2 = time.perf_counter()
    formula(stats, reference)
    sync(device)
    return {"generate": t1 - t0, "features": t2 - t1, "fid": time.perf_counter() - t2}


def bench(device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    model = load_model(args.model, device=device)
    scorer = FIDScorer(args.extractor, device=device, batch_size=args.batch)
    reference = reference_statistics(args.reference, scorer, args.cache_dir)
    genome = Genome(tuple(heuristic_schedule("trailing", args.steps, model.alphas_cumprod)))
    generator = ImageGenerator(model, "ddim", True, args.batch, args.precision)
    samples = SampleSet.draw(args.samples, model.sample_shape, model.num_classes, 0)
    generator.generate(genome, SampleSet.draw(min(64, args.samples), model.sample_shape, model.num_classes, 1))  # warm-up
    times: dict[str, list[float]] = {"generate": [], "features": [], "fid": []}
    for _ in range(args.repeats):
        for key, dt in time_candidate(generator, scorer, genome, samples, reference).items():
            times[key].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    return {"image_steps_per_s": args.samples * args.steps / med["generate"], "seconds": total,
            **{f"share_{k}": v / total for k, v in med.items()}}


def bench_fid_formula(dim: int, n: int, repeats: int, device: torch.device) -> dict[str, float]:
    """torch-fidelity's formula (scipy sqrtm of the product) vs ours (cached reference root + one eigh)."""
    import numpy as np

    from autodiff_opt.metrics.fid import FIDStats, fast_fid

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    f1, f2 = rng.normal(size=(n, dim)) @ mix, rng.normal(size=(n, dim)) @ mix * 1.1 + 0.05
    a = FIDStats(f1.mean(0), np.cov(f1, rowvar=False), n)
    ref = FIDStats(f2.mean(0), np.cov(f2, rowvar=False), n)
    expected = fid_from_stats(a, ref)
    first = time.perf_counter()
    fast_fid(a, ref, device)  # computes and caches the reference's square root
    first = time.perf_counter() - first
    slow, fast, value = [], [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fid_from_stats(a, ref)
        t1 = time.perf_counter()
        value = fast_fid(a, ref, device)
        sync(device)
        fast.append(time.perf_counter() - t1)
        slow.append(t1 - t0)
    return {"torch_fidelity_s": statistics.median(slow), "fast_s": statistics.median(fast), "first_s": first,
            "rel_diff": abs(value - expected) / abs(expected)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:digits-ddpm")
    parser.add_argument("--extractor", default="digits-cnn")
    parser.add_argument("--reference", default="builtin:digits-train")
    parser.add_argument("--cache-dir", default="~/.cache/autodiff_opt")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--fid-dim", type=int, default=2048, help="feature dimension of the FID-formula benchmark")
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"one candidate: {args.samples} samples x {args.steps} steps of {args.model}, FID in {args.extractor} features")
    print(f"{'device':8} {'threads':>7} {'img-steps/s':>12} {'s/candidate':>12} {'generate':>9} {'features':>9} {'fid':>6}")
    for device in devices:
        r = bench(device, args)
        print(f"{device.type:8} {torch.get_num_threads():>7} {r['image_steps_per_s']:>12.0f} {r['seconds']:>12.3f}"
              f" {r['share_generate']:>9.1%} {r['share_features']:>9.1%} {r['share_fid']:>6.1%}")
    print(f"\nFID formula at {args.fid_dim} dimensions ({args.samples} samples; median of {args.repeats}):")
    for device in devices:
        r = bench_fid_formula(args.fid_dim, max(args.samples, args.fid_dim + 1), args.repeats, device)
        print(f"{device.type:8} torch-fidelity {r['torch_fidelity_s']:.3f}s  ours {r['fast_s']:.3f}s"
              f" ({r['torch_fidelity_s'] / r['fast_s']:.1f}x; first call with the reference root {r['first_s']:.3f}s)"
              f"  relative difference {r['rel_diff']:.1e}")


if __name__ == "__main__":
    main()
