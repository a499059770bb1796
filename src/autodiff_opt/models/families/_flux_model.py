"""Flux's model class (the ``flux`` family, ``flux.py``, names it lazily): ``FluxModel``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from autodiff_opt.models.base import Network, sample_of
from autodiff_opt.models.families._prompt_flow import PromptFlowModel, folder_opener
from autodiff_opt.models.families._transformer import BLOCKS, block_skipper, skip_joint_block, transformer_units

# the family's ``units`` (double blocks, then single blocks) and ``skip``
units = functools.partial(transformer_units, groups=(*BLOCKS, ("single", "single_transformer_blocks")))
skip = block_skipper({"FluxTransformerBlock": skip_joint_block, "FluxSingleTransformerBlock": skip_joint_block})


@dataclass
class FluxModel(PromptFlowModel):
    """Flux: prompts through CLIP and T5, the guidance scale as the transformer's guidance embedding (one
    evaluation a step), latents packed into 2x2 patches around each call; the transformer sees t."""

    kind: str = "flux"
    max_sequence_length: int = 512

    def encode(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, ...]]:
        """Per prompt, (sequence, pooled, text ids) embeddings."""
        with torch.no_grad():
            seq, pooled, ids = self.pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=self.device,
                                                       max_sequence_length=self.max_sequence_length)
        return [(seq[i], pooled[i], ids) for i in range(len(texts))]

    def velocity(self, x: torch.Tensor, t: float, state: dict[str, Any], kwargs: dict[str, Any],
                 network: Network) -> torch.Tensor:
        seq, pooled = state["cond"]
        b, c, h, w = x.shape
        dtype = next(self.denoiser.parameters()).dtype
        packed = self.pipe._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        guidance = (torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
                    if self.denoiser.config.guidance_embeds else None)
        timestep = torch.full((b,), t, device=x.device, dtype=dtype)
        out = sample_of(network(hidden_states=packed, timestep=timestep, guidance=guidance,
                                pooled_projections=pooled.to(dtype), encoder_hidden_states=seq.to(dtype),
                                txt_ids=state["ids"], img_ids=img_ids, return_dict=False, **kwargs))
        scale = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, h * scale, w * scale, scale).float()

    @staticmethod
    def latent_grid(h_px: int, w_px: int, scale: int) -> tuple[int, int, int]:
        lh, lw = 2 * (h_px // (scale * 2)), 2 * (w_px // (scale * 2))
        return lh, lw, (lh // 2) * (lw // 2)

    @staticmethod
    def scheduler_time_scale(scheduler_config: dict[str, Any]) -> float:
        return 1.0


open_folder = folder_opener(FluxModel)
