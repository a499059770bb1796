#!/usr/bin/env python
"""Does stage 2 pay? Stage 1 alone, the two-stage search, diffusers' caches and uniform schedules at equal FLOPs.

For each model and each budget of B full network evaluations (FLOPs counted by the cost model, in
full-step units), on the same fresh sample sets:

- ``uniform``: DDIM on the uniform schedule of B steps (the paper's baseline);
- ``stage1``: the default sampler's best B-step schedule (one search per seed);
- ``two-stage U/p/e``: the default sampler with stage 2 (``search.stage2.enabled=true``), skipped units U
  (``blocks`` or ``sub_blocks``), at most a fraction p of them per step (``max_prun``), K allowed to grow by e
  steps (``max_extra_steps``), its cost capped at B full steps (``budget_flops=B``);
- ``cache:NAME``: each diffusers cache (arch/caches.py) on a stage-1 searched schedule of K' > B steps. A
  cache's cost depends on its inputs, so it is counted (arch.flops.count_step_flops over one sample's
  trajectory), not assumed: of the stage-1 searched schedules of K' >= B steps (the budgets and ``--cache-ks``),
  the cache runs on the one of most steps, at the mildest of its settings (``CACHE_LEVELS``), whose counted
  cost is within B full steps.

Searches run as ``python -m autodiff_opt`` runs them (``runner.run`` in this process, one SQLite study each,
final stage off); every
candidate is then re-scored here on ``--repeats`` fresh sample sets of ``--final-samples`` images. Each row
gives the FID mean over seeds x sets, the spread (std of the per-seed means; over sets for a single seed),
and the mean cost in full steps.

    python experiments/bench_stage2.py [--models digits-dit,digits-deep] [--budgets 4,6,10] [--seeds 0,1]
        [--variants blocks:0.1:1,blocks:0.25:2] [--caches first_block,taylorseer,pab,faster,mag] [--smoke]

Writes <out>/runs.json, <out>/table.md and <out>/fid_vs_flops.html and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_stage2")

EXPERIMENTS = {"digits-dit": "digits_dit", "digits-deep": "digits_deep"}
CACHES = ("first_block", "taylorseer", "pab", "faster", "mag")
# Each cache's settings from diffusers' defaults (arch/caches.py) to more aggressive ones: the bench runs a cache
# with the first of these that fits the budget on the longest schedule (never chosen by FID).
CACHE_LEVELS: dict[str, list[dict[str, Any]]] = {
    "first_block": [{}, {"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.4}, {"threshold": 0.8}],
    "taylorseer": [{}, {"cache_interval": 3}, {"cache_interval": 4}],
    "pab": [{}, {"spatial_attention_block_skip_range": 4, "spatial_attention_timestep_skip_range": (0, 1000)}],
    "faster": [{}, {"spatial_attention_block_skip_range": 4, "spatial_attention_timestep_skip_range": (-1, 1000)}],
    "mag": [{}, {"threshold": 0.12}, {"threshold": 0.24, "max_skip_steps": 3}, {"threshold": 0.5, "max_skip_steps": 4}],
}


@dataclass(frozen=True)
class Variant:
    """One stage-2 setting: skipped units, max fraction skipped per step, extra steps the budget may buy."""

    units: str
    max_prun: float
    extra_steps: int

    @classmethod
    def parse(cls, text: str) -> "Variant":
        units, prun, extra = text.split(":")
        return cls(units, float(prun), int(extra))

    @property
    def label(self) -> str:
        return f"two-stage {self.units}/{self.max_prun:g}/+{self.extra_steps}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-dit,digits-deep")
    p.add_argument("--budgets", default="4,6", help="full-step FLOPs budgets B")
    p.add_argument("--seeds", default="0,1", help="search seeds (search.seed) of every search")
    p.add_argument("--variants", default="blocks:0.1:1,blocks:0.25:2",
                   help="stage-2 settings units:max_prun:max_extra_steps (sub_blocks applies to transformers only)")
    p.add_argument("--caches", default=",".join(CACHES), help="diffusers caches, transformers only ('' for none)")
    p.add_argument("--cache-ks", default="8", help="extra stage-1 K' searched for the caches to run on")
    p.add_argument("--search-budget", type=float, default=60.0,
                   help="candidate-equivalents of every search, stage 1 alone and two-stage alike")
    p.add_argument("--num-samples", type=int, default=500, help="search samples per candidate")
    p.add_argument("--final-samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="fresh sample sets")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_stage2"))
    p.add_argument("--smoke", action="store_true", help="a tiny run of every part (CI)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    if args.smoke:
        args.budgets, args.seeds, args.variants, args.cache_ks = "2", "0", "blocks:0.25:1", "3"
        args.caches = "first_block,taylorseer"
        args.search_budget, args.num_samples = 6.0, 32
        args.final_samples, args.repeats = 32, 2
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------- searches (real CLI runs)

def common_overrides(args: argparse.Namespace, model: str) -> list[str]:
    return [f"+experiment={EXPERIMENTS.get(model, model)}", f"search.num_samples={args.num_samples}",
            "search.peers=[]", "search.baselines=[ddim_uniform,trailing,logsnr]", "search.stop=budget", "progress=false",
            f"cache_dir={args.out / 'cache'}", *args.overrides]


def search(args: argparse.Namespace, model: str, name: str, overrides: list[str]) -> dict[str, Any]:
    """One search, run as ``python -m autodiff_opt`` runs it (in this process: imports once), resumed when its
    study exists: the best genome and what the search took."""
    import optuna

    from autodiff_opt.cli import compose_config
    from autodiff_opt.runner import run
    from autodiff_opt.search.final import best_genome

    url = f"sqlite:///{(args.out / 'studies.db').resolve()}"
    study_name = f"{model}-{name}"
    run_dir = args.out / "runs" / study_name
    cfg = compose_config([*common_overrides(args, model), *overrides, "final.enabled=false", "report.artifact_dir=null",
                          "report.dashboard=false", "report.grid_size=0", f"storage.url={url}",
                          f"storage.study_name={study_name}", f"output_dir={run_dir}"])
    t0 = time.perf_counter()
    log.info("search %s: %s", study_name, " ".join(overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    run(cfg)
    study = optuna.load_study(study_name=study_name, storage=url)
    genome = best_genome(study)
    return {"study": study_name, "genome": genome.to_json(), "seconds": round(time.perf_counter() - t0, 1),
            "trials": len(study.trials)}


def run_searches(args: argparse.Namespace, model: str, transformer: bool) -> dict[str, Any]:
    """stage1 at every K in budgets + cache_ks, two-stage at every budget and variant, for every seed."""
    budgets, seeds = _ints(args.budgets), _ints(args.seeds)
    ks = sorted(set(budgets) | (set(_ints(args.cache_ks)) if transformer and args.caches else set()))
    out: dict[str, Any] = {}
    for seed in seeds:
        for k in ks:
            out[f"stage1-k{k}-s{seed}"] = search(args, model, f"stage1-k{k}-s{seed}", [
                f"search.num_steps={k}", f"search.seed={seed}", f"search.budget={args.search_budget}"])
        for b in budgets:
            for v in map(Variant.parse, args.variants.split(",")):
                if v.units == "sub_blocks" and not transformer:
                    continue
                key = f"stage2-{v.units}-p{v.max_prun:g}-e{v.extra_steps}-b{b}-s{seed}"
                out[key] = search(args, model, key, [
                    f"search.num_steps={b}", f"search.seed={seed}", f"search.budget={args.search_budget}",
                    "search.stage2.enabled=true", f"search.stage2.budget_flops={b}",
                    f"search.stage2.max_prun={v.max_prun}", f"search.stage2.max_extra_steps={v.extra_steps}",
                    f"search.stage2.units={v.units}"])
    return out


# ---------------------------------------------------------------- fresh-seed scoring (in process)

def scoring_experiment(args: argparse.Namespace, model: str, units: str) -> Any:
    """One Experiment with stage 2's cost model (layer FLOPs) for scoring every row of this model."""
    from autodiff_opt.cli import compose_config
    from autodiff_opt.runner import build_experiment

    cfg = compose_config([*common_overrides(args, model), "search.stage2.enabled=true", f"search.stage2.units={units}",
                          f"output_dir={args.out}"])
    return build_experiment(cfg)


