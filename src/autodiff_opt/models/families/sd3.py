"""Stable Diffusion 3 (``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``, a text-to-image rectified flow
with classifier-free guidance against the empty prompt)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from autodiff_opt.models.base import Network, sample_of
from autodiff_opt.models.families._prompt_flow import PromptFlowModel, folder_opener
from autodiff_opt.models.families._transformer import (block_skipper, has_index_class, load_pipeline_model,
                                                        skip_joint_block, transformer_units)
from autodiff_opt.models.families.record import ModelFamily


@dataclass
class SD3Model(PromptFlowModel):
    """SD3: prompts through the pipeline's two CLIPs and T5, CFG against the empty prompt (2 evaluations a step),
    the transformer sees t * num_train_timesteps."""

    kind: str = "sd3"
    max_sequence_length: int = 256

    def encode(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, ...]]:
        """Per prompt, (sequence, pooled) embeddings."""
        with torch.no_grad():
            seq, _, pooled, _ = self.pipe.encode_prompt(prompt=list(texts), prompt_2=None, prompt_3=None,
                                                        device=self.device, do_classifier_free_guidance=False,
                                                        max_sequence_length=self.max_sequence_length)
        return [(seq[i], pooled[i]) for i in range(len(texts))]

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def velocity(self, x: torch.Tensor, t: float, state: dict[str, Any], kwargs: dict[str, Any],
                 network: Network) -> torch.Tensor:
        seq, pooled = state["cond"]
        dtype = next(self.denoiser.parameters()).dtype
        if self.guided:
            empty_seq, empty_pooled = self._empty()
            b = x.shape[0]
            seq = torch.cat([empty_seq.expand(b, -1, -1), seq])
            pooled = torch.cat([empty_pooled.expand(b, -1), pooled])
            x = torch.cat([x, x])
        timestep = torch.full((x.shape[0],), t * self.time_scale, device=x.device, dtype=dtype)
        out = sample_of(network(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=seq.to(dtype),
                                pooled_projections=pooled.to(dtype), return_dict=False, **kwargs)).float()
        if self.guided:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out

    @staticmethod
    def latent_grid(h_px: int, w_px: int, scale: int) -> tuple[int, int, int]:
        lh, lw = h_px // scale, w_px // scale
        return lh, lw, lh * lw

    @staticmethod
    def scheduler_time_scale(scheduler_config: dict[str, Any]) -> float:
        return float(scheduler_config.get("num_train_timesteps", 1000))



FAMILY = ModelFamily(
    name="sd3", summary="Stable Diffusion 3 (StableDiffusion3Pipeline), text-to-image flow",
    detect=has_index_class("StableDiffusion3Pipeline"), load=load_pipeline_model,
    denoiser_classes=("SD3Transformer2DModel",), units=transformer_units,
    skip=block_skipper({"JointTransformerBlock": skip_joint_block}), flops_inputs=None, flow=True,
    export="pipeline", pipeline_class="StableDiffusion3Pipeline", subfolder="transformer", transformer=True,
    priority=10, open_folder=folder_opener(SD3Model),
)
