"""The denoiser interface every solver uses: eps(x_t, t, step_index) on a fixed noise schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from autodiff_opt.core.errors import ModelLoadError
from autodiff_opt.core.genome import Genome


class EpsFn(Protocol):
    """Noise prediction for x_t at the integer training time step t; step_index is the position in the schedule."""

    def __call__(self, x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor: ...


Network = Callable[..., Any]
"""One network evaluation: the denoiser module, or the denoiser compiled whole."""

StepWrapper = Callable[[EpsFn, Genome], EpsFn]
"""Wraps a batch's eps function for one genome (per-step layer skipping, guidance, ...)."""

def sample_of(out: Any) -> torch.Tensor:
    """The predicted tensor of a network's output (a diffusers ``ModelOutput``, a tuple, or the tensor)."""
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


class Guidance(Protocol):
    """Something that turns a batch's eps function into a guided one (ADM's classifier guidance)."""

    def wrap(self, eps: EpsFn, class_labels: torch.Tensor) -> EpsFn: ...


@dataclass
class DiffusionModel:
    """A pretrained denoiser and the facts a sampler needs about it.

    ``alphas_cumprod`` (alpha_bar) is float64 on CPU, indexed by the training time step.
    ``learned_sigma`` models output 2*C channels; eps is the first C (ADM style).
    ``decode`` maps a final sample (pixels or latents) to images in [-1, 1].

    Set once after loading: ``source`` (what a schedule file names to load the model again),
    ``guidance`` (ADM's classifier), ``components`` (modules besides the denoiser that move with it: VAE,
    text encoder), ``family`` (the name of the ``models.families`` record that loaded it).

    How this process runs the denoiser (its layer skipper, torch.compile) is not the model's: it lives in
    an ``arch.runtime.DenoiserRuntime``, which passes the network to call into ``eps_fn``.
    """

    name: str
    denoiser: torch.nn.Module  # a UNet, or a DiT / SD3 / Flux transformer
    alphas_cumprod: torch.Tensor
    prediction_type: str
    sample_shape: tuple[int, int, int]
    num_classes: int | None = None
    learned_sigma: bool = False
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    source: str = ""
    guidance: Guidance | None = None
    components: dict[str, torch.nn.Module] = field(default_factory=dict)
    family: str = ""  # the models.families record it was loaded by ("" for a model built by hand)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device) -> "DiffusionModel":
        self.denoiser.to(device)
        for module in self.components.values():
            module.to(device)
        return self

    def eps_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """Convert the network output to an eps prediction, whatever the model's prediction type."""
        channels = x_t.shape[1]
        if self.learned_sigma or out.shape[1] == 2 * channels:
            out = out[:, :channels]
        out = out.float()
        if self.prediction_type == "epsilon":
            return out
        alpha_bar = float(self.alphas_cumprod[t])
        sqrt_ab, sqrt_1mab = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
        if self.prediction_type == "v_prediction":
            return sqrt_ab * out + sqrt_1mab * x_t.float()
        if self.prediction_type == "sample":
            return (x_t.float() - sqrt_ab * out) / sqrt_1mab
        raise ModelLoadError(
            f"prediction_type={self.prediction_type!r} is not supported: use epsilon, v_prediction or sample"
        )

    def eps_fn(self, class_labels: torch.Tensor | None = None, network: Network | None = None,
               **unet_kwargs: Any) -> EpsFn:
        """A noise-prediction callable for one batch, with its class labels (or other conditioning) bound.
        ``network`` is what one evaluation calls (None: the plain ``denoiser``; a ``DenoiserRuntime`` passes
        the denoiser compiled whole, arch/runtime.py)."""
        net = self.denoiser if network is None else network

        def eps(x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
            t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
            kwargs = dict(unet_kwargs)
            if class_labels is not None:
                kwargs["class_labels"] = class_labels
            return self.eps_from_output(sample_of(net(x_t, t_batch, **kwargs)), x_t, t)

        if self.guidance is not None and class_labels is not None:
            return self.guidance.wrap(eps, class_labels)
        return eps

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Final samples to images in [-1, 1] (decoding latents when the model has a decoder)."""
        return self.decode(x0) if self.decode is not None else x0
