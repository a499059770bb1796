"""Flux (``FluxPipeline``: ``FluxTransformer2DModel``, a text-to-image rectified flow with the guidance
embedding; double blocks then single blocks). The model class is in ``_flux_model.py``, imported when a Flux
pipeline is loaded."""

from __future__ import annotations

from typing import Any

from autodiff_opt.models.families.record import ModelFamily, Unit, has_index_class, lazy

_TRANSFORMER = "autodiff_opt.models.families._transformer"


def _units(denoiser: Any, units: str) -> list[Unit]:
    from autodiff_opt.models.families._transformer import BLOCKS, transformer_units

    return transformer_units(denoiser, units, groups=(*BLOCKS, ("single", "single_transformer_blocks")))


def _skip(module: Any, kind: str | None = None) -> Any:
    from autodiff_opt.models.families._transformer import block_skipper, skip_joint_block

    return block_skipper({"FluxTransformerBlock": skip_joint_block,
                          "FluxSingleTransformerBlock": skip_joint_block})(module, kind)


FAMILY = ModelFamily(
    name="flux", summary="Flux (FluxPipeline), text-to-image flow with the guidance embedding",
    detect=has_index_class("FluxPipeline"), load=lazy(f"{_TRANSFORMER}:load_pipeline_model"),
    denoiser_classes=("FluxTransformer2DModel",), units=_units, skip=_skip,
    flops_inputs=None, flow=True, export="pipeline", pipeline_class="FluxPipeline", subfolder="transformer",
    transformer=True, priority=10, open_folder=lazy("autodiff_opt.models.families._flux_model:open_folder"),
)
