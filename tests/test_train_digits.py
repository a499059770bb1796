"""Smoke test of experiments/train_digits.py: a tiny config writes loadable assets into tmp_path."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from autodiff_opt.metrics.digits_cnn import DIGITS_CNN_FEATURE_DIM, load_digits_cnn

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "autodiff_opt" / "assets"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_smoke_training_writes_loadable_assets(tmp_path: Path) -> None:
    before = _digest(SHIPPED)
    cmd = [sys.executable, str(REPO / "experiments" / "train_digits.py"), "--smoke", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(SHIPPED) == before

    unet = UNet2DModel.from_pretrained(tmp_path / "digits-ddpm")
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "digits-ddpm")
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    with torch.no_grad():
        out = unet(torch.randn(2, 1, 8, 8), torch.tensor([10, 900])).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()

    cnn = load_digits_cnn(tmp_path / "digits-cnn")
    with torch.no_grad():
        feats = cnn.features(torch.zeros(3, 1, 8, 8, dtype=torch.uint8))
    assert feats.shape == (3, DIGITS_CNN_FEATURE_DIM)

