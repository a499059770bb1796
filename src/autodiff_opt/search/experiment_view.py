"""What the layers below the orchestration read of ``runner.Experiment``, as a Protocol.

search/final.py and report/ take the experiment but sit below runner.py, so naming runner's class, even
in a type-only import, pointed up a layer (an import cycle once type-only imports count: docs/architecture.md,
"Optuna's internals and errors"). They name this Protocol instead; runner.Experiment satisfies it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # all below search: type-only imports that point down
    from omegaconf import DictConfig

    from autodiff_opt.core.genome import Genome
    from autodiff_opt.generate import ImageGenerator
    from autodiff_opt.metrics.fid import FIDScorer, FIDStats
    from autodiff_opt.models.base import DiffusionModel
    from autodiff_opt.search.space import SearchSpace


class ExperimentView(Protocol):
    """The fields of runner.Experiment that search/final.py and report/ read."""

    cfg: DictConfig
    model: DiffusionModel
    scorer: FIDScorer
    reference: FIDStats
    space: SearchSpace
    generator: ImageGenerator
    baselines: dict[str, Genome]
    peers: dict[str, Genome]
    stage2: Any
    layer_costs: Any
    caches: dict[str, tuple[str, Genome]]

    def all_baselines(self) -> dict[str, Genome]: ...
