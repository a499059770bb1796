"""Plain diffusers UNets (``UNet2DModel``): the embedded digits models (DDPM, deep, flow), DDPM / iDDPM folders
and hub ids, a converted ADM folder given directly. The fallback family: whatever no other family claims.
VP noise prediction or a rectified flow, as the scheduler config says."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from autodiff_opt.models.families.record import ModelFamily, ModelRef, lazy

if TYPE_CHECKING:
    from autodiff_opt.config import ModelConfig

_UNET = "autodiff_opt.models.families._unet"  # the UNet families' layers, skips and cost inputs


def load_unet(model_cfg: ModelConfig, pretrained: str, device: Any, dtype: Any) -> Any:
    """A UNet folder (or pipeline folder with unet/) with its noise schedule, and ADM's classifier if configured."""
    from autodiff_opt.models.loading import load_model

    schedule = dict(model_cfg.noise_schedule) if model_cfg.noise_schedule else None
    model = load_model(pretrained, name=model_cfg.name, subfolder=model_cfg.subfolder, noise_schedule=schedule,  # type: ignore[arg-type]
                       device=device, dtype=dtype)
    model.source = pretrained  # what a schedule file names to load this model again
    if model_cfg.classifier:
        from autodiff_opt.models.families.adm import attach_classifier

        attach_classifier(model, model_cfg, device)
    return model


def _load(model_cfg: ModelConfig, device: Any, dtype: Any, cache_dir: Path) -> Any:
    return load_unet(model_cfg, str(model_cfg.pretrained), device, dtype)


def _detect(ref: ModelRef) -> bool:
    return True


FAMILY = ModelFamily(
    name="unet", summary="a diffusers UNet2DModel folder (DDPM, iDDPM, the digits models, a rectified-flow UNet)",
    detect=_detect, load=_load, denoiser_classes=("UNet2DModel",), units=lazy(f"{_UNET}:unet_units"),
    skip=lazy(f"{_UNET}:unet_skip"), flops_inputs=lazy(f"{_UNET}:example_inputs"), flow=None,
    export="unet", subfolder="unet", priority=90,
)
