"""The convergence stop's window, chosen on stored searches: replay every setting on `bench_search.py` runs.

`bench_search.py --stops observe --fresh-all` keeps each run's trials (state, FID, prefix FIDs,
image-steps) and the fresh-seed FID of every best-so-far schedule. The sampler's choices are a pure
function of the stored trials and the stop only ends the loop, so the stop rule can be replayed on each
run for any ``search.patience`` (candidate-equivalents) and ``search.patience_candidates`` (candidates):
where it stops, and the fresh ratio of the best schedule there against the run's result at its budget.

    python experiments/replay_stop.py outputs/bench_search_stop/runs.json [--patience 30]
        [--candidates 0,30,60,75,90] [--num-samples 1000] [--num-steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from optuna.trial import FrozenTrial, TrialState, create_trial


def _trials(history: list[dict[str, Any]]) -> list[FrozenTrial]:
    """The stored trial records as Optuna trials, in trial-number order."""
    from autodiff_opt.core.keys import BASELINE_ATTR, IMAGE_STEPS_ATTR

    out = []
    for rec in sorted(history, key=lambda r: r["number"]):
        attrs = {IMAGE_STEPS_ATTR: rec["image_steps"] or 0}
        if rec["baseline"] is not None:
            attrs[BASELINE_ATTR] = rec["baseline"]
        state = TrialState[rec["state"]]
        value = rec["value"] if state == TrialState.COMPLETE else None
        trial = create_trial(state=state, value=value, params={}, distributions={}, user_attrs=attrs,
                             intermediate_values={int(k): v for k, v in rec["intermediate"].items()})
        trial.number = rec["number"]
        out.append(trial)
    return out


def _mean_sd(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="runs.json of bench_search.py --stops observe --fresh-all")
    parser.add_argument("--patience", default="30", help="search.patience values (candidate-equivalents)")
    parser.add_argument("--candidates", default="0,30,60,75,90", help="search.patience_candidates values")
    parser.add_argument("--num-samples", type=int, default=1000, help="search.num_samples of the runs")
    parser.add_argument("--num-steps", type=int, default=4, help="search.num_steps of the runs")
    args = parser.parse_args(argv)
    from autodiff_opt.search.stopping import converged_at

    data = json.loads(open(args.runs).read())
    fresh = {k: statistics.mean(v) for k, v in data["fresh"].items()}
    best_heuristic = min(data["heuristics"].values())
    runs = [r for r in data["runs"] if r.get("history") and r["stop"] == "budget"]
    if not runs:
        raise SystemExit(f"{args.runs} holds no run with its trials: run bench_search.py --stops observe --fresh-all")
    unit = args.num_samples * args.num_steps
    print(f"{args.runs}: fresh FID / the best heuristic's ({best_heuristic:.3f}); mean ± std over seeds\n")
    print("| sampler | patience | patience_candidates | stops at (cand.-eq.) | share of the budget | ratio at the stop"
          " | ratio at the budget | stop minus budget |")
    print("|---|---|---|---|---|---|---|---|")
    for sampler in dict.fromkeys(r["sampler"] for r in runs):
        mine = [r for r in runs if r["sampler"] == sampler]
        for patience in (float(p) for p in args.patience.split(",")):
            for candidates in (int(c) for c in args.candidates.split(",")):
                ends, at_stop, at_budget = [], [], []
                for run in mine:
                    found = converged_at(_trials(run["history"]), unit, args.num_samples, patience, candidates)
                    i = found.trial if found is not None else len(run["trace"]) - 1  # trace[i]: after trial i
                    ends.append(run["trace"][i][0])
                    at_stop.append(fresh[run["trace"][i][1]] / best_heuristic)
                    at_budget.append(fresh[run["trace"][-1][1]] / best_heuristic)
                budget = mine[0]["trace"][-1][0]
                gaps = [a - b for a, b in zip(at_stop, at_budget)]
                print(f"| {sampler} | {patience:g} | {candidates} | {_mean_sd(ends, 1)} |"
                      f" {statistics.mean(ends) / budget:.0%} | {_mean_sd(at_stop, 3)} | {_mean_sd(at_budget, 3)} |"
                      f" {_mean_sd(gaps, 3)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
