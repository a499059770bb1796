"""The model families, one module each (``FAMILY = ModelFamily(...)`` in ``<name>.py``), found by listing this
package: adding a family is adding its module (docs/architecture.md, "Adding a model family").

``family_for(model_cfg)`` picks the configured model's family before loading (``detect``, lowest ``priority``
first); ``family_of(denoiser)`` recognises a loaded network by its class; ``family_of_model(model)`` is the
family the model was loaded by (``DiffusionModel.family``), else its denoiser's.

Importing this package, listing the families, reading their records and detecting a configured model import
no torch, diffusers or NumPy (``record.py``: a family names its heavy parts lazily).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from autodiff_opt.models.families.record import ExportStyle, Lazy, ModelFamily, ModelRef, Unit, has_index_class, lazy

if TYPE_CHECKING:
    from autodiff_opt.config import ModelConfig

__all__ = ["ExportStyle", "Lazy", "ModelFamily", "ModelRef", "Unit", "families", "family_for", "family_named",
           "family_of", "family_of_model", "has_index_class", "lazy", "pipeline_families"]


@functools.lru_cache(maxsize=None)
def _registry() -> tuple[ModelFamily, ...]:
    found: list[ModelFamily] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "record":
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(family, ModelFamily):
            raise TypeError(f"{__name__}.{info.name} defines no FAMILY = ModelFamily(...)")
        if family.name != info.name:
            raise ValueError(f"{__name__}.{info.name}: FAMILY.name is {family.name!r}; name the module after the family")
        found.append(family)
    return tuple(sorted(found, key=lambda f: (f.priority, f.name)))


def families() -> dict[str, ModelFamily]:
    """Every family by name, in detection order."""
    return {f.name: f for f in _registry()}


def family_named(name: str) -> ModelFamily:
    known = families()
    if name not in known:
        raise KeyError(f"no model family {name!r}: known ones are {sorted(known)}")
    return known[name]


def family_for(model_cfg: ModelConfig) -> ModelFamily:
    """The family of the configured model (``model.pretrained``, ``converter``, ``prompts``), before loading."""
    ref = ModelRef(model_cfg)
    for family in _registry():
        if family.detect(ref):
            return family
    raise LookupError(f"model.pretrained={ref.pretrained}: no model family recognises it")  # the fallback always does


def family_of(module: Any) -> ModelFamily | None:
    """The family whose denoiser class ``module`` is (or subclasses); a UNet-shaped network of another class is
    a plain UNet's; None for anything else."""
    for family in _registry():
        if family.owns(module):
            return family
    from autodiff_opt.models.families._unet import is_unet

    return families()["unet"] if is_unet(module) else None


def family_of_model(model: Any) -> ModelFamily | None:
    """The family the model was loaded by (``model.family``), else the one of its denoiser."""
    name = getattr(model, "family", "")
    return families()[name] if name in families() else family_of(model.denoiser)


def pipeline_families() -> dict[str, str]:
    """diffusers pipeline class -> family name, for the families that load their own pipeline folder."""
    return {f.pipeline_class: f.name for f in _registry() if f.pipeline_class and f.open_folder is not None}
