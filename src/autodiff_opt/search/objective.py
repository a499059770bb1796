"""The objective: a trial's genome -> samples from the fixed SampleSet -> FID against the reference."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import numpy as np
import optuna

from autodiff_opt.generate import ImageGenerator, NonFiniteSamples, SampleSet
from autodiff_opt.metrics.fid import FIDScorer, FIDStats
from autodiff_opt.search.attrs import set_trial_attrs
from autodiff_opt.search.fidelity import IMAGE_STEPS_ATTR
from autodiff_opt.core.genome import Genome
from autodiff_opt.search.space import GENOME_ATTR, SearchSpace, suggest_genome
from autodiff_opt.core.keys import FAIL_REASON_ATTR
from autodiff_opt.search.storage_compat import trial_id

log = logging.getLogger(__name__)



def evaluate(generator: ImageGenerator, scorer: FIDScorer, reference: FIDStats, samples: SampleSet,
             genome: Genome) -> dict[str, float]:
    """FID of one genome on one SampleSet, with the time spent in generation and in the metric."""
    return evaluate_on_rungs(generator, scorer, reference, samples, genome, rungs=())


def evaluate_on_rungs(generator: ImageGenerator, scorer: FIDScorer, reference: FIDStats, samples: SampleSet,
                     genome: Genome, rungs: Sequence[int],
                     report: Callable[[float, int], bool] | None = None) -> dict[str, float]:
    """FID on growing prefixes of one SampleSet (features of a prefix are kept, never recomputed).

    After each prefix of ``rungs`` (sizes < len(samples)) ``report(fid, n)`` is called; when it returns
    True the evaluation stops there. The result says how many samples were generated.
    """
    feats: list[np.ndarray] = []
    gen_s = fid_s = 0.0
    start, fid = 0, float("nan")
    for stop in [*[n for n in rungs if 0 < n < len(samples)], len(samples)]:
        t0 = time.perf_counter()
        images = generator.generate(genome, samples.slice(start, stop))
        t1 = time.perf_counter()
        feats.append(scorer.features(images))
        fid = scorer.fid_of_features(np.concatenate(feats), reference)
        gen_s, fid_s, start = gen_s + t1 - t0, fid_s + time.perf_counter() - t1, stop
        if not math.isfinite(fid):
            raise NonFiniteSamples(f"FID is {fid} for time steps {list(genome.timesteps)}")
        if stop < len(samples) and report is not None and report(fid, stop):
            break
    return {"fid": fid, "num_samples": start, "gen_seconds": gen_s, "fid_seconds": fid_s,
            "image_steps_per_s": start * genome.num_steps / max(gen_s, 1e-9)}


GenomeFn = Callable[[optuna.Trial], Genome]


class Objective:
    """Callable for study.optimize: every candidate sees the same noise and labels (common random numbers)."""

    def __init__(self, generator: ImageGenerator, scorer: FIDScorer, reference: FIDStats,
                 samples: SampleSet, space: SearchSpace, cost_fn: Callable[[Genome], float] | None = None,
                 cost_objective: Callable[[Genome], float] | None = None, rungs: Sequence[int] = (),
                 genome_fn: GenomeFn | None = None) -> None:
        self.generator = generator
        self.scorer = scorer
        self.reference = reference
        self.samples = samples
        self.space = space
        self.cost_fn = cost_fn
        self.cost_objective = cost_objective
        self.rungs = list(rungs)
        self.genome_fn = genome_fn

    def _genome(self, trial: optuna.Trial) -> Genome:
        if self.genome_fn is None:  # our samplers: the genome is already in the trial's system attribute
            chosen = getattr(trial.study.sampler, "chosen_genome", None)  # what the sampler just wrote
            return suggest_genome(trial, self.space, chosen(trial_id(trial)) if chosen else None)
        genome = self.genome_fn(trial)  # a built-in sampler's params: the genome gets its one home here
        set_trial_attrs(trial.storage, trial_id(trial), system={GENOME_ATTR: genome.key()},
                        user={"timesteps": list(genome.timesteps)})
        return genome

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        genome: Genome | None = None
        pruned = {"at": 0}

        def report(fid: float, n: int) -> bool:
            trial.report(fid, n)
            if trial.should_prune():
                pruned["at"] = n
                return True
            return False

        attrs: dict[str, object] = {}  # written in one transaction once the candidate is scored or failed
        try:
            genome = self._genome(trial)
            attrs["nfe"] = self.generator.nfe(genome)
            if self.cost_fn is not None:
                attrs["flops"] = float(self.cost_fn(genome))
            result = evaluate_on_rungs(self.generator, self.scorer, self.reference, self.samples, genome,
                                       self.rungs, report if self.rungs else None)
        except Exception as err:  # the candidate fails, the study goes on; the reason stays in the trial
            attrs[FAIL_REASON_ATTR] = f"{type(err).__name__}: {err}"[:500]
            if genome is not None:
                attrs[IMAGE_STEPS_ATTR] = len(self.samples) * self.generator.nfe(genome)  # an upper bound
            set_trial_attrs(trial.storage, trial_id(trial), user=attrs)
            log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
            raise
        attrs[IMAGE_STEPS_ATTR] = int(result["num_samples"]) * self.generator.nfe(genome)
        attrs.update({key: round(result[key], 4) for key in ("gen_seconds", "fid_seconds", "image_steps_per_s")})
        set_trial_attrs(trial.storage, trial_id(trial), user=attrs)
        if pruned["at"]:
            raise optuna.TrialPruned(f"FID {result['fid']:.4g} on the first {pruned['at']} samples: not among the parents")
        if self.cost_objective is not None:
            return result["fid"], float(self.cost_objective(genome))
        return result["fid"]
