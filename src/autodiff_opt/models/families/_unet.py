"""What the UNet families (plain UNets, ADM, Stable Diffusion) share: their layers, how one is skipped, and one
forward's inputs for the cost model.

A *layer* is one residual block (``ResnetBlock2D``, including the ones that up- or down-sample) or one
attention module (``Attention`` in ``UNet2DModel``'s Attn blocks, ``Transformer2DModel`` in
``UNet2DConditionModel``'s CrossAttn blocks) inside the down, mid or up blocks, in forward order: down
blocks, mid block, up blocks; inside a block ``resnets.0, attentions.0, resnets.1, ...`` then the resampler.
Stem, embeddings, output head and plain ``Downsample2D``/``Upsample2D`` are never layers.

A skipped layer returns what the layer itself would return if its residual branch were zero:

* ``ResnetBlock2D``: the shortcut path exactly as the block adds it: the input, resampled when the block
  up/down-samples, through ``conv_shortcut`` when the block has one, divided by ``output_scale_factor``.
* ``Attention``: the input, divided by ``rescale_output_factor`` when the module adds its own residual
  (``residual_connection=True``, as in every UNet Attn block); the input unchanged otherwise.
* ``Transformer2DModel``: the input (its output is ``proj_out(...) + input``), wrapped in the type the caller
  asked for: ``(tensor,)`` with ``return_dict=False``, ``Transformer2DModelOutput`` otherwise.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Iterator

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from autodiff_opt.models.families.record import Unit

log = logging.getLogger(__name__)

# (short name used in layer names, attribute of the UNet)
BLOCK_GROUPS: tuple[tuple[str, str], ...] = (("down", "down_blocks"), ("mid", "mid_block"), ("up", "up_blocks"))
RESAMPLERS: tuple[str, ...] = ("downsamplers", "upsamplers")
UNET_KINDS = (None, "resnet", "attention")


def layer_kind(module: nn.Module | None) -> str | None:
    """``"resnet"`` or ``"attention"`` for a skippable module, ``None`` for anything else."""
    if isinstance(module, ResnetBlock2D):
        return "resnet"
    if isinstance(module, (Attention, Transformer2DModel)):
        return "attention"
    return None


def _iter_blocks(unet: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(short prefix, module path, block) for every down, mid and up block, in forward order."""
    for short, attr in BLOCK_GROUPS:
        group = getattr(unet, attr, None)
        if group is None:
            continue
        if isinstance(group, nn.ModuleList):
            for b, block in enumerate(group):
                yield f"{short}.{b}", f"{attr}.{b}", block
        else:
            yield short, attr, group


def _block_members(block: nn.Module) -> Iterator[tuple[str, int, nn.Module | None]]:
    """(attribute, index, module) of a block's resnets and attentions interleaved, then resamplers."""
    resnets = list(getattr(block, "resnets", None) or [])
    attentions = list(getattr(block, "attentions", None) or [])
    for i in range(max(len(resnets), len(attentions))):
        if i < len(resnets):
            yield "resnets", i, resnets[i]
        if i < len(attentions):
            yield "attentions", i, attentions[i]
    for attr in RESAMPLERS:
        for j, module in enumerate(getattr(block, attr, None) or []):
            yield attr, j, module


def unet_units(unet: nn.Module, units: str = "blocks") -> list[Unit]:
    """The residual and attention blocks of a ``UNet2DModel`` / ``UNet2DConditionModel`` whatever ``units`` says."""
    out: list[Unit] = []
    for short, block_path, block in _iter_blocks(unet):
        for attr, idx, module in _block_members(block):
            kind = layer_kind(module)
            if kind is None:
                if module is not None and attr in ("resnets", "attentions"):
                    log.warning("%s.%s.%d (%s) is not a supported layer type: never skipped",
                                block_path, attr, idx, type(module).__name__)
                continue
            out.append((f"{short}.{attr}.{idx}", kind, f"{block_path}.{attr}.{idx}"))
    return out


