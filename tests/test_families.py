"""The model-family registry (models/families/) is complete and consistent: every module in the package is a
family, each family recognises its own denoiser and lists layers that its skip knows, and the configured model
of every kind the project loads (the embedded digits models, an ADM checkpoint, the SD / DiT / SD3 / Flux
pipeline layouts) finds its family before loading."""

from __future__ import annotations

import dataclasses
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autodiff_opt.arch.layers import discover_layers
from autodiff_opt.arch.skip import LayerSkipper
from autodiff_opt.config import ModelConfig
from autodiff_opt.models import families as family_pkg
from autodiff_opt.models.families import Lazy, families, family_for, family_of, pipeline_families

EXPECTED = {"unet", "adm", "sd", "dit", "sd3", "flux"}  # the families the project had when the registry came


def _unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4)


def _sd_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4)


def _dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=10)


def _sd3() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                                 pooled_projection_dim=8, out_channels=4)


def _flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4))


DENOISERS = {"unet": _unet, "adm": _unet, "sd": _sd_unet, "dit": _dit, "sd3": _sd3, "flux": _flux}


def test_every_module_of_the_package_is_a_registered_family() -> None:
    modules = {m.name for m in pkgutil.iter_modules(family_pkg.__path__) if not m.name.startswith("_")} - {"record"}
    assert set(families()) == modules and EXPECTED <= modules
    assert {"DiTPipeline": "dit", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}.items() <= pipeline_families().items()
    for family in families().values():
        assert (family.export == "pipeline") == (family.open_folder is not None) == bool(family.transformer)
        assert family.flops_inputs is None or not family.transformer  # transformers count through their model
        for field in dataclasses.fields(family):  # every lazy reference names a callable that exists
            value = getattr(family, field.name)
            if isinstance(value, Lazy):
                assert callable(value.resolve()), (family.name, field.name, value.target)


@pytest.mark.parametrize("name", sorted(families()))
def test_a_family_lists_layers_its_skip_knows(name: str) -> None:
    """Each family's denoiser is recognised by class (ADM's is a plain UNet2DModel, the unet family's), every
    unit it lists, blocks and sub-blocks, names a submodule its skip replaces, and a UNet runs with all of them
    skipped on the family's own cost inputs."""
    family = families()[name]
    assert name in DENOISERS, f"a new family {name!r}: add a tiny denoiser of its class to DENOISERS"
    torch.manual_seed(0)
    denoiser = DENOISERS[name]().eval()
    assert family_of(denoiser) is families()["unet" if name == "adm" else name]
    for units in ("blocks", "sub_blocks"):
        listed = family.units(denoiser, units)
        assert listed and [u[0] for u in listed] == [layer.name for layer in discover_layers(denoiser, units)]  # type: ignore[arg-type]
        for unit_name, kind, path in listed:
            assert family.skip(denoiser.get_submodule(path), kind) is not None, (name, unit_name)
    if family.flops_inputs is not None:
        skipper = LayerSkipper(denoiser)
        inputs = family.flops_inputs(denoiser)
        with torch.no_grad(), skipper.skipping(range(skipper.num_layers)):
            skipped = denoiser(**inputs).sample
        with torch.no_grad():
            full = denoiser(**inputs).sample
        assert skipped.shape == full.shape and not torch.equal(skipped, full)


def _index(folder: Path, pipeline: str, **components: list) -> str:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}))
    return str(folder)


def _model(pretrained: str, **settings: object) -> ModelConfig:
    return ModelConfig(pretrained=pretrained, **settings)  # type: ignore[arg-type]


def test_each_model_kind_finds_its_family_before_loading(tmp_path: Path) -> None:
    """The embedded models, an ADM checkpoint (model.converter) and the pipelines' model_index.json layouts (as
    the published folders and the test replicas have them) pick their families; nothing is loaded."""
    t2i = {"text_encoder": ["transformers", "CLIPTextModel"], "vae": ["diffusers", "AutoencoderKL"]}
    cases = {
        "unet": [_model("builtin:digits-ddpm"), _model("builtin:digits-deep"), _model("builtin:digits-flow")],
        "adm": [_model(str(tmp_path / "converted"), converter="adm", checkpoint=str(tmp_path / "64x64_diffusion.pt"))],
        "sd": [_model(_index(tmp_path / "sd", "StableDiffusionPipeline", **t2i)),
               _model("builtin:digits-ddpm", prompts=str(tmp_path / "captions.json"))],
        "dit": [_model("builtin:digits-dit"), _model(_index(tmp_path / "dit", "DiTPipeline"))],
        "sd3": [_model(_index(tmp_path / "sd3", "StableDiffusion3Pipeline", **t2i), prompts="p.txt")],
        "flux": [_model(_index(tmp_path / "flux", "FluxPipeline", **t2i), prompts="p.txt")],
    }
    for name, configs in cases.items():
        for cfg in configs:
            assert family_for(cfg).name == name, (name, cfg)


# What preflight does with the registry, in a fresh interpreter: list and name the families, read every record's
# declarative fields, detect local folders' families, read a folder's pipeline class. None of it may import torch,
# diffusers or NumPy (a family module that imports them at top level fails here; see docs/architecture.md).
_TORCH_FREE = """
import sys
from pathlib import Path
from types import SimpleNamespace

from autodiff_opt.models.families import ModelRef, families, family_for, family_named, pipeline_families

root = Path(sys.argv[1])
fields = {name: (f.name, f.summary, f.flow, f.export, f.pipeline_class, f.subfolder, f.transformer, f.priority,
                 f.denoiser_classes) for name, f in families().items()}
assert all(family_named(name).name == name for name in fields), fields
assert pipeline_families()["DiTPipeline"] == "dit"
assert ModelRef(pretrained=str(root / "dit")).pipeline_class == "DiTPipeline"
found = {str(p): family_for(SimpleNamespace(pretrained=p, converter=c, prompts=None)).name
         for p, c in ((str(root / "dit"), None), (str(root / "sd"), None), ("builtin:digits-ddpm", None),
                      ("builtin:digits-dit", None), (str(root / "adm"), "adm"))}
heavy = sorted(m for m in ("torch", "diffusers", "numpy") if m in sys.modules)
print(sorted(found.values()), heavy)
"""


def test_the_registry_imports_no_torch(tmp_path: Path) -> None:
    """Reading the registry and detecting a model's family, as preflight does, imports no torch, diffusers or
    NumPy (a fresh interpreter, PYTHONPATH inherited)."""
    _index(tmp_path / "dit", "DiTPipeline")
    _index(tmp_path / "sd", "StableDiffusionPipeline", text_encoder=["transformers", "CLIPTextModel"],
           vae=["diffusers", "AutoencoderKL"])
    done = subprocess.run([sys.executable, "-c", _TORCH_FREE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['adm', 'dit', 'dit', 'sd', 'unet'] []", done.stdout
