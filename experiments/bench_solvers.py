"""Low-NFE solvers on one model: fresh-seed FID at several NFE for every solver with its best heuristic
schedule, every solver with a searched schedule, and the joint (solver, steps) search.

For each NFE budget: every heuristic with every solver (K = the steps that fit the NFE; Heun gets
(NFE + 1) // 2) is scored on the search samples and the best one per solver kept; then the default
sampler searches the steps of each solver alone (``search.solvers=[s]``, its heuristics seeded, budget
``--budget`` candidate-equivalents of NFE x samples) and the joint search chooses the solver too
(``search.solvers=[all]``, budget ``--joint-budget``). Every kept schedule is re-scored on fresh seeds.

    OMP_NUM_THREADS=1 python experiments/bench_solvers.py [--nfe 4,6,10] [--budget 15] [--joint-budget 45]
        [--solvers ddim,dpmpp_2m,...] [--repeats 2] [--final-samples 2000] [--ddim-reference 10] [-- OVERRIDES...]

Prints one markdown table and writes it, with the schedules, to <out>/table.md and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

SOLVER_NAMES = ["ddim", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc", "euler", "heun"]
log = logging.getLogger("bench_solvers")


def _experiment(overrides: list[str], out: Path) -> Any:
    from autodiff_opt.cli import compose_config
    from autodiff_opt.runner import build_experiment

    return build_experiment(compose_config([*overrides, f"output_dir={out}", "progress=false", "search.peers=[]"]))


def _set_space(exp: Any, nfe: int, solvers: list[str]) -> None:
    """Point the experiment at an NFE budget and a solver list (the baselines follow)."""
    from omegaconf import OmegaConf

    from autodiff_opt import runner
    from autodiff_opt.search.samplers import resolve
    from autodiff_opt.search.space import SearchSpace

    cfg = exp.cfg.copy()
    OmegaConf.update(cfg, "search.num_steps", nfe)
    OmegaConf.update(cfg, "search.solvers", solvers)
    exp.cfg, exp.setup = cfg, resolve(cfg.search)
    exp.space = SearchSpace(nfe, exp.model.num_train_timesteps, solvers=tuple(solvers))
    exp.baselines = runner.baseline_genomes(cfg, exp.model.alphas_cumprod, exp.model.num_train_timesteps)
    exp.peers = {}


def _search(exp: Any, nfe: int, solvers: list[str], budget: float, seed: int) -> tuple[Any, float, int]:
    """The best genome of a search with this budget, its search FID, and the number of trials."""
    import optuna

    from autodiff_opt import runner
    from autodiff_opt.search.fidelity import ImageStepBudget, make_pruner
    from autodiff_opt.search.sampler import genome_of
    from autodiff_opt.search.space import best_fid_trial

    _set_space(exp, nfe, solvers)
    study = optuna.create_study(sampler=runner.make_sampler(exp, seed=seed),
                                pruner=make_pruner(exp.setup.prune, exp.setup.evolution.num_parents))
    runner.seed_study(study, exp)
    unit = len(exp.samples) * nfe
    stop = ImageStepBudget(int(budget * unit), unit)

    failures = [0]

    def check(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failures[0] = failures[0] + 1 if trial.state == optuna.trial.TrialState.FAIL else 0
        if failures[0] >= 10:
            raise RuntimeError(f"10 candidates failed in a row: {trial.user_attrs.get('fail_reason')}")
        if stop.should_stop(study):
            study.stop()

    study.optimize(runner.make_objective(exp), callbacks=[check], catch=(Exception,), gc_after_trial=False)
    best = best_fid_trial(study)
    return genome_of(best), float(best.values[0]), len(study.trials)


def _fresh(exp: Any, genome: Any, repeats: int, num_samples: int, seed: int) -> float:
    from autodiff_opt.generate import SampleSet
    from autodiff_opt.search.objective import evaluate

    sets = [SampleSet.draw(num_samples, exp.model.sample_shape, exp.model.num_classes, seed + 7919 * r)
            for r in range(repeats)]
    return statistics.mean(evaluate(exp.generator, exp.scorer, exp.reference, s, genome)["fid"] for s in sets)


def _best_heuristic(exp: Any, nfe: int, solver: str) -> tuple[str, Any, float]:
    """(heuristic name, genome, search FID) of the solver's best heuristic schedule at this NFE."""
    from autodiff_opt.search.objective import evaluate

    _set_space(exp, nfe, [solver])
    scored = []
    for name, genome in exp.baselines.items():
        try:
            fid = evaluate(exp.generator, exp.scorer, exp.reference, exp.samples, genome)["fid"]
        except Exception as err:  # a heuristic that diverges for this solver is skipped, and said so
            log.warning("%s: %s", name, err)
            continue
        scored.append((fid, name.split("@")[0], genome))
    fid, name, genome = min(scored, key=lambda s: s[0])
    return name, genome, fid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", default="4,6,10")
    parser.add_argument("--solvers", default=",".join(SOLVER_NAMES))
    parser.add_argument("--budget", type=float, default=15.0, help="candidate-equivalents per single-solver search")
    parser.add_argument("--joint-budget", type=float, default=45.0, help="candidate-equivalents of the joint search")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--final-samples", type=int, default=2000)
    parser.add_argument("--fresh-seed", type=int, default=1_000_003)
    parser.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    parser.add_argument("--ddim-reference", type=int, default=10,
                        help="also score DDIM's best heuristic at this NFE (the NFE-6 target's yardstick); 0: no")
    parser.add_argument("--parts", default="single,joint", help="single (per-solver rows), joint, or both")
    parser.add_argument("--merge", default=None, help="comma-separated results.json of part runs: print their table")
    parser.add_argument("--out", default="outputs/bench_solvers")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment (after --)")
    args = parser.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge.split(",")]
        results = [r for run in runs for r in run["results"]]
        nfes = sorted({r["nfe"] for r in results})
        solvers = list(dict.fromkeys(r["solver"] for r in results if r["kind"] != "joint"))
        seconds = sum(run["seconds"] for run in runs)
        print(_report(results, nfes, solvers, seconds, runs[0]["args"]))  # noqa: T201 - a benchmark's report
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
    exp = _experiment(args.overrides, out)
    fresh = lambda g: _fresh(exp, g, args.repeats, args.final_samples, args.fresh_seed)  # noqa: E731
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    parts = args.parts.split(",")

    def save() -> None:
        (out / "results.json").write_text(json.dumps({"args": vars(args), "seconds": time.perf_counter() - t_start,
                                                      "results": results}, indent=1))

    for nfe in nfes:
        for solver in solvers if "single" in parts else []:
            t0 = time.perf_counter()
            name, genome, search_fid = _best_heuristic(exp, nfe, solver)
            results.append({"nfe": nfe, "solver": solver, "kind": "heuristic", "schedule": name,
                            "timesteps": list(genome.timesteps), "fid_search": search_fid, "fid": fresh(genome)})
            genome, search_fid, trials = _search(exp, nfe, [solver], args.budget, args.seed)
            results.append({"nfe": nfe, "solver": solver, "kind": "searched", "schedule": f"searched ({trials} trials)",
                            "timesteps": list(genome.timesteps), "fid_search": search_fid, "fid": fresh(genome)})
            log.info("NFE %d %s: heuristic %.3f, searched %.3f (%.0fs)", nfe, solver, results[-2]["fid"],
                     results[-1]["fid"], time.perf_counter() - t0)
            save()
        if "joint" not in parts:
            continue
        t0 = time.perf_counter()
        genome, search_fid, trials = _search(exp, nfe, solvers, args.joint_budget, args.seed)
        results.append({"nfe": nfe, "solver": genome.solver, "kind": "joint", "schedule": f"joint ({trials} trials)",
                        "timesteps": list(genome.timesteps), "fid_search": search_fid, "fid": fresh(genome)})
        log.info("NFE %d joint: %s %s %.3f (%.0fs)", nfe, genome.solver, list(genome.timesteps), results[-1]["fid"],
                 time.perf_counter() - t0)
        save()
    if args.ddim_reference and args.ddim_reference not in nfes:
        name, genome, search_fid = _best_heuristic(exp, args.ddim_reference, "ddim")
        results.append({"nfe": args.ddim_reference, "solver": "ddim", "kind": "heuristic", "schedule": name,
                        "timesteps": list(genome.timesteps), "fid_search": search_fid, "fid": fresh(genome)})
        nfes = [*nfes, args.ddim_reference]
    save()
    text = _report(results, nfes, solvers, time.perf_counter() - t_start, vars(args))
    (out / "table.md").write_text(text + "\n")
    print(text)  # noqa: T201 - a benchmark's report
    return 0