def fresh_sets(exp: Any, args: argparse.Namespace) -> list[Any]:
    from autodiff_opt.generate import SampleSet

    seed = int(exp.cfg.final.seed)
    return [SampleSet.draw(args.final_samples, exp.model.sample_shape, exp.model.num_classes, seed + 7919 * r)
            for r in range(args.repeats)]


def cost_of(exp: Any, genome: Any) -> float:
    """Full-step FLOPs of a (possibly masked) schedule under this experiment's layer costs."""
    return exp.layer_costs.genome_flops(genome) / exp.layer_costs.full_step


def score(exp: Any, genome: Any, sets: list[Any], name: str) -> list[float]:
    from autodiff_opt.search.final import _fresh_fids

    return _fresh_fids(exp.final_inputs(), genome, sets, name)[0]


def score_rows(args: argparse.Namespace, model: str, searches: dict[str, Any], transformer: bool) -> list[dict[str, Any]]:
    from autodiff_opt.core.genome import Genome
    from autodiff_opt.runner import heuristic_steps

    rows: list[dict[str, Any]] = []
    budgets, seeds = _ints(args.budgets), _ints(args.seeds)
    variants = [v for v in map(Variant.parse, args.variants.split(",")) if transformer or v.units != "sub_blocks"]
    for units in sorted({v.units for v in variants} | {"blocks"}):
        exp = scoring_experiment(args, model, units)
        sets = fresh_sets(exp, args)

        def add(method: str, b: int, seed: int | None, genome: Genome, cost: float, fids: list[float], **extra: Any) -> None:
            rows.append({"model": model, "budget": b, "method": method, "seed": seed, "timesteps": list(genome.timesteps),
                         "skipped": sum(len(m) for m in genome.skips), "cost": round(cost, 3), "fids": fids, **extra})
            log.info("%s B=%d %s seed %s: cost %.2f, FID %s", model, b, method, seed, cost, [round(f, 3) for f in fids])

        for b in budgets:
            for seed in seeds:
                for v in (v for v in variants if v.units == units):
                    g = Genome.from_json(searches[f"stage2-{v.units}-p{v.max_prun:g}-e{v.extra_steps}-b{b}-s{seed}"]["genome"])
                    add(v.label, b, seed, g, cost_of(exp, g), score(exp, g, sets, v.label))
            if units != "blocks":
                continue
            uniform = Genome.from_steps(heuristic_steps("ddim_uniform", b, exp.model.num_train_timesteps,
                                                        exp.model.alphas_cumprod))
            add("uniform", b, None, uniform, float(b), score(exp, uniform, sets, "uniform"))
            for seed in seeds:
                g = Genome.from_json(searches[f"stage1-k{b}-s{seed}"]["genome"])
                add("stage1", b, seed, g, cost_of(exp, g), score(exp, g, sets, "stage1"))
                if transformer:
                    add_cache_rows(args, exp, sets, searches, b, seed, add)
    return rows


