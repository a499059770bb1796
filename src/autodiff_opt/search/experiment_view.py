"""What report/ reads of ``runner.Experiment``, as a Protocol.

report/write.py takes the experiment but sits below runner.py, so naming runner's class, even in a type-only
import, pointed up a layer (an import cycle once type-only imports count: docs/architecture.md, "Optuna's
internals and errors"). It names this Protocol instead; runner.Experiment satisfies it. search/final.py no
longer takes the experiment: it takes ``FinalInputs`` (``final_inputs()`` below), the typed pieces it reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # all at or below search: type-only imports that point down
    from autodiff_opt.config import Config
    from autodiff_opt.generate import ImageGenerator
    from autodiff_opt.models.base import DiffusionModel
    from autodiff_opt.search.final import FinalInputs
    from autodiff_opt.search.space import SearchSpace


class ExperimentView(Protocol):
    """The fields of runner.Experiment that report/write.py reads."""

    cfg: Config  # the typed config (config.to_config)
    model: DiffusionModel
    space: SearchSpace
    generator: ImageGenerator

    def final_inputs(self) -> FinalInputs: ...
