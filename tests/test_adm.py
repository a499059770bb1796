"""ADM support: converter vs guided-diffusion reference outputs, classifier, CLI, classifier guidance.

Reference tensors come from guided-diffusion's own UNetModel / EncoderUNetModel on random weights
(tests/fixtures/adm/README.md says how). The weights are not stored: they are regenerated here from
the fixture's seed and key shapes, and checked against the recorded sha256 first.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from autodiff_opt.models.adm import (
    AdmClassifier,
    AdmClassifierConfig,
    AdmUNetConfig,
    KeyMapError,
    MissingCheckpointError,
    adm_alphas_cumprod,
    adm_betas,
    build_unet,
    classifier_guidance,
    classifier_preset,
    convert_unet_state_dict,
    load_adm_classifier,
    scheduler_config,
    unet_preset,
)
from autodiff_opt.models.adm.classifier import classifier_module_pairs
from autodiff_opt.models.adm.convert import main as convert_main
from autodiff_opt.models.adm.keymap import convert_params, split_qkv

FIXTURES = Path(__file__).parent / "fixtures" / "adm"
UNET_FIXTURES = ["unet_cond", "unet_uncond", "unet_plain"]
ATOL = 1e-5  # measured: max |diff| 2.2e-6 (UNets), 3e-7 (classifier), float32 on CPU


def random_adm_state(shapes: dict[str, list[int]], seed: int) -> "OrderedDict[str, torch.Tensor]":
    """The fixtures' weights: numpy RandomState(seed) normals drawn in sorted key order, scaled per kind."""
    rng = np.random.RandomState(seed)
    drawn = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        z = rng.standard_normal(size=shape)
        if len(shape) >= 2:
            z = z / math.sqrt(math.prod(shape[1:]))  # 1 / sqrt(fan_in)
        elif key.endswith("weight"):
            z = 1.0 + 0.1 * z  # group-norm gains
        else:
            z = 0.1 * z  # biases
        drawn[key] = torch.from_numpy(z.astype(np.float32))
    return OrderedDict((key, drawn[key]) for key in shapes)  # the checkpoint's own key order


def sha256_of(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def load_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor], "OrderedDict[str, torch.Tensor]"]:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    tensors = load_file(FIXTURES / f"{name}.safetensors")
    return meta, tensors, random_adm_state(meta["param_shapes"], meta["seed"])


