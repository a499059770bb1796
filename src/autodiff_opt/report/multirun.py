"""The Hydra callback that ends a multirun with the steps summary (registered in conf/config.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from autodiff_opt.report.steps_summary import write_summary


class StepsSummary(Callback):
    """After all jobs of `python -m autodiff_opt -m ...`: summary.{html,csv,md} in the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(Path(str(config.hydra.sweep.dir)))
