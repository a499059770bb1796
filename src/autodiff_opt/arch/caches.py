"""diffusers' training-free caches as stage-2 baselines: the same job as a searched skip mask (less
compute per step), done by reusing what earlier steps computed.

Each cache is diffusers' own hook set (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``,
``PyramidAttentionBroadcastConfig``, ``FasterCacheConfig``, ``MagCacheConfig``), attached with
diffusers' ``enable_cache`` to the transformer and removed with ``disable_cache``. Flux's transformer
has these methods (diffusers' ``CacheMixin``); DiT's and SD3's do not, although the hooks support their
blocks, so while a cache is applied their class gets the mixin added (a subclass of the same name,
put back afterwards). Our sampling loop plays the pipeline's part: every network evaluation
runs inside ``cache_context("cond", step_index=i, ...)`` and the hook state is reset when a batch starts
its trajectory (step 0). The cost of a cached run is not assumed: ``arch.flops.count_step_flops``
counts what one sample's whole trajectory executes, so the final table puts it on the same full-step
axis as the searched masks. Settings are diffusers' defaults, scaled to the few steps of a low-NFE
schedule where a default counts steps (TaylorSeer's refresh interval and warm-up).

MagCache needs per-model magnitude ratios: it is calibrated here on the first batch (diffusers'
``calibrate=True`` run, ratios read from the hook's state) and then run with them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from autodiff_opt.core.genome import Genome
from autodiff_opt.models.base import DiffusionModel, EpsFn
from autodiff_opt.specs.options import CACHES

log = logging.getLogger(__name__)

# TaylorSeer's attention modules. diffusers' default patterns (``^transformer_blocks.*attn``, matched with
# re.fullmatch) end at "attn": they hook Flux's and SD3's ``attn`` but not DiT's ``attn1``, where TaylorSeer
# then silently cached nothing (tests/test_caches_reference.py); the same modules, attn1 / attn2 included.
TAYLORSEER_MODULES = (r"(transformer_blocks|single_transformer_blocks|blocks)\.\d+\.attn\d*",)


def _mixin() -> Any:
    try:
        from diffusers.models.cache_utils import CacheMixin
    except ImportError as err:  # pragma: no cover - depends on the installed diffusers
        raise RuntimeError("search.stage2.caches needs diffusers with diffusers.models.cache_utils") from err
    if not hasattr(CacheMixin, "cache_context"):  # pragma: no cover - depends on the installed diffusers
        raise RuntimeError("search.stage2.caches needs a diffusers whose CacheMixin has cache_context: upgrade diffusers")
    return CacheMixin


@contextmanager
def _cache_methods(unet: torch.nn.Module) -> Iterator[None]:
    """``unet`` with diffusers' CacheMixin methods inside the block."""
    mixin = _mixin()
    if isinstance(unet, mixin):
        yield
        return
    original = type(unet)
    unet.__class__ = type(original.__name__, (original, mixin), {"__module__": original.__module__})
    unet._cache_config = None
    try:
        yield
    finally:
        unet.__class__ = original
        del unet._cache_config


