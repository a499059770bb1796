"""How the denoiser runs on its device: channels_last, torch.compile (of each skippable layer, or of the
whole UNet), CUDA graphs.

``scope="unet"`` compiles the whole UNet (``model.compiled_forward``, what ``DiffusionModel.network``
calls): the most fusion, for studies without layer skipping (stage 1). Masks would recompile it.

``scope="layers"`` gates the model's ``LayerSkipper`` (skipping becomes a runtime
switch, arch/skip.py) and replaces each gate's ``run`` by ``torch.compile`` of the layer's forward, with
static shapes. The glue between layers (embeddings, ``conv_in``, concatenations, the output head) stays
eager, and so does the skip decision: a new mask runs other compiled layers, it compiles nothing. Layers
of the same class and shapes share one compiled graph. Everything is compiled lazily, at the first call
of each layer, and once per process: later candidates, masks and batches of the same size reuse it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from autodiff_opt.arch.skip import model_skipper
from autodiff_opt.models.base import DiffusionModel
from autodiff_opt.utils import COMPILE_MODES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledDenoiser:
    """What ``compile_denoiser`` did: the torch.compile mode (None: eager) and whether CUDA graphs are on."""

    compile: str
    scope: str
    mode: str | None
    cuda_graphs: bool
    channels_last: bool
    backend: str

    def step_begin(self) -> None:
        """Call before each network evaluation: a new CUDA-graph step (earlier outputs may be reused)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()


def torch_compile_mode(compile: str, device: torch.device, cuda_graphs: bool) -> str | None:
    """The torch.compile mode for ``compile=`` (off: None); CUDA graphs only on CUDA."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} is not one of {', '.join(COMPILE_MODES)}")
    if compile == "off":
        return None
    graphs = cuda_graphs and device.type == "cuda"
    if compile == "default":
        return "reduce-overhead" if graphs else "default"
    return "max-autotune" if graphs else "max-autotune-no-cudagraphs"


def _raise_recompile_limit(needed: int) -> None:
    """Each distinct layer shape is one cache entry of the shared forward code: allow them all."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < needed:
        log.info("torch._dynamo.config.%s raised from %d to %d (one entry per layer shape)",
                 name, getattr(config, name), needed)
        setattr(config, name, needed)


SCOPES = ("layers", "unet")


def _whole_unet(model: DiffusionModel, mode: str, backend: str, clone: bool) -> None:
    """The whole UNet compiled; with CUDA graphs its output is copied out of the graph's memory
    (a solver may keep an eps across the next evaluation)."""
    kwargs = {"mode": mode} if backend == "inductor" else {}
    compiled = torch.compile(model.denoiser, backend=backend, dynamic=False, **kwargs)

    def forward(*args: Any, **kw: Any) -> torch.Tensor:
        out = compiled(*args, **kw)
        sample = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        return sample.clone() if clone else sample

    model.compiled_forward = forward


def compile_denoiser(model: DiffusionModel, compile: str = "default", cuda_graphs: bool = True,
                     channels_last: bool | None = None, backend: str = "inductor",
                     scope: str = "layers") -> CompiledDenoiser:
    """Prepare ``model`` to run compiled (idempotent: a second call returns the first result).

    ``channels_last`` (None: on CUDA) converts the UNet's weights and keeps every layer's 4-d inputs in
    that layout. ``backend`` is torch.compile's (tests use "aot_eager", which needs no C++ compiler).
    """
    done = model.compiled
    if done is not None:
        if (done.compile, done.backend, done.scope) != (compile, backend, scope):
            raise RuntimeError(f"the denoiser is compiled with compile={done.compile} already; use one mode per process")
        return done
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    device = model.device
    mode = torch_compile_mode(compile, device, cuda_graphs)
    layout = device.type == "cuda" if channels_last is None else channels_last
    result = CompiledDenoiser(compile, scope, mode, mode is not None and cuda_graphs and device.type == "cuda", layout,
                              backend)
    if mode is None:
        return result
    if layout:
        model.denoiser.to(memory_format=torch.channels_last)
    if scope == "unet":
        _whole_unet(model, mode, backend, clone=result.cuda_graphs)
        model.compiled = result
        log.info("denoiser: the whole UNet compiled lazily (torch.compile mode=%s, backend=%s, channels_last=%s)",
                 mode, backend, layout)
        return result
    skipper = model_skipper(model)
    skipper.gate()
    _raise_recompile_limit(2 * len(skipper.gates) + 8)
    for gate in skipper.gates.values():
        gate.layout = torch.channels_last if layout else torch.contiguous_format
        kwargs = {"mode": mode} if backend == "inductor" else {}  # modes are inductor's
        gate.run = torch.compile(gate.run, backend=backend, dynamic=False, **kwargs)
    model.compiled = result
    log.info("denoiser: %d layers compiled lazily (torch.compile mode=%s, backend=%s, channels_last=%s,"
             " CUDA graphs %s)", len(skipper.gates), mode, backend, layout, "on" if result.cuda_graphs else "off")
    return result
