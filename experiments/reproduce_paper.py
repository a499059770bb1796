"""Reproduce one of AutoDiffusion's experiments: the search, then the final evaluation on fresh seeds.

    python experiments/reproduce_paper.py --experiment imagenet64 [--variant joint] [--storage URL] [--dry-run]
        [-- extra Hydra overrides, e.g. model.checkpoint=/data/64x64_diffusion.pt]

It prints the plan (paper settings, commands), checks that every input file is there (stopping with
the missing-files message, exit code 2, when one is not), then calls the CLI twice on one study:
1. ``python -m autodiff_opt +experiment=NAME ... final.enabled=false``: the evolutionary search
   (resumable: rerun the same command after an interruption);
2. ``python -m autodiff_opt +experiment=NAME ... final.enabled=true``: the search is found complete and
   the best schedule and the baselines are scored on ``final.num_samples`` fresh samples
   (50,000 for the ADM experiments, 10,000 COCO captions for Stable Diffusion).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    description: str
    overrides: dict[str, str] = field(default_factory=dict)


VARIANTS: dict[str, dict[str, Variant]] = {
    "imagenet64": {
        "default": Variant("time steps only, K=4, DDIM, 5,000 samples per candidate, 10 generations"),
        "joint": Variant("time steps and skipped layers (stage 2), 1,000 samples per candidate, 15 generations",
                         {"search.stage2.enabled": "true", "search.num_samples": "1000", "search.generations": "15"}),
    },
    "lsun_bedroom": {"default": Variant("time steps only, K=4, DDIM, 3,000 samples per candidate, 10 generations")},
    "lsun_cat": {"default": Variant("time steps only, K=4, DDIM, 3,000 samples per candidate, 10 generations")},
    "lsun_church": {"default": Variant("not in the paper: LSUN settings on google/ddpm-church-256")},
    "cifar10": {"default": Variant("not in the paper: ImageNet-64 settings on google/ddpm-cifar10-32")},
    "sd_coco": {
        "default": Variant("K=4, DDIM in place of the paper's PLMS, 2,000 samples per candidate, 10 generations"),
        "dpm10": Variant("K=10, DPM-Solver++(2M) in place of the paper's DPM-Solver, 1,000 samples per candidate",
                         {"solver.name": "dpmpp_2m", "search.num_steps": "10", "search.num_samples": "1000"}),
    },
}

PAPER_RESULTS = {
    "imagenet64": "ADM-G, DDIM, 4 steps: FID 17.86 searched vs 138.66 with DDIM's uniform steps {0, 250, 500, 750}",
    "lsun_bedroom": "see the paper's LSUN table (numbers not restated here)",
    "lsun_cat": "see the paper's LSUN table (numbers not restated here)",
    "lsun_church": "no number in the paper (not one of its settings)",
    "cifar10": "no number in the paper (not one of its settings)",
    "sd_coco": "see the paper's Stable Diffusion table (numbers not restated here)",
}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Anything after -- is passed to both CLI calls as Hydra overrides.")
    p.add_argument("--experiment", required=True, choices=sorted(VARIANTS))
    p.add_argument("--variant", default="default", help="default | joint (imagenet64) | dpm10 (sd_coco)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///paper-EXPERIMENT.db)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/paper"), help="where the two runs write reports")
    p.add_argument("--dry-run", action="store_true", help="print the plan and check files, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.variant not in VARIANTS[args.experiment]:
        p.error(f"--variant {args.variant} does not exist for {args.experiment}: use one of {sorted(VARIANTS[args.experiment])}")
    return args, extra


def overrides_for(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The experiment's variant overrides, then the user's (which win); one value per key."""
    storage = args.storage or f"sqlite:///paper-{args.experiment}-{args.variant}.db"
    merged = {"storage.url": storage, **VARIANTS[args.experiment][args.variant].overrides}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} is not KEY=VALUE")
        merged.pop(key.lstrip("+"), None)
        merged[key] = value
    return [f"+experiment={args.experiment}", *(f"{k}={v}" for k, v in merged.items())]


def compose_config(overrides: list[str]):  # type: ignore[no-untyped-def]
    from hydra import compose, initialize_config_dir

    from autodiff_opt.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def commands(args: argparse.Namespace, overrides: list[str]) -> list[list[str]]:
    run_dir = args.output_dir / f"{args.experiment}-{args.variant}"
    base = [sys.executable, "-m", "autodiff_opt", *overrides]
    return [
        [*base, "final.enabled=false", f"hydra.run.dir={run_dir / 'search'}"],
        [*base, "final.enabled=true", f"hydra.run.dir={run_dir / 'final'}"],
    ]


def describe(args: argparse.Namespace, cfg, cmds: list[list[str]]) -> str:  # type: ignore[no-untyped-def]
    s = cfg.search
    lines = [
        f"experiment {args.experiment}, variant {args.variant}: {VARIANTS[args.experiment][args.variant].description}",
        f"  model {cfg.model.name} ({cfg.model.checkpoint or cfg.model.pretrained}), solver {cfg.solver.name},"
        f" K={s.num_steps}, {s.num_samples} samples per candidate, population {s.population},"
        f" {s.generations} generations, stage 2 {'on' if s.stage2.enabled else 'off'}",
        f"  final evaluation: {cfg.final.num_samples} fresh samples, FID ({cfg.metric.feature_extractor}) against"
        f" {cfg.dataset.reference}",
        f"  paper: {PAPER_RESULTS[args.experiment]}",
        "  1. search:  python " + shlex.join(cmds[0][1:]),
        "  2. final:   python " + shlex.join(cmds[1][1:]),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from autodiff_opt.config import to_config
    from autodiff_opt.models.factory import missing_files

    overrides = overrides_for(args, extra)
    cfg = compose_config([f"output_dir={args.output_dir}", *overrides])  # no Hydra run to resolve it from
    cmds = commands(args, overrides)
    print(describe(args, cfg, cmds), flush=True)
    missing = missing_files(to_config(cfg))
    if missing:
        print("error: input files are missing, nothing was started:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    for step, cmd in zip(("search", "final evaluation"), cmds):
        print(f"running the {step} ...", flush=True)
        code = subprocess.call(cmd)
        if code != 0:
            print(f"error: the {step} exited with code {code}; rerun this script to resume the study", file=sys.stderr)
            return code
    print(f"done: reports in {args.output_dir / f'{args.experiment}-{args.variant}'}/final", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
