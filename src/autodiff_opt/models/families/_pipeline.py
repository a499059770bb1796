"""Pipeline folders a family loads itself (DiT, SD3, Flux): the layouts ``save_pretrained`` writes and the hub
publishes; every component named in ``model_index.json`` must be there with its weights, or the error names the
missing files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from autodiff_opt.models.base import DiffusionModel, ModelLoadError
from autodiff_opt.models.loading import local_root

WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
           "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def pipeline_kind(path: str | Path) -> str | None:
    """The family (dit, sd3, flux, ...) of a local folder whose model_index.json names a pipeline that a model
    family loads itself (``models.families.pipeline_families``)."""
    from autodiff_opt.models.families import pipeline_families

    index = Path(path).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        return pipeline_families().get(str(json.loads(index.read_text()).get("_class_name")))
    except (OSError, json.JSONDecodeError):
        return None


def missing_components(root: Path) -> list[str]:
    """The files each component of model_index.json needs that are absent (config and weights, or tokenizer files)."""
    index = json.loads((root / "model_index.json").read_text())
    out = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = root / name
        if name.startswith("tokenizer"):
            if not any((folder / f).is_file() for f in TOKENIZER_FILES):
                out.append(f"{name}/tokenizer.json (or vocab.json / spiece.model)")
        elif name.startswith("scheduler"):
            if not (folder / "scheduler_config.json").is_file():
                out.append(f"{name}/scheduler_config.json")
        else:
            if not (folder / "config.json").is_file():
                out.append(f"{name}/config.json")
            if not any((folder / w).is_file() for w in WEIGHTS):
                out.append(f"{name}/{WEIGHTS[0] if 'text_encoder' not in name else WEIGHTS[1]}")
    return out


def _fetch(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                                      ignore_patterns=["*.fp16.*", "*.bin", "*.onnx*", "*.msgpack"]))
    except Exception as err:  # offline, gated, missing: all end the same way for the user
        raise ModelLoadError(
            f"could not load hub pipeline {repo_id!r} ({type(err).__name__}): on a machine without network (or for a"
            f" gated model, after accepting its licence on the hub), run huggingface-cli download {repo_id}"
            " --local-dir DIR elsewhere and set model.pretrained=DIR") from err


def pipeline_root(pretrained: str, source_hint: str = "") -> tuple[Path, str]:
    """(local folder, kind) of a DiT / SD3 / Flux pipeline; every component present or a one-line error."""
    from autodiff_opt.models.families import pipeline_families

    root = local_root(pretrained, _fetch)
    kind = pipeline_kind(root)
    if kind is None:
        raise ModelLoadError(f"model.pretrained={pretrained!r}: no model_index.json naming one of"
                             f" {sorted(pipeline_families())}")
    missing = missing_components(root)
    if missing:
        hint = f" ({source_hint})" if source_hint else ""
        raise ModelLoadError(f"model.pretrained={pretrained}: the pipeline folder {root} lacks {', '.join(missing)}{hint}:"
                             " copy the whole folder (huggingface-cli download ID --local-dir DIR) and set"
                             " model.pretrained=DIR")
    return root, kind


def _load_pipeline(root: Path, dtype: torch.dtype) -> Any:
    import diffusers

    index = json.loads((root / "model_index.json").read_text())
    cls_name = index["_class_name"]
    # components saved as [null, null] (a pixel-space DiT has no VAE) are passed as None, as diffusers expects
    absent = {name: None for name, spec in index.items()
              if not name.startswith("_") and isinstance(spec, list) and spec[0] is None}
    try:
        return getattr(diffusers, cls_name).from_pretrained(root, local_files_only=True, torch_dtype=dtype, **absent)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load the {cls_name} in {root}: {err}") from err


def _sample_shape(channels: int, height: int, width: int) -> tuple[int, int, int]:
    return (int(channels), int(height), int(width))


def load_transformer_pipeline(pretrained: str, prompts: Any, *, guidance_scale: float, decode_batch_size: int,
                              device: torch.device | str, dtype: torch.dtype, name: str | None = None,
                              source_hint: str = "", image_size: int | None = None) -> DiffusionModel:
    """DiT, SD3, Flux (any family that loads its own pipeline folder) from a folder or hub id; the family is
    the one whose pipeline class model_index.json names."""
    from autodiff_opt.models.families import family_named

    root, kind = pipeline_root(pretrained, source_hint)
    family = family_named(kind)
    assert family.open_folder is not None  # pipeline_families lists only families that have one
    model = family.open_folder(root, prompts, guidance_scale=guidance_scale, decode_batch_size=decode_batch_size,
                               device=device, dtype=dtype, name=name, image_size=image_size)
    model.family = family.name
    return model
