"""Stable Diffusion v1.x (``StableDiffusionPipeline``: ``UNet2DConditionModel``, CLIP prompts, a VAE),
a pipeline folder or hub id with ``model.prompts``. Layers, skips and costs are the UNet's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from autodiff_opt.models.families.record import ModelFamily, ModelRef, lazy

if TYPE_CHECKING:
    from autodiff_opt.config import ModelConfig

_UNET = "autodiff_opt.models.families._unet"  # the UNet families' layers, skips and cost inputs


def _load(model_cfg: ModelConfig, device: Any, dtype: Any, cache_dir: Path) -> Any:
    from autodiff_opt.models.base import ModelLoadError
    from autodiff_opt.models.latent import load_text_to_image

    if model_cfg.converter or model_cfg.classifier:
        raise ModelLoadError("model.converter and model.classifier apply to ADM checkpoints, not to text-to-image"
                             " pipelines: set them to null")
    model = load_text_to_image(str(model_cfg.pretrained), model_cfg.prompts, name=model_cfg.name,
                               guidance_scale=float(model_cfg.guidance_scale),
                               decode_batch_size=int(model_cfg.decode_batch_size), device=device, dtype=dtype)
    model.source = str(model_cfg.pretrained)
    return model


def _detect(ref: ModelRef) -> bool:
    from autodiff_opt.models.sources import is_text_to_image_pipeline

    return bool(ref.setting("prompts")) or is_text_to_image_pipeline(ref.root)


FAMILY = ModelFamily(
    name="sd", summary="Stable Diffusion v1.x (StableDiffusionPipeline, model.prompts)",
    detect=_detect, load=_load, denoiser_classes=("UNet2DConditionModel",), units=lazy(f"{_UNET}:unet_units"),
    skip=lazy(f"{_UNET}:unet_skip"), flops_inputs=lazy(f"{_UNET}:example_inputs"), flow=False,
    export="text_to_image", pipeline_class="StableDiffusionPipeline", subfolder="unet", priority=30,
)
