"""Convert a guided-diffusion (ADM) UNet checkpoint into a diffusers UNet2DModel folder.

    python -m autodiff_opt.models.adm.convert --checkpoint 64x64_diffusion.pt --preset imagenet64 --out DIR

writes DIR/config.json, DIR/diffusion_pytorch_model.safetensors, DIR/scheduler_config.json (DDPMScheduler
with ADM's schedule) and DIR/adm_config.json (the ADM settings used). The UNet outputs 2*C channels when
the checkpoint learned sigma; the first C are eps.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from autodiff_opt.models.adm.config import (
    ADM_GROUPS,
    ADM_NORM_EPS,
    UNET_PRESETS,
    AdmConfigError,
    AdmUNetConfig,
    scheduler_config,
)
from autodiff_opt.models.adm.keymap import convert_params, unet_module_pairs
from autodiff_opt.models.base import ModelLoadError
from autodiff_opt.models.loading import plain_state_dict

log = logging.getLogger(__name__)

RELEASE_URL = "https://github.com/openai/guided-diffusion#download-pre-trained-models"
RELEASED_FILES = ("64x64_diffusion.pt", "64x64_classifier.pt", "lsun_bedroom.pt", "lsun_cat.pt")


class MissingCheckpointError(FileNotFoundError):
    """The checkpoint file is not there; the message says where the authors published it."""


def missing_file_message(path: str | Path, option: str) -> str:
    return (f"ADM checkpoint not found: {path} — the authors published it in the openai/guided-diffusion"
            f" README ({RELEASE_URL}: {', '.join(RELEASED_FILES)}); download it and set {option}")


def load_adm_state_dict(path: str | Path, option: str = "--checkpoint") -> dict[str, torch.Tensor]:
    """torch.load of a guided-diffusion .pt (a plain state dict), weights only, on CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingCheckpointError(missing_file_message(path, option))
    return plain_state_dict(path, option)


def _block_types(cfg: AdmUNetConfig) -> tuple[list[str], list[str]]:
    plain_down = "ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"
    down = ["AttnDownBlock2D" if attn else plain_down for attn in cfg.attention_levels]
    up = ["AttnUpBlock2D" if attn else plain_up for attn in cfg.attention_levels][::-1]
    return down, up


def unet2d_config(cfg: AdmUNetConfig) -> dict[str, Any]:
    """The UNet2DModel configuration that computes exactly what ADM's UNetModel computes."""
    down, up = _block_types(cfg)
    resample = "resnet" if cfg.resblock_updown else "conv"
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,  # ADM's embedding is [cos, sin]
        "freq_shift": 0,  # frequencies exp(-ln(1e4) * i / half), as in ADM
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": cfg.level_channels,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": resample,
        "upsample_type": resample,
        "dropout": 0.0,
        "act_fn": "silu",
        "attention_head_dim": cfg.num_head_channels,
        "norm_num_groups": ADM_GROUPS,
        # The mid-block attention has no group norm under scale_shift unless this is set; ADM has one.
        "attn_norm_num_groups": ADM_GROUPS,
        "norm_eps": ADM_NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": cfg.num_classes,
    }


def _meta_unet(config: dict[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DModel

    with torch.device("meta"):
        return UNet2DModel(**config)


def convert_unet_state_dict(adm_state: dict[str, torch.Tensor], cfg: AdmUNetConfig) -> dict[str, torch.Tensor]:
    """ADM parameter dict -> UNet2DModel parameter dict (every key used, every parameter filled)."""
    expected = {k: v.shape for k, v in _meta_unet(unet2d_config(cfg)).state_dict().items()}
    return convert_params(adm_state, unet_module_pairs(cfg), expected)


def build_unet(adm_state: dict[str, torch.Tensor], cfg: AdmUNetConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A UNet2DModel (eval mode) carrying the converted ADM weights."""
    converted = {k: v.to(dtype) for k, v in convert_unet_state_dict(adm_state, cfg).items()}
    model = _meta_unet(unet2d_config(cfg))
    model.load_state_dict(converted, strict=True, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise AdmConfigError(f"tensors left without values after conversion: {leftover[:8]}")
    return model.eval()


def save_diffusers_folder(model: torch.nn.Module, cfg: AdmUNetConfig, out: str | Path) -> Path:
    """save_pretrained (safetensors) + scheduler_config.json + adm_config.json into one folder."""
    from diffusers import DDPMScheduler

    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    DDPMScheduler(**scheduler_config(cfg)).save_pretrained(out)
    (out / "adm_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def convert_checkpoint(checkpoint: str | Path, cfg: AdmUNetConfig, out: str | Path) -> Path:
    """Load a guided-diffusion .pt, convert it and write the diffusers folder."""
    state = load_adm_state_dict(checkpoint)
    model = build_unet(state, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("converted %d ADM tensors into %d parameters (%.1fM)", len(state), n_params, n_params / 1e6)
    folder = save_diffusers_folder(model, cfg, out)
    log.info("wrote %s", folder)
    return folder


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(" ", "").split(",") if v)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autodiff_opt.models.adm.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="guided-diffusion UNet state dict (.pt)")
    p.add_argument("--out", required=True, help="output folder (diffusers UNet2DModel)")
    p.add_argument("--preset", choices=sorted(UNET_PRESETS), help="the authors' settings for a released file")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-channels", type=int, help="ADM model_channels")
    p.add_argument("--channel-mult", type=_int_list, help="e.g. 1,2,3,4")
    p.add_argument("--num-res-blocks", type=int)
    p.add_argument("--attention-resolutions", type=_int_list, help="in pixels, e.g. 32,16,8")
    p.add_argument("--num-head-channels", type=int)
    p.add_argument("--num-classes", type=int, help="0 for an unconditional model")
    p.add_argument("--learn-sigma", type=_bool)
    p.add_argument("--use-scale-shift-norm", type=_bool)
    p.add_argument("--resblock-updown", type=_bool)
    p.add_argument("--use-new-attention-order", type=_bool)
    p.add_argument("--noise-schedule", choices=("linear", "cosine"))
    p.add_argument("--diffusion-steps", type=int)
    return p


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "t"):
        return True
    if text.lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def config_from_args(args: argparse.Namespace) -> AdmUNetConfig:
    """A preset with explicit arguments on top, or explicit arguments alone."""
    fields = {
        "image_size": args.image_size, "model_channels": args.num_channels, "channel_mult": args.channel_mult,
        "num_res_blocks": args.num_res_blocks, "attention_resolutions": args.attention_resolutions,
        "num_head_channels": args.num_head_channels, "learn_sigma": args.learn_sigma,
        "use_scale_shift_norm": args.use_scale_shift_norm, "resblock_updown": args.resblock_updown,
        "use_new_attention_order": args.use_new_attention_order, "noise_schedule": args.noise_schedule,
        "diffusion_steps": args.diffusion_steps,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if args.num_classes is not None:
        given["num_classes"] = args.num_classes or None
    if args.preset:
        return replace(UNET_PRESETS[args.preset], **given)
    needed = {"image_size": "--image-size", "model_channels": "--num-channels", "channel_mult": "--channel-mult",
              "num_res_blocks": "--num-res-blocks", "attention_resolutions": "--attention-resolutions"}
    absent = [flag for name, flag in needed.items() if name not in given]
    if absent:
        raise AdmConfigError(f"without --preset, give the architecture explicitly; missing: {', '.join(absent)}")
    return AdmUNetConfig(**given)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        convert_checkpoint(args.checkpoint, cfg, args.out)
    except (MissingCheckpointError, AdmConfigError, ModelLoadError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
