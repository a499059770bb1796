"""Search efficiency, measured: every `search.sampler` and the trajectory-DP peer on one objective.

Each sampler runs on the same Experiment as `python -m autodiff_opt` builds it (same model, search
samples, baselines and peer schedule enqueued first, same objective; pruning where the sampler's
setting has it) for a budget in candidate-equivalents of image-steps (pruned candidates count what they
cost, the peer's teacher counts too). At each checkpoint the best-so-far schedule (by search FID) is
re-scored on the same fresh sample sets; the table gives the mean and std over sampler seeds of that
fresh FID and of its ratio to the best heuristic's fresh FID.

    python experiments/bench_search.py [--samplers autodiffusion,tpe,...] [--seeds 0,1,2]
        [--checkpoints 50,100,200] [--long-seeds 0 --long-checkpoint 500] [--stops budget,converged]
        [--jobs 2] [-- OVERRIDES...]

``--stops``: each sampler runs under each stop rule (search.stop): ``budget`` spends the largest
checkpoint, ``converged`` ends earlier once the search has converged (search/stopping.py); the table
gives where it stopped and the ratio there. ``observe`` gives both rows from one run: it runs to the
budget with the objective a converged search has (rungs scored), and the ``converged`` row is the run cut
at the trial where the convergence stop fires. That is the run a ``converged`` search makes: the
sampler's choices are a pure function of the stored trials and the stop only ends the loop.

Writes <out>/runs.json, <out>/table.md and <out>/fid_vs_image_steps.html and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time
import yaml
from pathlib import Path
from typing import Any

SAMPLERS = ["autodiffusion", "autodiffusion_paper", "tpe", "cmaes", "gp", "random"]
_EXP: Any = None


def _compose(overrides: list[str], out: Path) -> Any:
    from autodiff_opt.cli import compose_config

    return compose_config([*overrides, f"output_dir={out}", "progress=false"])


def _init(overrides: list[str], out: str, threads: int) -> None:
    """Per worker process: one Experiment (model, reference, search samples) for all its runs."""
    global _EXP
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from autodiff_opt.runner import build_experiment

    _EXP = build_experiment(_compose(overrides, Path(out)))


def _run(job: tuple[str, int, float, str, dict[str, Any]]) -> dict[str, Any]:
    """One sampler, one seed: the best-so-far (image-steps spent, genome, search FID) after every trial."""
    import optuna
    from omegaconf import OmegaConf

    from autodiff_opt import runner
    from autodiff_opt.search.fidelity import PEER_COST_ATTR, ImageStepBudget, make_pruner
    from autodiff_opt.search.storage_compat import set_study_system_attr
    from autodiff_opt.search.evolution import genome_of
    from autodiff_opt.search.sampler_choice import resolve
    from autodiff_opt.search.stopping import StopRule, Trace

    name, seed, budget, stop_kind, peers = job
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    exp = _EXP
    from autodiff_opt.config import as_tree, to_config

    cfg = as_tree(exp.cfg)  # a DictConfig copy of the typed config, to update
    base, *variants = name.split("+")  # e.g. tpe+prune (with our pruning), autodiffusion+prune=false
    OmegaConf.update(cfg, "search.sampler", base)
    for variant in variants:
        key, _, value = variant.partition("=")
        OmegaConf.update(cfg, f"search.{key}", yaml.safe_load(value) if value else True)
    observe = stop_kind == "observe"  # to the budget; the converged stop's trial is read off afterwards
    OmegaConf.update(cfg, "search.stop", "converged" if observe else stop_kind)  # the objective scores the rungs the stop reads
    exp.cfg, exp.setup = to_config(cfg), resolve(cfg.search)
    sampler = runner.make_sampler(exp, seed=1000 + seed)  # the sampler's seed varies; the search samples do not
    study = optuna.create_study(sampler=sampler, pruner=make_pruner(exp.setup.prune, exp.setup.evolution.num_parents))
    exp.peers = {k: runner.Genome.from_json(g) for k, g in peers["genomes"].items()}
    set_study_system_attr(study, runner.PEERS_ATTR, peers["genomes"])
    set_study_system_attr(study, PEER_COST_ATTR, peers["image_steps"])
    runner.seed_study(study, exp)
    unit = len(exp.samples) * exp.space.num_steps
    stop = ImageStepBudget(int(budget * unit), unit)
    rule = StopRule(stop, unit, len(exp.samples), runner.converges(exp) and not observe, float(cfg.search.patience), None,
                    patience_candidates=int(cfg.search.patience_candidates))
    trace: list[tuple[float, str, float]] = []
    times: list[float] = []
    best = (float("inf"), "")

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal best
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None and trial.value < best[0]:
            best = (float(trial.value), json.dumps(genome_of(trial).to_json()))
        trace.append((stop.spent(study), best[1], best[0]))
        times.append(time.perf_counter() - t0)
        if rule.should_stop(study):
            study.stop()

    t0 = time.perf_counter()
    study.optimize(runner.make_objective(exp), callbacks=[record], catch=(Exception,), gc_after_trial=False)
    states = [t.state.name for t in study.trials]
    run = {"sampler": name, "seed": seed, "stop": stop_kind, "trace": trace, "seconds": time.perf_counter() - t0,
           "stop_reason": (rule.reason or {}).get("reason", "budget"),
           "trials": len(states), "pruned": states.count("PRUNED"), "failed": states.count("FAIL")}
    if observe:
        seen = Trace(unit, len(exp.samples), float(cfg.search.patience), int(cfg.search.patience_candidates))
        seen.feed(study.get_trials(deepcopy=False))
        run["converged_at"] = seen.first.trial if seen.first is not None else None
        run["times"], run["states"] = times, states
        run["history"] = [_trial_record(t) for t in study.get_trials(deepcopy=False)]
    return run


def _trial_record(t: Any) -> dict[str, Any]:
    """What the stop rule reads of one trial, so other stop rules can be replayed on the stored run."""
    from autodiff_opt.core.keys import BASELINE_ATTR, IMAGE_STEPS_ATTR

    return {"number": t.number, "state": t.state.name, "value": t.value if t.values else None,
            "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
            "image_steps": t.user_attrs.get(IMAGE_STEPS_ATTR), "baseline": t.user_attrs.get(BASELINE_ATTR)}


def _split(run: dict[str, Any]) -> list[dict[str, Any]]:
    """An ``observe`` run as its two rows: to the budget, and cut where the convergence stop fires."""
    if run["stop"] != "observe":
        return [run]
    at = run["converged_at"]
    converged = dict(run, stop="converged", stop_reason="budget" if at is None else "converged")
    if at is not None:  # the callback ran once per trial, in trial order: trace[i] is after trial i
        states = run["states"][:at + 1]
        converged.update(trace=run["trace"][:at + 1], seconds=run["times"][at], trials=at + 1,
                         pruned=states.count("PRUNED"), failed=states.count("FAIL"))
    return [dict(run, stop="budget"), converged]


def _fresh(job: tuple[str, int, int, int]) -> tuple[str, list[float]]:
    """FID of one genome on each fresh sample set."""
    from autodiff_opt.generate import SampleSet
    from autodiff_opt.core.genome import Genome
    from autodiff_opt.search.objective import evaluate

    key, repeats, num_samples, seed = job
    exp, genome = _EXP, Genome.from_json(json.loads(key))
    sets = [SampleSet.draw(num_samples, exp.model.sample_shape, exp.model.num_classes, seed + 7919 * r) for r in range(repeats)]
    return key, [evaluate(exp.generator, exp.scorer, exp.reference, s, genome)["fid"] for s in sets]


def _peers(overrides: list[str], out: Path) -> dict[str, Any]:
    """The peer schedules (computed once, shared by every run) and what they cost."""
    from autodiff_opt.search.peers import trajectory_dp

    exp = _EXP
    from autodiff_opt.runner import peer_clip_x0

    peer = trajectory_dp(exp.generator, exp.space.num_steps, exp.cfg.search.peer_samples, exp.cfg.search.peer_grid,
                         seed=exp.cfg.search.seed + 1, clip_x0=peer_clip_x0(exp))
    return {"genomes": {peer.name: peer.genome.to_json()}, "image_steps": peer.image_steps, "seconds": peer.seconds}


def _best_at(trace: list[tuple[float, str, float]], checkpoint: float) -> str | None:
    within = [key for spent, key, _ in trace if spent <= checkpoint + 1e-9 and key]
    return within[-1] if within else None


def _table(runs: list[dict[str, Any]], fresh: dict[str, list[float]], checkpoints: list[float],
           heuristic_best: float, peer: dict[str, Any], unit: int) -> tuple[str, list[dict[str, Any]]]:
    rows, lines = [], []
    header = ("| sampler | stop | " + " | ".join(f"{c:g} cand." for c in checkpoints)
              + " | stopped at (cand.) | at the stop | search seconds |")
    lines += [header, "|---|---|" + "---|" * len(checkpoints) + "---|---|---|"]
    for name, stop in dict.fromkeys((r["sampler"], r.get("stop", "budget")) for r in runs):
        mine = [r for r in runs if r["sampler"] == name and r.get("stop", "budget") == stop]
        cells = []
        for c in checkpoints:
            fids = [statistics.mean(fresh[k]) for r in mine if r["trace"]
                    and r["trace"] and r["trace"][-1][0] >= c - 1e-6 and (k := _best_at(r["trace"], c))]
            if not fids:
                cells.append("")
                continue
            ratios = [f / heuristic_best for f in fids]
            sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
            cells.append(f"{statistics.mean(ratios):.3f} ± {sd:.3f} (n={len(ratios)})")
            rows.append({"sampler": name, "stop": stop, "checkpoint": c, "fid": statistics.mean(fids),
                         "ratio": statistics.mean(ratios), "ratio_std": sd, "n": len(ratios)})
        ends = [r["trace"][-1][0] for r in mine if r["trace"]]
        at_stop = [statistics.mean(fresh[k]) / heuristic_best for r in mine if r["trace"] and (k := r["trace"][-1][1])]
        cells += [_mean_sd(ends, 1), _mean_sd(at_stop, 3), _mean_sd([r["seconds"] for r in mine], 0)]
        lines.append(f"| {name} | {stop} | " + " | ".join(cells) + " |")
    dp_cost = peer["image_steps"] / unit
    dp_ratio = statistics.mean(fresh[json.dumps(peer["genomes"]["gits_dp"])]) / heuristic_best
    lines.append(f"| gits_dp (peer, {dp_cost:.1f} cand.) | | " + " | ".join(f"{dp_ratio:.3f}" for _ in checkpoints)
                 + f" | {dp_cost:.1f} | {dp_ratio:.3f} | |")
    return "\n".join(lines), rows


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _figure(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, stop in dict.fromkeys((r["sampler"], r["stop"]) for r in rows):
        mine = [r for r in rows if r["sampler"] == name and r["stop"] == stop]
        fig.add_trace(go.Scatter(x=[r["checkpoint"] for r in mine], y=[r["ratio"] for r in mine], name=f"{name} ({stop})",
                                 error_y={"array": [r["ratio_std"] for r in mine]}, mode="lines+markers"))
    fig.update_layout(title=title, xaxis={"title": "image-steps spent (candidate-equivalents)", "type": "log"},
                      yaxis={"title": "fresh-seed FID / best heuristic's"})
    fig.write_html(path, include_plotlyjs=True)  # self-contained: opens offline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--checkpoints", default="50,100,200")
    parser.add_argument("--long-seeds", default="0", help="seeds also run to --long-checkpoint")
    parser.add_argument("--long-checkpoint", type=float, default=500)
    parser.add_argument("--long-samplers", default=None, help="samplers run to --long-checkpoint (default: all)")
    parser.add_argument("--stops", default="budget", help="search.stop rules to run every sampler under: budget,converged;"
                        " observe: both rows from one run to the budget")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--final-samples", type=int, default=2000)
    parser.add_argument("--fresh-all", action="store_true", help="re-score every best-so-far schedule, not only those at"
                        " the checkpoints and stops (other stop rules can then be replayed on runs.json)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/bench_search")
    parser.add_argument("--merge", default=None, help="runs.json of an earlier run on the same experiment: its runs of"
                        " other samplers (and its fresh FIDs) join the table")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment (after --)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    samplers, seeds = args.samplers.split(","), [int(s) for s in args.seeds.split(",")]
    checkpoints = [float(c) for c in args.checkpoints.split(",")]
    long_seeds = [int(s) for s in args.long_seeds.split(",")] if args.long_seeds else []
    long_samplers = args.long_samplers.split(",") if args.long_samplers else samplers
    jobs: list[tuple[str, int, float, str]] = []
    for name in samplers:
        for seed in seeds:
            long = seed in long_seeds and name in long_samplers and args.long_checkpoint > max(checkpoints)
            for stop in args.stops.split(","):
                jobs.append((name, seed, args.long_checkpoint if long else max(checkpoints), stop))
    if long_seeds and args.long_checkpoint > max(checkpoints):
        checkpoints.append(args.long_checkpoint)
    jobs.sort(key=lambda j: -j[2])  # long runs first: the pool stays busy
    init = (args.overrides, str(out), args.threads)
    _init(*init)
    peer = _peers(args.overrides, out)
    unit = len(_EXP.samples) * _EXP.space.num_steps
    print(f"peer gits_dp {peer['genomes']['gits_dp']['timesteps']}: {peer['image_steps'] / unit:.1f} candidate-equivalents,"
          f" {peer['seconds']:.1f}s", flush=True)
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    with ctx.Pool(args.jobs, initializer=_init, initargs=init) as pool:
        runs = []
        for observed in pool.imap_unordered(_run, [(*j, peer) for j in jobs]):
            runs += (split := _split(observed))
            (out / "runs_raw.json").write_text(json.dumps(runs))  # the searches survive a failure of what follows
            for run in split:
                print(f"{run['sampler']} ({run['stop']}, stopped by {run['stop_reason']}) seed {run['seed']}: {run['trials']} trials ({run['pruned']} pruned,"
                      f" {run['failed']} failed), {run['trace'][-1][0]:.0f} cand., best search FID {run['trace'][-1][2]:.3f},"
                      f" {run['seconds']:.0f}s", flush=True)
        earlier: dict[str, Any] = json.loads(Path(args.merge).read_text()) if args.merge else {"runs": [], "fresh": {}}
        if earlier.get("overrides", args.overrides) != args.overrides:
            raise SystemExit(f"--merge {args.merge} was run with overrides {earlier['overrides']}, not {args.overrides}")
        runs = [r for r in earlier["runs"] if r["sampler"] not in samplers] + runs
        keys = {k for r in runs for c in checkpoints if (k := _best_at(r["trace"], c))}
        keys |= {r["trace"][-1][1] for r in runs if r["trace"] and r["trace"][-1][1]}  # where each run stopped
        if args.fresh_all:
            keys |= {key for r in runs for _, key, _ in r["trace"] if key}
        keys |= {json.dumps(peer["genomes"]["gits_dp"])}
        from autodiff_opt.core.genome import Genome
        from autodiff_opt.solvers import heuristic_schedule

        heuristics = {name: json.dumps(Genome(tuple(heuristic_schedule(name, _EXP.space.num_steps, _EXP.model.alphas_cumprod))).to_json())
                      for name in _EXP.cfg.search.baselines}
        keys |= set(heuristics.values())
        fresh_seed = int(_EXP.cfg.final.seed)
        known = earlier["fresh"] if earlier.get("repeats", args.repeats) == args.repeats else {}
        fresh = {k: v for k, v in known.items() if k in keys}
        fresh.update(pool.imap_unordered(_fresh, [(k, args.repeats, args.final_samples, fresh_seed)
                                                  for k in sorted(keys - set(fresh))]))
    heuristic_fid = {name: statistics.mean(fresh[k]) for name, k in heuristics.items()}
    best_name = min(heuristic_fid, key=heuristic_fid.get)
    title = f"{' '.join(args.overrides) or 'default experiment'}: fresh FID / {best_name}'s ({heuristic_fid[best_name]:.3f})"
    table, rows = _table(runs, fresh, checkpoints, heuristic_fid[best_name], peer, unit)
    print(f"\n{title}\nmean ± std over seeds of the best-so-far schedule's fresh-seed FID ratio"
          f" ({args.repeats} x {args.final_samples} fresh samples), {time.perf_counter() - t0:.0f}s\n{table}")
    (out / "table.md").write_text(f"{title}\n\n{table}\n")
    (out / "runs.json").write_text(json.dumps({"runs": runs, "fresh": fresh, "peer": peer, "heuristics": heuristic_fid,
                                               "overrides": args.overrides, "repeats": args.repeats}, indent=1))
    _figure(rows, out / "fid_vs_image_steps.html", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
