"""Low-NFE solvers on one model: fresh-seed FID at several NFE for every solver with its best heuristic
schedule, every solver with a searched schedule, and the joint (solver, steps) search.

For each NFE budget, every (heuristic, solver) pair (K = the steps that fit the NFE; Heun gets
(NFE + 1) // 2) is scored once on the search samples, with its FID on the pruning prefixes; the best
heuristic per solver (by search FID) is kept. Those scored pairs then warm-start the searches as
completed trials, their cost counted in the search's budget (nothing is scored twice, nothing is free):

- single-solver search of s (``search.solvers=[s]``, the default sampler): s's 5 heuristics + search,
  ``--budget`` candidate-equivalents in all (one candidate-equivalent = NFE x search samples image-steps);
- joint search (``search.solvers=[all]``): all 5 x len(solvers) pairs + search, ``--joint-budget`` in all.

Searched rows are repeated for every sampler seed of ``--seeds``; every kept schedule is re-scored on
fresh seeds (``--repeats`` x ``--final-samples``), and the table gives each method's compute.

    OMP_NUM_THREADS=1 python experiments/bench_solvers.py [--nfe 4,6,10] [--budget 40] [--joint-budget 100]
        [--seeds 0,1] [--solvers ddim,dpmpp_2m,...] [--repeats 2] [--final-samples 2000] [--ddim-reference 10]
        [--parts single,joint] [--merge a.json,b.json] [-- OVERRIDES...]

Prints one markdown table and writes it, with the schedules, to <out>/table.md and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOLVER_NAMES = ["ddim", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc", "euler", "heun"]
log = logging.getLogger("bench_solvers")


@dataclass
class Scored:
    """One (heuristic, solver) pair scored on the search samples, as a search's warm start reads it."""

    name: str
    genome: Any
    fid: float
    prefixes: dict[int, float]  # FID on the pruning prefixes (samples -> FID)
    image_steps: int


def _experiment(overrides: list[str], out: Path) -> Any:
    from autodiff_opt.cli import compose_config
    from autodiff_opt.runner import build_experiment

    return build_experiment(compose_config([*overrides, f"output_dir={out}", "progress=false", "search.peers=[]"]))


def _set_space(exp: Any, nfe: int, solvers: list[str]) -> None:
    """Point the experiment at an NFE budget and a solver list (the baselines follow)."""
    from omegaconf import OmegaConf

    from autodiff_opt import runner
    from autodiff_opt.search.sampler_choice import resolve
    from autodiff_opt.search.space import SearchSpace
    from autodiff_opt.config import as_tree, to_config

    cfg = as_tree(exp.cfg)  # a DictConfig copy of the typed config, to update
    OmegaConf.update(cfg, "search.num_steps", nfe)
    OmegaConf.update(cfg, "search.solvers", solvers)
    exp.cfg, exp.setup = to_config(cfg), resolve(cfg.search)
    exp.space = SearchSpace(nfe, exp.model.num_train_timesteps, solvers=tuple(solvers))
    exp.baselines = runner.baseline_genomes(exp.cfg.search, exp.model.alphas_cumprod, exp.model.num_train_timesteps)
    exp.peers = {}


def _unit(exp: Any, nfe: int) -> int:
    """Image-steps of one candidate-equivalent: every search sample at the full NFE budget."""
    return len(exp.samples) * nfe


def _score_pairs(exp: Any, nfe: int, solvers: list[str]) -> dict[str, list[Scored]]:
    """Every (heuristic, solver) pair on the search samples, with the prefix FIDs the pruner compares."""
    from autodiff_opt.search.fidelity import rung_sizes
    from autodiff_opt.search.objective import evaluate_on_rungs

    _set_space(exp, nfe, solvers)
    rungs = rung_sizes(len(exp.samples), exp.setup.rung_fractions)
    out: dict[str, list[Scored]] = {s: [] for s in solvers}
    for name, genome in exp.baselines.items():
        prefixes: dict[int, float] = {}

        def record(fid: float, n: int) -> bool:
            prefixes[n] = fid
            return False  # never stop: a heuristic is scored in full

        try:
            result = evaluate_on_rungs(exp.generator, exp.scorer, exp.reference, exp.samples, genome, rungs, record)
        except Exception as err:  # a heuristic that diverges for this solver is skipped, and said so
            log.warning("%s: %s", name, err)
            continue
        steps = int(result["num_samples"]) * exp.generator.nfe(genome)
        out[genome.solver].append(Scored(name.split("@")[0], genome, float(result["fid"]), prefixes, steps))
    return out


