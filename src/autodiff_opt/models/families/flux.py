"""Flux (``FluxPipeline``: ``FluxTransformer2DModel``, a text-to-image rectified flow with the guidance
embedding; double blocks then single blocks)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from autodiff_opt.models.families._transformer import (BLOCKS, block_skipper, has_index_class, load_pipeline_model,
                                                        skip_joint_block, transformer_units)
from autodiff_opt.models.families.record import ModelFamily


def _open(root: Path, prompts: Any, *, guidance_scale: float, decode_batch_size: int, device: Any, dtype: Any,
          name: str | None = None, image_size: int | None = None) -> Any:
    from autodiff_opt.models.families._prompt_flow import load_prompt_flow

    return load_prompt_flow(root, "flux", prompts, guidance_scale, decode_batch_size, device, dtype, name,
                            image_size, image_size)


FAMILY = ModelFamily(
    name="flux", summary="Flux (FluxPipeline), text-to-image flow with the guidance embedding",
    detect=has_index_class("FluxPipeline"), load=load_pipeline_model, denoiser_classes=("FluxTransformer2DModel",),
    units=functools.partial(transformer_units, groups=(*BLOCKS, ("single", "single_transformer_blocks"))),
    skip=block_skipper({"FluxTransformerBlock": skip_joint_block, "FluxSingleTransformerBlock": skip_joint_block}),
    flops_inputs=None, flow=True, export="pipeline", pipeline_class="FluxPipeline", subfolder="transformer",
    transformer=True, priority=10, open_folder=_open,
)
