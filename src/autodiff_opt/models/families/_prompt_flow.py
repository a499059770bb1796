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
from typing import Any, Sequence

import torch

from autodiff_opt.models.base import EpsFn, ModelLoadError
from autodiff_opt.models.families._pipeline import _load_pipeline, _sample_shape
from autodiff_opt.models.flow import FLOW_PREDICTION, GRID_SIZE, FlowModel, model_shift, vp_alphas_cumprod
from autodiff_opt.models.latent import VaeDecoder, load_prompts

log = logging.getLogger(__name__)


@dataclass
class PromptFlowModel(FlowModel):
    """SD3 or Flux: a text-conditioned flow transformer; ``class_labels`` are prompt indices."""

    pipe: Any = None
    kind: str = "sd3"
    prompts: list[str] = field(default_factory=list)
    guidance_scale: float = 1.0
    max_sequence_length: int = 256
    _cache: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    def encode(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, ...]]:
        """Per prompt, the pipeline's own embeddings: (sequence, pooled) for SD3, (sequence, pooled, text ids) for Flux."""
        device = self.device
        with torch.no_grad():
            if self.kind == "sd3":
                seq, _, pooled, _ = self.pipe.encode_prompt(prompt=list(texts), prompt_2=None, prompt_3=None, device=device,
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=self.max_sequence_length)
                return [(seq[i], pooled[i]) for i in range(len(texts))]
            seq, pooled, ids = self.pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=device,
                                                       max_sequence_length=self.max_sequence_length)
            return [(seq[i], pooled[i], ids) for i in range(len(texts))]

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
        return self.kind == "sd3" and self.guidance_scale > 1.0

    def eps_fn(self, class_labels: torch.Tensor | None = None, **unet_kwargs: Any) -> EpsFn:
        """The velocity for one batch of prompt indices (None: the empty prompt)."""
        state: dict[str, Any] = {}

        def velocity(x_t: torch.Tensor, index: int, step_index: int) -> torch.Tensor:
            if "cond" not in state:
                ids = [int(i) for i in class_labels.tolist()] if class_labels is not None else []
                cond = self._embeddings(ids) if ids else [self._empty()] * x_t.shape[0]
                state["cond"] = [torch.stack([c[j] for c in cond]) for j in range(2)]
                state["ids"] = cond[0][2] if self.kind == "flux" else None
            t = self.time(index)
            if self.kind == "sd3":
                return self._sd3(x_t, t, state, unet_kwargs)
            return self._flux(x_t, t, state, unet_kwargs)

        return velocity

    def _sd3(self, x: torch.Tensor, t: float, state: dict[str, Any], kwargs: dict[str, Any]) -> torch.Tensor:
        seq, pooled = state["cond"]
        dtype = next(self.denoiser.parameters()).dtype
        if self.guided:
            empty_seq, empty_pooled = self._empty()
            b = x.shape[0]
            seq = torch.cat([empty_seq.expand(b, -1, -1), seq])
            pooled = torch.cat([empty_pooled.expand(b, -1), pooled])
            x = torch.cat([x, x])
        timestep = torch.full((x.shape[0],), t * self.time_scale, device=x.device, dtype=dtype)
        out = self.denoiser(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=seq.to(dtype),
                        pooled_projections=pooled.to(dtype), return_dict=False, **kwargs)[0].float()
        if self.guided:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out

    def _flux(self, x: torch.Tensor, t: float, state: dict[str, Any], kwargs: dict[str, Any]) -> torch.Tensor:
        seq, pooled = state["cond"]
        b, c, h, w = x.shape
        dtype = next(self.denoiser.parameters()).dtype
        packed = self.pipe._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        guidance = (torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
                    if self.denoiser.config.guidance_embeds else None)
        timestep = torch.full((b,), t, device=x.device, dtype=dtype)
        out = self.denoiser(hidden_states=packed, timestep=timestep, guidance=guidance, pooled_projections=pooled.to(dtype),
                        encoder_hidden_states=seq.to(dtype), txt_ids=state["ids"], img_ids=img_ids, return_dict=False,
                        **kwargs)[0]
        scale = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, h * scale, w * scale, scale).float()


def load_prompt_flow(root: Path, kind: str, prompts: str | Path | Sequence[str] | None, guidance_scale: float,
                     decode_batch_size: int, device: torch.device | str, dtype: torch.dtype,
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
    if kind == "flux":
        lh, lw = 2 * (h_px // (scale * 2)), 2 * (w_px // (scale * 2))
        image_seq_len = (lh // 2) * (lw // 2)
    else:
        lh, lw = h_px // scale, w_px // scale
        image_seq_len = lh * lw
    sched = dict(pipe.scheduler.config)
    shift, dynamic = model_shift(sched, image_seq_len=image_seq_len)
    model = PromptFlowModel(
        name=name or root.name, denoiser=transformer, alphas_cumprod=vp_alphas_cumprod(GRID_SIZE),
        prediction_type=FLOW_PREDICTION, sample_shape=_sample_shape(channels, lh, lw), num_classes=len(pool),
        decode=VaeDecoder(vae, decode_batch_size), components={"vae": vae}, shift=shift, dynamic_shift=dynamic,
        time_scale=float(sched.get("num_train_timesteps", 1000)) if kind == "sd3" else 1.0,
        pipe=pipe, kind=kind, prompts=pool, guidance_scale=float(guidance_scale),
        max_sequence_length=256 if kind == "sd3" else 512)
    log.info("loaded %s: %s flow, latents %s, shift %.3g%s, %d prompts, guidance %.2f", model.name, kind.upper(),
             model.sample_shape, shift, " (dynamic)" if dynamic else "", len(pool), model.guidance_scale)
    return model
