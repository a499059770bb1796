"""Stable Diffusion 3 (``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``, a text-to-image rectified flow
with classifier-free guidance against the empty prompt). The model class is in ``_sd3_model.py``, imported
when an SD3 pipeline is loaded."""

from __future__ import annotations

from typing import Any

from autodiff_opt.models.families.record import ModelFamily, has_index_class, lazy

_TRANSFORMER = "autodiff_opt.models.families._transformer"


def _skip(module: Any, kind: str | None = None) -> Any:
    from autodiff_opt.models.families._transformer import block_skipper, skip_joint_block

    return block_skipper({"JointTransformerBlock": skip_joint_block})(module, kind)


FAMILY = ModelFamily(
    name="sd3", summary="Stable Diffusion 3 (StableDiffusion3Pipeline), text-to-image flow",
    detect=has_index_class("StableDiffusion3Pipeline"), load=lazy(f"{_TRANSFORMER}:load_pipeline_model"),
    denoiser_classes=("SD3Transformer2DModel",), units=lazy(f"{_TRANSFORMER}:transformer_units"),
    skip=_skip, flops_inputs=None, flow=True,
    export="pipeline", pipeline_class="StableDiffusion3Pipeline", subfolder="transformer", transformer=True,
    priority=10, open_folder=lazy("autodiff_opt.models.families._sd3_model:open_folder"),
)
