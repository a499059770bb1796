"""ADM (guided-diffusion) models: checkpoint converter to diffusers, noisy-image classifier, classifier guidance.

See docs/adm.md for the parameter map, the measured agreement with the reference and the commands.
Names are imported lazily, so ``python -m autodiff_opt.models.adm.convert`` runs its module only once.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "classifier": ("AdmClassifier", "AttentionPool", "classifier_preset", "load_adm_classifier"),
    "config": ("CLASSIFIER_PRESETS", "UNET_PRESETS", "AdmClassifierConfig", "AdmConfigError", "AdmUNetConfig",
               "adm_alphas_cumprod", "adm_betas", "scheduler_config", "unet_preset"),
    "convert": ("MissingCheckpointError", "build_unet", "convert_checkpoint", "convert_unet_state_dict",
                "load_adm_state_dict", "save_diffusers_folder", "unet2d_config"),
    "guidance": ("ClassifierGuidance", "classifier_guidance", "grad_log_prob"),
    "keymap": ("KeyMapError", "split_qkv"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
