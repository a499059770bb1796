"""Which layers of a diffusers UNet can be skipped: discovery, stable ids and readable names.

A *layer* is one residual block (``ResnetBlock2D``, including the ones that up- or down-sample)
or one attention module (``Attention`` in ``UNet2DModel``'s Attn blocks, ``Transformer2DModel`` in
``UNet2DConditionModel``'s CrossAttn blocks) inside the down, mid or up blocks. Ids follow the
order in which the forward pass runs the layers: down blocks, mid block, up blocks; inside a block
``resnets.0, attentions.0, resnets.1, ...`` then the resampler. Stem (``conv_in``), embeddings,
output head and plain ``Downsample2D``/``Upsample2D`` are never layers.

In a transformer denoiser (DiT, SD3, Flux) a layer is one residual block (``units="blocks"``,
``blocks.i`` then Flux's ``single.i``), or, with ``units="sub_blocks"``, each attention and
feed-forward branch inside a block (``blocks.i.attn1``, ``blocks.i.ff``; SD3 / Flux: ``blocks.i.attn``,
``blocks.i.ff``, ``blocks.i.ff_context``; Flux single blocks: ``single.i.attn``), in forward order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from autodiff_opt.core.genome import Genome
from autodiff_opt.specs.options import SKIP_UNITS

log = logging.getLogger(__name__)

LayerKind = Literal["resnet", "attention", "block", "block_attention", "block_ff"]
SkipUnits = Literal["blocks", "sub_blocks"]

# (short name used in layer names, attribute of the UNet)
_BLOCK_GROUPS: tuple[tuple[str, str], ...] = (("down", "down_blocks"), ("mid", "mid_block"), ("up", "up_blocks"))
_RESAMPLERS: tuple[str, ...] = ("downsamplers", "upsamplers")


@dataclass(frozen=True)
class Layer:
    """One skippable layer: ``id`` indexes masks, ``name`` is for people, ``path`` for ``get_submodule``."""

    id: int
    name: str
    kind: LayerKind
    path: str


def layer_kind(module: nn.Module | None) -> LayerKind | None:
    """``"resnet"`` or ``"attention"`` for a skippable module, ``None`` for anything else."""
    if isinstance(module, ResnetBlock2D):
        return "resnet"
    if isinstance(module, (Attention, Transformer2DModel)):
        return "attention"
    return None


def _iter_blocks(unet: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(short prefix, module path, block) for every down, mid and up block, in forward order."""
    for short, attr in _BLOCK_GROUPS:
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
    for attr in _RESAMPLERS:
        for j, module in enumerate(getattr(block, attr, None) or []):
            yield attr, j, module


# Transformer denoisers (DiT, SD3, Flux): their residual blocks, in forward order.
_TRANSFORMER_GROUPS: tuple[tuple[str, str], ...] = (("blocks", "transformer_blocks"), ("single", "single_transformer_blocks"))
# Branches of a block whose output is added to the residual stream (after the block's gate), in forward order.
_SUB_BLOCKS: tuple[tuple[str, LayerKind], ...] = (("attn1", "block_attention"), ("attn", "block_attention"),
                                                  ("attn2", "block_attention"), ("ff", "block_ff"),
                                                  ("ff_context", "block_ff"))


def discover_transformer_blocks(model: nn.Module, units: SkipUnits = "blocks") -> tuple[Layer, ...]:
    """``transformer_blocks.i`` (then Flux's ``single_transformer_blocks.i``) of a transformer denoiser,
    or their attention and feed-forward branches (``units="sub_blocks"``)."""
    if units not in SKIP_UNITS:
        raise ValueError(f"units={units!r}: use one of {SKIP_UNITS}")
    layers: list[Layer] = []
    for short, attr in _TRANSFORMER_GROUPS:
        for i, block in enumerate(getattr(model, attr, None) or []):
            if units == "blocks":
                layers.append(Layer(len(layers), f"{short}.{i}", "block", f"{attr}.{i}"))
                continue
            for sub, kind in _SUB_BLOCKS:
                if isinstance(getattr(block, sub, None), nn.Module):
                    layers.append(Layer(len(layers), f"{short}.{i}.{sub}", kind, f"{attr}.{i}.{sub}"))
    return tuple(layers)


def is_transformer(model: nn.Module) -> bool:
    """A DiT / SD3 / Flux style denoiser: its layers are transformer blocks."""
    return isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList)


def discover_layers(unet: nn.Module, units: SkipUnits = "blocks") -> tuple[Layer, ...]:
    """All skippable layers of a ``UNet2DModel`` / ``UNet2DConditionModel``, ids 0..L-1 in forward order;
    the transformer blocks (or their branches, ``units="sub_blocks"``) of a DiT / SD3 / Flux transformer.
    A UNet's layers are its residual and attention blocks whatever ``units`` says."""
    if is_transformer(unet):
        return discover_transformer_blocks(unet, units)
    layers: list[Layer] = []
    for short, block_path, block in _iter_blocks(unet):
        for attr, idx, module in _block_members(block):
            kind = layer_kind(module)
            if kind is None:
                if module is not None and attr in ("resnets", "attentions"):
                    log.warning("%s.%s.%d (%s) is not a supported layer type: never skipped",
                                block_path, attr, idx, type(module).__name__)
                continue
            layers.append(Layer(len(layers), f"{short}.{attr}.{idx}", kind, f"{block_path}.{attr}.{idx}"))
    if not layers:
        raise ValueError(f"no skippable layers found in {type(unet).__name__}: expected a diffusers UNet2D model")
    log.debug("found %d skippable layers in %s", len(layers), type(unet).__name__)
    return tuple(layers)


def layer_modules(unet: nn.Module, layers: Iterable[Layer]) -> dict[int, nn.Module]:
    """Map layer id -> the module it names."""
    return {layer.id: unet.get_submodule(layer.path) for layer in layers}


def ids_from_names(layers: Iterable[Layer], names: Iterable[str]) -> frozenset[int]:
    """Layer ids of the given readable names; unknown names raise ``KeyError`` listing them."""
    by_name = {layer.name: layer.id for layer in layers}
    names = list(names)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown layer names {unknown}; known names look like {next(iter(by_name), '?')!r}")
    return frozenset(by_name[n] for n in names)


def names_from_ids(layers: Iterable[Layer], ids: Iterable[int]) -> list[str]:
    """Readable names of the given layer ids, in id order; unknown ids raise ``KeyError``."""
    by_id = {layer.id: layer.name for layer in layers}
    ids = sorted(set(ids))
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise KeyError(f"unknown layer ids {unknown}; valid ids are 0..{len(by_id) - 1}")
    return [by_id[i] for i in ids]


def genome_to_named(genome: Genome, layers: Iterable[Layer]) -> dict[str, Any]:
    """JSON-ready export: time steps and, per step, the names of its skipped layers."""
    layers = tuple(layers)
    return {"timesteps": list(genome.timesteps), "skipped_layers": [names_from_ids(layers, m) for m in genome.skips]}


def genome_from_named(data: dict[str, Any], layers: Iterable[Layer]) -> Genome:
    """Inverse of ``genome_to_named`` for the same model: names map back to this model's ids."""
    layers = tuple(layers)
    masks = [ids_from_names(layers, names) for names in data.get("skipped_layers") or [[] for _ in data["timesteps"]]]
    return Genome.from_steps(data["timesteps"], masks)
