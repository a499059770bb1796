"""The shipped digits DDPM and digits-cnn feature extractor: offline loading, shapes, torch-fidelity use."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch_fidelity
from diffusers import DDPMScheduler, UNet2DModel
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from autodiff_opt.data.digits import UInt8ImageDataset, load_digits_images, model_to_uint8, uint8_to_model
from autodiff_opt.metrics.digits_cnn import (
    DIGITS_CNN_FEATURE_DIM,
    DIGITS_CNN_FEATURE_LAYER,
    DIGITS_CNN_NAME,
    FeatureExtractorDigitsCNN,
    default_assets_dir,
    load_digits_cnn,
    register_digits_cnn,
)

REPO = Path(__file__).resolve().parents[1]
DDPM_DIR = REPO / "src" / "autodiff_opt" / "assets" / "digits-ddpm"
CNN_DIR = REPO / "src" / "autodiff_opt" / "assets" / "digits-cnn"


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The model is tiny: one thread is as fast, and does not stall when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def eval_digits() -> ModuleType:
    return _load_script("eval_digits")


@pytest.fixture(scope="module")
def ddpm() -> tuple[UNet2DModel, DDPMScheduler]:
    return UNet2DModel.from_pretrained(DDPM_DIR).eval(), DDPMScheduler.from_pretrained(DDPM_DIR)


def test_split_is_fixed_disjoint_and_stratified() -> None:
    x_all, y_all = load_digits_images("all")
    x_tr, y_tr = load_digits_images("train")
    x_he, y_he = load_digits_images("heldout")
    assert x_all.shape == (1797, 1, 8, 8) and x_all.dtype == torch.uint8 and y_all.dtype == torch.int64
    assert len(y_tr) + len(y_he) == len(y_all) and len(y_he) == math.ceil(0.2 * len(y_all))
    as_rows = lambda x: {tuple(r) for r in x.flatten(1).tolist()}  # noqa: E731
    assert len(as_rows(x_tr) | as_rows(x_he)) == len(as_rows(x_all))
    share = y_he.bincount(minlength=10).float() / y_all.bincount(minlength=10).float()
    assert torch.all((share - 0.2).abs() < 0.02)
    assert torch.equal(load_digits_images("train")[0], x_tr)


def test_pixel_scaling_matches_sklearn() -> None:
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images[:5]).float()
    x, _ = load_digits_images("all")
    assert torch.equal(x[:5, 0], torch.round(raw * 255 / 16).to(torch.uint8))
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert torch.equal(model_to_uint8(uint8_to_model(x)), x)
    assert float(uint8_to_model(x).min()) == -1.0 and float(uint8_to_model(x).max()) == 1.0


def test_shipped_ddpm_loads_offline_with_documented_shapes(ddpm: tuple[UNet2DModel, DDPMScheduler]) -> None:
    unet, scheduler = ddpm
    _, info = UNet2DModel.from_pretrained(DDPM_DIR, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # no silently random layer
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (8, 1, 1)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"
    assert any("Attn" in type(m).__name__ for m in unet.down_blocks + unet.up_blocks)
    with torch.no_grad():
        out = unet(torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 0])).sample
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    size = sum(p.stat().st_size for p in DDPM_DIR.iterdir())
    assert size < 5 * 2**20


def test_shipped_classifier_accuracy_and_features() -> None:
    cnn = load_digits_cnn()
    x, y = load_digits_images("heldout")
    with torch.no_grad():
        acc = float((cnn(x).argmax(1) == y).float().mean())
        feats = cnn.features(x[:7])
        same = cnn.features(uint8_to_model(x[:7]))
    assert acc >= 0.97
    assert feats.shape == (7, DIGITS_CNN_FEATURE_DIM)
    assert torch.allclose(feats, same)
    assert default_assets_dir().resolve() == CNN_DIR.resolve()


def test_register_is_idempotent() -> None:
    register_digits_cnn()
    register_digits_cnn()
    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS_CNN_NAME] is FeatureExtractorDigitsCNN


def test_extractor_interface() -> None:
    fe = FeatureExtractorDigitsCNN(DIGITS_CNN_NAME, [DIGITS_CNN_FEATURE_LAYER])
    x = load_digits_images("heldout")[0][:4]
    (feats,) = fe(x)
    assert feats.shape == (4, DIGITS_CNN_FEATURE_DIM) and feats.dtype == torch.float32
    (rgb_feats,) = fe(x.expand(-1, 3, -1, -1))
    assert torch.allclose(feats, rgb_feats, atol=1e-5)
    with pytest.raises(ValueError):
        fe(x.float())
    with pytest.raises(ValueError):
        FeatureExtractorDigitsCNN(DIGITS_CNN_NAME, ["no-such-layer"])
    assert fe.get_default_feature_layer_for_metric("fid") == DIGITS_CNN_FEATURE_LAYER


def _fid(a: torch.Tensor, b: torch.Tensor, **kwargs: object) -> float:
    register_digits_cnn()
    out = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(a),
        input2=UInt8ImageDataset(b),
        fid=True,
        feature_extractor=DIGITS_CNN_NAME,
        feature_layer_fid=DIGITS_CNN_FEATURE_LAYER,
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,
        cache=False,
        verbose=False,
        **kwargs,
    )
    return float(out[torch_fidelity.KEY_METRIC_FID])


def test_torch_fidelity_end_to_end_on_a_few_images(tmp_path: Path) -> None:
    x_tr, _ = load_digits_images("train")
    x_he, _ = load_digits_images("heldout")
    same = _fid(x_he[:80], x_he[:80])
    diff = _fid(x_he[:80], x_tr[:80])
    explicit = _fid(x_he[:80], x_tr[:80], feature_extractor_weights_path=str(CNN_DIR / "model.safetensors"))
    assert abs(same) < 1e-3 and diff > 0.1 and math.isclose(diff, explicit, rel_tol=1e-6)
    with pytest.raises(FileNotFoundError):
        _fid(x_he[:8], x_tr[:8], feature_extractor_weights_path=str(tmp_path / "missing.safetensors"))


def test_metric_tells_real_from_few_step_samples(
    eval_digits: ModuleType, ddpm: tuple[UNet2DModel, DDPMScheduler]
) -> None:
    unet, scheduler = ddpm
    x_tr, _ = load_digits_images("train")
    x_he, _ = load_digits_images("heldout")
    floor = _fid(x_he, x_tr)
    four = eval_digits.ddim_sample(unet, scheduler, num_steps=4, num_samples=400, seed=0)
    more = eval_digits.ddim_sample(unet, scheduler, num_steps=10, num_samples=400, seed=0)
    assert four.shape == (400, 1, 8, 8) and four.dtype == torch.uint8
    fid_4, fid_10 = _fid(four, x_tr), _fid(more, x_tr)
    assert floor < fid_4
    assert fid_10 < fid_4
