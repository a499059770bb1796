"""Which layers of a denoiser can be skipped: discovery, stable ids and readable names.

The denoiser's model family (``models/families/``) lists its layers in forward order; here they get their ids
(0..L-1, the index masks use) and become ``Layer`` records. In a UNet (plain, ADM, Stable Diffusion) a layer is
one residual block or one attention module of the down, mid and up blocks (``down.0.resnets.1``); in a
transformer (DiT, SD3, Flux) one residual block (``units="blocks"``: ``blocks.i``, then Flux's ``single.i``) or,
with ``units="sub_blocks"``, each attention and feed-forward branch inside a block (``blocks.i.attn1``,
``blocks.i.ff``; SD3 / Flux: ``blocks.i.attn``, ``blocks.i.ff``, ``blocks.i.ff_context``; Flux single blocks:
``single.i.attn``). A UNet's layers are its residual and attention blocks whatever ``units`` says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from torch import nn

from autodiff_opt.core.genome import Genome
from autodiff_opt.models.families import ModelFamily, family_of
from autodiff_opt.specs.options import SKIP_UNITS

log = logging.getLogger(__name__)

LayerKind = Literal["resnet", "attention", "block", "block_attention", "block_ff"]
SkipUnits = Literal["blocks", "sub_blocks"]


@dataclass(frozen=True)
class Layer:
    """One skippable layer: ``id`` indexes masks, ``name`` is for people, ``path`` for ``get_submodule``."""

    id: int
    name: str
    kind: LayerKind
    path: str


def denoiser_family(model: nn.Module) -> ModelFamily:
    """The model family of a denoiser network, or a ValueError naming its class."""
    family = family_of(model)
    if family is None:
        raise ValueError(f"no skippable layers found in {type(model).__name__}: no model family knows this class"
                         " (docs/architecture.md, Adding a model family)")
    return family


def is_transformer(model: nn.Module) -> bool:
    """A DiT / SD3 / Flux style denoiser: its layers are transformer blocks (its family says so)."""
    family = family_of(model)
    return family is not None and family.transformer


def discover_layers(unet: nn.Module, units: SkipUnits = "blocks") -> tuple[Layer, ...]:
    """All skippable layers of a denoiser, ids 0..L-1 in forward order, as its model family lists them."""
    if units not in SKIP_UNITS:
        raise ValueError(f"units={units!r}: use one of {SKIP_UNITS}")
    family = denoiser_family(unet)
    layers = tuple(Layer(i, name, kind, path) for i, (name, kind, path) in enumerate(family.units(unet, units)))  # type: ignore[arg-type]
    if not layers and not family.transformer:
        raise ValueError(f"no skippable layers found in {type(unet).__name__}: expected a diffusers UNet2D model")
    log.debug("found %d skippable layers in %s (%s family)", len(layers), type(unet).__name__, family.name)
    return layers


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
