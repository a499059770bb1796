"""`search.sampler`: which sampler runs the study, its defaults, and how it sees a schedule.

- ``autodiffusion`` (default): the two-stage evolution with surrogate-selected offspring and pruning
  on sample prefixes (multi-fidelity); ``AutoDiffusionSampler``.
- ``autodiffusion_paper``: the authors' evolution as published (population 50, ...); no pruning;
  ``AutoDiffusionPaperSampler`` (the base of the other: each class is named after its setting).
- ``tpe``, ``cmaes``, ``gp``, ``random``: Optuna's own samplers on the stick-breaking fractions of
  ``coding.py`` (stage 1 only: they have no notion of a per-step skip mask). They run as shipped, with
  one addition: each trial's owner is recorded as it is taken up (``recovery.OwnerRecording``), so a
  restart fails a dead worker's trial at once. They take no study lock: their ``before_trial`` writes
  nothing (TPE's constant liar handles trials running elsewhere), so there is no section to guard.

A setting left null takes the sampler's preset (``specs/samplers.py``, the one place the defaults live).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from autodiff_opt.core.errors import ConfigError
from autodiff_opt.search.recovery import OwnerRecording
from autodiff_opt.search.evolution import EvolutionConfig, SamplerInputs
from autodiff_opt.specs.samplers import GENOME_SAMPLERS, SAMPLER_SPECS, SamplerSpec

EVOLUTIONARY = GENOME_SAMPLERS  # the samplers of whole genomes (stage 2, the solver gene)
BUILTIN = tuple(n for n, spec in SAMPLER_SPECS.items() if spec.factory.endswith(":make_builtin"))
SAMPLERS = tuple(SAMPLER_SPECS)
EVOLUTION_KEYS = ("population", "num_parents", "num_mutants", "mutation_prob", "num_crossovers", "init_random",
                  "init_mutation_prob", "max_attempts")


class SamplerChoiceError(ConfigError):
    """search.sampler or one of its settings is wrong."""


@dataclass(frozen=True)
class SearchSetup:
    """The search settings after defaults: built once from the config, read by the runner."""

    sampler: str
    evolution: EvolutionConfig
    generations: int
    budget: float  # in candidate-equivalents (image-steps of one full candidate)
    prune: bool
    rung_fractions: tuple[float, ...]
    pool_size: int

    @property
    def spec(self) -> SamplerSpec:
        return SAMPLER_SPECS[self.sampler]

    @property
    def evolutionary(self) -> bool:
        """Samples whole genomes (stage 2, the solver gene); False: Optuna's samplers on step fractions."""
        return self.spec.genome

    def signature(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "population": self.evolution.population,
                "prune": self.prune, "rungs": list(self.rung_fractions) if self.prune else []}


def _get(search: Any, key: str, default: Any = None) -> Any:
    value = search.get(key) if hasattr(search, "get") else getattr(search, key, None)
    return default if value is None else value


def resolve(search: Any) -> SearchSetup:
    """search config (DictConfig, dict or dataclass) -> SearchSetup; raises SamplerChoiceError on bad values."""
    name = str(_get(search, "sampler", "autodiffusion"))
    if name not in SAMPLERS:
        raise SamplerChoiceError(f"search.sampler={name!r} is unknown: use one of {', '.join(SAMPLERS)}")
    spec = SAMPLER_SPECS[name]
    generations, prune = spec.generations, spec.prune  # Optuna's samplers run as shipped unless search.prune=true
    given = {k: _get(search, k) for k in EVOLUTION_KEYS if _get(search, k) is not None}
    try:
        evolution = EvolutionConfig(**{**spec.evolution, **given})
    except ValueError as err:
        raise SamplerChoiceError(f"{err}: lower them or raise search.population") from err
    generations = int(_get(search, "generations", generations))
    budget = _get(search, "budget")
    if budget is not None and spec.counts == "generations":
        generations = max(1, math.ceil(float(budget) / evolution.population))
    budget = float(budget) if budget is not None else float(evolution.population * generations)
    if budget <= 0:
        raise SamplerChoiceError(f"search.budget={budget}: must be positive (candidate-equivalents)")
    prune = bool(_get(search, "prune", prune))
    fractions = tuple(float(f) for f in _get(search, "rungs", (0.25, 0.5)))
    if any(not 0.0 < f < 1.0 for f in fractions):
        raise SamplerChoiceError(f"search.rungs={list(fractions)}: each is a fraction of search.num_samples in (0, 1)")
    return SearchSetup(name, evolution, generations, budget, prune, fractions, int(_get(search, "pool_size", 256)))


class TPESampler(OwnerRecording, optuna.samplers.TPESampler):
    """Optuna's TPE sampler, recording each trial's owner."""


class CmaEsSampler(OwnerRecording, optuna.samplers.CmaEsSampler):
    """Optuna's CMA-ES sampler, recording each trial's owner."""


class GPSampler(OwnerRecording, optuna.samplers.GPSampler):
    """Optuna's GP sampler, recording each trial's owner."""


class RandomSampler(OwnerRecording, optuna.samplers.RandomSampler):
    """Optuna's random sampler, recording each trial's owner."""


def make_sampler(inputs: SamplerInputs) -> optuna.samplers.BaseSampler:
    """The sampler of ``search.sampler=inputs.name``, built by its spec's factory."""
    import importlib

    module, _, attr = SAMPLER_SPECS[inputs.name].factory.partition(":")
    return getattr(importlib.import_module(module), attr)(inputs)


def make_builtin(inputs: SamplerInputs) -> optuna.samplers.BaseSampler:
    """The factory of Optuna's samplers (specs/samplers.py)."""
    return builtin_sampler(inputs.name, inputs.seed)


def builtin_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler as a user would set it up for a small continuous space."""
    if name == "tpe":
        return TPESampler(multivariate=True, seed=seed, constant_liar=True)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna imports it lazily; fail here with the fix)
        except ImportError as err:
            raise SamplerChoiceError("search.sampler=cmaes needs the cmaes package: pip install cmaes") from err
        return CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return GPSampler(seed=seed)
    if name == "random":
        return RandomSampler(seed=seed)
    raise SamplerChoiceError(f"{name!r} is not one of Optuna's built-in samplers here: {BUILTIN}")
