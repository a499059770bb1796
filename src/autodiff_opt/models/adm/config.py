"""Architecture settings of ADM (guided-diffusion) networks, the authors' presets, and ADM's beta schedules.

Field names follow the flags of the authors' sampling scripts (``--num_channels`` is ``model_channels``,
``--attention_resolutions 32,16,8`` is ``attention_resolutions=(32, 16, 8)`` in pixels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from autodiff_opt.core.errors import ConfigError

ADM_GROUPS = 32  # ADM normalises with GroupNorm(32, C), eps 1e-5 (the torch default)
ADM_NORM_EPS = 1e-5
COSINE_MAX_BETA = 0.999


class AdmConfigError(ConfigError):
    """An ADM configuration that this project cannot build or express as a diffusers UNet2DModel (a user
    error: one line, exit 2)."""


@dataclass(frozen=True)
class AdmTrunk:
    """The encoder trunk shared by the ADM UNet and the ADM noisy-image classifier."""

    image_size: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    in_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        self.validate()

    def validate(self) -> None:
        if self.num_head_channels <= 0:
            raise AdmConfigError(
                "only ADM's --num_head_channels mode is supported (a fixed head width); a fixed head count"
                " (--num_heads with --num_head_channels -1) gives a different head width per level, which"
                " diffusers' single attention_head_dim cannot express"
            )
        for ch in self.level_channels:
            if ch % ADM_GROUPS or ch % self.num_head_channels:
                raise AdmConfigError(
                    f"level width {ch} must be a multiple of {ADM_GROUPS} (group norm) and of"
                    f" num_head_channels={self.num_head_channels}"
                )

    @property
    def level_channels(self) -> list[int]:
        """Output width of each resolution level, shallowest first."""
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def attention_at_level(self, level: int) -> bool:
        """ADM's rule: a level attends when image_size // res equals its downsampling rate 2**level."""
        rates = {self.image_size // res for res in self.attention_resolutions}
        return 2**level in rates

    @property
    def attention_levels(self) -> list[bool]:
        return [self.attention_at_level(level) for level in range(len(self.channel_mult))]

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels


@dataclass(frozen=True)
class AdmUNetConfig(AdmTrunk):
    """The full ADM UNet (guided-diffusion ``UNetModel``) and its diffusion settings."""

    num_classes: int | None = None
    learn_sigma: bool = True
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000

    def validate(self) -> None:
        super().validate()
        if self.channel_mult[0] != 1:
            raise AdmConfigError(
                f"channel_mult[0]={self.channel_mult[0]}: diffusers sizes the time embedding from the first"
                " level's width, ADM from model_channels; they agree only when channel_mult[0] == 1"
            )
        if self.noise_schedule not in ("linear", "cosine"):
            raise AdmConfigError(f"noise_schedule={self.noise_schedule!r}: ADM has 'linear' and 'cosine'")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdmClassifierConfig(AdmTrunk):
    """ADM's noisy-image classifier (guided-diffusion ``EncoderUNetModel`` with attention pooling)."""

    num_classes: int = 1000
    pool: str = "attention"

    def validate(self) -> None:
        super().validate()
        if self.pool != "attention":
            raise AdmConfigError(f"pool={self.pool!r}: only the attention pooling head of the released classifiers is implemented")

    @property
    def pooled_size(self) -> int:
        """Side of the feature map the pooling head sees (image_size / 2**(levels-1))."""
        return self.image_size // 2 ** (len(self.channel_mult) - 1)


UNET_PRESETS: dict[str, AdmUNetConfig] = {
    # 64x64_diffusion.pt: README flags of the classifier-guidance example for the 64x64 model.
    "imagenet64": AdmUNetConfig(
        image_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=True, num_classes=1000, learn_sigma=True,
        noise_schedule="cosine",
    ),
    # lsun_bedroom.pt / lsun_cat.pt / lsun_horse.pt: README "LSUN models" flags (legacy attention order).
    "lsun256": AdmUNetConfig(
        image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=False, num_classes=None, learn_sigma=True,
        noise_schedule="linear",
    ),
}
UNET_PRESETS["lsun_bedroom"] = UNET_PRESETS["lsun256"]
UNET_PRESETS["lsun_cat"] = UNET_PRESETS["lsun256"]

CLASSIFIER_PRESETS: dict[str, AdmClassifierConfig] = {
    # 64x64_classifier.pt: classifier_defaults() with --classifier_depth 4 from the README example.
    "imagenet64": AdmClassifierConfig(
        image_size=64, model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=4,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=False, num_classes=1000,
    ),
}


def unet_preset(name: str, **overrides: Any) -> AdmUNetConfig:
    """A named UNet preset, optionally with some fields replaced."""
    if name not in UNET_PRESETS:
        raise AdmConfigError(f"unknown ADM preset {name!r}: known ones are {sorted(UNET_PRESETS)}")
    return replace(UNET_PRESETS[name], **overrides)


def adm_betas(noise_schedule: str, num_steps: int = 1000) -> torch.Tensor:
    """ADM's betas in float64: 'linear' (Ho et al., rescaled to num_steps) or 'cosine' (Nichol & Dhariwal)."""
    if noise_schedule == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if noise_schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), COSINE_MAX_BETA)
                 for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise AdmConfigError(f"noise_schedule={noise_schedule!r}: ADM has 'linear' and 'cosine'")


def adm_alphas_cumprod(noise_schedule: str, num_steps: int = 1000) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64, length num_steps."""
    return torch.cumprod(1.0 - adm_betas(noise_schedule, num_steps), dim=0)


def scheduler_config(cfg: AdmUNetConfig) -> dict[str, Any]:
    """A DDPMScheduler config with ADM's schedule, eps prediction and learned-range variance."""
    scale = 1000.0 / cfg.diffusion_steps
    return {
        "num_train_timesteps": cfg.diffusion_steps,
        "beta_schedule": "squaredcos_cap_v2" if cfg.noise_schedule == "cosine" else "linear",
        "beta_start": scale * 1e-4,
        "beta_end": scale * 0.02,
        "prediction_type": "epsilon",
        "variance_type": "learned_range" if cfg.learn_sigma else "fixed_large",
        "clip_sample": True,
        "clip_sample_range": 1.0,
    }
