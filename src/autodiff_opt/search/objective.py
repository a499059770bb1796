"""The objective: a trial's genome -> samples from the fixed SampleSet -> FID against the reference."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import optuna

from autodiff_opt.generate import ImageGenerator, NonFiniteSamples, SampleSet
from autodiff_opt.metrics.fid import FIDScorer, FIDStats
from autodiff_opt.search.genome import Genome
from autodiff_opt.search.space import SearchSpace, suggest_genome

log = logging.getLogger(__name__)

FAIL_REASON_ATTR = "fail_reason"


def evaluate(generator: ImageGenerator, scorer: FIDScorer, reference: FIDStats, samples: SampleSet,
             genome: Genome) -> dict[str, float]:
    """FID of one genome on one SampleSet, with the time spent in generation and in the metric."""
    t0 = time.perf_counter()
    images = generator.generate(genome, samples)
    t1 = time.perf_counter()
    fid = scorer.fid(images, reference)
    t2 = time.perf_counter()
    if not math.isfinite(fid):
        raise NonFiniteSamples(f"FID is {fid} for time steps {list(genome.timesteps)}")
    return {"fid": fid, "gen_seconds": t1 - t0, "fid_seconds": t2 - t1,
            "image_steps_per_s": len(samples) * genome.num_steps / max(t1 - t0, 1e-9)}


class Objective:
    """Callable for study.optimize: every candidate sees the same noise and labels (common random numbers)."""

    def __init__(self, generator: ImageGenerator, scorer: FIDScorer, reference: FIDStats,
                 samples: SampleSet, space: SearchSpace, cost_fn: Callable[[Genome], float] | None = None,
                 cost_objective: Callable[[Genome], float] | None = None) -> None:
        self.generator = generator
        self.scorer = scorer
        self.reference = reference
        self.samples = samples
        self.space = space
        self.cost_fn = cost_fn
        self.cost_objective = cost_objective

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        try:
            genome = suggest_genome(trial, self.space)
            trial.set_user_attr("nfe", genome.num_steps)
            if self.cost_fn is not None:
                trial.set_user_attr("flops", float(self.cost_fn(genome)))
            result = evaluate(self.generator, self.scorer, self.reference, self.samples, genome)
        except Exception as err:  # the candidate fails, the study goes on; the reason stays in the trial
            trial.set_user_attr(FAIL_REASON_ATTR, f"{type(err).__name__}: {err}"[:500])
            log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
            raise
        for key in ("gen_seconds", "fid_seconds", "image_steps_per_s"):
            trial.set_user_attr(key, round(result[key], 4))
        if self.cost_objective is not None:
            return result["fid"], float(self.cost_objective(genome))
        return result["fid"]
