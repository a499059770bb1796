"""The convergence stop, measured after the fact on studies that ran to their budget.

A study run with ``search.stop=budget`` holds every decision a converged run would have made up to its
stop (the sampler's choices are a pure function of the stored trials, and the stop only ends the loop),
so each stop rule can be replayed on it: where it would have stopped, and what the best schedule at that
point scores on fresh seeds (the same 3 x 2,000 fresh samples as the final table) against the best at
the budget. Rules compared: ``converged`` (improvement over the window <= the measured noise, the
default), ``plateau`` (no improvement at all over the window), ``fixed-1%`` (<= 1% improvement).

    python experiments/bench_stop.py STUDY.db [STUDY.db ...] [--patience 20,30,40] [--patience-candidates 75]
        [-- OVERRIDES...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState


def _load(db: str) -> optuna.Study:
    url = f"sqlite:///{db}"
    return optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)


def _stops(study: optuna.Study, unit: float, num_samples: int, patience: float, candidates: int) -> dict[str, Any]:
    from autodiff_opt.search.stopping import verdicts

    trace = verdicts(study.get_trials(deepcopy=False), unit, num_samples, patience, candidates)
    out: dict[str, Any] = {}
    for name, ok in (("converged", lambda v: v.converged),
                     ("plateau", lambda v: v.noise is not None and v.gain <= 0.0),
                     ("fixed-1%", lambda v: v.noise is not None and v.gain <= 0.01)):
        hit = next((v for v in trace if ok(v)), None)
        out[name] = hit.trial if hit else None
    last = trace[-1]
    out["noise"], out["reliability"], out["end"] = last.noise, last.reliability, trace[-1].trial
    from autodiff_opt.core.keys import PEER_COST_ATTR
    from autodiff_opt.search.storage_compat import study_system_attrs

    peers = float(study_system_attrs(study).get(PEER_COST_ATTR, 0)) / unit  # the budget counts the peers' cost too
    out["spent"] = {v.trial: v.spent + peers for v in trace}
    return out


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _best_until(study: optuna.Study, number: int) -> tuple[str, float]:
    from autodiff_opt.search.evolution import genome_of

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number <= number]
    best = min(done, key=lambda t: (t.values[0], t.number))
    return json.dumps(genome_of(best).to_json()), float(best.values[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dbs", nargs="+")
    parser.add_argument("--patience", default="20,30,40")
    parser.add_argument("--patience-candidates", type=int, default=75, help="search.patience_candidates of every rule")
    parser.add_argument("--budget", type=float, default=150.0, help="the budget the share column is of")
    parser.add_argument("--no-fresh", action="store_true", help="stop points only (no model, no fresh FIDs)")
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    exp = None
    if not args.no_fresh:
        from autodiff_opt.cli import compose_config
        from autodiff_opt.runner import build_experiment

        exp = build_experiment(compose_config([*overrides, "output_dir=/tmp/bench_stop", "progress=false"]))
    from autodiff_opt.core.genome import Genome
    from autodiff_opt.generate import SampleSet
    from autodiff_opt.search.objective import evaluate

    cache: dict[str, float] = {}

    def fresh(key: str) -> float:
        if key not in cache and exp is not None:
            cfg = exp.cfg
            n = int(cfg.final.num_samples or 2 * cfg.search.num_samples)
            sets = [SampleSet.draw(n, exp.model.sample_shape, exp.model.num_classes, int(cfg.final.seed) + 7919 * r)
                    for r in range(int(cfg.final.repeats))]
            cache[key] = statistics.mean(evaluate(exp.generator, exp.scorer, exp.reference, s,
                                                  Genome.from_json(json.loads(key)))["fid"] for s in sets)
        return cache.get(key, math.nan)

    num_samples, num_steps = 1000, 4
    if exp is not None:
        num_samples, num_steps = len(exp.samples), exp.space.num_steps
    heuristic = None
    if exp is not None:
        heuristic = min(fresh(json.dumps(g.to_json())) for g in exp.baselines.values())
    print(f"best heuristic fresh FID: {heuristic}")
    print("| study | patience | rule | stop (cand.-eq.) | share of budget | search FID | fresh ratio | noise | split-half r |")
    print("|---|---|---|---|---|---|---|---|---|")
    for db in args.dbs:
        study = _load(db)
        for patience in (float(p) for p in args.patience.split(",")):
            stops = _stops(study, num_samples * num_steps, num_samples, patience, args.patience_candidates)
            end = stops["end"]
            for rule in ("converged", "plateau", "fixed-1%", "budget"):
                at = end if rule == "budget" else stops[rule]
                if at is None:
                    print(f"| {Path(db).name} | {patience:g} | {rule} | never | | | | | |")
                    continue
                key, search_fid = _best_until(study, at)
                ratio = fresh(key) / heuristic if heuristic else math.nan
                spent = stops["spent"][at]
                print(f"| {Path(db).name} | {patience:g} | {rule} | {spent:.1f} | {spent / args.budget:.0%} |"
                      f" {search_fid:.3f} | {ratio:.3f} | {_num(stops['noise'], 3)} | {_num(stops['reliability'], 2)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
