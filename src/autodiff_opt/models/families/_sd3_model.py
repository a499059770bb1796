"""SD3's model class (the ``sd3`` family, ``sd3.py``, names it lazily): ``SD3Model``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from autodiff_opt.models.base import Network, sample_of
from autodiff_opt.models.families._prompt_flow import PromptFlowModel, folder_opener
from autodiff_opt.models.families._transformer import block_skipper, skip_joint_block

skip = block_skipper({"JointTransformerBlock": skip_joint_block})  # the family's ``skip``


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


open_folder = folder_opener(SD3Model)