def _report(results: list[dict[str, Any]], nfes: list[int], solvers: list[str], seconds: float,
            args: dict[str, Any]) -> str:
    return (f"{_table(results, nfes, solvers)}\n\n{_targets(results)}\n\n{seconds:.0f} s of runs (budget"
            f" {args['budget']:g} candidate-equivalents per single-solver search, {args['joint_budget']:g} for the"
            f" joint search; fresh FID: mean of {args['repeats']} x {args['final_samples']} samples).")


def _table(results: list[dict[str, Any]], nfes: list[int], solvers: list[str]) -> str:
    def cell(nfe: int, solver: str, kind: str) -> str:
        row = next((r for r in results if r["nfe"] == nfe and r["solver"] == solver and r["kind"] == kind), None)
        if row is None:
            return ""
        return f"{row['fid']:.3f} ({row['schedule'] if kind == 'heuristic' else row['timesteps']})"

    lines = ["| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for solver in solvers:
        for kind in ("heuristic", "searched"):
            lines.append(f"| {solver} | {'best heuristic' if kind == 'heuristic' else 'searched'} | "
                         + " | ".join(cell(n, solver, kind) for n in nfes) + " |")
    joint = {r["nfe"]: r for r in results if r["kind"] == "joint"}
    lines.append("| **joint search** | solver + steps | " + " | ".join(
        f"**{joint[n]['fid']:.3f}** ({joint[n]['solver']} {joint[n]['timesteps']})" if n in joint else "" for n in nfes) + " |")
    return "\n".join(lines)


def _targets(results: list[dict[str, Any]]) -> str:
    """The issue's targets: joint at NFE 4 <= 0.8x the best (solver, heuristic); at NFE 6 <= 10-step DDIM."""
    out = []
    joint = {r["nfe"]: r["fid"] for r in results if r["kind"] == "joint"}
    heur4 = [r["fid"] for r in results if r["nfe"] == 4 and r["kind"] == "heuristic"]
    if 4 in joint and heur4:
        ratio = joint[4] / min(heur4)
        out.append(f"NFE 4: joint {joint[4]:.3f} = {ratio:.2f}x the best (solver, heuristic) pair {min(heur4):.3f}"
                   f" (target <= 0.8x: {'met' if ratio <= 0.8 else 'not met'}).")
    ddim10 = [r["fid"] for r in results if r["nfe"] == 10 and r["solver"] == "ddim" and r["kind"] == "heuristic"]
    if 6 in joint and ddim10:
        out.append(f"NFE 6: joint {joint[6]:.3f} vs 10-step DDIM (best heuristic) {ddim10[0]:.3f}"
                   f" (target <=: {'met' if joint[6] <= ddim10[0] else 'not met'}).")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
