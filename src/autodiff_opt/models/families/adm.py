"""ADM (guided-diffusion) checkpoints: converted once to a diffusers ``UNet2DModel`` folder and cached, with
the optional classifier guidance. Layers, skips and costs are the UNet's."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autodiff_opt.models.families.record import ModelFamily, ModelRef, lazy

if TYPE_CHECKING:
    from autodiff_opt.config import ModelConfig

_UNET = "autodiff_opt.models.families._unet"  # the UNet families' layers, skips and cost inputs

log = logging.getLogger(__name__)


def converted_folder(model_cfg: ModelConfig, cache_dir: Path) -> Path:
    """Convert a guided-diffusion checkpoint once; later runs reuse the diffusers folder."""
    from autodiff_opt.models.base import ModelLoadError

    ckpt = Path(str(model_cfg.checkpoint)).expanduser()
    if not ckpt.is_file():
        hint = f" ({model_cfg.source_hint})" if model_cfg.source_hint else ""
        raise ModelLoadError(f"model.checkpoint={ckpt} not found{hint}: download it and set model.checkpoint=/path/to/{ckpt.name}")
    stat = ckpt.stat()
    key = hashlib.sha256(f"{ckpt.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|{model_cfg.preset}".encode()).hexdigest()[:12]
    out = cache_dir / f"{ckpt.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    if model_cfg.converter != "adm":
        raise ModelLoadError(f"model.converter={model_cfg.converter!r} is unknown: use adm or null")
    from autodiff_opt.models.adm import convert_checkpoint, unet_preset

    log.info("converting %s to a diffusers folder in %s", ckpt, out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")  # one per process: workers may convert together
    convert_checkpoint(ckpt, unet_preset(model_cfg.preset or "imagenet64"), tmp)
    if (out / "config.json").is_file():  # another worker finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return out


def attach_classifier(model: Any, model_cfg: ModelConfig, device: Any) -> None:
    """Classifier guidance (ADM): eps <- eps - sqrt(1 - alpha_bar) * s * grad log p(y | x_t, t)."""
    from autodiff_opt.models.adm import ClassifierGuidance, load_adm_classifier

    path = Path(str(model_cfg.classifier)).expanduser()
    classifier = load_adm_classifier(path, model_cfg.preset or "imagenet64", device=device, option="model.classifier")
    model.guidance = ClassifierGuidance(classifier, model.alphas_cumprod, float(model_cfg.classifier_scale))


def _load(model_cfg: ModelConfig, device: Any, dtype: Any, cache_dir: Path) -> Any:
    from autodiff_opt.models.families.unet import load_unet

    folder = converted_folder(model_cfg, Path(cache_dir).expanduser() / "converted")
    return load_unet(model_cfg, str(folder), device, dtype)


def _detect(ref: ModelRef) -> bool:
    return bool(ref.setting("converter"))


FAMILY = ModelFamily(
    name="adm", summary="a guided-diffusion checkpoint (model.converter=adm), with its classifier",
    detect=_detect, load=_load, denoiser_classes=(), units=lazy(f"{_UNET}:unet_units"),
    skip=lazy(f"{_UNET}:unet_skip"), flops_inputs=lazy(f"{_UNET}:example_inputs"), flow=False,
    export="unet", subfolder="unet", priority=40,
)
