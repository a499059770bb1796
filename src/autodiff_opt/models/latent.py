"""Text-to-image latent diffusion (Stable Diffusion v1.x) from a diffusers pipeline folder or hub id.

The pipeline folder is the layout ``StableDiffusionPipeline.save_pretrained`` writes (and the hub's
``CompVis/stable-diffusion-v1-4`` has): ``model_index.json`` plus ``unet/`` (UNet2DConditionModel),
``vae/`` (AutoencoderKL), ``text_encoder/`` (CLIPTextModel), ``tokenizer/`` (CLIPTokenizer) and
``scheduler/``. Weights are read from safetensors only.

Prompts plug into the class-label path of the rest of the toolkit: the model's ``num_classes`` is the
number of prompts, ``SampleSet`` draws one prompt index per sample from the study's seed (with
replacement, like class labels), and ``eps_fn(class_labels=indices)`` looks up the CLIP embeddings
of those prompts (encoded once, then cached) and applies classifier-free guidance with the
conditional and unconditional passes in one batch:
``eps = eps_uncond + s * (eps_cond - eps_uncond)``. Samples live in latent space (4, H/8, W/8);
``to_images`` decodes them with the VAE (latents / scaling_factor) to images in [-1, 1].
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from autodiff_opt.models.base import DiffusionModel, EpsFn, ModelLoadError, Network, sample_of
from autodiff_opt.models.loading import _alphas_cumprod, local_root
from autodiff_opt.models.sources import read_json

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.fp16.*", "*non_ema*"]
CACHE_BYTES = 4 * 2**30  # prompt embeddings kept on CPU: 77 x 768 fp16 is 118 KiB, so ~36,000 prompts
ENCODE_BATCH = 128


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a COCO captions JSON (``captions_val2014.json``: annotations sorted by id) or a .txt (one a line)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelLoadError(f"model.prompts={path}: no such file (a COCO captions JSON such as captions_val2014.json,"
                             " or a .txt with one prompt a line)")
    if file.suffix.lower() == ".txt":
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    else:
        prompts = _coco_captions(file)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ModelLoadError(f"model.prompts={path} holds no prompts")
    log.info("%d prompts from %s", len(prompts), file)
    return prompts


def _coco_captions(file: Path) -> list[str]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"model.prompts={file} is not valid JSON ({err}): expected COCO captions format") from err
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not all(isinstance(a, dict) and "caption" in a for a in annotations):
        raise ModelLoadError(f"model.prompts={file} is not in COCO captions format: expected"
                             " {'annotations': [{'image_id', 'id', 'caption'}, ...]}")
    ordered = sorted(annotations, key=lambda a: (int(a.get("id", 0)), int(a.get("image_id", 0))))
    return [" ".join(str(a["caption"]).split()) for a in ordered]


class PromptEncoder:
    """CLIP embeddings (last hidden state, padded to the tokenizer's max length) of prompts by index, cached."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, prompts: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.prompts = list(prompts)
        positions = int(text_encoder.config.max_position_embeddings)
        self.max_length = min(int(tokenizer.model_max_length), positions)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_bytes = 0
        self._empty: torch.Tensor | None = None

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, L, D) embeddings on CPU, in the text encoder's dtype."""
        device = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        with torch.no_grad():
            hidden = self.text_encoder(tokens.input_ids.to(device))[0]
        return hidden.cpu()

    def unconditional(self) -> torch.Tensor:
        """(1, L, D) embedding of the empty prompt (the unconditional branch of classifier-free guidance)."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """(N, L, D) embeddings of the prompts at these indices."""
        ids = [int(i) for i in indices.flatten().tolist()]
        bad = [i for i in ids if not 0 <= i < len(self.prompts)]
        if bad:
            raise ValueError(f"prompt indices {bad[:5]} are outside [0, {len(self.prompts)})")
        todo = sorted({i for i in ids if i not in self._cache})
        fresh: dict[int, torch.Tensor] = {}
        for start in range(0, len(todo), ENCODE_BATCH):
            chunk = todo[start : start + ENCODE_BATCH]
            fresh.update(zip(chunk, self.encode([self.prompts[i] for i in chunk])))
        for i, hidden in fresh.items():
            size = hidden.numel() * hidden.element_size()
            if self._cache_bytes + size > CACHE_BYTES:
                break
            self._cache[i] = hidden.clone()
            self._cache_bytes += size
        return torch.stack([self._cache[i] if i in self._cache else fresh[i] for i in ids])


class VaeDecoder:
    """Latents -> images in [-1, 1] with the VAE, in chunks (decoding is memory-hungry at 512 px)."""

    def __init__(self, vae: torch.nn.Module, batch_size: int = 8) -> None:
        self.vae = vae
        self.batch_size = max(1, int(batch_size))
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        out = []
        for start in range(0, latents.shape[0], self.batch_size):
            z = latents[start : start + self.batch_size] / self.scaling_factor + self.shift_factor
            out.append(self.vae.decode(z.to(dtype)).sample.float().clamp(-1.0, 1.0))
        return torch.cat(out)


@dataclass
class TextToImageModel(DiffusionModel):
    """A latent UNet2DConditionModel with prompts as its 'classes' and classifier-free guidance."""

    prompt_encoder: PromptEncoder | None = None
    guidance_scale: float = 7.5

    def _context(self, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        """Encoder hidden states for one solver batch: [uncond; cond] under guidance, else cond (or uncond) alone."""
        assert self.prompt_encoder is not None
        dtype = next(self.denoiser.parameters()).dtype
        empty = self.prompt_encoder.unconditional().expand(batch, -1, -1)
        if class_labels is None:
            return empty.to(device, dtype), False
        if class_labels.shape[0] != batch:
            raise ValueError(f"{class_labels.shape[0]} prompt indices for a batch of {batch} samples")
        cond = self.prompt_encoder(class_labels.cpu())
        if self.guidance_scale == 1.0:
            return cond.to(device, dtype), False
        return torch.cat([empty, cond]).to(device, dtype), True

    def eps_fn(self, class_labels: torch.Tensor | None = None, network: Network | None = None,
               **unet_kwargs: Any) -> EpsFn:
        """eps(x_t, t, step) for one batch; ``class_labels`` are prompt indices (None: the empty prompt)."""
        net = self.denoiser if network is None else network
        contexts: dict[tuple[int, str], tuple[torch.Tensor, bool]] = {}

        def eps(x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
            key = (x_t.shape[0], str(x_t.device))
            if key not in contexts:
                contexts[key] = self._context(class_labels, x_t.shape[0], x_t.device)
            context, guided = contexts[key]
            dtype = context.dtype
            x_in = torch.cat([x_t, x_t]) if guided else x_t
            t_batch = torch.full((x_in.shape[0],), t, device=x_t.device, dtype=torch.long)
            out = sample_of(net(x_in.to(dtype), t_batch, encoder_hidden_states=context, **unet_kwargs))
            if guided:
                uncond, cond = out.float().chunk(2)
                out = uncond + self.guidance_scale * (cond - uncond)
            return self.eps_from_output(out, x_t, t)

        return eps


def _fetch_pipeline(repo_id: str) -> Path:
    """A hub text-to-image pipeline's five components (safetensors only) from the cache or the network."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", *(f"{c}/*" for c in COMPONENTS)]
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=HUB_IGNORE))
    except Exception as err:  # offline, missing repo, gated repo: all end the same way for the user
        raise ModelLoadError(
            f"could not load hub pipeline {repo_id!r} ({type(err).__name__}): on a machine without network,"
            f" download it elsewhere (huggingface-cli download {repo_id} --local-dir DIR) and set model.pretrained=DIR"
        ) from err


