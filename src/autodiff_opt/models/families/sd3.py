"""Stable Diffusion 3 (``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``, a text-to-image rectified flow
with classifier-free guidance against the empty prompt). The model class is in ``_sd3_model.py``, imported
when an SD3 pipeline is loaded."""

from __future__ import annotations

from autodiff_opt.models.families.record import ModelFamily, has_index_class, lazy

_TRANSFORMER = "autodiff_opt.models.families._transformer"
_MODEL = "autodiff_opt.models.families._sd3_model"  # its model class, units and skips: imported when needed


FAMILY = ModelFamily(
    name="sd3", summary="Stable Diffusion 3 (StableDiffusion3Pipeline), text-to-image flow",
    detect=has_index_class("StableDiffusion3Pipeline"), load=lazy(f"{_TRANSFORMER}:load_pipeline_model"),
    denoiser_classes=("SD3Transformer2DModel",), units=lazy(f"{_TRANSFORMER}:transformer_units"),
    skip=lazy(f"{_MODEL}:skip"), flops_inputs=None, flow=True,
    export="pipeline", pipeline_class="StableDiffusion3Pipeline", subfolder="transformer", transformer=True,
    priority=10, open_folder=lazy(f"{_MODEL}:open_folder"),
)