class CacheBaseline:
    """One diffusers cache on ``model``'s transformer, for schedules of ``num_steps`` steps.

    ``with cache.applied(): generator.generate(...)`` with ``cache.wrap`` as the step wrapper. ``settings``
    override the config's arguments (e.g. ``{"threshold": 0.2}``: a more aggressive First Block cache)."""

    def __init__(self, model: DiffusionModel, name: str, num_steps: int, settings: dict[str, Any] | None = None) -> None:
        if name not in CACHES:
            raise ValueError(f"cache {name!r}: use one of {CACHES}")
        self.model, self.name, self.num_steps = model, name, int(num_steps)
        self.settings = dict(settings or {})
        self.timestep = 0.0  # what PAB and FasterCache read: the current step's time on a 0..1000 axis
        self.mag_ratios: list[float] | None = None

    def _timestep(self) -> float:
        return self.timestep

    def config(self, calibrate: bool = False) -> Any:
        """The diffusers config; defaults kept, step counts scaled to a K-step schedule."""
        from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                               PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

        K = self.num_steps
        if self.name == "first_block":
            cls, kwargs = FirstBlockCacheConfig, dict(threshold=0.05)
        elif self.name == "taylorseer":  # refresh every other step after a one-step warm-up at low NFE
            cls, kwargs = TaylorSeerCacheConfig, dict(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                                      taylor_factors_dtype=torch.float32,
                                                      cache_identifiers=list(TAYLORSEER_MODULES))
        elif self.name == "pab":  # attention broadcast every other block inside diffusers' default window
            cls, kwargs = PyramidAttentionBroadcastConfig, dict(spatial_attention_block_skip_range=2,
                                                                spatial_attention_timestep_skip_range=(100, 800),
                                                                current_timestep_callback=self._timestep)
        elif self.name == "faster":  # attention caching only: our CFG batch is [cond; uncond], not diffusers' order
            cls, kwargs = FasterCacheConfig, dict(spatial_attention_block_skip_range=2,
                                                  spatial_attention_timestep_skip_range=(-1, 681),
                                                  current_timestep_callback=self._timestep,
                                                  attention_weight_callback=lambda _: 0.5, tensor_format="BCHW",
                                                  is_guidance_distilled=True)
        elif calibrate:
            return MagCacheConfig(calibrate=True, num_inference_steps=K + 1)
        else:
            cls, kwargs = MagCacheConfig, dict(threshold=0.06, max_skip_steps=2, retention_ratio=0.2,
                                               num_inference_steps=K, mag_ratios=torch.tensor(self.mag_ratios))
        return cls(**{**kwargs, **self.settings})

    @contextmanager
    def applied(self, calibrate: bool = False) -> Iterator["CacheBaseline"]:
        """The cache's hooks on the transformer inside the block, removed after."""
        unet = self.model.denoiser
        with _cache_methods(unet):
            unet.enable_cache(self.config(calibrate))
            try:
                yield self
            finally:
                unet.disable_cache()

    def _time(self, t: int) -> float:
        time = getattr(self.model, "time", None)
        return 1000.0 * float(time(t)) if callable(time) else float(t)

    def wrap(self, eps_fn: EpsFn, genome: Genome) -> EpsFn:
        """A step wrapper (inside ``applied``): each evaluation in diffusers' cache context, the state
        reset at step 0."""
        unet = self.model.denoiser

        def eps(x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
            if step_index == 0:
                unet._reset_stateful_cache()
            self.timestep = self._time(t)
            with unet.cache_context("cond"):
                return eps_fn(x_t, t, step_index)

        return eps

    def calibrate(self, run: Callable[[], Any]) -> None:
        """MagCache: one calibration run of ``run`` (no step skipped), then the ratios it measured. The
        calibration is told one step more than the schedule has, so its state is still there to read."""
        if self.name != "mag":
            return
        with self.applied(calibrate=True):
            run()
            measured = [list(state.calibration_ratios) for state in _hook_states(self.model.denoiser)
                        if getattr(state, "calibration_ratios", None)]
        ratios = measured[-1] if measured else []
        if len(ratios) < self.num_steps:
            raise RuntimeError(f"MagCache calibration measured {len(ratios)} ratios for {self.num_steps} steps")
        self.mag_ratios = ratios[: self.num_steps]
        log.info("MagCache calibrated on %d steps: ratios %s", self.num_steps, [round(r, 3) for r in self.mag_ratios])


def _hook_states(unet: torch.nn.Module) -> Iterator[Any]:
    """Every per-context state that diffusers' stateful hooks under ``unet`` hold (their StateManagers)."""
    for module in unet.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            for value in vars(hook).values():
                yield from getattr(value, "_state_cache", {}).values()