def add_cache_rows(args: argparse.Namespace, exp: Any, sets: list[Any], searches: dict[str, Any], b: int, seed: int,
                   add: Any) -> None:
    """Each cache on the searched schedule of most steps (any searched K' >= B) at the mildest of its settings
    whose counted cost fits B full steps; costs are counted on one sample, the FID only for the pick."""
    from autodiff_opt.core.genome import Genome
    from autodiff_opt.search.final import score_cache

    ks = sorted({k for k in (*_ints(args.budgets), *_ints(args.cache_ks)) if k >= b}, reverse=True)
    for name in [c for c in args.caches.split(",") if c]:
        tried: dict[str, float] = {}
        pick = None
        for k in ks:
            g = Genome.from_json(searches[f"stage1-k{k}-s{seed}"]["genome"])
            for level, settings in enumerate(CACHE_LEVELS[name]):
                try:
                    cost = score_cache(exp.final_inputs(), name, g, sets, with_fid=False, settings=settings)[0]
                except Exception as err:  # a cache whose hooks do not fit this model: logged, not fatal
                    log.warning("cache %s %s failed: %s: %s", name, settings, type(err).__name__, err)
                    continue
                tried[f"k{k}/level{level}"] = round(cost, 3)
                if cost <= b * 1.0001:
                    pick = (k, level, settings, g)
                    break
            if pick is not None:
                break
        if pick is None:
            log.warning("cache %s: nothing of %s steps fits %d full steps (%s)", name, ks, b, tried)
            continue
        k, level, settings, g = pick
        cost, fids, _ = score_cache(exp.final_inputs(), name, g, sets, settings=settings)
        add(f"cache:{name}", b, seed, g, cost, fids, base_k=k, settings=str(settings), costs_tried=tried)


