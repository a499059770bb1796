"""Honest final comparison: the best candidate and every baseline re-scored on fresh seeds, more samples.

Takes ``FinalInputs``: the typed pieces it reads, built by the runner (``runner.Experiment.final_inputs``),
not the experiment or the raw config."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from autodiff_opt.config import FinalConfig
from autodiff_opt.generate import NonFiniteSamples, SampleSet
from autodiff_opt.core.errors import ConfigError, StudyError
from autodiff_opt.core.genome import Genome
from autodiff_opt.search.objective import evaluate
from autodiff_opt.search.evolution import genome_of
from autodiff_opt.search.space import best_fid_trial, pareto_front
from autodiff_opt.core.keys import FINAL_ATTR

if TYPE_CHECKING:  # all below search: type-only imports that point down
    from autodiff_opt.arch.budget import Budget
    from autodiff_opt.arch.flops import LayerCosts
    from autodiff_opt.generate import ImageGenerator
    from autodiff_opt.metrics.fid import FIDScorer, FIDStats
    from autodiff_opt.models.base import DiffusionModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalInputs:
    """Exactly what the final comparison reads (and the report's sample grids: the candidates and their kinds)."""

    generator: ImageGenerator
    scorer: FIDScorer
    reference: FIDStats
    model: DiffusionModel  # the fresh sets' sample shape and classes; the denoiser a cache hooks
    settings: FinalConfig  # final.seed, final.repeats, final.num_samples
    search_seed: int  # the final seeds must not meet it
    search_samples: int  # search.num_samples: final.num_samples null means twice it
    baselines: Mapping[str, Genome] = field(default_factory=dict)  # heuristic and user schedules
    peers: Mapping[str, Genome] = field(default_factory=dict)  # peer methods' schedules
    caches: Mapping[str, tuple[str, Genome]] = field(default_factory=dict)  # row -> (diffusers cache, schedule)
    budget: Budget | None = None  # stage 2's compute budget; None: stage 2 is off
    layer_costs: LayerCosts | None = None  # stage 2's measured FLOPs (a cache row's cost)

    def all_baselines(self) -> dict[str, Genome]:
        """Heuristic and user schedules, then the peers' (what the search is compared against)."""
        return compared_schedules(self.baselines, self.peers)


def compared_schedules(baselines: Mapping[str, Genome], peers: Mapping[str, Genome]) -> dict[str, Genome]:
    """The baselines, then each peer schedule that is not one of them."""
    return {**baselines, **{k: v for k, v in peers.items() if v not in baselines.values()}}


def search_fid_by_genome(study: optuna.Study) -> dict[str, float]:
    """Search-time FID of every completed genome (key -> value)."""
    out: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        genome = genome_of(t)
        if genome is not None and t.values:
            out[genome.key()] = float(t.values[0])
    return out


def best_genome(study: optuna.Study) -> Genome:
    best = best_fid_trial(study)
    genome = genome_of(best)
    if genome is None:
        raise StudyError(f"best trial {best.number} has no genome attribute: was the study made by autodiff-opt?")
    return genome


def best_genome_where(study: optuna.Study, with_skips: bool) -> Genome | None:
    """The best candidate without skipped layers (what stage 1 alone returns), or the best with some."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and genome_of(t) is not None and genome_of(t).has_skips == with_skips]
    return genome_of(min(done, key=lambda t: t.values[0])) if done else None


def final_candidates(study: optuna.Study, inputs: FinalInputs) -> dict[str, Genome]:
    candidates = {"searched": best_genome(study)}
    if inputs.budget is not None:  # stage 2 ran: stage-1-only best and best with skipped layers, whichever is not the winner
        for name, with_skips in (("searched_stage1", False), ("searched_with_skips", True)):
            genome = best_genome_where(study, with_skips)
            if genome is not None and genome != candidates["searched"]:
                candidates[name] = genome
    if len(study.directions) > 1:  # the Pareto front, at most 6 points spread over the cost axis
        front = pareto_front(study.get_trials(deepcopy=False))
        picks = front if len(front) <= 6 else [front[round(i * (len(front) - 1) / 5)] for i in range(6)]
        for t in picks:
            genome = genome_of(t)
            if genome is not None and genome not in candidates.values():
                candidates[f"searched_pareto_{t.values[1]:.2f}"] = genome
    candidates.update(inputs.all_baselines())
    return candidates


def kind_of(name: str, inputs: FinalInputs) -> str:
    """searched, heuristic (the built-in schedules), user (search.schedules), peer (another method's) or
    cache (a diffusers cache on a heuristic schedule)."""
    if name.startswith("searched"):
        return "searched"
    if name in inputs.caches:
        return "cache"
    if name in inputs.peers and name not in inputs.baselines:
        return "peer"
    return "user" if name.startswith("user") else "heuristic"


def add_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """FID ratios to the best baseline of all, to the best heuristic and to the best peer (fresh seeds)."""
    baseline = table.kind != "searched"
    for column, mask in (("ratio_to_best_baseline", baseline), ("ratio_to_best_heuristic", table.kind == "heuristic"),
                         ("ratio_to_best_peer", table.kind == "peer")):
        best = table.loc[mask, "fid_final"].min() if mask.any() else float("nan")
        table[column] = table["fid_final"] / best
    return table


def _fresh_fids(inputs: FinalInputs, genome: Genome, sample_sets: list[SampleSet], name: str) -> tuple[list[float], float]:
    """FID on each fresh sample set (NaN for a schedule whose samples are not finite) and the time it took."""
    fids, seconds = [], 0.0
    for samples in sample_sets:
        try:
            result = evaluate(inputs.generator, inputs.scorer, inputs.reference, samples, genome)
        except NonFiniteSamples as err:  # a broken schedule gets NaN in the table, the others still count
            log.warning("final evaluation of %s failed: %s", name, err)
            return [float("nan")] * len(sample_sets), seconds
        fids.append(result["fid"])
        seconds += result["gen_seconds"] + result["fid_seconds"]
    return fids, seconds


def score_cache(inputs: FinalInputs, cache_name: str, genome: Genome, sample_sets: list[SampleSet],
                with_fid: bool = True, settings: dict[str, Any] | None = None) -> tuple[float, list[float], float]:
    """One diffusers cache on ``genome`` (its config's arguments overridden by ``settings``): (the FLOPs one
    sample's trajectory actually ran, in full steps; the FID on each fresh set, or none when ``with_fid`` is
    False; seconds). Raises what the cache's hooks raise."""
    from autodiff_opt.arch.caches import CacheBaseline
    from autodiff_opt.arch.flops import count_step_flops

    if inputs.layer_costs is None:
        raise ConfigError("search.stage2.caches needs stage 2's measured FLOPs: set search.stage2.enabled=true")
    cache = CacheBaseline(inputs.model, cache_name, genome.num_steps, settings)
    probe = sample_sets[0].slice(0, 1)

    def trajectory() -> Any:
        return inputs.generator.denoise(genome, probe.noise, probe.class_labels)

    trajectory()  # uncounted: what the model makes once per batch (prompt embeddings) is made here
    with inputs.generator.wrapped(cache.wrap):
        cache.calibrate(trajectory)
        with cache.applied():
            cost = count_step_flops(trajectory)[0] / inputs.layer_costs.full_step
            fids, seconds = _fresh_fids(inputs, genome, sample_sets, cache_name) if with_fid else ([], 0.0)
    return cost, fids, seconds


def cache_rows(inputs: FinalInputs, sample_sets: list[SampleSet]) -> list[dict[str, Any]]:
    """search.stage2.caches: each diffusers cache on its schedule, FID on the fresh sets and the FLOPs one
    sample's trajectory actually ran (in full steps). A cache that fails gets NaN and a warning."""
    rows = []
    for name, (cache_name, genome) in inputs.caches.items():
        log.info("final evaluation of %s %s (diffusers cache %s)", name, list(genome.timesteps), cache_name)
        try:
            cost, fids, seconds = score_cache(inputs, cache_name, genome, sample_sets)
        except Exception as err:  # diffusers' hooks do not fit every block layout: this row fails, not the table
            log.warning("cache baseline %s failed on %s: %s: %s", name, type(inputs.model.denoiser).__name__,
                        type(err).__name__, err)
            cost, fids, seconds = float("nan"), [float("nan")] * len(sample_sets), 0.0
        rows.append(_row(inputs, name, "cache", genome, fids, seconds, round(cost, 3), None))
    return rows


def _row(inputs: FinalInputs, name: str, kind: str, genome: Genome, fids: list[float], seconds: float,
         cost: float, fid_search: float | None) -> dict[str, Any]:
    return {
        "schedule": name, "kind": kind,
        "timesteps": list(genome.timesteps), "skipped_layers": sum(len(s) for s in genome.skips),
        "solver": inputs.generator.solver_of(genome), "nfe": inputs.generator.nfe(genome), "fid_search": fid_search,
        "cost_full_steps": cost, "fid_final": float(np.mean(fids)),
        "fid_final_std": float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0, "seconds": round(seconds, 3),
    }


def final_seeds(final_seed: int, repeats: int, search_seed: int) -> list[int]:
    """The seeds of the final comparison's repeats, final_seed + 7919 r; ConfigError (one line, exit 2) when
    one is the search's seed (the images the search was scored on). preflight.check_seeds says the same
    before any model work; this guards callers that skip preflight."""
    seeds = [final_seed + 7919 * r for r in range(max(1, repeats))]
    if search_seed in seeds:
        r = seeds.index(search_seed)
        which = "final.seed" if r == 0 else f"final.seed + 7919 x {r} (repeat {r})"
        raise ConfigError(f"{which} = {search_seed} is search.seed: the final comparison needs fresh seeds:"
                          " set final.seed to another value (the default is 1000003)")
    return seeds


def final_evaluation(study: optuna.Study, inputs: FinalInputs) -> pd.DataFrame:
    """Scores once per study and setting; stored in the study so workers and reruns reuse it."""
    final = inputs.settings
    seeds = final_seeds(int(final.seed), int(final.repeats), int(inputs.search_seed))
    num_samples = int(final.num_samples or 2 * inputs.search_samples)
    setting = {"num_samples": num_samples, "seed": int(final.seed), "repeats": int(final.repeats), "best_trial": best_fid_trial(study).number,
               "trials": len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))}
    stored = study.user_attrs.get(FINAL_ATTR)
    if stored and stored.get("setting") == setting:
        log.info("final evaluation already in the study: reused")
        return pd.DataFrame(stored["rows"])
    repeats = len(seeds)
    sample_sets = [SampleSet.draw(num_samples, inputs.model.sample_shape, inputs.model.num_classes, seed) for seed in seeds]
    search_fid = search_fid_by_genome(study)
    rows: list[dict[str, Any]] = []
    for name, genome in final_candidates(study, inputs).items():
        log.info("final evaluation of %s %s on %d x %d fresh samples", name, list(genome.timesteps), repeats, num_samples)
        fids, seconds = _fresh_fids(inputs, genome, sample_sets, name)
        cost = round(inputs.budget.in_full_steps(genome), 3) if inputs.budget is not None else genome.num_steps
        rows.append(_row(inputs, name, kind_of(name, inputs), genome, fids, seconds, cost, search_fid.get(genome.key())))
    rows += cache_rows(inputs, sample_sets)
    table = pd.DataFrame(rows)
    table = add_ratios(table)
    study.set_user_attr(FINAL_ATTR, {"setting": setting, "rows": table.to_dict(orient="records")})
    return table
