"""The errors a user can cause and fix: the CLI reports them as one line and exits with status 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting is wrong; the message names it and the fix."""


class GenomeError(ValueError):
    """A schedule or skip mask that cannot be sampled."""


class MetricError(RuntimeError):
    """The metric cannot be computed as configured; the message says what to set."""


class ModelLoadError(RuntimeError):
    """The model named in the config cannot be loaded; the message says what to set."""


class StudyError(RuntimeError):
    """The study cannot be opened as configured; the message says what to change."""


class SearchAborted(RuntimeError):
    """Candidates failed in a row: the setup is broken (finished trials are kept)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, GenomeError, MetricError, ModelLoadError, SearchAborted, StudyError)