def _warm_start(study: Any, exp: Any, seeds: list[Scored]) -> None:
    """The scored pairs as completed trials of this study (genome, prefix FIDs, cost), as if run in it."""
    import optuna

    from autodiff_opt.core.keys import BASELINE_ATTR, GENOME_ATTR, IMAGE_STEPS_ATTR
    from autodiff_opt.search.space import SOLVER_PARAM, genome_params

    T = exp.space.num_train_timesteps
    for s in seeds:
        genome = s.genome
        params = genome_params(genome, exp.space)
        dists = {k: (optuna.distributions.CategoricalDistribution(list(exp.space.solvers)) if k == SOLVER_PARAM
                     else optuna.distributions.IntDistribution(0, T - 1)) for k in params}
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=s.fid, params=params, distributions=dists,
            intermediate_values=dict(s.prefixes), system_attrs={GENOME_ATTR: genome.key()},
            user_attrs={BASELINE_ATTR: f"{s.name}@{genome.solver}", IMAGE_STEPS_ATTR: s.image_steps}))


def _search(exp: Any, nfe: int, solvers: list[str], seeds: list[Scored], budget: float,
            seed: int) -> dict[str, Any]:
    """A search warm-started with the scored pairs, until it has spent ``budget`` candidate-equivalents in all
    (the pairs' cost included); its best genome, search FID, trials and spent candidate-equivalents."""
    import optuna

    from autodiff_opt import runner
    from autodiff_opt.search.fidelity import ImageStepBudget, make_pruner
    from autodiff_opt.search.evolution import genome_of
    from autodiff_opt.search.space import best_fid_trial

    _set_space(exp, nfe, solvers)
    study = optuna.create_study(sampler=runner.make_sampler(exp, seed=seed),
                                pruner=make_pruner(exp.setup.prune, exp.setup.evolution.num_parents))
    _warm_start(study, exp, seeds)
    unit = _unit(exp, nfe)
    stop = ImageStepBudget(int(budget * unit), unit)
    failures = [0]

    def check(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failures[0] = failures[0] + 1 if trial.state == optuna.trial.TrialState.FAIL else 0
        if failures[0] >= 10:
            raise RuntimeError(f"10 candidates failed in a row: {trial.user_attrs.get('fail_reason')}")
        if stop.should_stop(study):
            study.stop()

    if not stop.should_stop(study):
        study.optimize(runner.make_objective(exp), callbacks=[check], catch=(Exception,), gc_after_trial=False)
    best = best_fid_trial(study)
    searched = [t for t in study.trials if "baseline" not in t.user_attrs]
    return {"genome": genome_of(best), "fid_search": float(best.values[0]), "trials": len(searched),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in searched),
            "cost": stop.spent(study), "seed_cost": sum(s.image_steps for s in seeds) / unit,
            "from_seed": "baseline" in best.user_attrs}


