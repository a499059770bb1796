"""Loading pretrained diffusion models behind one small interface (see base.DiffusionModel)."""

from autodiff_opt.models.base import DiffusionModel, EpsFn, ModelLoadError
from autodiff_opt.models.loading import load_model, resolve_pretrained

__all__ = ["DiffusionModel", "EpsFn", "ModelLoadError", "load_model", "resolve_pretrained"]