def unet_output(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(tensors["x"], tensors["t"], class_labels=tensors.get("y")).sample


# ---------------------------------------------------------------- converter


@pytest.mark.parametrize("name", [*UNET_FIXTURES, "classifier"])
def test_regenerated_weights_are_the_reference_weights(name: str) -> None:
    meta, _, state = load_fixture(name)
    assert sha256_of(state) == meta["weights_sha256"]


@pytest.mark.parametrize("name", UNET_FIXTURES)
def test_converter_maps_every_key_with_matching_shapes(name: str) -> None:
    from diffusers import UNet2DModel

    from autodiff_opt.models.adm import unet2d_config

    meta, _, state = load_fixture(name)
    cfg = AdmUNetConfig(**meta["adm_config"])
    converted = convert_unet_state_dict(state, cfg)
    expected = UNet2DModel(**unet2d_config(cfg)).state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert sum(t.numel() for t in converted.values()) == sum(t.numel() for t in state.values())


@pytest.mark.parametrize("name", UNET_FIXTURES)
def test_converted_unet_reproduces_guided_diffusion(name: str) -> None:
    meta, tensors, state = load_fixture(name)
    model = build_unet(state, AdmUNetConfig(**meta["adm_config"]))
    out = unet_output(model, tensors)
    assert out.shape == tensors["out"].shape
    torch.testing.assert_close(out, tensors["out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["unet_cond", "unet_uncond"])
def test_wrong_attention_order_is_detected(name: str) -> None:
    """The fixtures are sensitive to the qkv head layout: the other ADM order gives other outputs."""
    meta, tensors, state = load_fixture(name)
    cfg = AdmUNetConfig(**meta["adm_config"])
    wrong = replace(cfg, use_new_attention_order=not cfg.use_new_attention_order)
    out = unet_output(build_unet(state, wrong), tensors)
    assert (out - tensors["out"]).abs().max() > 1e-2


@pytest.mark.parametrize("preset", ["imagenet64", "lsun256"])
def test_released_architectures_map_every_key(preset: str) -> None:
    """Key names and shapes of the full-size released models (recorded from guided-diffusion), on meta tensors."""
    shapes = json.loads((FIXTURES / "released_shapes.json").read_text())["param_shapes"][f"unet_{preset}"]
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    converted = convert_unet_state_dict(state, unet_preset(preset))
    assert sum(t.numel() for t in converted.values()) == sum(t.numel() for t in state.values())


def test_released_classifier_maps_every_key() -> None:
    shapes = json.loads((FIXTURES / "released_shapes.json").read_text())["param_shapes"]["classifier_imagenet64"]
    cfg = classifier_preset("imagenet64")
    with torch.device("meta"):
        model = AdmClassifier(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    converted = convert_params(state, classifier_module_pairs(cfg), expected)
    assert converted.keys() == expected.keys()


def test_unmapped_missing_and_misshapen_keys_are_named() -> None:
    meta, _, state = load_fixture("unet_cond")
    cfg = AdmUNetConfig(**meta["adm_config"])
    extra = dict(state, **{"input_blocks.99.0.in_layers.0.weight": torch.zeros(32)})
    with pytest.raises(KeyMapError, match=r"no place.*input_blocks\.99\.0\.in_layers\.0\.weight"):
        convert_unet_state_dict(extra, cfg)
    missing = {k: v for k, v in state.items() if k != "middle_block.1.qkv.weight"}
    with pytest.raises(KeyMapError, match=r"mid_block\.attentions\.0\.to_q\.weight"):
        convert_unet_state_dict(missing, cfg)
    with pytest.raises(KeyMapError, match=r"shape mismatches"):
        convert_unet_state_dict(state, replace(cfg, num_classes=7))
    with pytest.raises(KeyMapError, match=r"no place in this architecture: input_blocks\.4\.0"):  # 2 blocks/level
        convert_unet_state_dict(state, replace(cfg, num_res_blocks=1))


def test_split_qkv_layouts() -> None:
    heads, width = 2, 3
    rows = torch.arange(3 * heads * width).float()[:, None, None]
    q_new, k_new, _ = split_qkv(rows, heads, legacy_order=False)
    assert q_new.flatten().tolist() == [0, 1, 2, 3, 4, 5] and k_new.flatten().tolist() == [6, 7, 8, 9, 10, 11]
    q_old, k_old, v_old = split_qkv(rows, heads, legacy_order=True)
    assert q_old.flatten().tolist() == [0, 1, 2, 9, 10, 11]
    assert k_old.flatten().tolist() == [3, 4, 5, 12, 13, 14] and v_old.flatten().tolist() == [6, 7, 8, 15, 16, 17]


# ---------------------------------------------------------------- schedules


def test_schedules_equal_adm_and_diffusers_agrees() -> None:
    from diffusers import DDPMScheduler

    reference = load_file(FIXTURES / "betas.safetensors")
    for schedule, preset in (("cosine", "imagenet64"), ("linear", "lsun256")):
        torch.testing.assert_close(adm_betas(schedule), reference[schedule], atol=1e-15, rtol=0)
        sched = DDPMScheduler(**scheduler_config(unet_preset(preset)))
        torch.testing.assert_close(sched.betas.double(), reference[schedule], atol=0, rtol=2e-7)
        assert sched.config.variance_type == "learned_range" and sched.config.prediction_type == "epsilon"
    assert float(reference["cosine"].max()) == pytest.approx(0.999)  # max_beta clip, as diffusers' default
    ab = adm_alphas_cumprod("cosine")
    assert ab.dtype == torch.float64 and ab.shape == (1000,)


# ---------------------------------------------------------------- classifier


def test_classifier_reproduces_guided_diffusion() -> None:
    meta, tensors, state = load_fixture("classifier")
    model = AdmClassifier.from_adm_state_dict(state, AdmClassifierConfig(**meta["adm_config"]))
    with torch.no_grad():
        logits = model(tensors["x"], tensors["t"])
    torch.testing.assert_close(logits, tensors["out"], atol=ATOL, rtol=0)


def test_classifier_loads_pt_and_its_gradient_is_right(tmp_path: Path) -> None:
    meta, tensors, state = load_fixture("classifier")
    torch.save(state, tmp_path / "classifier.pt")
    model = load_adm_classifier(tmp_path / "classifier.pt", AdmClassifierConfig(**meta["adm_config"])).double()
    x = tensors["x"].double().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x, 500).log_softmax(-1)[:, 3].sum(), x)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        f = lambda z: model(z, 500).log_softmax(-1)[:, 3].sum()  # noqa: E731
        numeric = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
    assert float(numeric) == pytest.approx(float((grad * direction).sum()), rel=1e-5)


# ---------------------------------------------------------------- CLI and folder


def _cli_args(checkpoint: Path, out: Path) -> list[str]:
    """unet_cond is the imagenet64 preset shrunk: same flags, smaller sizes."""
    return ["--checkpoint", str(checkpoint), "--out", str(out), "--preset", "imagenet64", "--image-size", "16",
            "--num-channels", "32", "--channel-mult", "1,2,2", "--num-res-blocks", "2",
            "--attention-resolutions", "8,4", "--num-head-channels", "16", "--num-classes", "5"]


def test_cli_converts_a_guided_diffusion_pt_into_a_loadable_folder(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    meta, tensors, state = load_fixture("unet_cond")
    checkpoint = tmp_path / "64x64_diffusion.pt"
    torch.save(state, checkpoint)  # what guided-diffusion's training loop writes: a plain state dict
    assert convert_main(_cli_args(checkpoint, tmp_path / "out")) == 0

    folder = tmp_path / "out"
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    model = UNet2DModel.from_pretrained(folder).eval()
    torch.testing.assert_close(unet_output(model, tensors), tensors["out"], atol=ATOL, rtol=0)
    assert model.config.out_channels == 2 * model.config.in_channels  # learned sigma: eps is the first half
    sched = json.loads((folder / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "squaredcos_cap_v2" and sched["variance_type"] == "learned_range"
    assert sched["num_train_timesteps"] == 1000 and sched["prediction_type"] == "epsilon"
    DDPMScheduler.from_pretrained(folder)
    assert AdmUNetConfig(**json.loads((folder / "adm_config.json").read_text())) == AdmUNetConfig(**meta["adm_config"])


def test_project_loader_reads_the_converted_folder(tmp_path: Path) -> None:
    from autodiff_opt.models import load_model

    _, tensors, state = load_fixture("unet_cond")
    torch.save(state, tmp_path / "ckpt.pt")
    assert convert_main(_cli_args(tmp_path / "ckpt.pt", tmp_path / "out")) == 0
    model = load_model(str(tmp_path / "out"))
    assert model.learned_sigma and model.num_classes == 5
    torch.testing.assert_close(model.alphas_cumprod, adm_alphas_cumprod("cosine"), atol=1e-8, rtol=2e-5)
    x, t, y = tensors["x"], tensors["t"], tensors["y"]
    with torch.no_grad():
        eps = model.eps_fn(class_labels=y[:1])(x[:1], int(t[0]), 0)
    torch.testing.assert_close(eps, tensors["out"][:1, :3], atol=ATOL, rtol=0)


def test_missing_checkpoint_gives_one_line_naming_file_source_and_option(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "64x64_diffusion.pt"
    result = subprocess.run(
        [sys.executable, "-m", "autodiff_opt.models.adm.convert", "--checkpoint", str(missing), "--preset",
         "imagenet64", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in (str(missing), "openai/guided-diffusion", "64x64_diffusion.pt", "64x64_classifier.pt",
                   "lsun_bedroom.pt", "lsun_cat.pt", "--checkpoint"):
        assert needle in lines[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingCheckpointError, match="64x64_classifier.pt.*model.classifier_path"):
        load_adm_classifier(tmp_path / "64x64_classifier.pt", option="model.classifier_path")


# ---------------------------------------------------------------- classifier guidance


class MeanPixelClassifier(torch.nn.Module):
    """Hand-made p(y | x): logits_k = w_k * mean(x) with w = (-2, 0, 2); class 2 likes bright images."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([-2.0, 0.0, 2.0]))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        return x.flatten(1).mean(dim=1, keepdim=True) * self.w


def _x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    return (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)


def _gaussian_data_eps(alphas_cumprod: torch.Tensor):
    """Exact eps for data ~ N(0, I): E[eps | x_t] = sqrt(1 - alpha_bar_t) x_t."""

    def eps_fn(x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        return math.sqrt(1 - float(alphas_cumprod[t])) * x_t

    return eps_fn


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_guidance_is_the_formula_and_raises_log_p_of_the_label(mode: str) -> None:
    alphas_cumprod = adm_alphas_cumprod("cosine")
    classifier, scale, t = MeanPixelClassifier(), 1.5, 600
    eps_fn = _gaussian_data_eps(alphas_cumprod)
    x_t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 2, 0, 1])
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        guided = classifier_guidance(eps_fn, classifier, alphas_cumprod, labels, scale=scale)(x_t, t, 0)
        eps = eps_fn(x_t, t, 0)
    # analytic grad of log softmax(w * m)_y w.r.t. each pixel: (w_y - E_p[w]) / numel
    m = x_t.flatten(1).mean(1, keepdim=True)
    probs = (m * classifier.w.detach()).softmax(-1)
    grad = (classifier.w.detach()[labels] - (probs * classifier.w.detach()).sum(-1)) / x_t[0].numel()
    sigma = math.sqrt(1 - float(alphas_cumprod[t]))
    expected = eps - sigma * scale * grad[:, None, None, None]
    torch.testing.assert_close(guided, expected, atol=1e-6, rtol=1e-5)

    ab = float(alphas_cumprod[t])
    x0_plain, x0_guided = _x0(x_t, eps, ab), _x0(x_t, guided, ab)
    shift = (x0_guided - x0_plain).flatten(1).mean(1)
    assert (shift[:2] > 0).all() and shift[2] < 0  # toward bright for class 2, dark for class 0
    log_p = lambda x: classifier(x, torch.zeros(4, dtype=torch.long)).log_softmax(-1)[torch.arange(4), labels]  # noqa: E731
    with torch.no_grad():
        assert (log_p(x0_guided) > log_p(x0_plain)).all()


def test_guided_ddim_samples_move_toward_the_label() -> None:
    alphas_cumprod = adm_alphas_cumprod("linear")
    eps_fn = _gaussian_data_eps(alphas_cumprod)
    steps = [999, 749, 499, 249, 0]
    noise = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def ddim(fn) -> torch.Tensor:  # eta = 0, last step to alpha_bar = 1
        x = noise.clone()
        for i, t in enumerate(steps):
            ab, ab_next = float(alphas_cumprod[t]), float(alphas_cumprod[steps[i + 1]]) if i + 1 < len(steps) else 1.0
            eps = fn(x, t, i)
            x0 = _x0(x, eps, ab)
            x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
        return x

    classifier = MeanPixelClassifier()
    with torch.inference_mode():
        plain = ddim(eps_fn)
        bright = ddim(classifier_guidance(eps_fn, classifier, alphas_cumprod, torch.full((6,), 2), 4.0))
        dark = ddim(classifier_guidance(eps_fn, classifier, alphas_cumprod, torch.zeros(6, dtype=torch.long), 4.0))
        same = ddim(classifier_guidance(eps_fn, classifier, alphas_cumprod, torch.zeros(6, dtype=torch.long), 0.0))
    mean = lambda x: x.flatten(1).mean(1)  # noqa: E731
    assert (mean(bright) > mean(plain)).all() and (mean(dark) < mean(plain)).all()
    torch.testing.assert_close(same, plain)


def test_guidance_rejects_a_label_batch_of_the_wrong_size() -> None:
    alphas_cumprod = adm_alphas_cumprod("linear")
    guided = classifier_guidance(_gaussian_data_eps(alphas_cumprod), MeanPixelClassifier(), alphas_cumprod,
                                 torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 class labels for a batch of 3"):
        guided(torch.zeros(3, 3, 4, 4), 10, 0)


def test_guidance_refuses_a_classifier_built_under_inference_mode() -> None:
    with torch.inference_mode():
        classifier = MeanPixelClassifier()
    with pytest.raises(ValueError, match="inference_mode"):
        classifier_guidance(lambda x, t, i: x, classifier, adm_alphas_cumprod("linear"), torch.tensor([0]))
