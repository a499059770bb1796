"""Parameter names and tensor layouts: ADM (guided-diffusion) checkpoints -> diffusers modules.

The map is built module by module from the architecture, not by pattern matching on names, so a
checkpoint from another configuration fails with the exact keys that do not fit.

Module correspondences (ADM -> diffusers):
  time_embed.{0,2}              -> time_embedding.linear_{1,2}
  label_emb                     -> class_embedding
  input_blocks.0.0              -> conv_in
  ResBlock: in_layers.0 / in_layers.2 / emb_layers.1 / out_layers.0 / out_layers.3 / skip_connection
                                -> norm1 / conv1 / time_emb_proj / norm2 / conv2 / conv_shortcut
  AttentionBlock: norm / qkv (1x1 conv1d, 3C rows) / proj_out (1x1 conv1d)
                                -> group_norm / to_q, to_k, to_v (linear) / to_out.0 (linear)
  Downsample(conv).op, Upsample(conv).conv -> downsamplers.0.conv, upsamplers.0.conv
  out.0 / out.2                 -> conv_norm_out / conv_out
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from autodiff_opt.models.adm.config import AdmConfigError, AdmTrunk, AdmUNetConfig

Transform = Callable[[torch.Tensor], list[torch.Tensor]]

RESBLOCK_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


@dataclass(frozen=True)
class ModulePair:
    """One ADM module and the diffusers module that takes its parameters."""

    adm: str
    target: str
    kind: str  # "plain" (weight, bias), "tensor" (one named tensor), "resblock", "attention"
    heads: int = 0
    legacy_order: bool = False


class KeyMapError(KeyError):
    """Checkpoint keys that do not fit the chosen architecture; the message names them."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def split_qkv(qkv: torch.Tensor, heads: int, legacy_order: bool) -> list[torch.Tensor]:
    """Split ADM's fused qkv projection (rows 3C, any trailing dims) into q, k, v with C rows each.

    New order (QKVAttention): rows are [q | k | v], each head-major. Legacy order
    (QKVAttentionLegacy): rows are grouped per head, [q_h | k_h | v_h] for h = 0..H-1.
    diffusers' Attention splits q, k and v head-major, so both become head-major blocks.
    """
    rows = qkv.shape[0]
    if rows % (3 * heads):
        raise AdmConfigError(f"qkv with {rows} rows cannot hold q, k, v for {heads} heads")
    width = rows // (3 * heads)
    flat = qkv.reshape(rows, -1)
    if legacy_order:
        grouped = flat.view(heads, 3, width, -1).transpose(0, 1)
    else:
        grouped = flat.view(3, heads, width, -1)
    # clone: q, k, v must not share storage (safetensors refuses to save tensors that do)
    return [grouped[i].reshape(heads * width, *qkv.shape[1:]).clone() for i in range(3)]


