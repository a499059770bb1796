"""How the denoiser runs on its device: channels_last, torch.compile (of each skippable layer, or of the
whole UNet), CUDA graphs.

``scope="unet"`` compiles the whole network (the runtime's ``network``, what every eps function calls):
the most fusion, for studies without layer skipping (stage 1). Masks would recompile it.

``scope="layers"`` gates the runtime's ``LayerSkipper`` (skipping becomes a runtime
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
from torch import nn

from autodiff_opt.arch.skip import LayerSkipper
from autodiff_opt.models.base import Network, sample_of
from autodiff_opt.utils import COMPILE_MODES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledDenoiser:
    """What ``compile_network`` did: the torch.compile mode (None: eager) and whether CUDA graphs are on."""

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


def _whole_network(denoiser: nn.Module, mode: str, backend: str, clone: bool) -> Network:
    """The whole network compiled; with CUDA graphs its output is copied out of the graph's memory
    (a solver may keep an eps across the next evaluation)."""
    kwargs = {"mode": mode} if backend == "inductor" else {}
    compiled = torch.compile(denoiser, backend=backend, dynamic=False, **kwargs)

    def forward(*args: Any, **kw: Any) -> torch.Tensor:
        sample = sample_of(compiled(*args, **kw))
        return sample.clone() if clone else sample

    return forward


def compile_network(denoiser: nn.Module, skipper: LayerSkipper, compile: str = "default", cuda_graphs: bool = True,
                    channels_last: bool | None = None, backend: str = "inductor", scope: str = "layers"
                    ) -> tuple[CompiledDenoiser, Network]:
    """Prepare ``denoiser`` to run compiled; returns what was done and what one evaluation calls (the denoiser
    itself, or it compiled whole). Called once per denoiser, by ``arch.runtime.build_runtime``.

    ``channels_last`` (None: on CUDA) converts the network's weights and keeps every layer's 4-d inputs in
    that layout. ``backend`` is torch.compile's (tests use "aot_eager", which needs no C++ compiler).
    ``scope="layers"`` gates ``skipper`` and compiles each gate's layer forward.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    device = next(denoiser.parameters()).device
    mode = torch_compile_mode(compile, device, cuda_graphs)
    layout = device.type == "cuda" if channels_last is None else channels_last
    result = CompiledDenoiser(compile, scope, mode, mode is not None and cuda_graphs and device.type == "cuda", layout,
                              backend)
    if mode is None:
        return result, denoiser
    if layout:
        denoiser.to(memory_format=torch.channels_last)
    if scope == "unet":
        log.info("denoiser: the whole network compiled lazily (torch.compile mode=%s, backend=%s, channels_last=%s)",
                 mode, backend, layout)
        return result, _whole_network(denoiser, mode, backend, clone=result.cuda_graphs)
    skipper.gate()
    _raise_recompile_limit(2 * len(skipper.gates) + 8)
    for gate in skipper.gates.values():
        gate.layout = torch.channels_last if layout else torch.contiguous_format
        kwargs = {"mode": mode} if backend == "inductor" else {}  # modes are inductor's
        gate.run = torch.compile(gate.run, backend=backend, dynamic=False, **kwargs)
    log.info("denoiser: %d layers compiled lazily (torch.compile mode=%s, backend=%s, channels_last=%s,"
             " CUDA graphs %s)", len(skipper.gates), mode, backend, layout, "on" if result.cuda_graphs else "off")
    return result, denoiser
