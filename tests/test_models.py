"""Model loading: UNet folders, pipeline folders, prediction types, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from autodiff_opt.models import ModelLoadError, load_model
from conftest import make_tiny_unet, save_tiny_model


def test_unet_folder_with_scheduler_config(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir))
    assert model.sample_shape == (1, 8, 8) and model.num_train_timesteps == 1000
    expected = torch.cumprod(1 - DDPMScheduler(beta_schedule="linear").betas.double(), 0)
    torch.testing.assert_close(model.alphas_cumprod, expected)
    eps = model.eps_fn()(torch.randn(2, 1, 8, 8), 500, 0)
    assert eps.shape == (2, 1, 8, 8) and torch.isfinite(eps).all()


def test_pipeline_folder_and_class_conditional(tmp_path: Path) -> None:
    pipe = DDPMPipeline(unet=make_tiny_unet(num_classes=5), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.save_pretrained(tmp_path / "pipe")
    model = load_model(str(tmp_path / "pipe"))
    assert model.num_classes == 5
    assert model.alphas_cumprod[-1] < 1e-4  # the cosine schedule came from scheduler/
    labels = torch.tensor([0, 4])
    x = torch.randn(2, 1, 8, 8)
    a, b = model.eps_fn(labels)(x, 300, 0), model.eps_fn(torch.tensor([1, 2]))(x, 300, 0)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_convert_to_eps(prediction_type: str, tmp_path: Path) -> None:
    """The forward process and the v target come from diffusers' scheduler (add_noise, get_velocity):
    given the model output for a known (x0, eps), eps_from_output must return that eps."""
    model = load_model(str(save_tiny_model(tmp_path / prediction_type, prediction_type=prediction_type)))
    assert model.prediction_type == prediction_type
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    for t in (10, 400, 900):
        steps = torch.full((3,), t, dtype=torch.long)
        x_t = scheduler.add_noise(x0, eps, steps)
        out = x0 if prediction_type == "sample" else scheduler.get_velocity(x0, eps, steps)
        torch.testing.assert_close(model.eps_from_output(out, x_t, t), eps, atol=2e-4, rtol=1e-4)


def test_learned_sigma_output_keeps_eps_half(tmp_path: Path) -> None:
    folder = tmp_path / "ls"
    make_tiny_unet(out_channels=2).save_pretrained(folder)
    DDPMScheduler(variance_type="learned_range").save_pretrained(folder)
    model = load_model(str(folder))
    assert model.learned_sigma
    assert model.eps_fn()(torch.randn(2, 1, 8, 8), 10, 0).shape == (2, 1, 8, 8)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_model(str(tmp_path / "empty"))
    make_tiny_unet().save_pretrained(tmp_path / "nosched")
    with pytest.raises(ModelLoadError, match="noise_schedule"):
        load_model(str(tmp_path / "nosched"))
    ok = load_model(str(tmp_path / "nosched"), noise_schedule={"num_train_timesteps": 500, "beta_schedule": "linear"})
    assert ok.num_train_timesteps == 500
    with pytest.raises(ModelLoadError, match="no embedded model"):
        load_model("builtin:nope")
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        load_model("some-org/some-model-that-is-not-cached")