# ---------------------------------------------------------------- tables and figure

def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["budget"], r["method"]), []).append(r)
    out = []
    for (model, b, method), rs in groups.items():
        per_seed = [statistics.fmean(r["fids"]) for r in rs]
        all_fids = [f for r in rs for f in r["fids"]]
        spread = statistics.stdev(per_seed) if len(per_seed) > 1 else (statistics.stdev(all_fids) if len(all_fids) > 1 else 0.0)
        out.append({"model": model, "budget": b, "method": method, "fid": statistics.fmean(all_fids), "spread": spread,
                    "cost": statistics.fmean(r["cost"] for r in rs), "seeds": len(rs),
                    "skipped": statistics.fmean(r["skipped"] for r in rs),
                    "steps": statistics.fmean(len(r["timesteps"]) for r in rs)})
    for s in out:
        ref = next((o["fid"] for o in out if (o["model"], o["budget"], o["method"]) == (s["model"], s["budget"], "stage1")), None)
        s["ratio_to_stage1"] = s["fid"] / ref if ref else float("nan")
    return sorted(out, key=lambda s: (s["model"], s["budget"], s["fid"]))


def table_md(summary: list[dict[str, Any]]) -> str:
    lines = ["| model | budget (full steps) | method | steps | skipped units | cost (full steps) | fresh FID (mean) | spread | vs stage 1 | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['budget']} | {s['method']} | {s['steps']:.1f} | {s['skipped']:.1f} | {s['cost']:.2f}"
                     f" | {s['fid']:.3f} | {s['spread']:.3f} | {s['ratio_to_stage1']:.2f} | {s['seeds']} |")
    return "\n".join(lines)


def figure(summary: list[dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    models = sorted({s["model"] for s in summary})
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models)
    colors: dict[str, str] = {}
    for col, model in enumerate(models, start=1):
        for method in sorted({s["method"] for s in summary if s["model"] == model}):
            pts = sorted((s for s in summary if s["model"] == model and s["method"] == method), key=lambda s: s["cost"])
            first = method not in colors
            color = colors.setdefault(method, f"hsl({(len(colors) * 47) % 360},65%,45%)")
            fig.add_trace(go.Scatter(x=[s["cost"] for s in pts], y=[s["fid"] for s in pts], name=method,
                                     legendgroup=method, showlegend=first, mode="lines+markers",
                                     line={"color": color},
                                     error_y={"type": "data", "array": [s["spread"] for s in pts], "visible": True}),
                          row=1, col=col)
        fig.update_xaxes(title_text="cost (full-step FLOPs)", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_yaxes(title_text="fresh-seed FID (digits-cnn, log)", row=1, col=1)
    fig.update_layout(title="Stage 1, two-stage search, diffusers caches and uniform DDIM at equal FLOPs",
                      width=520 * len(models), height=480)
    fig.write_html(path, include_plotlyjs=True)  # self-contained: opens offline


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    from autodiff_opt.models.sources import resolve_pretrained
    from autodiff_opt.models.pipelines import pipeline_kind

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    searches: dict[str, Any] = {}
    for model in [m for m in args.models.split(",") if m]:
        transformer = pipeline_kind(resolve_pretrained(f"builtin:{model}")) is not None
        searches[model] = run_searches(args, model, transformer)
        rows += score_rows(args, model, searches[model], transformer)
        (args.out / "runs.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "searches": searches, "rows": rows}, indent=1))
    summary = summarise(rows)
    text = table_md(summary)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "runs.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "searches": searches, "rows": rows, "summary": summary}, indent=1))
    figure(summary, args.out / "fid_vs_flops.html")
    print(text)
    print(f"\n{len(rows)} scored rows in {time.perf_counter() - t0:.0f}s; {args.out}/table.md, runs.json, fid_vs_flops.html")
    return summary


if __name__ == "__main__":
    main()
