"""How a run was made: the resolved settings as YAML and the command that reproduces it (passwords redacted)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from autodiff_opt.config import Config

from autodiff_opt.search.study import _redact


def _redact_value(text: str) -> str:
    return _redact(text) if "://" in text and "@" in text else text


def _redact_override(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{key}{sep}{_redact_value(value)}" if sep else override


def settings_yaml(config: Config) -> str:
    """The resolved config (what the run used): the typed Config, resolved when it was built."""
    tree: dict[str, Any] = asdict(config)
    tree["storage"]["url"] = _redact_value(str(tree["storage"]["url"]))
    return OmegaConf.to_yaml(OmegaConf.create(tree))


def job_overrides() -> tuple[list[str], str]:
    """This job's command-line overrides (a multirun job's own sweep values included) and its launch folder."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        return list(hydra_cfg.overrides.task), str(hydra_cfg.runtime.cwd)
    return [a for a in sys.argv[1:] if "=" in a and not a.startswith("hydra.")], str(Path.cwd())


def reproduce_command(overrides: list[str], cwd: str) -> str:
    """A shell line that runs the same experiment again (relative paths are taken from cwd)."""
    args = " ".join(shlex.quote(_redact_override(o)) for o in overrides)
    return f"cd {shlex.quote(cwd)} && python -m autodiff_opt {args}".rstrip()
