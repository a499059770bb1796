"""What the transformer families (DiT, SD3, Flux) share: residual blocks as layers, their attention and
feed-forward branches (``units="sub_blocks"``), and the skips of both.

A layer is one residual block (``units="blocks"``: ``blocks.i``, then Flux's ``single.i``) or each attention
and feed-forward branch inside a block (``blocks.i.attn1``, ``blocks.i.ff``; SD3 / Flux: ``blocks.i.attn``,
``blocks.i.ff``, ``blocks.i.ff_context``; Flux single blocks: ``single.i.attn``), in forward order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from autodiff_opt.models.families.record import Unit

if TYPE_CHECKING:
    from autodiff_opt.config import ModelConfig

SkipFn = Callable[..., Any]

# (short name used in layer names, attribute of the transformer): DiT's and SD3's; Flux adds its single blocks
BLOCKS: tuple[tuple[str, str], ...] = (("blocks", "transformer_blocks"),)
# Branches of a block whose output is added to the residual stream (after the block's gate), in forward order.
SUB_BLOCKS: tuple[tuple[str, str], ...] = (("attn1", "block_attention"), ("attn", "block_attention"),
                                           ("attn2", "block_attention"), ("ff", "block_ff"), ("ff_context", "block_ff"))


def transformer_units(model: nn.Module, units: str, groups: tuple[tuple[str, str], ...] = BLOCKS) -> list[Unit]:
    """The residual blocks of ``groups`` in forward order, or their attention and feed-forward branches."""
    out: list[Unit] = []
    for short, attr in groups:
        for i, block in enumerate(getattr(model, attr, None) or []):
            if units == "blocks":
                out.append((f"{short}.{i}", "block", f"{attr}.{i}"))
                continue
            for sub, kind in SUB_BLOCKS:
                if isinstance(getattr(block, sub, None), nn.Module):
                    out.append((f"{short}.{i}.{sub}", kind, f"{attr}.{i}.{sub}"))
    return out


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _text_stream(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A transformer block's or joint attention's second input, ``encoder_hidden_states`` (None: none)."""
    return args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")


def skip_dit_block(block: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """DiT's ``BasicTransformerBlock``: the residual stream passes through unchanged."""
    return _first_arg(args, kwargs, "hidden_states").clone()


def skip_joint_block(block: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """SD3's ``JointTransformerBlock`` and Flux's double and single blocks: (text stream, image stream)
    pass through unchanged (the last SD3 block, ``context_pre_only``, returns no text stream)."""
    hidden = _first_arg(args, kwargs, "hidden_states").clone()
    context = _text_stream(args, kwargs)
    if getattr(block, "context_pre_only", False) or context is None:
        return None, hidden
    return context.clone(), hidden


def skip_block_attention(attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """An attention branch inside a transformer block: zero output, so the block's gated residual
    ``x + gate * attn(...)`` is ``x``; a joint attention (text stream given) returns zeros for both streams."""
    hidden = _first_arg(args, kwargs, "hidden_states")
    context = _text_stream(args, kwargs)
    if context is None:
        return torch.zeros_like(hidden)
    return torch.zeros_like(hidden), torch.zeros_like(context)


def skip_block_ff(ff: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A feed-forward branch inside a transformer block (dim_out = dim): zero output."""
    return torch.zeros_like(_first_arg(args, kwargs, "hidden_states"))


BRANCH_SKIPS: dict[str, SkipFn] = {"block_attention": skip_block_attention, "block_ff": skip_block_ff}


def block_skipper(block_skips: dict[str, SkipFn]) -> Callable[[nn.Module, str | None], SkipFn | None]:
    """A family's ``skip``: a branch by its kind, a block by its class name (``block_skips``)."""

    def skip(module: nn.Module, kind: str | None = None) -> SkipFn | None:
        if kind in BRANCH_SKIPS:
            return BRANCH_SKIPS[kind]
        return block_skips.get(type(module).__name__)

    return skip


def load_pipeline_model(model_cfg: ModelConfig, device: Any, dtype: Any, cache_dir: Any = None) -> Any:
    """A DiT / SD3 / Flux family's ``load``: the transformer pipeline loader, after the ADM-only settings are refused."""
    from autodiff_opt.models.base import ModelLoadError
    from autodiff_opt.models.families._pipeline import load_transformer_pipeline

    if model_cfg.converter or model_cfg.classifier:
        raise ModelLoadError("model.converter and model.classifier apply to ADM checkpoints, not to DiT / SD3 / Flux"
                             " pipelines: set them to null")
    model = load_transformer_pipeline(str(model_cfg.pretrained), model_cfg.prompts,
                                      guidance_scale=float(model_cfg.guidance_scale),
                                      decode_batch_size=int(model_cfg.decode_batch_size), device=device,
                                      dtype=dtype, name=model_cfg.name,
                                      source_hint=str(model_cfg.source_hint or ""),
                                      image_size=model_cfg.image_size)
    model.source = str(model_cfg.pretrained)
    return model
