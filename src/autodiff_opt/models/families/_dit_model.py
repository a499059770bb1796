"""DiT's model class and loader (the ``dit`` family, ``dit.py``, names them lazily): ``ClassGuidedModel``, a
class-conditional transformer with classifier-free guidance against the null class, latent or pixel space."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autodiff_opt.models.base import DiffusionModel, EpsFn, Network, sample_of
from autodiff_opt.models.families._pipeline import _load_pipeline, _sample_shape
from autodiff_opt.models.families._transformer import block_skipper, skip_dit_block
from autodiff_opt.models.latent import VaeDecoder
from autodiff_opt.models.loading import _alphas_cumprod

log = logging.getLogger(__name__)

skip = block_skipper({"BasicTransformerBlock": skip_dit_block})  # the family's ``skip``


@dataclass
class ClassGuidedModel(DiffusionModel):
    """A class-conditional transformer with classifier-free guidance against the null class."""

    guidance_scale: float = 1.0
    null_class: int = 1000
    kind: str = "dit"

    def eps_fn(self, class_labels: torch.Tensor | None = None, network: Network | None = None,
               **unet_kwargs: Any) -> EpsFn:
        guided = class_labels is not None and self.guidance_scale > 1.0
        net = self.denoiser if network is None else network

        def eps(x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
            b, channels = x_t.shape[0], x_t.shape[1]
            null = torch.full((b,), self.null_class, device=x_t.device, dtype=torch.long)
            labels = null if class_labels is None else class_labels.to(x_t.device)
            x_in = torch.cat([x_t, x_t]) if guided else x_t
            labels_in = torch.cat([labels, null]) if guided else labels
            t_batch = torch.full((x_in.shape[0],), t, device=x_t.device, dtype=torch.long)
            dtype = next(self.denoiser.parameters()).dtype
            out = sample_of(net(x_in.to(dtype), timestep=t_batch, class_labels=labels_in, **unet_kwargs))
            e = out[:, :channels].float()
            if guided:
                cond, uncond = e.chunk(2)
                e = uncond + self.guidance_scale * (cond - uncond)
            return e

        return eps


def load_dit(root: Path, guidance_scale: float, decode_batch_size: int, device: torch.device | str,
             dtype: torch.dtype, name: str | None = None) -> ClassGuidedModel:
    pipe = _load_pipeline(root, dtype)
    transformer, vae = pipe.transformer, pipe.vae  # vae None: a pixel-space DiT, samples are images
    for module in (transformer, vae):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    config = transformer.config
    channels, size = int(config.in_channels), int(config.sample_size)
    num_classes = int(config.num_embeds_ada_norm)
    model = ClassGuidedModel(
        name=name or root.name, denoiser=transformer, alphas_cumprod=_alphas_cumprod(dict(pipe.scheduler.config)),
        prediction_type="epsilon", sample_shape=_sample_shape(channels, size, size), num_classes=num_classes,
        learned_sigma=int(config.out_channels) == 2 * channels,
        decode=VaeDecoder(vae, decode_batch_size) if vae is not None else None,
        components={"vae": vae} if vae is not None else {}, guidance_scale=float(guidance_scale), null_class=num_classes)
    log.info("loaded %s: DiT, %s %s, %d classes, CFG %.2f (2 evaluations a step when > 1)", model.name,
             "latents" if vae is not None else "pixels", model.sample_shape, num_classes, model.guidance_scale)
    return model


def open_folder(root: Path, prompts: Any, *, guidance_scale: float, decode_batch_size: int, device: Any, dtype: Any,
          name: str | None = None, image_size: int | None = None) -> Any:
    return load_dit(root, guidance_scale, decode_batch_size, device, dtype, name)
