"""Skipping layers of a denoiser, per sampling step, without touching the network's code.

What a skipped layer returns is its model family's business (``ModelFamily.skip``, ``models/families/``): a
UNet's residual block its shortcut path, its attention module the input (rescaled as the module does), a
transformer's block the residual stream, a block's attention or feed-forward branch zeros.

A skipped layer always returns a new tensor, so no in-place op downstream can alias its input.
The replacement forward is attached with diffusers' ``HookRegistry`` (a ``ModelHook`` whose
``new_forward`` does not call the original) only while a layer is skipped; with an empty mask
no hook is attached, so the model runs its own, unmodified forward.

``LayerSkipper.gate()`` turns skipping into a runtime switch instead: every layer gets one
permanent forward (a ``LayerGate``) that reads the mask at each call and runs either the skip
function or ``gate.run``, the layer's own forward, which ``arch.compiled`` may replace by that
forward compiled. A mask change then touches no module attribute, so ``torch.compile`` has
nothing to specialise on and never recompiles for a new mask (docs/gpu.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from autodiff_opt.arch.layers import Layer, SkipUnits, discover_layers, layer_modules
from autodiff_opt.core.genome import Genome
from autodiff_opt.models.families import ModelFamily, families, family_of

from diffusers.hooks import HookRegistry, ModelHook  # diffusers >= 0.33 (the declared floor is above it)

log = logging.getLogger(__name__)

HOOK_NAME = "autodiff_opt.layer_skip"
R = TypeVar("R")
SkipFn = Callable[..., Any]


def skip_function(module: nn.Module, kind: str | None = None, family: ModelFamily | None = None) -> SkipFn:
    """The replacement forward ``f(module, *args, **kwargs)`` for a skippable module (``kind``: the layer's
    kind, which tells a transformer block's attention branch from a UNet's Attn block): the denoiser's family
    (``family``) decides, else the first family that knows the module."""
    for candidate in ([family] if family is not None else []) + list(families().values()):
        fn = candidate.skip(module, kind)
        if fn is not None:
            return fn
    raise TypeError(f"{type(module).__name__} is not a skippable layer")


class SkipHook(ModelHook):
    """A diffusers hook that replaces the module's forward by its skip function."""

    def __init__(self, skip_fn: SkipFn) -> None:
        super().__init__()
        self.skip_fn = skip_fn

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.skip_fn(module, *args, **kwargs)


def _attach(module: nn.Module, skip_fn: SkipFn) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(SkipHook(skip_fn), HOOK_NAME)


def _detach(module: nn.Module) -> None:
    registry = module._diffusers_hook
    registry.remove_hook(HOOK_NAME, recurse=False)
    patched = module.__dict__.get("forward")
    if not registry.hooks and getattr(patched, "__func__", None) is type(module).forward:
        del module.forward  # the registry leaves the bound original behind: restore the class's own


def _in_layout(value: Any, layout: torch.memory_format) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=layout)
    return value


class LayerGate:
    """A layer's permanent forward once its skipper is gated: the skip function while the mask holds
    the layer, else ``run`` (the layer's own forward, or that forward compiled).

    With ``layout`` set, 4-d tensor inputs are put in that memory format before ``run``: a skipped
    neighbour returns a contiguous tensor where the layer would have returned, e.g., attention's
    transposed view, and a compiled ``run`` would otherwise recompile for the other strides.
    Under a dispatch mode (``FlopCounterMode`` of the cost model) the layer's own eager forward runs,
    so fused compiled kernels never hide operations from the counter.
    """

    def __init__(self, skipper: "LayerSkipper", layer_id: int, module: nn.Module, skip_fn: SkipFn) -> None:
        self.skipper, self.layer_id, self.module, self.skip_fn = skipper, layer_id, module, skip_fn
        self.eager: Callable[..., Any] = type(module).forward.__get__(module)
        self.run: Callable[..., Any] = self.eager
        self.layout: torch.memory_format | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.layer_id in self.skipper.skipped:
            return self.skip_fn(self.module, *args, **kwargs)
        if _get_current_dispatch_mode() is not None:
            return self.eager(*args, **kwargs)
        if self.layout is not None:
            args = tuple(_in_layout(a, self.layout) for a in args)
            kwargs = {k: _in_layout(v, self.layout) for k, v in kwargs.items()}
        return self.run(*args, **kwargs)


