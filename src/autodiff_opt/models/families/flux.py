"""Flux (``FluxPipeline``: ``FluxTransformer2DModel``, a text-to-image rectified flow with the guidance
embedding; double blocks then single blocks). The model class is in ``_flux_model.py``, imported when a Flux
pipeline is loaded."""

from __future__ import annotations

from autodiff_opt.models.families.record import ModelFamily, has_index_class, lazy

_TRANSFORMER = "autodiff_opt.models.families._transformer"
_MODEL = "autodiff_opt.models.families._flux_model"  # its model class, units and skips: imported when needed


FAMILY = ModelFamily(
    name="flux", summary="Flux (FluxPipeline), text-to-image flow with the guidance embedding",
    detect=has_index_class("FluxPipeline"), load=lazy(f"{_TRANSFORMER}:load_pipeline_model"),
    denoiser_classes=("FluxTransformer2DModel",), units=lazy(f"{_MODEL}:units"),
    skip=lazy(f"{_MODEL}:skip"),
    flops_inputs=None, flow=True, export="pipeline", pipeline_class="FluxPipeline", subfolder="transformer",
    transformer=True, priority=10, open_folder=lazy(f"{_MODEL}:open_folder"),
)
