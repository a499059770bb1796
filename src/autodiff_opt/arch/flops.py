"""Measured cost model: FLOPs of every skippable layer, counted once with ``FlopCounterMode``.

One forward at the model's resolution and batch 1 with nothing skipped gives each layer's FLOPs;
one forward with every layer skipped gives what each layer still costs when skipped (a resnet's
``conv_shortcut``). Skipping never changes a tensor's shape, so costs add up: the FLOPs of a masked
step are ``full_step - sum(savings[j] for j in mask)``, exactly (``check_additivity`` measures it).
FLOPs are multiply-adds x 2 of matmuls, convolutions and attention, as torch counts them; the
CPU flash-attention kernel, which torch's counter does not know, is counted like the CUDA ones so
the numbers do not depend on the device.

A UNet is counted on its family's inputs (``example_inputs``: its own resolution, batch 1). A family without
inputs (DiT, SD3, Flux: ``ModelFamily.flops_inputs`` is None) is counted through the model's own eps function on one latent (``model_step``), so what a
step costs includes what the model wraps around the network: the CFG pair (two rows per image),
Flux's packing; prompt embeddings are computed once before counting, as in a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from autodiff_opt.arch.budget import Budget
from autodiff_opt.arch.layers import denoiser_family
from autodiff_opt.arch.skip import LayerSkipper
from autodiff_opt.core.genome import Genome
from autodiff_opt.models.base import DiffusionModel
from autodiff_opt.models.families._unet import example_inputs  # noqa: F401 (a UNet's inputs, where callers found them)

log = logging.getLogger(__name__)


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_flop_formulas() -> dict[Any, Any]:
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {cpu_sdpa: _sdpa_flops} if cpu_sdpa is not None else {}


def family_inputs(unet: nn.Module) -> dict[str, Any]:
    """One forward's keyword inputs at batch 1, as the denoiser's model family makes them (a UNet's
    ``example_inputs``); a family counted through its model's eps function has none: use ``measure_model_costs``."""
    family = denoiser_family(unet)
    if family.flops_inputs is None:
        raise ValueError(f"{type(unet).__name__} ({family.name} family) is counted through its model's eps function:"
                         " use measure_model_costs(model, skipper)")
    return family.flops_inputs(unet)


def model_step(model: DiffusionModel, timestep: int | None = None) -> Callable[[], Any]:
    """One network evaluation of ``model`` for one sample (class 0 / prompt 0 when conditional), through
    its own eps function. Its first call also makes what a batch caches (prompt embeddings):
    ``measure_layer_costs`` makes that call before it counts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *model.sample_shape, generator=gen).to(model.device)
    labels = torch.zeros(1, dtype=torch.long, device=model.device) if model.num_classes else None
    t = model.num_train_timesteps // 2 if timestep is None else timestep
    eps = model.eps_fn(class_labels=labels)

    def step() -> Any:
        return eps(x, t, 0)

    return step


def count_step_flops(step: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of ``step()`` and FLOPs per submodule path of the outermost module it runs
    (``down_blocks.0.resnets.1``: n)."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas())
    with torch.no_grad(), counter:
        step()
    per_path = {
        name.split(".", 1)[1]: int(sum(ops.values()))
        for name, ops in counter.get_flop_counts().items()
        if "." in name
    }
    return int(counter.get_total_flops()), per_path


def count_flops(unet: nn.Module, inputs: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward on ``inputs`` and FLOPs per submodule path."""
    return count_step_flops(lambda: unet(**inputs))


@dataclass(frozen=True)
class LayerCosts:
    """Measured FLOPs (batch 1) of a full step and of every layer, run and skipped."""

    names: tuple[str, ...]
    full_step: int
    layer_flops: tuple[int, ...]
    skipped_flops: tuple[int, ...]
    key: str = ""

    @property
    def savings(self) -> tuple[int, ...]:
        """FLOPs saved by skipping each layer."""
        return tuple(f - s for f, s in zip(self.layer_flops, self.skipped_flops))

    def step_flops(self, mask: Set[int]) -> int:
        """FLOPs of one network evaluation with ``mask`` skipped."""
        savings = self.savings
        return self.full_step - sum(savings[j] for j in mask)

    def genome_flops(self, genome: Genome) -> int:
        """FLOPs of a whole candidate (batch 1): sum over its steps."""
        return sum(self.step_flops(mask) for mask in genome.skips)

    def budget(self, full_steps: float) -> Budget:
        """A FLOPs budget of ``full_steps`` full network evaluations."""
        return Budget.from_flops(self.full_step, self.savings, full_steps)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerCosts":
        return cls(tuple(data["names"]), int(data["full_step"]), tuple(data["layer_flops"]),
                   tuple(data["skipped_flops"]), str(data.get("key", "")))


