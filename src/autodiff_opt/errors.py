"""The errors a user can cause and fix: reported as one line with a non-zero exit."""

from autodiff_opt.metrics.fid import MetricError
from autodiff_opt.models.base import ModelLoadError
from autodiff_opt.search.genome import GenomeError
from autodiff_opt.search.runner import ConfigError, SearchAborted
from autodiff_opt.search.study import StudyError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, GenomeError, MetricError, ModelLoadError, SearchAborted, StudyError)