def _trunk_pairs(cfg: AdmTrunk) -> Iterator[ModulePair]:
    """time embedding, stem, encoder levels and middle block."""
    yield ModulePair("time_embed.0", "time_embedding.linear_1", "plain")
    yield ModulePair("time_embed.2", "time_embedding.linear_2", "plain")
    yield ModulePair("input_blocks.0.0", "conv_in", "plain")
    index = 1
    last = len(cfg.channel_mult) - 1
    for level, width in enumerate(cfg.level_channels):
        for j in range(cfg.num_res_blocks):
            yield ModulePair(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resblock")
            if cfg.attention_at_level(level):
                yield _attention(cfg, f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", width)
            index += 1
        if level != last:
            target = f"down_blocks.{level}.downsamplers.0"
            if cfg.resblock_updown:
                yield ModulePair(f"input_blocks.{index}.0", target, "resblock")
            else:
                yield ModulePair(f"input_blocks.{index}.0.op", f"{target}.conv", "plain")
            index += 1
    deepest = cfg.level_channels[-1]
    yield ModulePair("middle_block.0", "mid_block.resnets.0", "resblock")
    yield _attention(cfg, "middle_block.1", "mid_block.attentions.0", deepest)
    yield ModulePair("middle_block.2", "mid_block.resnets.1", "resblock")


def _decoder_pairs(cfg: AdmUNetConfig) -> Iterator[ModulePair]:
    """Class embedding, decoder levels (deepest first) and output head of the full UNet."""
    if cfg.num_classes is not None:
        yield ModulePair("label_emb", "class_embedding", "plain")
    index = 0
    levels = list(enumerate(cfg.level_channels))[::-1]
    for up_index, (level, width) in enumerate(levels):
        for j in range(cfg.num_res_blocks + 1):
            yield ModulePair(f"output_blocks.{index}.0", f"up_blocks.{up_index}.resnets.{j}", "resblock")
            sub = 1
            if cfg.attention_at_level(level):
                yield _attention(cfg, f"output_blocks.{index}.1", f"up_blocks.{up_index}.attentions.{j}", width)
                sub = 2
            if level and j == cfg.num_res_blocks:
                target = f"up_blocks.{up_index}.upsamplers.0"
                if cfg.resblock_updown:
                    yield ModulePair(f"output_blocks.{index}.{sub}", target, "resblock")
                else:
                    yield ModulePair(f"output_blocks.{index}.{sub}.conv", f"{target}.conv", "plain")
            index += 1
    yield ModulePair("out.0", "conv_norm_out", "plain")
    yield ModulePair("out.2", "conv_out", "plain")


def _attention(cfg: AdmTrunk, adm: str, target: str, width: int) -> ModulePair:
    return ModulePair(adm, target, "attention", heads=cfg.heads(width), legacy_order=not cfg.use_new_attention_order)


def unet_module_pairs(cfg: AdmUNetConfig) -> list[ModulePair]:
    return [*_trunk_pairs(cfg), *_decoder_pairs(cfg)]


def trunk_module_pairs(cfg: AdmTrunk) -> list[ModulePair]:
    return list(_trunk_pairs(cfg))


def _squeeze_1x1(t: torch.Tensor) -> list[torch.Tensor]:
    """A 1x1 conv1d kernel [out, in, 1] becomes a linear weight [out, in]; biases pass through."""
    return [t.reshape(t.shape[0], -1) if t.dim() == 3 else t]


def _param_rules(pair: ModulePair) -> Iterator[tuple[str, list[str], Transform]]:
    """(ADM parameter name, diffusers parameter names, tensor transform) for one module."""
    identity: Transform = lambda t: [t]  # noqa: E731
    if pair.kind == "tensor":
        yield pair.adm, [pair.target], identity
        return
    for param in ("weight", "bias"):
        if pair.kind == "plain":
            yield f"{pair.adm}.{param}", [f"{pair.target}.{param}"], identity
        elif pair.kind == "resblock":
            for adm_part, target_part in RESBLOCK_PARTS.items():
                yield f"{pair.adm}.{adm_part}.{param}", [f"{pair.target}.{target_part}.{param}"], identity
        elif pair.kind == "attention":
            yield f"{pair.adm}.norm.{param}", [f"{pair.target}.group_norm.{param}"], identity
            qkv_targets = [f"{pair.target}.to_{name}.{param}" for name in "qkv"]
            yield f"{pair.adm}.qkv.{param}", qkv_targets, _qkv_transform(pair)
            yield f"{pair.adm}.proj_out.{param}", [f"{pair.target}.to_out.0.{param}"], _squeeze_1x1
        else:
            raise AdmConfigError(f"unknown module kind {pair.kind!r}")


def _qkv_transform(pair: ModulePair) -> Transform:
    def transform(t: torch.Tensor) -> list[torch.Tensor]:
        return [_squeeze_1x1(part)[0] for part in split_qkv(t, pair.heads, pair.legacy_order)]

    return transform


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_params(
    adm_state: dict[str, torch.Tensor],
    pairs: list[ModulePair],
    expected: dict[str, torch.Size],
    *,
    ignore_prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Rename and reshape every ADM parameter; fail naming unmapped, missing and misshapen keys.

    ``expected`` holds the diffusers parameter names and shapes. A rule applies only when its ADM key
    is in the checkpoint and its targets exist in the model (resblocks that keep their width have no
    skip_connection / conv_shortcut); every checkpoint key must be used and every target filled.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for pair in pairs:
        for adm_key, targets, transform in _param_rules(pair):
            if adm_key not in adm_state or not all(t in expected for t in targets):
                continue  # absent here: reported below as unmapped or missing
            used.add(adm_key)
            for target, tensor in zip(targets, transform(adm_state[adm_key])):
                out[target] = tensor.contiguous()
    unmapped = sorted(k for k in adm_state if k not in used and not k.startswith(ignore_prefixes))
    missing = sorted(k for k in expected if k not in out)
    misshapen = sorted(f"{k}: checkpoint gives {tuple(out[k].shape)}, model needs {tuple(expected[k])}"
                       for k in out if out[k].shape != expected[k])
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} checkpoint keys have no place in this architecture: {_preview(unmapped)}")
    if missing:
        problems.append(f"{len(missing)} model parameters get no checkpoint key: {_preview(missing)}")
    if misshapen:
        problems.append(f"{len(misshapen)} shape mismatches: {_preview(misshapen, 4)}")
    if problems:
        raise KeyMapError("ADM checkpoint does not fit the configuration (wrong preset or size arguments?): "
                          + "; ".join(problems))
    return out
