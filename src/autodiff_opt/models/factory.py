"""Build the configured model through its family (models/families/), and list the configured input files that are absent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from autodiff_opt.models.base import DiffusionModel, ModelLoadError
from autodiff_opt.models.families import family_for
from autodiff_opt.models.sources import BUILTIN_PREFIX, looks_like_path

if TYPE_CHECKING:  # a layer below: the typed config (config.to_config)
    from autodiff_opt.config import Config, ModelConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INCEPTION_HINT = ("torch-fidelity's Inception weights, published at github.com/toshas/torch-fidelity/releases/download/"
                  "v0.2.0/weights-inception-2015-12-05-6726825d.pth")


def build_model(model_cfg: ModelConfig, device: torch.device, cache_dir: str | Path = "~/.cache/autodiff_opt") -> DiffusionModel:
    """The configured model, loaded by its family (``models.families.family_for``: DiT / SD3 / Flux pipelines,
    Stable Diffusion, ADM checkpoints, plain UNets)."""
    if model_cfg.dtype not in _DTYPES:
        raise ModelLoadError(f"model.dtype={model_cfg.dtype!r}: use one of {sorted(_DTYPES)}")
    family = family_for(model_cfg)
    model = family.load(model_cfg, device, _DTYPES[model_cfg.dtype], Path(cache_dir).expanduser())
    model.family = family.name
    return model


def missing_files(cfg: Config) -> list[str]:
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


def _missing_pretrained(model_cfg: ModelConfig, hint: str) -> list[str]:
    """model.pretrained: a local folder that is absent, or a hub id that an offline machine has not cached."""
    ref = str(model_cfg.pretrained)
    if model_cfg.converter or ref.startswith(BUILTIN_PREFIX) or Path(ref).expanduser().exists():
        return []
    if looks_like_path(ref):
        return [f"model.pretrained={ref}: no such file or directory{hint}: set model.pretrained=/path/to/the/model/folder"]
    if _hub_offline() and not _hub_cached(ref):
        return [f"model.pretrained={ref} is a hub id that is not in the local cache, and the hub is offline{hint}:"
                f" download it elsewhere (huggingface-cli download {ref} --local-dir DIR) and set model.pretrained=DIR"]
    return []
