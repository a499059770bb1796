"""Transformer pipelines: DiT (class-conditional latent VP diffusion) and SD3 / Flux (text-to-image flows), each
loaded by its model family (``models/families/dit.py``, ``sd3.py``, ``flux.py``).

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

from autodiff_opt.models.families._pipeline import (load_transformer_pipeline, missing_components, pipeline_kind,
                                                     pipeline_root)
from autodiff_opt.models.families._prompt_flow import PromptFlowModel, load_prompt_flow
from autodiff_opt.models.families._dit_model import ClassGuidedModel, load_dit

__all__ = ["ClassGuidedModel", "PromptFlowModel", "load_dit", "load_prompt_flow", "load_transformer_pipeline",
           "missing_components", "pipeline_kind", "pipeline_root"]
