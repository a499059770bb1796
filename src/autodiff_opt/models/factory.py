"""Build the configured model: a diffusers folder as is, or a foreign checkpoint converted once and cached."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from autodiff_opt.models.base import DiffusionModel, ModelLoadError
from autodiff_opt.models.latent import is_text_to_image_pipeline
from autodiff_opt.models.loading import BUILTIN_PREFIX, _looks_like_path, load_model, resolve_pretrained

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INCEPTION_HINT = ("torch-fidelity's Inception weights, published at github.com/toshas/torch-fidelity/releases/download/"
                  "v0.2.0/weights-inception-2015-12-05-6726825d.pth")


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
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")  # one per process: workers may convert together
    convert_checkpoint(ckpt, unet_preset(model_cfg.preset or "imagenet64"), tmp)
    if (out / "config.json").is_file():  # another worker finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return out


def build_model(model_cfg: DictConfig, device: torch.device, cache_dir: str | Path = "~/.cache/autodiff_opt") -> DiffusionModel:
    if model_cfg.dtype not in _DTYPES:
        raise ModelLoadError(f"model.dtype={model_cfg.dtype!r}: use one of {sorted(_DTYPES)}")
    pretrained = str(model_cfg.pretrained)
    if transformer_pipeline_kind(pretrained) is not None:
        return build_transformer_pipeline(model_cfg, device)
    if model_cfg.prompts or is_text_to_image_pipeline(resolve_pretrained(pretrained)):
        return build_text_to_image(model_cfg, device)
    if model_cfg.converter:
        pretrained = str(_converted_folder(model_cfg, Path(cache_dir).expanduser() / "converted"))
    schedule = OmegaConf.to_container(model_cfg.noise_schedule) if model_cfg.noise_schedule else None
    model = load_model(pretrained, name=model_cfg.name, subfolder=model_cfg.subfolder, noise_schedule=schedule,  # type: ignore[arg-type]
                       device=device, dtype=_DTYPES[model_cfg.dtype])
    model.source = pretrained  # what a schedule file names to load this model again
    if model_cfg.classifier:
        attach_classifier(model, model_cfg, device)
    return model


def build_text_to_image(model_cfg: DictConfig, device: torch.device) -> DiffusionModel:
    """Stable Diffusion v1.x (pipeline folder or hub id): latents, CLIP prompts, classifier-free guidance."""
    from autodiff_opt.models.latent import load_text_to_image

    if model_cfg.converter or model_cfg.classifier:
        raise ModelLoadError("model.converter and model.classifier apply to ADM checkpoints, not to text-to-image"
                             " pipelines: set them to null")
    model = load_text_to_image(str(model_cfg.pretrained), model_cfg.prompts, name=model_cfg.name,
                               guidance_scale=float(model_cfg.guidance_scale),
                               decode_batch_size=int(model_cfg.decode_batch_size), device=device,
                               dtype=_DTYPES[model_cfg.dtype])
    model.source = str(model_cfg.pretrained)
    return model


def transformer_pipeline_kind(pretrained: str) -> str | None:
    """dit, sd3 or flux when model.pretrained is such a pipeline (a local folder, or a hub id whose
    model_index.json is cached or downloadable); None otherwise."""
    from autodiff_opt.models.pipelines import pipeline_kind

    ref = resolve_pretrained(pretrained)
    if Path(ref).exists() or _looks_like_path(ref):
        return pipeline_kind(ref)
    try:
        from huggingface_hub import hf_hub_download

        return pipeline_kind(Path(hf_hub_download(ref, "model_index.json")).parent)
    except Exception:  # not on the hub, offline and not cached: the other loaders report it
        return None


def build_transformer_pipeline(model_cfg: DictConfig, device: torch.device) -> DiffusionModel:
    """DiT (class-conditional, CFG with the null class), SD3 (CFG) or Flux (guidance embedding)."""
    from autodiff_opt.models.pipelines import load_transformer_pipeline

    if model_cfg.converter or model_cfg.classifier:
        raise ModelLoadError("model.converter and model.classifier apply to ADM checkpoints, not to DiT / SD3 / Flux"
                             " pipelines: set them to null")
    model = load_transformer_pipeline(str(model_cfg.pretrained), model_cfg.prompts,
                                      guidance_scale=float(model_cfg.guidance_scale),
                                      decode_batch_size=int(model_cfg.decode_batch_size), device=device,
                                      dtype=_DTYPES[model_cfg.dtype], name=model_cfg.name,
                                      source_hint=str(model_cfg.source_hint or ""),
                                      image_size=model_cfg.image_size)
    model.source = str(model_cfg.pretrained)
    return model


def attach_classifier(model: DiffusionModel, model_cfg: DictConfig, device: torch.device) -> None:
    """Classifier guidance (ADM): eps <- eps - sqrt(1 - alpha_bar) * s * grad log p(y | x_t, t)."""
    from autodiff_opt.models.adm import ClassifierGuidance, load_adm_classifier

    path = Path(str(model_cfg.classifier)).expanduser()
    classifier = load_adm_classifier(path, model_cfg.preset or "imagenet64", device=device, option="model.classifier")
    model.guidance = ClassifierGuidance(classifier, model.alphas_cumprod, float(model_cfg.classifier_scale))


def missing_files(cfg: DictConfig) -> list[str]:
    """Every configured input file that is absent, each with where it comes from and the override to set."""
    hint = f" ({cfg.model.source_hint})" if cfg.model.source_hint else ""
    checks = []
    if cfg.model.converter:
        checks.append(("model.checkpoint", cfg.model.checkpoint, hint))
    if cfg.model.classifier:
        checks.append(("model.classifier", cfg.model.classifier, hint))
    data_hint = f" ({cfg.dataset.source_hint})" if cfg.dataset.source_hint else ""
    if cfg.model.prompts:
        checks.append(("model.prompts", cfg.model.prompts, data_hint))
    if not str(cfg.dataset.reference).startswith("builtin:"):
        checks.append(("dataset.reference", cfg.dataset.reference, data_hint))
    if cfg.metric.weights_path:
        inception = str(cfg.metric.feature_extractor).startswith("inception")
        checks.append(("metric.weights_path", cfg.metric.weights_path, f" ({INCEPTION_HINT})" if inception else ""))
    out = _missing_pretrained(cfg.model, hint)
    for option, value, where in checks:
        if value is None or not Path(str(value)).expanduser().exists():
            out.append(f"{option}={value} is missing{where}: set {option}=/path/to/it")
    return out


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in ("model_index.json", "config.json"))


def _missing_pretrained(model_cfg: DictConfig, hint: str) -> list[str]:
    """model.pretrained: a local folder that is absent, or a hub id that an offline machine has not cached."""
    ref = str(model_cfg.pretrained)
    if model_cfg.converter or ref.startswith(BUILTIN_PREFIX) or Path(ref).expanduser().exists():
        return []
    if _looks_like_path(ref):
        return [f"model.pretrained={ref}: no such file or directory{hint}: set model.pretrained=/path/to/the/model/folder"]
    if _hub_offline() and not _hub_cached(ref):
        return [f"model.pretrained={ref} is a hub id that is not in the local cache, and the hub is offline{hint}:"
                f" download it elsewhere (huggingface-cli download {ref} --local-dir DIR) and set model.pretrained=DIR"]
    return []