def is_unet(module: nn.Module) -> bool:
    """A UNet-shaped network (down, mid or up blocks), whatever its class."""
    return any(getattr(module, attr, None) is not None for _, attr in BLOCK_GROUPS)


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def skip_resnet(block: ResnetBlock2D, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``ResnetBlock2D`` output with the residual branch zero: resample, ``conv_shortcut``, scale."""
    x = _first_arg(args, kwargs, "input_tensor")
    if block.upsample is not None:
        x = block.upsample(x)
    elif block.downsample is not None:
        x = block.downsample(x)
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    return x / block.output_scale_factor


def skip_attention(attn: Attention, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Attention`` output with the attention branch zero (the processor's residual and rescale)."""
    x = _first_arg(args, kwargs, "hidden_states")
    if attn.residual_connection:
        return x / attn.rescale_output_factor
    return x.clone()


@functools.lru_cache(maxsize=None)
def _return_dict_position(cls: type) -> int:
    return list(inspect.signature(cls.forward).parameters).index("return_dict") - 1  # minus self


def skip_transformer(model: Transformer2DModel, *args: Any, **kwargs: Any) -> Any:
    """``Transformer2DModel`` output with the transformer branch zero: its input, in the caller's type."""
    x = _first_arg(args, kwargs, "hidden_states").clone()
    pos = _return_dict_position(type(model))
    return_dict = kwargs.get("return_dict", args[pos] if len(args) > pos else True)
    return Transformer2DModelOutput(sample=x) if return_dict else (x,)


def unet_skip(module: nn.Module, kind: str | None = None) -> Callable[..., Any] | None:
    """The skip of a UNet layer (``kind``: None, "resnet" or "attention"), None for anything else."""
    if kind not in UNET_KINDS:
        return None
    if isinstance(module, ResnetBlock2D):
        return skip_resnet
    if isinstance(module, Attention):
        return skip_attention
    if isinstance(module, Transformer2DModel):
        if not module.is_input_continuous:
            raise TypeError("only Transformer2DModel on continuous inputs (UNet feature maps) can be skipped")
        return skip_transformer
    return None


def _resolution(sample_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(sample_size, int):
        return sample_size, sample_size
    return int(sample_size[0]), int(sample_size[1])


def _time_embed_dim(cfg: Any) -> int:
    return int(cfg.get("time_embedding_dim") or cfg["block_out_channels"][0] * 4)


def _class_labels(cfg: Any, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    kind = cfg.get("class_embed_type")
    if kind is None:
        if cfg.get("num_class_embeds") is None:
            return None
        return torch.zeros(batch, dtype=torch.long, device=device)
    if kind == "timestep":
        return torch.zeros(batch, dtype=torch.long, device=device)
    if kind == "identity":
        return torch.zeros(batch, _time_embed_dim(cfg), dtype=dtype, device=device)
    if kind in ("projection", "simple_projection"):
        return torch.zeros(batch, cfg["projection_class_embeddings_input_dim"], dtype=dtype, device=device)
    raise NotImplementedError(f"class_embed_type={kind!r}: pass the model inputs explicitly")


def _conditioning(cfg: Any, batch: int, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``encoder_hidden_states`` (and SDXL's ``added_cond_kwargs``) for a ``UNet2DConditionModel``."""
    dim = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]
    if not isinstance(dim, int):
        raise NotImplementedError(f"cross_attention_dim={dim!r} per block: pass the model inputs explicitly")
    out: dict[str, Any] = {"encoder_hidden_states": torch.zeros(batch, seq_len, dim, dtype=dtype, device=device)}
    added = cfg.get("addition_embed_type")
    if added == "text_time":
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        out["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, text_dim, dtype=dtype, device=device),
            "time_ids": torch.zeros(batch, 6, dtype=dtype, device=device),
        }
    elif added not in (None, "text"):
        raise NotImplementedError(f"addition_embed_type={added!r}: pass the model inputs explicitly")
    return out


def example_inputs(unet: nn.Module, batch_size: int = 1, encoder_seq_len: int = 77, timestep: int = 500) -> dict[str, Any]:
    """Keyword inputs for one forward of a diffusers UNet at its own resolution, on its device and dtype."""
    cfg = unet.config
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    h, w = _resolution(cfg["sample_size"])
    gen = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch_size, cfg["in_channels"], h, w, generator=gen).to(device, dtype),
        "timestep": torch.full((batch_size,), timestep, dtype=torch.long, device=device),
    }
    labels = _class_labels(cfg, batch_size, device, dtype)
    if labels is not None:
        inputs["class_labels"] = labels
    if "cross_attention_dim" in cfg:
        inputs.update(_conditioning(cfg, batch_size, encoder_seq_len, device, dtype))
    return inputs
