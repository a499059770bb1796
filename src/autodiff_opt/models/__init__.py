"""Loading pretrained diffusion models behind one small interface (see base.DiffusionModel).

The names below are imported on first use (PEP 562), so importing a torch-free submodule (the model-family
registry ``models.families``, ``models.sources``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autodiff_opt.models.base import DiffusionModel, EpsFn, ModelLoadError
    from autodiff_opt.models.loading import load_model
    from autodiff_opt.models.sources import resolve_pretrained

__all__ = ["DiffusionModel", "EpsFn", "ModelLoadError", "load_model", "resolve_pretrained"]

_HOMES = {"DiffusionModel": "base", "EpsFn": "base", "ModelLoadError": "base", "load_model": "loading",
          "resolve_pretrained": "sources"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