def _pipeline_root(pretrained: str) -> Path:
    root = local_root(pretrained, _fetch_pipeline)
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if not (root / "model_index.json").is_file() or missing:
        raise ModelLoadError(
            f"model.pretrained={pretrained!r} is not a text-to-image pipeline folder: it needs model_index.json and"
            f" {', '.join(COMPONENTS)}/ (missing: {', '.join(missing) or 'model_index.json'}) — the layout"
            " StableDiffusionPipeline.save_pretrained writes"
        )
    return root


def _load_components(root: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"local_files_only": True, "use_safetensors": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **common)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", **common).to(dtype)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load the pipeline in {root}: {err}") from err
    return unet, vae, text_encoder, tokenizer


def load_text_to_image(
    pretrained: str,
    prompts: str | Path | Sequence[str] | None,
    *,
    name: str | None = None,
    guidance_scale: float = 7.5,
    decode_batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextToImageModel:
    """Load a Stable Diffusion v1.x pipeline (folder or hub id) with its prompt pool."""
    if prompts is None:
        raise ModelLoadError(f"model.pretrained={pretrained!r} is a text-to-image pipeline: set model.prompts="
                             "/path/to/captions_val2014.json (COCO captions) or a .txt with one prompt a line")
    if guidance_scale < 0.0:
        raise ModelLoadError(f"model.guidance_scale={guidance_scale}: use 1.0 (no guidance) or more (7.5 in the paper)")
    pool = list(prompts) if isinstance(prompts, (list, tuple)) else load_prompts(prompts)  # type: ignore[arg-type]
    root = _pipeline_root(pretrained)
    unet, vae, text_encoder, tokenizer = _load_components(root, dtype)
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    sched = read_json(root / "scheduler" / "scheduler_config.json")
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    model = TextToImageModel(
        name=name or root.name, denoiser=unet, alphas_cumprod=_alphas_cumprod(sched),
        prediction_type=sched.get("prediction_type", "epsilon"),
        sample_shape=(int(unet.config.in_channels), int(height), int(width)),
        num_classes=len(pool), decode=VaeDecoder(vae, decode_batch_size),
        components={"vae": vae, "text_encoder": text_encoder},
        prompt_encoder=PromptEncoder(tokenizer, text_encoder, pool), guidance_scale=float(guidance_scale),
    )
    log.info("loaded %s: latents %s -> images %dx%d, T=%d, %s, %d prompts, guidance %.2f", model.name,
             model.sample_shape, height * downsample, width * downsample, model.num_train_timesteps,
             model.prediction_type, len(pool), model.guidance_scale)
    return model
