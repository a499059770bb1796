"""Transformer pipelines: DiT (class-conditional latent VP diffusion) and SD3 / Flux (text-to-image flows).

Folders are the layouts ``save_pretrained`` writes and the hub publishes (``facebook/DiT-XL-2-256``:
``transformer/ vae/ scheduler/``; ``stabilityai/stable-diffusion-3-medium-diffusers``: plus
``text_encoder{,_2,_3}/ tokenizer{,_2,_3}/``; ``black-forest-labs/FLUX.1-dev``: ``text_encoder{,_2}/
tokenizer{,_2}/``). Every component named in ``model_index.json`` must be there with its weights; the
error names the missing files.

- **DiT**: eps is the first C of the 2C output channels (learned sigma). Classifier-free guidance with
  the null class (``num_embeds_ada_norm``, 1000 for ImageNet) runs [conditional; null] as one batch:
  eps = eps_null + s (eps_cond - eps_null), on eps only, as ``DiTPipeline`` does. One step is one
  batched call on 2B latents: **2 network evaluations a step** when s > 1.
- **SD3**: prompts encoded with the pipeline's own ``encode_prompt`` (two CLIPs and T5 when present),
  CFG against the empty prompt, same 2 evaluations a step; the transformer sees t * 1000.
- **Flux**: the guidance scale is the transformer's guidance embedding (FLUX.1-dev; none for schnell),
  one evaluation a step; latents are packed into 2x2 patches around each call and the transformer sees t.
  The shift is Flux's dynamic one for the latent size (s = e^mu).

Samples are latents (C, H, W); ``to_images`` decodes them with the VAE in chunks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from autodiff_opt.models.base import DiffusionModel, EpsFn, ModelLoadError
from autodiff_opt.models.flow import FLOW_PREDICTION, GRID_SIZE, FlowModel, model_shift, vp_alphas_cumprod
from autodiff_opt.models.latent import VaeDecoder, load_prompts
from autodiff_opt.models.loading import _alphas_cumprod, local_root

log = logging.getLogger(__name__)

PIPELINES = {"DiTPipeline": "dit", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
           "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def pipeline_kind(path: str | Path) -> str | None:
    """dit, sd3 or flux for a local folder whose model_index.json names one of those pipelines."""
    index = Path(path).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        return PIPELINES.get(str(json.loads(index.read_text()).get("_class_name")))
    except (OSError, json.JSONDecodeError):
        return None


def missing_components(root: Path) -> list[str]:
    """The files each component of model_index.json needs that are absent (config and weights, or tokenizer files)."""
    index = json.loads((root / "model_index.json").read_text())
    out = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = root / name
        if name.startswith("tokenizer"):
            if not any((folder / f).is_file() for f in TOKENIZER_FILES):
                out.append(f"{name}/tokenizer.json (or vocab.json / spiece.model)")
        elif name.startswith("scheduler"):
            if not (folder / "scheduler_config.json").is_file():
                out.append(f"{name}/scheduler_config.json")
        else:
            if not (folder / "config.json").is_file():
                out.append(f"{name}/config.json")
            if not any((folder / w).is_file() for w in WEIGHTS):
                out.append(f"{name}/{WEIGHTS[0] if 'text_encoder' not in name else WEIGHTS[1]}")
    return out


def _fetch(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                                      ignore_patterns=["*.fp16.*", "*.bin", "*.onnx*", "*.msgpack"]))
    except Exception as err:  # offline, gated, missing: all end the same way for the user
        raise ModelLoadError(
            f"could not load hub pipeline {repo_id!r} ({type(err).__name__}): on a machine without network (or for a"
            f" gated model, after accepting its licence on the hub), run huggingface-cli download {repo_id}"
            " --local-dir DIR elsewhere and set model.pretrained=DIR") from err


def pipeline_root(pretrained: str, source_hint: str = "") -> tuple[Path, str]:
    """(local folder, kind) of a DiT / SD3 / Flux pipeline; every component present or a one-line error."""
    root = local_root(pretrained, _fetch)
    kind = pipeline_kind(root)
    if kind is None:
        raise ModelLoadError(f"model.pretrained={pretrained!r}: no model_index.json naming one of {sorted(PIPELINES)}")
    missing = missing_components(root)
    if missing:
        hint = f" ({source_hint})" if source_hint else ""
        raise ModelLoadError(f"model.pretrained={pretrained}: the pipeline folder {root} lacks {', '.join(missing)}{hint}:"
                             " copy the whole folder (huggingface-cli download ID --local-dir DIR) and set"
                             " model.pretrained=DIR")
    return root, kind


def _load_pipeline(root: Path, dtype: torch.dtype) -> Any:
    import diffusers

    index = json.loads((root / "model_index.json").read_text())
    cls_name = index["_class_name"]
    # components saved as [null, null] (a pixel-space DiT has no VAE) are passed as None, as diffusers expects
    absent = {name: None for name, spec in index.items()
              if not name.startswith("_") and isinstance(spec, list) and spec[0] is None}
    try:
        return getattr(diffusers, cls_name).from_pretrained(root, local_files_only=True, torch_dtype=dtype, **absent)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load the {cls_name} in {root}: {err}") from err


def _sample_shape(channels: int, height: int, width: int) -> tuple[int, int, int]:
    return (int(channels), int(height), int(width))


# ---------------------------------------------------------------- DiT

@dataclass
class ClassGuidedModel(DiffusionModel):
    """A class-conditional transformer with classifier-free guidance against the null class."""

    guidance_scale: float = 1.0
    null_class: int = 1000
    kind: str = "dit"

    def eps_fn(self, class_labels: torch.Tensor | None = None, **unet_kwargs: Any) -> EpsFn:
        guided = class_labels is not None and self.guidance_scale > 1.0

        def eps(x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
            b, channels = x_t.shape[0], x_t.shape[1]
            null = torch.full((b,), self.null_class, device=x_t.device, dtype=torch.long)
            labels = null if class_labels is None else class_labels.to(x_t.device)
            x_in = torch.cat([x_t, x_t]) if guided else x_t
            labels_in = torch.cat([labels, null]) if guided else labels
            t_batch = torch.full((x_in.shape[0],), t, device=x_t.device, dtype=torch.long)
            dtype = next(self.denoiser.parameters()).dtype
            out = self.denoiser(x_in.to(dtype), timestep=t_batch, class_labels=labels_in, **unet_kwargs).sample
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


# ---------------------------------------------------------------- SD3 / Flux

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


def load_transformer_pipeline(pretrained: str, prompts: Any, *, guidance_scale: float, decode_batch_size: int,
                              device: torch.device | str, dtype: torch.dtype, name: str | None = None,
                              source_hint: str = "", image_size: int | None = None) -> DiffusionModel:
    """DiT, SD3 or Flux from a folder or hub id (kind read from model_index.json)."""
    root, kind = pipeline_root(pretrained, source_hint)
    if kind == "dit":
        return load_dit(root, guidance_scale, decode_batch_size, device, dtype, name)
    return load_prompt_flow(root, kind, prompts, guidance_scale, decode_batch_size, device, dtype, name,
                            image_size, image_size)