def _fresh(exp: Any, genome: Any, repeats: int, num_samples: int, seed: int) -> float:
    from autodiff_opt.generate import SampleSet
    from autodiff_opt.search.objective import evaluate

    sets = [SampleSet.draw(num_samples, exp.model.sample_shape, exp.model.num_classes, seed + 7919 * r)
            for r in range(repeats)]
    return statistics.mean(evaluate(exp.generator, exp.scorer, exp.reference, s, genome)["fid"] for s in sets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", default="4,6,10")
    parser.add_argument("--solvers", default=",".join(SOLVER_NAMES))
    parser.add_argument("--budget", type=float, default=40.0,
                        help="candidate-equivalents per single-solver search, its 5 heuristics included")
    parser.add_argument("--joint-budget", type=float, default=100.0,
                        help="candidate-equivalents of the joint search, its 5 x len(solvers) heuristic pairs included")
    parser.add_argument("--seeds", default="0,1", help="the samplers' seeds: searched rows are repeated per seed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--final-samples", type=int, default=2000)
    parser.add_argument("--fresh-seed", type=int, default=1_000_003)
    parser.add_argument("--ddim-reference", type=int, default=10,
                        help="also score DDIM's best heuristic at this NFE (the NFE-6 target's yardstick); 0: no")
    parser.add_argument("--parts", default="single,joint", help="single (per-solver rows), joint, or both; oracle: only every (heuristic, solver) pair on the fresh seeds")
    parser.add_argument("--merge", default=None, help="comma-separated results.json of part runs: print their table")
    parser.add_argument("--out", default="outputs/bench_solvers")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment (after --)")
    args = parser.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge.split(",")]
        results, keys = [], set()
        for r in (r for run in runs for r in run["results"]):  # a row two parts both ran is kept once (the first)
            key = (r["nfe"], r["solver"] if r["kind"] != "joint" else "", r["kind"], r.get("seed"), r["schedule"]
                   if r["kind"] == "pair" else "")
            if key not in keys:
                keys.add(key)
                results.append(r)
        nfes = sorted({r["nfe"] for r in results})
        solvers = list(dict.fromkeys(r["solver"] for r in results if r["kind"] == "heuristic"))
        solvers = [s for s in SOLVER_NAMES if s in solvers] + [s for s in solvers if s not in SOLVER_NAMES]
        seconds = [run["seconds"] for run in runs]
        text = _report(results, nfes, solvers, seconds, runs[0]["args"])
        if args.out != parser.get_default("out"):
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "table.md").write_text(text + "\n")
            (Path(args.out) / "results.json").write_text(json.dumps(
                {"args": runs[0]["args"], "seconds": sum(seconds), "parts": args.merge.split(","),
                 "results": results}, indent=1))
        print(text)  # noqa: T201 - a benchmark's report
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nfes, solvers = [int(n) for n in args.nfe.split(",")], args.solvers.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    exp = _experiment(args.overrides, out)
    fresh = lambda g: _fresh(exp, g, args.repeats, args.final_samples, args.fresh_seed)  # noqa: E731
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    parts = args.parts.split(",")

    def save() -> None:
        (out / "results.json").write_text(json.dumps({"args": vars(args), "seconds": time.perf_counter() - t_start,
                                                      "search_samples": len(exp.samples), "results": results},
                                                     indent=1))

    def row(nfe: int, solver: str, kind: str, schedule: str, genome: Any, fid_search: float, **extra: Any) -> None:
        results.append({"nfe": nfe, "solver": solver, "kind": kind, "schedule": schedule,
                        "timesteps": list(genome.timesteps), "nfe_used": exp.generator.nfe(genome),
                        "fid_search": fid_search, "fid": fresh(genome), **extra})
        save()

    for nfe in nfes:
        t0 = time.perf_counter()
        pairs = _score_pairs(exp, nfe, solvers)
        log.info("NFE %d: %d pairs scored (%.0fs)", nfe, sum(map(len, pairs.values())), time.perf_counter() - t0)
        unit = _unit(exp, nfe)
        if "oracle" in parts:  # every pair on the fresh seeds: the best pair picked by its fresh FID itself
            for solver in solvers:
                for s in pairs[solver]:
                    row(nfe, solver, "pair", s.name, s.genome, s.fid, cost=s.image_steps / unit, trials=1)
            continue
        for solver in solvers if "single" in parts else []:  # a joint-only part leaves them to the single part
            best = min(pairs[solver], key=lambda s: s.fid)
            row(nfe, solver, "heuristic", best.name, best.genome, best.fid,
                cost=sum(s.image_steps for s in pairs[solver]) / unit, trials=len(pairs[solver]))
        for solver in solvers if "single" in parts else []:
            for seed in seeds:
                t0 = time.perf_counter()
                r = _search(exp, nfe, [solver], pairs[solver], args.budget, seed)
                row(nfe, solver, "searched", f"searched (seed {seed})", r["genome"], r["fid_search"], seed=seed,
                    trials=r["trials"], pruned=r["pruned"], cost=r["cost"], seed_cost=r["seed_cost"],
                    from_seed=r["from_seed"])
                log.info("NFE %d %s seed %d: searched %.3f fresh (%d trials, %.1f cand.-eq.; %.0fs)", nfe, solver,
                         seed, results[-1]["fid"], r["trials"], r["cost"], time.perf_counter() - t0)
        if "joint" not in parts:
            continue
        everything = [s for solver in solvers for s in pairs[solver]]
        for seed in seeds:
            t0 = time.perf_counter()
            r = _search(exp, nfe, solvers, everything, args.joint_budget, seed)
            row(nfe, r["genome"].solver, "joint", f"joint (seed {seed})", r["genome"], r["fid_search"], seed=seed,
                trials=r["trials"], pruned=r["pruned"], cost=r["cost"], seed_cost=r["seed_cost"],
                from_seed=r["from_seed"])
            log.info("NFE %d joint seed %d: %s %s %.3f fresh (%d trials, %.1f cand.-eq.; %.0fs)", nfe, seed,
                     r["genome"].solver, list(r["genome"].timesteps), results[-1]["fid"], r["trials"], r["cost"],
                     time.perf_counter() - t0)
    if args.ddim_reference and args.ddim_reference not in nfes:
        pairs = _score_pairs(exp, args.ddim_reference, ["ddim"])
        best = min(pairs["ddim"], key=lambda s: s.fid)
        row(args.ddim_reference, "ddim", "heuristic", best.name, best.genome, best.fid,
            cost=sum(s.image_steps for s in pairs["ddim"]) / _unit(exp, args.ddim_reference), trials=len(pairs["ddim"]))
        nfes = [*nfes, args.ddim_reference]
    save()
    text = _report(results, nfes, solvers, [time.perf_counter() - t_start], vars(args))
    (out / "table.md").write_text(text + "\n")
    print(text)  # noqa: T201 - a benchmark's report
    return 0


