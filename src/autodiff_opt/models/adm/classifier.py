"""ADM's noisy-image classifier p(y | x_t, t): the UNet encoder, a middle block and attention pooling.

The trunk is built from diffusers blocks (the same ones the converted UNet uses) and the released
``64x64_classifier.pt`` is loaded through the explicit key map of ``keymap.py``; only the pooling head
is written here. Inputs are x_t in the model's [-1, 1] scale and the original training step t.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autodiff_opt.models.adm.config import (
    ADM_GROUPS,
    ADM_NORM_EPS,
    CLASSIFIER_PRESETS,
    AdmClassifierConfig,
    AdmConfigError,
)
from autodiff_opt.models.adm.convert import load_adm_state_dict
from autodiff_opt.models.adm.keymap import ModulePair, convert_params, trunk_module_pairs

log = logging.getLogger(__name__)


class AttentionPool(nn.Module):
    """Attention pooling (as in CLIP): the mean token, with learned positions, attends over all tokens.

    Parameter names and layouts follow the checkpoint: positional_embedding [C, HW + 1], qkv_proj and
    c_proj as 1x1 conv1d. q, k, v are split first, then into heads (ADM's "new" attention order).
    """

    def __init__(self, channels: int, side: int, head_channels: int, out_features: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(channels, side * side + 1))
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_features, 1)
        self.heads = channels // head_channels

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = h.flatten(2)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        q, k, v = self.qkv_proj(tokens).chunk(3, dim=1)
        batch, channels, length = k.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # [B, C, L] -> [B, heads, L, C / heads]
            return x.reshape(batch, self.heads, channels // self.heads, -1).transpose(-1, -2)

        # Only the pooled (first) token is read out, so only its query is needed.
        pooled = F.scaled_dot_product_attention(split_heads(q[..., :1]), split_heads(k), split_heads(v))
        pooled = pooled.transpose(-1, -2).reshape(batch, channels, 1)
        return self.c_proj(pooled)[..., 0]


def _timestep_batch(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)


class AdmClassifier(nn.Module):
    """forward(x_t, t) -> logits [B, num_classes]; t is the training time step (int or [B] tensor)."""

    def __init__(self, cfg: AdmClassifierConfig) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block

        self.config = cfg
        widths = cfg.level_channels
        time_shift = "scale_shift" if cfg.use_scale_shift_norm else "default"
        self.time_proj = Timesteps(cfg.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(cfg.model_channels, cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            self.down_blocks.append(get_down_block(
                "AttnDownBlock2D" if cfg.attention_at_level(level) else
                ("ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D"),
                num_layers=cfg.num_res_blocks, in_channels=widths[max(level - 1, 0)], out_channels=width,
                temb_channels=cfg.time_embed_dim, add_downsample=level < len(widths) - 1,
                resnet_eps=ADM_NORM_EPS, resnet_act_fn="silu", resnet_groups=ADM_GROUPS,
                attention_head_dim=cfg.num_head_channels, downsample_padding=1,
                resnet_time_scale_shift=time_shift,
                downsample_type="resnet" if cfg.resblock_updown else "conv", dropout=0.0,
            ))
        self.mid_block = UNetMidBlock2D(
            in_channels=widths[-1], temb_channels=cfg.time_embed_dim, dropout=0.0, resnet_eps=ADM_NORM_EPS,
            resnet_act_fn="silu", output_scale_factor=1.0, resnet_time_scale_shift=time_shift,
            attention_head_dim=cfg.num_head_channels, resnet_groups=ADM_GROUPS, attn_groups=ADM_GROUPS,
        )
        self.norm_out = nn.GroupNorm(ADM_GROUPS, widths[-1], eps=ADM_NORM_EPS)
        self.pool = AttentionPool(widths[-1], cfg.pooled_size, cfg.num_head_channels, cfg.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        emb = self.time_embedding(self.time_proj(_timestep_batch(t, x)).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        h = self.mid_block(h, emb)
        return self.pool(F.silu(self.norm_out(h)))

    @classmethod
    def from_adm_state_dict(cls, adm_state: dict[str, torch.Tensor], cfg: AdmClassifierConfig) -> "AdmClassifier":
        """Build the classifier and fill it from a guided-diffusion EncoderUNetModel state dict."""
        model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = convert_params(adm_state, classifier_module_pairs(cfg), expected)
        model.load_state_dict(state, strict=True)
        return model.eval()


def classifier_module_pairs(cfg: AdmClassifierConfig) -> list[ModulePair]:
    head = [
        ModulePair("out.0", "norm_out", "plain"),
        ModulePair("out.2.positional_embedding", "pool.positional_embedding", "tensor"),
        ModulePair("out.2.qkv_proj", "pool.qkv_proj", "plain"),
        ModulePair("out.2.c_proj", "pool.c_proj", "plain"),
    ]
    return [*trunk_module_pairs(cfg), *head]


def classifier_preset(name: str = "imagenet64", **overrides: Any) -> AdmClassifierConfig:
    if name not in CLASSIFIER_PRESETS:
        raise AdmConfigError(f"unknown ADM classifier preset {name!r}: known ones are {sorted(CLASSIFIER_PRESETS)}")
    return replace(CLASSIFIER_PRESETS[name], **overrides)


def load_adm_classifier(
    path: str | Path,
    cfg: AdmClassifierConfig | str = "imagenet64",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    option: str = "the classifier path option",
) -> AdmClassifier:
    """Load e.g. ``64x64_classifier.pt`` (guided-diffusion format) into an eval-mode AdmClassifier."""
    config = classifier_preset(cfg) if isinstance(cfg, str) else cfg
    model = AdmClassifier.from_adm_state_dict(load_adm_state_dict(path, option=option), config)
    model.requires_grad_(False)
    log.info("loaded ADM classifier %s (%d classes)", path, config.num_classes)
    return model.to(device=device, dtype=dtype)
