"""Shared fixtures: tiny diffusers models saved the way users have them, and a tiny feature extractor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TEST_EXTRACTOR = "test-randconv"


def _register_test_extractor() -> None:
    """A fixed random conv net as a stand-in for Inception on tiny images (same torch-fidelity interface)."""
    import torch_fidelity
    import torch_fidelity.registry as registry
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class RandConvFeatures(FeatureExtractorBase):
        def __init__(self, name: str, features_list: list[str], **kwargs: object) -> None:
            super().__init__(name, features_list)
            gen = torch.Generator().manual_seed(1234)
            self.w1 = torch.nn.Parameter(torch.randn(16, 3, 3, 3, generator=gen) * 0.3, requires_grad=False)
            self.w2 = torch.nn.Parameter(torch.randn(32, 16, 3, 3, generator=gen) * 0.2, requires_grad=False)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("32",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "32"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            x = x.float() / 127.5 - 1
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            h = torch.tanh(torch.nn.functional.conv2d(x, self.w1, padding=1))
            h = torch.tanh(torch.nn.functional.conv2d(h, self.w2, padding=1))
            return (h.mean(dim=(2, 3)),)

    if TEST_EXTRACTOR not in registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(TEST_EXTRACTOR, RandConvFeatures)


_register_test_extractor()


def make_tiny_unet(num_classes: int | None = None, out_channels: int = 1, seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_classes,
    )


def save_tiny_model(folder: Path, num_classes: int | None = None, beta_schedule: str = "linear",
                    prediction_type: str = "epsilon") -> Path:
    from diffusers import DDPMScheduler

    make_tiny_unet(num_classes).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-unet"))


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An .npz of 200 uint8 8x8 'real' images (smooth blobs) as a reference data set."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:8, 0:8]
    cy, cx = rng.uniform(2, 6, (2, 200))
    images = 255 * np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 4)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, arr_0=images.astype(np.uint8)[:, :, :, None])
    return path
