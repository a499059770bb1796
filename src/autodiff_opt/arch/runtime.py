"""How one model's denoiser runs in this process: its layer skipper and its compiled forward, built once in a
``DenoiserRuntime`` and handed to whoever runs, measures or exports the denoiser.

The model (``models.base.DiffusionModel``) stays a value: it holds the network and the facts about it, never
how this process runs it. ``build_runtime(model, settings)`` makes the skipper (the layers of
``settings.units``) and compiles (``arch/compiled.py``); ``ImageGenerator`` builds one, and the cost model,
the report and ``apply`` take its skipper from there.

Both change the network's modules (a gate per layer, ``channels_last`` weights), so a denoiser has one
runtime at a time: asking again with the same settings returns the same runtime, and asking with other
settings raises ``RuntimeConflictError`` instead of silently running the first request's layers or mode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch

from autodiff_opt.arch.compiled import CompiledDenoiser, compile_network
from autodiff_opt.arch.layers import Layer, SkipUnits, discover_layers
from autodiff_opt.arch.skip import LayerSkipper, with_step_masks
from autodiff_opt.core.genome import Genome
from autodiff_opt.models.base import DiffusionModel, EpsFn, Network

log = logging.getLogger(__name__)

R = TypeVar("R")


class RuntimeConflictError(RuntimeError):
    """A denoiser that already runs with one runtime was asked for another (other layers, another compile)."""


@dataclass(frozen=True)
class RuntimeSettings:
    """What a runtime is built with. ``units``: the skippable layers (``search.stage2.units``); ``compile``
    (off | default | max-autotune), ``cuda_graphs``, ``backend`` (torch.compile's), ``scope`` ("layers":
    each skippable layer, masks switch without recompiling; "unet": the whole network, for studies without
    masks) and ``channels_last`` (None: on CUDA), as ``arch/compiled.py`` reads them."""

    units: SkipUnits = "blocks"
    compile: str = "off"
    cuda_graphs: bool = True
    backend: str = "inductor"
    scope: str = "layers"
    channels_last: bool | None = None

    def differences(self, other: "RuntimeSettings") -> str:
        return ", ".join(f"{f.name}={getattr(other, f.name)!r} (it runs with {getattr(self, f.name)!r})"
                         for f in fields(self) if getattr(self, f.name) != getattr(other, f.name))


@dataclass(frozen=True, eq=False)
class DenoiserRuntime:
    """A model's denoiser as this process runs it: ``skipper`` (its one ``LayerSkipper``), ``compiled``
    (what torch.compile did) and ``network`` (what one evaluation calls: the denoiser, or it compiled whole)."""

    model: DiffusionModel
    settings: RuntimeSettings
    skipper: LayerSkipper
    compiled: CompiledDenoiser
    network: Network

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The skippable layers, ids 0..L-1 in forward order (what genomes' masks and exported names index)."""
        return self.skipper.layers

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.skipper.layers)

    def eps_fn(self, class_labels: torch.Tensor | None = None) -> EpsFn:
        """The batch's eps function through ``network``; with CUDA graphs each evaluation starts a new graph step."""
        eps = self.model.eps_fn(class_labels=class_labels, network=self.network)
        return _with_step_begin(eps, self.compiled.step_begin) if self.compiled.cuda_graphs else eps

    def masked(self, eps_fn: Callable[..., R], genome: Genome) -> Callable[..., R]:
        """``eps_fn`` with the genome's per-step skip masks (itself for a genome without skips). The skipper is
        gated on the first genome with skips: one permanent forward per layer, so each step switches its mask
        without attaching or removing hooks, and a stage-1-only run never touches the network's modules."""
        if not genome.has_skips:
            return eps_fn
        self.skipper.gate()
        return with_step_masks(eps_fn, self.skipper, genome)


RUNTIME_ATTR = "_autodiff_opt_runtime"  # on the denoiser module: the runtime its modules are set up for


def build_runtime(model: DiffusionModel, settings: RuntimeSettings = RuntimeSettings()) -> DenoiserRuntime:
    """The model's runtime: built on the first request; the same one for the same settings; a request with
    other settings raises ``RuntimeConflictError`` (the network's modules are already set up for the first).

    The denoiser module keeps a reference to its runtime (a cycle the garbage collector frees with the
    module), so the check holds for the module's whole life, not only while the first caller keeps it."""
    built: DenoiserRuntime | None = getattr(model.denoiser, RUNTIME_ATTR, None)
    if built is not None:
        if built.settings != settings:
            raise RuntimeConflictError(
                f"the denoiser of {model.name!r} already runs with other settings: {built.settings.differences(settings)};"
                " build its runtime once, with the settings the whole run uses (search.stage2.units, compile),"
                " and pass that runtime to everything that runs the model")
        return built if built.model is model else replace(built, model=model)
    skipper = LayerSkipper(model.denoiser, discover_layers(model.denoiser, settings.units))
    compiled, network = compile_network(model.denoiser, skipper, settings.compile, settings.cuda_graphs,
                                        settings.channels_last, settings.backend, settings.scope)
    runtime = DenoiserRuntime(model, settings, skipper, compiled, network)
    object.__setattr__(model.denoiser, RUNTIME_ATTR, runtime)  # a plain attribute, not a submodule or buffer
    return runtime


def _with_step_begin(eps_fn: EpsFn, step_begin: Callable[[], None]) -> EpsFn:
    def eps(x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        step_begin()
        return eps_fn(x_t, t, step_index)

    return eps