def _mean_spread(values: list[float]) -> str:
    """'mean' for one value, 'mean ± half-range' for several (the spread over sampler seeds)."""
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def _rows(results: list[dict[str, Any]], nfe: int, solver: str | None, kind: str) -> list[dict[str, Any]]:
    return [r for r in results if r["nfe"] == nfe and r["kind"] == kind and (solver is None or r["solver"] == solver)]


def _cell(rows: list[dict[str, Any]], show_solver: bool = False) -> str:
    """fresh FID (mean ± half-range over seeds) (heuristic, or the joint search's solvers) [compute]."""
    if not rows:
        return ""
    fid = _mean_spread([r["fid"] for r in rows])
    cost = statistics.mean(r["cost"] for r in rows)
    if rows[0]["kind"] == "heuristic":
        return f"{fid} ({rows[0]['schedule']}) [{cost:.0f}]"
    kept = "*" if any(r["from_seed"] for r in rows) else ""
    solvers = f" ({', '.join(r['solver'] for r in rows)})" if show_solver else ""
    return f"{fid}{kept}{solvers} [{cost:.0f}]"


def _schedules(results: list[dict[str, Any]]) -> str:
    """The joint search's schedules (every searched schedule is in results.json)."""
    return "\n".join(f"- NFE {r['nfe']}, {r['schedule']}: {r['solver']} {r['timesteps']} (NFE {r['nfe_used']},"
                     f" search FID {r['fid_search']:.3f}, {r['trials']} trials past the seeds, {r['pruned']} pruned)"
                     for r in results if r["kind"] == "joint")