def config_key(unet: nn.Module, inputs: dict[str, Any], extra: str = "") -> str:
    """A short hash of the model class, its config and the input shapes: the cost cache's key."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    shapes = {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    doc = {"class": type(unet).__name__, "config": config, "inputs": shapes}
    if extra:
        doc["step"] = extra
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, path)


def measure_layer_costs(
    unet: nn.Module,
    skipper: LayerSkipper | None = None,
    inputs: dict[str, Any] | None = None,
    cache_path: str | Path | None = None,
    step: Callable[[], Any] | None = None,
    step_key: str = "",
) -> LayerCosts:
    """FLOPs of one full step and of every layer, from two counted forwards (or the JSON cache).

    ``step`` (a zero-argument call that runs one evaluation for one sample, ``model_step``) replaces
    ``unet(**inputs)``; ``step_key`` then names what it runs (sample shape, guidance) in the cache key."""
    skipper = skipper or LayerSkipper(unet)
    warm_up = step is not None  # a model's step caches per batch (prompt embeddings) on its first call
    if step is None:
        inputs = inputs if inputs is not None else family_inputs(unet)
        step, batch = (lambda: unet(**inputs)), int(inputs["sample"].shape[0])
        key = config_key(unet, inputs)
    else:
        batch = 1
        key = config_key(unet, {}, extra=step_key)
    names = tuple(layer.name for layer in skipper.layers)
    if cache_path is not None:
        cached = _read_cache(Path(cache_path)).get(key)
        if cached is not None and tuple(cached["names"]) == names:
            log.debug("layer costs for %s from cache %s", key, cache_path)
            return LayerCosts.from_json(cached)
    if warm_up:
        with torch.no_grad():
            step()
    with skipper.skipping(()):
        full_step, full = count_step_flops(step)
    with skipper.skipping(range(skipper.num_layers)):
        _, skipped = count_step_flops(step)
    per_layer = tuple(full.get(layer.path, 0) // batch for layer in skipper.layers)
    if not any(per_layer):
        raise RuntimeError("FlopCounterMode reported no FLOPs inside any layer: module names did not match")
    costs = LayerCosts(names, full_step // batch, per_layer,
                       tuple(skipped.get(layer.path, 0) // batch for layer in skipper.layers), key)
    log.info("%s: %.3g FLOPs per full step, %d layers hold %.1f%% of them", type(unet).__name__,
             costs.full_step, len(names), 100 * sum(costs.savings) / costs.full_step)
    if cache_path is not None:
        entries = _read_cache(Path(cache_path))
        entries[key] = costs.to_json()
        _write_cache(Path(cache_path), entries)
    return costs


def measure_step_flops(unet: nn.Module, skipper: LayerSkipper, mask: Set[int], inputs: dict[str, Any] | None = None) -> int:
    """FLOPs of one forward actually run with ``mask`` skipped (to check the additive model)."""
    inputs = inputs if inputs is not None else family_inputs(unet)
    with skipper.skipping(mask):
        total, _ = count_flops(unet, inputs)
    return total


def check_additivity(unet: nn.Module, skipper: LayerSkipper, costs: LayerCosts, mask: Set[int],
                     inputs: dict[str, Any] | None = None) -> tuple[int, int]:
    """(predicted, measured) FLOPs of a masked step at batch 1; they agree when the model is additive."""
    measured = measure_step_flops(unet, skipper, mask, inputs)
    batch = int((inputs or {"sample": torch.empty(1)})["sample"].shape[0])
    return costs.step_flops(mask), measured // batch


def measure_model_costs(model: DiffusionModel, skipper: LayerSkipper, cache_path: str | Path | None = None) -> LayerCosts:
    """``measure_layer_costs`` for a loaded model: on its family's inputs (a UNet's example inputs), or, for a
    family without (DiT, SD3, Flux), through ``model_step`` (the CFG pair and packing included)."""
    if denoiser_family(model.denoiser).flops_inputs is not None:
        return measure_layer_costs(model.denoiser, skipper, cache_path=cache_path)
    guidance = getattr(model, "guidance_scale", 1.0)
    step_key = json.dumps({"model": type(model).__name__, "sample": list(model.sample_shape), "guidance": guidance,
                           "layers": [layer.path for layer in skipper.layers]})
    return measure_layer_costs(model.denoiser, skipper, cache_path=cache_path, step=model_step(model), step_key=step_key)
