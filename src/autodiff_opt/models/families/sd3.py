"""Stable Diffusion 3 (``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``, a text-to-image rectified flow
with classifier-free guidance against the empty prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autodiff_opt.models.families._transformer import (block_skipper, has_index_class, load_pipeline_model,
                                                        skip_joint_block, transformer_units)
from autodiff_opt.models.families.record import ModelFamily


def _open(root: Path, prompts: Any, *, guidance_scale: float, decode_batch_size: int, device: Any, dtype: Any,
          name: str | None = None, image_size: int | None = None) -> Any:
    from autodiff_opt.models.families._prompt_flow import load_prompt_flow

    return load_prompt_flow(root, "sd3", prompts, guidance_scale, decode_batch_size, device, dtype, name,
                            image_size, image_size)


FAMILY = ModelFamily(
    name="sd3", summary="Stable Diffusion 3 (StableDiffusion3Pipeline), text-to-image flow",
    detect=has_index_class("StableDiffusion3Pipeline"), load=load_pipeline_model,
    denoiser_classes=("SD3Transformer2DModel",), units=transformer_units,
    skip=block_skipper({"JointTransformerBlock": skip_joint_block}), flops_inputs=None, flow=True,
    export="pipeline", pipeline_class="StableDiffusion3Pipeline", subfolder="transformer", transformer=True,
    priority=10, open_folder=_open,
)
