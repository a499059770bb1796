"""DiT (``DiTPipeline``: ``DiTTransformer2DModel``, class-conditional VP diffusion, classifier-free guidance
with the null class), latent (``facebook/DiT-XL-2-256``) or pixel-space (the embedded digits-dit, no VAE).
The model class and its loader are in ``_dit_model.py``, imported when a DiT is loaded."""

from __future__ import annotations

from autodiff_opt.models.families.record import ModelFamily, has_index_class, lazy

_TRANSFORMER = "autodiff_opt.models.families._transformer"
_MODEL = "autodiff_opt.models.families._dit_model"  # its model class, units and skips: imported when needed


FAMILY = ModelFamily(
    name="dit", summary="DiT (DiTPipeline), class-conditional, latent or pixel space",
    detect=has_index_class("DiTPipeline"), load=lazy(f"{_TRANSFORMER}:load_pipeline_model"),
    denoiser_classes=("DiTTransformer2DModel",), units=lazy(f"{_TRANSFORMER}:transformer_units"),
    skip=lazy(f"{_MODEL}:skip"),
    flops_inputs=None, flow=False, export="pipeline", pipeline_class="DiTPipeline", subfolder="transformer",
    transformer=True, priority=10, open_folder=lazy(f"{_MODEL}:open_folder"),
)
