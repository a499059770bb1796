"""Load a diffusers UNet (folder, pipeline folder, hub id or embedded asset) with its noise schedule."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from autodiff_opt.models.base import DiffusionModel, ModelLoadError
from autodiff_opt.models.flow import flow_model_from, is_flow_scheduler
from autodiff_opt.models.sources import looks_like_path, read_json, resolve_pretrained

log = logging.getLogger(__name__)


def check_safetensors(path: Path) -> None:
    """The file's header parses and its tensors cover the file (what a cut download or a saved error page
    fails): reads the header only, no tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({str(err).strip()[:120]}): the file is"
                             " damaged or cut short; copy or download it again") from err


def plain_state_dict(path: Path, option: str, mmap: bool = False) -> dict[str, Any]:
    """torch.load(weights_only=True) of a checkpoint, with one-line errors. With mmap the tensors are mapped,
    not read: a cheap check of a large file (falls back to a full load for the pre-1.6 torch.save format)."""
    import pickle

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"{option}={path} is not a plain state dict: it holds pickled Python objects, which"
            " torch.load(weights_only=True) refuses to run; where you trust the file, load it with"
            " weights_only=False and torch.save its state_dict() (a dict of tensors), then point"
            f" {option} at the new file") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        raise ModelLoadError(f"{option}={path} is not a readable PyTorch checkpoint ({type(err).__name__}:"
                             f" {first}): the file is damaged or cut short; download it again") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{option}={path} is not a state dict (a dict of tensors): save model.state_dict()"
                             f" with torch.save and point {option} at that file")
    return state


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """alpha_bar in float64 from any diffusers scheduler config (betas as the scheduler builds them)."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = DDPMScheduler.from_config(config)
    return torch.cumprod(1.0 - scheduler.betas.to(torch.float64), dim=0)


def _load_unet(source: str, subfolder: str | None, local_only: bool, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers

    kwargs: dict[str, Any] = {"local_files_only": local_only, "low_cpu_mem_usage": False, "torch_dtype": dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    config_path = Path(source) / (subfolder or "") / "config.json"
    class_name = read_json(config_path).get("_class_name", "UNet2DModel") if config_path.is_file() else "UNet2DModel"
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelLoadError(f"{config_path} names class {class_name!r}, which diffusers does not have")
    return cls.from_pretrained(source, **kwargs)


def _scheduler_config(folder: Path, default: dict[str, Any] | None) -> dict[str, Any]:
    for candidate in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
                      folder.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return read_json(candidate)
    if default:
        log.warning("no scheduler_config.json beside %s: using model.noise_schedule from the config", folder)
        return default
    raise ModelLoadError(
        f"{folder} has no scheduler_config.json (the noise schedule): add one, or set model.noise_schedule"
        " (e.g. {num_train_timesteps: 1000, beta_schedule: linear, prediction_type: epsilon})"
    )


def _local_parts(root: Path, subfolder: str | None) -> tuple[str, str | None, Path]:
    """(source, unet subfolder, unet folder) for a UNet folder or a pipeline folder."""
    if subfolder:
        return str(root), subfolder, root / subfolder
    if (root / "model_index.json").is_file():
        if not (root / "unet" / "config.json").is_file():
            raise ModelLoadError(f"{root} is a pipeline folder without unet/config.json: only UNet pipelines are supported")
        return str(root), "unet", root / "unet"
    if (root / "config.json").is_file():
        return str(root), None, root
    raise ModelLoadError(
        f"{root} is not a diffusers model folder: expected model_index.json (pipeline) or config.json (UNet)"
        " — point model.pretrained at the folder save_pretrained wrote"
    )


def _fetch_hub(repo_id: str) -> Path:
    """Resolve a hub id to a local snapshot (cache or download); clear error when offline."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "unet/*", "scheduler/*", "vae/*",
                                                               "*.safetensors", "*.bin"]))
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise ModelLoadError(
            f"could not load hub model {repo_id!r} ({type(err).__name__}): on a machine without network,"
            f" download it elsewhere (huggingface-cli download {repo_id} --local-dir DIR) and set model.pretrained=DIR"
        ) from err


def local_root(pretrained: str, fetch: Callable[[str], Path]) -> Path:
    """The local folder of model.pretrained: an embedded asset, a path, or a hub id resolved by `fetch`."""
    ref = resolve_pretrained(pretrained)
    root = Path(ref)
    if root.exists():
        return root
    if looks_like_path(ref):
        raise ModelLoadError(f"model.pretrained={pretrained!r}: no such file or directory")
    return fetch(ref)


def load_model(
    pretrained: str,
    *,
    name: str | None = None,
    subfolder: str | None = None,
    noise_schedule: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionModel:
    """Load a UNet with its alpha_bar and prediction type; pixel-space models only (latent models add a decoder)."""
    root = local_root(pretrained, _fetch_hub)
    source, unet_sub, unet_dir = _local_parts(root, subfolder)
    unet = _load_unet(source, unet_sub, local_only=True, dtype=dtype).to(device=device).eval()
    unet.requires_grad_(False)
    sched = _scheduler_config(unet_dir, noise_schedule)
    config = unet.config
    in_channels = int(config.in_channels)
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    num_classes = getattr(config, "num_class_embeds", None)
    if is_flow_scheduler(sched):  # a rectified flow: velocity prediction on the (0, 1] time grid
        flow = flow_model_from(unet, sched, name or root.name, (in_channels, int(height), int(width)),
                               int(num_classes) if num_classes else None)
        log.info("loaded %s: %s, rectified flow (shift %.3g), sample %s, classes=%s", flow.name, type(unet).__name__,
                 flow.shift, flow.sample_shape, flow.num_classes)
        return flow
    learned = int(config.out_channels) == 2 * in_channels or sched.get("variance_type") in ("learned", "learned_range")
    model = DiffusionModel(
        name=name or root.name,
        denoiser=unet,
        alphas_cumprod=_alphas_cumprod(sched),
        prediction_type=sched.get("prediction_type", "epsilon"),
        sample_shape=(in_channels, int(height), int(width)),
        num_classes=int(num_classes) if num_classes else None,
        learned_sigma=learned,
    )
    log.info("loaded %s: %s, T=%d, %s, sample %s, classes=%s", model.name, type(unet).__name__,
             model.num_train_timesteps, model.prediction_type, model.sample_shape, model.num_classes)
    return model