def _table(results: list[dict[str, Any]], nfes: list[int], solvers: list[str]) -> str:
    lines = ["| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for solver in solvers:
        for kind in ("heuristic", "searched"):
            lines.append(f"| {solver} | {'best heuristic' if kind == 'heuristic' else 'searched'} | "
                         + " | ".join(_cell(_rows(results, n, solver, kind)) for n in nfes) + " |")
    def oracle(nfe: int) -> str:
        rows = _rows(results, nfe, None, "pair")
        if not rows:
            return ""
        best = min(rows, key=lambda r: r["fid"])
        return f"{best['fid']:.3f} ({best['solver']}, {best['schedule']}) [{sum(r['cost'] for r in rows):.0f}]"

    if any(r["kind"] == "pair" for r in results):
        lines.append("| oracle | best pair by fresh FID | " + " | ".join(oracle(n) for n in nfes) + " |")
    lines.append("| **joint search** | solver + steps | " + " | ".join(
        _cell(_rows(results, n, None, "joint"), show_solver=True) for n in nfes) + " |")
    return "\n".join(lines)


def _verdict(values: list[float], limit: float) -> str:
    if max(values) <= limit:
        return "met" + (" (every seed)" if len(values) > 1 else "")
    return "met on the mean only" if statistics.mean(values) <= limit else "not met"


def _targets(results: list[dict[str, Any]]) -> str:
    """The issue's targets: joint at NFE 4 <= 0.8x the best (solver, heuristic); at NFE 6 <= 10-step DDIM.

    Each against two yardsticks where both were run: the heuristic rows (each solver's heuristic picked by
    search FID, then fresh-scored) and the oracle (every pair fresh-scored, the lowest fresh FID: stricter).
    """
    out = []
    joint = {n: [r["fid"] for r in _rows(results, n, None, "joint")] for n in (4, 6)}
    yard4 = [("best (solver, heuristic) pair", [r for r in _rows(results, 4, None, "heuristic")]),
             ("best pair by fresh FID (oracle)", [r for r in _rows(results, 4, None, "pair")])]
    for label, rows in yard4:
        if joint[4] and rows:
            best = min(rows, key=lambda r: r["fid"])
            ratios = [j / best["fid"] for j in joint[4]]
            out.append(f"NFE 4: joint {_mean_spread(joint[4])} = {statistics.mean(ratios):.2f}x the {label}"
                       f" {best['fid']:.3f} ({best['solver']}, {best['schedule']}; per seed"
                       f" {', '.join(f'{x:.2f}x' for x in ratios)}): target <= 0.8x {_verdict(ratios, 0.8)}.")
    yard6 = [("10-step DDIM (best heuristic by search FID)", _rows(results, 10, "ddim", "heuristic")),
             ("10-step DDIM (best heuristic by fresh FID, oracle)", _rows(results, 10, "ddim", "pair"))]
    for label, rows in yard6:
        if joint[6] and rows:
            best = min(rows, key=lambda r: r["fid"])
            out.append(f"NFE 6: joint {_mean_spread(joint[6])} (per seed {', '.join(f'{x:.3f}' for x in joint[6])})"
                       f" vs {label} {best['fid']:.3f} ({best['schedule']}): target <= {_verdict(joint[6], best['fid'])}.")
    return "\n".join(out)


def _report(results: list[dict[str, Any]], nfes: list[int], solvers: list[str], seconds: list[float],
            args: dict[str, Any]) -> str:
    return (f"{_table(results, nfes, solvers)}\n\n{_targets(results)}\n\n{_schedules(results)}\n\n"
            f"Cells: fresh FID (mean of {args['repeats']} x {args['final_samples']} samples; searched rows: mean ±"
            f" half-range over sampler seeds {args['seeds']}) (heuristic) [compute: candidate-equivalents of"
            f" NFE x search samples, the heuristics scored included]. * = a search kept a seeded heuristic."
            f" Budgets: {args['budget']:g} per single-solver search, {args['joint_budget']:g} for the joint search."
            f" {' + '.join(f'{s:.0f}' for s in seconds)} s of runs.")


if __name__ == "__main__":
    raise SystemExit(main())
