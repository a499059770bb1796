"""``SamplerSpec``: one record per ``search.sampler``, read by preflight, ``search/sampler_choice.py`` (defaults,
``resolve``) and the runner (the factory, the stop rule). See docs/architecture.md, "Adding a sampler".

A setting of the evolution left null in the config takes the sampler's preset here: this is the one
place the sampler defaults live (``EvolutionConfig``'s own defaults are the authors' published ones,
the ``autodiffusion_paper`` preset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SURROGATE_EVOLUTION: dict[str, Any] = dict(population=10, num_parents=5, num_mutants=5, num_crossovers=3, init_random=5)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: how it is built, its defaults, and what it supports."""

    name: str
    factory: str  # "module:function", called with a ``search.evolution.SamplerInputs``, returns the Optuna sampler
    evolution: dict[str, Any] = field(default_factory=dict)  # EvolutionConfig fields over its (the paper's) defaults
    generations: int = 15  # null search.generations: this many generations (budget = population x generations)
    prune: bool = False  # multi-fidelity pruning on sample prefixes unless search.prune says otherwise
    genome: bool = False  # samples whole genomes (steps, skips, solver gene); False: stick-breaking steps only
    counts: Literal["image_steps", "generations"] = "image_steps"  # what the stop rule counts
    summary: str = ""

    @property
    def stage2(self) -> bool:
        """Per-step layer skipping (search.stage2) and its two-objective form: genome samplers only."""
        return self.genome

    @property
    def solver_gene(self) -> bool:
        """search.solvers (the solver as a gene): genome samplers only."""
        return self.genome

    @property
    def multi_objective(self) -> bool:
        """search.stage2.multi_objective (FID and FLOPs): the samplers that run stage 2."""
        return self.stage2


_BUILTIN = "autodiff_opt.search.sampler_choice:make_builtin"
SAMPLER_SPECS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("autodiffusion", "autodiff_opt.search.surrogate_sampler:make_sampler", SURROGATE_EVOLUTION, 15,
                prune=True, genome=True,
                summary="two-stage evolution, offspring picked by a GP surrogate, pruning on sample prefixes"),
    SamplerSpec("autodiffusion_paper", "autodiff_opt.search.evolution:make_sampler", {}, 10, genome=True,
                counts="generations", summary="the authors' evolution as published (population 50, no pruning)"),
    SamplerSpec("tpe", _BUILTIN, SURROGATE_EVOLUTION, summary="Optuna's TPE on stick-breaking fractions"),
    SamplerSpec("cmaes", _BUILTIN, SURROGATE_EVOLUTION, summary="Optuna's CMA-ES on stick-breaking fractions"),
    SamplerSpec("gp", _BUILTIN, SURROGATE_EVOLUTION, summary="Optuna's GP sampler on stick-breaking fractions"),
    SamplerSpec("random", _BUILTIN, SURROGATE_EVOLUTION, summary="Optuna's random sampler on stick-breaking fractions"),
)}
GENOME_SAMPLERS: tuple[str, ...] = tuple(n for n, s in SAMPLER_SPECS.items() if s.genome)