class LayerSkipper:
    """Skips a chosen set of layers of one UNet; change the set between network evaluations.

    ``skipper.set_skipped(ids)`` sets the mask until changed; ``with skipper.skipping(ids): ...``
    sets it for a block and restores the previous one. Not thread-safe: one mask per model at a time.
    """

    def __init__(self, denoiser: nn.Module, layers: Sequence[Layer] | None = None) -> None:
        self.denoiser = denoiser
        self.layers: tuple[Layer, ...] = tuple(layers) if layers is not None else discover_layers(denoiser)
        self._modules = layer_modules(denoiser, self.layers)
        kinds = {layer.id: layer.kind for layer in self.layers}
        family = family_of(denoiser)
        self._skip_fns = {i: skip_function(m, kinds[i], family) for i, m in self._modules.items()}
        self._skipped: frozenset[int] = frozenset()
        self._gates: dict[int, LayerGate] = {}

    @property
    def gates(self) -> dict[int, LayerGate]:
        """The layers' permanent forwards, by id (empty until ``gate()``)."""
        return self._gates

    def gate(self) -> None:
        """Install one permanent ``LayerGate`` per layer: from now on a mask change is a plain attribute
        of the skipper that every gate reads per call (no hook attached or removed). Idempotent."""
        if self._gates:
            return
        mask = self._skipped
        self.set_skipped(())  # detaches the hooks of the current mask
        for i, module in self._modules.items():
            if "forward" in module.__dict__:
                raise RuntimeError(f"{type(module).__name__} already has a patched forward (gated by another"
                                   " skipper?): build one DenoiserRuntime per model and pass it (arch/runtime.py)")
            gate = LayerGate(self, i, module, self._skip_fns[i])
            module.forward = gate
            self._gates[i] = gate
        self._skipped = mask

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def skipped(self) -> frozenset[int]:
        """Ids of the layers skipped now."""
        return self._skipped

    def _checked(self, ids: Iterable[int]) -> frozenset[int]:
        mask = frozenset(int(i) for i in ids)
        unknown = sorted(i for i in mask if i not in self._modules)
        if unknown:
            raise ValueError(f"unknown layer ids {unknown}: this model has layers 0..{self.num_layers - 1}")
        return mask

    def set_skipped(self, ids: Iterable[int]) -> None:
        """Skip exactly the layers ``ids`` from the next forward on (an empty set runs the plain model)."""
        mask = self._checked(ids)
        if self._gates:  # gated: the gates read the mask at each call
            self._skipped = mask
            return
        for i in self._skipped - mask:
            _detach(self._modules[i])
        for i in mask - self._skipped:
            _attach(self._modules[i], self._skip_fns[i])
        self._skipped = mask

    def clear(self) -> None:
        """Run every layer again."""
        self.set_skipped(())

    @contextmanager
    def skipping(self, ids: Iterable[int]) -> Iterator["LayerSkipper"]:
        """Skip ``ids`` inside the block, then restore the mask that was set before."""
        previous = self._skipped
        self.set_skipped(ids)
        try:
            yield self
        finally:
            self.set_skipped(previous)

    def for_step(self, genome: Genome, step_index: int) -> AbstractContextManager["LayerSkipper"]:
        """Context manager that applies ``genome.skips[step_index]``, the mask paired with that step."""
        return self.skipping(genome.skips[step_index])


def _as_int(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.reshape(-1)[0].item())
    return int(value)


def _get_arg(args: tuple[Any, ...], kwargs: dict[str, Any], where: tuple[int, str]) -> Any:
    position, name = where
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    raise TypeError(f"the call has no argument {name!r} (keyword, or position {position})")


def with_step_masks(
    predict: Callable[..., R],
    skipper: LayerSkipper,
    skips: Genome | Sequence[Set[int]],
    *,
    step_arg: tuple[int, str] = (2, "step_index"),
    timestep_arg: tuple[int, str] | None = (1, "t"),
) -> Callable[..., R]:
    """Wrap a per-step noise predictor so that the call for step ``i`` runs with mask ``skips[i]``.

    The defaults fit ``EpsFn``, ``eps(x_t, t, step_index)``: ``step_arg`` and ``timestep_arg`` say
    where a call carries the step index and the time step (position, keyword name). Given a
    ``Genome``, each call also checks that its time step is ``genome.timesteps[i]``, so a mask is
    never applied to another step by rank (``timestep_arg=None`` turns the check off).
    """
    masks = tuple(frozenset(s) for s in (skips.skips if isinstance(skips, Genome) else skips))
    timesteps = skips.timesteps if isinstance(skips, Genome) and timestep_arg is not None else None
    for mask in masks:
        skipper._checked(mask)

    @functools.wraps(predict)
    def masked(*args: Any, **kwargs: Any) -> R:
        i = int(_get_arg(args, kwargs, step_arg))
        if not 0 <= i < len(masks):
            raise IndexError(f"step index {i} outside the schedule's {len(masks)} steps")
        if timesteps is not None:
            t = _as_int(_get_arg(args, kwargs, timestep_arg))
            if t != timesteps[i]:
                raise ValueError(f"step {i} was called with t={t} but the genome pairs it with t={timesteps[i]}")
        with skipper.skipping(masks[i]):
            return predict(*args, **kwargs)

    return masked


def per_step_skipping(denoiser: nn.Module, skipper: LayerSkipper | None = None
                      ) -> Callable[[Callable[..., R], Genome], Callable[..., R]]:
    """A ``StepWrapper`` for one's own eps functions: ``wrap(eps_fn, genome)`` returns ``eps_fn`` itself for a
    genome without skips, else ``with_step_masks(eps_fn, skipper, genome)`` with hooks (not gated). The
    ``LayerSkipper`` is made on the first genome with skips (unless one is given). The generator does not use
    it: its ``DenoiserRuntime.masked`` does the same with the runtime's gated skipper (arch/runtime.py)."""
    skippers: list[LayerSkipper] = [skipper] if skipper is not None else []

    def wrap(eps_fn: Callable[..., R], genome: Genome) -> Callable[..., R]:
        if not genome.has_skips:
            return eps_fn
        if not skippers:
            skippers.append(LayerSkipper(denoiser))
        return with_step_masks(eps_fn, skippers[0], genome)

    return wrap
