"""SD3 and Flux share one model class: a text-conditioned flow transformer whose ``class_labels`` are prompt
indices; prompts are encoded with the pipeline's own ``encode_prompt`` (once, then cached).

- **SD3**: CFG against the empty prompt, 2 evaluations a step; the transformer sees t * 1000.
- **Flux**: the guidance scale is the transformer's guidance embedding (FLUX.1-dev; none for schnell), one
  evaluation a step; latents are packed into 2x2 patches around each call and the transformer sees t. The
  shift is Flux's dynamic one for the latent size (s = e^mu).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from autodiff_opt.models.base import EpsFn, ModelLoadError, Network
from autodiff_opt.models.families._pipeline import _load_pipeline, _sample_shape
from autodiff_opt.models.flow import FLOW_PREDICTION, GRID_SIZE, FlowModel, model_shift, vp_alphas_cumprod
from autodiff_opt.models.latent import VaeDecoder, load_prompts

log = logging.getLogger(__name__)


@dataclass
class PromptFlowModel(FlowModel):
    """SD3 or Flux (``sd3.SD3Model``, ``flux.FluxModel``): a text-conditioned flow transformer; ``class_labels``
    are prompt indices."""

    pipe: Any = None
    kind: str = ""
    prompts: list[str] = field(default_factory=list)
    guidance_scale: float = 1.0
    max_sequence_length: int = 256
    _cache: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    def encode(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, ...]]:
        """Per prompt, the pipeline's own embeddings: (sequence, pooled[, text ids]) (the family's subclass)."""
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, t: float, state: dict[str, Any], kwargs: dict[str, Any],
                 network: Network) -> torch.Tensor:
        """One evaluation of ``network`` (the denoiser, or it compiled) at time t on the batch's prompt
        embeddings (the family's subclass)."""
        raise NotImplementedError

    @staticmethod
    def latent_grid(h_px: int, w_px: int, scale: int) -> tuple[int, int, int]:
        """(latent height, latent width, image sequence length) of an image size (the family's subclass)."""
        raise NotImplementedError

    @staticmethod
    def scheduler_time_scale(scheduler_config: dict[str, Any]) -> float:
        """What the transformer's timestep is in units of t (the family's subclass)."""
        raise NotImplementedError

    def _embeddings(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        todo = sorted({i for i in indices if i not in self._cache})
        if todo:
            self._cache.update(zip(todo, self.encode([self.prompts[i] for i in todo])))
        return [self._cache[i] for i in indices]

    def _empty(self) -> tuple[torch.Tensor, ...]:
        if -1 not in self._cache:
            self._cache[-1] = self.encode([""])[0]
        return self._cache[-1]

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs a second, unconditional pass (SD3; Flux embeds the scale instead)."""
        return False

    def eps_fn(self, class_labels: torch.Tensor | None = None, network: Network | None = None,
               **unet_kwargs: Any) -> EpsFn:
        """The velocity for one batch of prompt indices (None: the empty prompt)."""
        net = self.denoiser if network is None else network
        state: dict[str, Any] = {}

        def velocity(x_t: torch.Tensor, index: int, step_index: int) -> torch.Tensor:
            if "cond" not in state:
                ids = [int(i) for i in class_labels.tolist()] if class_labels is not None else []
                cond = self._embeddings(ids) if ids else [self._empty()] * x_t.shape[0]
                state["cond"] = [torch.stack([c[j] for c in cond]) for j in range(2)]
                state["ids"] = cond[0][2] if len(cond[0]) > 2 else None
            return self.velocity(x_t, self.time(index), state, unet_kwargs, net)

        return velocity


def load_prompt_flow(root: Path, model_cls: type[PromptFlowModel], prompts: str | Path | Sequence[str] | None,
                     guidance_scale: float, decode_batch_size: int, device: torch.device | str, dtype: torch.dtype,
                     name: str | None = None, height: int | None = None, width: int | None = None) -> PromptFlowModel:
    if prompts is None:
        raise ModelLoadError(f"{root} is a text-to-image pipeline: set model.prompts=/path/to/captions_val2014.json"
                             " (COCO captions) or a .txt with one prompt a line")
    pool = list(prompts) if isinstance(prompts, (list, tuple)) else load_prompts(prompts)  # type: ignore[arg-type]
    pipe = _load_pipeline(root, dtype)
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    transformer, vae = pipe.transformer, pipe.vae
    scale = pipe.vae_scale_factor
    size = int(pipe.default_sample_size) * scale
    h_px, w_px = height or size, width or size
    channels = int(vae.config.latent_channels)
    lh, lw, image_seq_len = model_cls.latent_grid(h_px, w_px, scale)
    sched = dict(pipe.scheduler.config)
    shift, dynamic = model_shift(sched, image_seq_len=image_seq_len)
    model = model_cls(
        name=name or root.name, denoiser=transformer, alphas_cumprod=vp_alphas_cumprod(GRID_SIZE),
        prediction_type=FLOW_PREDICTION, sample_shape=_sample_shape(channels, lh, lw), num_classes=len(pool),
        decode=VaeDecoder(vae, decode_batch_size), components={"vae": vae}, shift=shift, dynamic_shift=dynamic,
        time_scale=model_cls.scheduler_time_scale(sched), pipe=pipe, prompts=pool, guidance_scale=float(guidance_scale))
    log.info("loaded %s: %s flow, latents %s, shift %.3g%s, %d prompts, guidance %.2f", model.name, model.kind.upper(),
             model.sample_shape, shift, " (dynamic)" if dynamic else "", len(pool), model.guidance_scale)
    return model


def folder_opener(model_cls: type[PromptFlowModel]) -> Callable[..., PromptFlowModel]:
    """A family's ``open_folder`` for a prompt-flow pipeline of ``model_cls`` (square images of image_size)."""
    def open_folder(root: Path, prompts: Any, *, guidance_scale: float, decode_batch_size: int, device: Any,
                    dtype: Any, name: str | None = None, image_size: int | None = None) -> PromptFlowModel:
        return load_prompt_flow(root, model_cls, prompts, guidance_scale, decode_batch_size, device, dtype, name,
                                image_size, image_size)
    return open_folder
