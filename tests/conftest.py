"""Shared fixtures: tiny diffusers models saved the way users have them, and a tiny feature extractor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from randconv_extractor import TEST_EXTRACTOR  # noqa: E402,F401  (registers it with torch-fidelity)
from pg import pg_proc, pg_server, pg_url  # noqa: E402,F401  (a throwaway PostgreSQL server: tests/pg.py)
from hypothesis_profiles import load_profile  # noqa: E402

load_profile()  # derandomised Hypothesis under CI (tests/hypothesis_profiles.py)

pytest_plugins = ["pytester"]  # tests/test_concurrency.py runs a session that needs a missing server


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


@pytest.fixture(scope="session")
def report_run(tiny_model_dir: Path, tiny_reference: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real CLI run on the tiny model with a peer, sample grids and an artifact store (report tests)."""
    from cli_helpers import REPORT_FINAL_SEED, REPORT_GRID, run_cli, tiny_overrides

    tmp = tmp_path_factory.mktemp("report")
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, tmp / "s.db", **{
        "search.peers": "[gits_dp]", "search.peer_samples": 16, "search.peer_grid": 20, "final.seed": REPORT_FINAL_SEED,
        "final.repeats": 2, "report.grid_size": REPORT_GRID, "report.artifact_dir": str(tmp / "artifacts")})
    proc = run_cli(overrides, tmp, tmp / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": tmp / "run", "db": tmp / "s.db", "artifacts": tmp / "artifacts", "tmp": tmp}
