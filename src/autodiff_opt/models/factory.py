"""Build the configured model: a diffusers folder as is, or a foreign checkpoint converted once and cached."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from autodiff_opt.generate import StepWrapper
from autodiff_opt.models.base import DiffusionModel, ModelLoadError
from autodiff_opt.models.loading import load_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _converted_folder(model_cfg: DictConfig, cache_dir: Path) -> Path:
    """Convert a guided-diffusion checkpoint once; later runs reuse the diffusers folder."""
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
    tmp = out.with_name(out.name + ".partial")
    convert_checkpoint(ckpt, unet_preset(model_cfg.preset or "imagenet64"), tmp)
    tmp.replace(out)
    return out


def build_model(model_cfg: DictConfig, device: torch.device, cache_dir: str | Path = "~/.cache/autodiff_opt") -> DiffusionModel:
    if model_cfg.dtype not in _DTYPES:
        raise ModelLoadError(f"model.dtype={model_cfg.dtype!r}: use one of {sorted(_DTYPES)}")
    pretrained = str(model_cfg.pretrained)
    if model_cfg.converter:
        pretrained = str(_converted_folder(model_cfg, Path(cache_dir).expanduser() / "converted"))
    schedule = OmegaConf.to_container(model_cfg.noise_schedule) if model_cfg.noise_schedule else None
    model = load_model(pretrained, name=model_cfg.name, subfolder=model_cfg.subfolder, noise_schedule=schedule,  # type: ignore[arg-type]
                       device=device, dtype=_DTYPES[model_cfg.dtype])
    model.extras["source"] = pretrained  # what a schedule file names to load this model again
    if model_cfg.classifier:
        attach_classifier(model, model_cfg, device)
    return model


def attach_classifier(model: DiffusionModel, model_cfg: DictConfig, device: torch.device) -> None:
    """Classifier guidance (ADM): eps <- eps - sqrt(1 - alpha_bar) * s * grad log p(y | x_t, t)."""
    from autodiff_opt.models.adm import ClassifierGuidance, load_adm_classifier

    path = Path(str(model_cfg.classifier)).expanduser()
    classifier = load_adm_classifier(path, model_cfg.preset or "imagenet64", device=device, option="model.classifier")
    model.extras["guidance"] = ClassifierGuidance(classifier, model.alphas_cumprod, float(model_cfg.classifier_scale))


def missing_files(cfg: DictConfig) -> list[str]:
    """Every configured input file that is absent, each with where it comes from and the override to set."""
    hint = f" ({cfg.model.source_hint})" if cfg.model.source_hint else ""
    checks = []
    if cfg.model.converter:
        checks.append(("model.checkpoint", cfg.model.checkpoint, hint))
    if cfg.model.classifier:
        checks.append(("model.classifier", cfg.model.classifier, hint))
    if not str(cfg.dataset.reference).startswith("builtin:"):
        checks.append(("dataset.reference", cfg.dataset.reference, ""))
    if cfg.metric.weights_path:
        checks.append(("metric.weights_path", cfg.metric.weights_path, ""))
    out = []
    for option, value, where in checks:
        if value is None or not Path(str(value)).expanduser().exists():
            out.append(f"{option}={value} is missing{where}: set {option}=/path/to/it")
    return out


def step_wrapper_for(model: DiffusionModel) -> StepWrapper:
    """Per-step layer skipping for genomes with masks (stage 2); genomes without masks run the plain model."""
    from autodiff_opt.arch import LayerSkipper, with_step_masks

    skipper = model.extras.get("skipper")
    if skipper is None:
        skipper = model.extras["skipper"] = LayerSkipper(model.unet)

    def wrap(eps_fn, genome):  # type: ignore[no-untyped-def]
        return with_step_masks(eps_fn, skipper, genome) if genome.has_skips else eps_fn

    return wrap
