"""The deep embedded models (digits-dit, digits-deep): loaded through the loaders a user's folder takes, sampled
through the package's generator and checked by the digits-cnn classifier; their training script and the
stage-2 benchmark at smoke size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from autodiff_opt.arch.layers import discover_layers
from autodiff_opt.cli import compose_config
from autodiff_opt.config import to_config
from autodiff_opt.core.genome import Genome
from autodiff_opt.data.digits import load_digits_images
from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.metrics.digits_cnn import load_digits_cnn
from autodiff_opt.models.factory import build_model
from autodiff_opt.models.pipelines import ClassGuidedModel

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "autodiff_opt" / "assets"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _user_copy(tmp_path: Path, asset: str) -> Path:
    """The shipped folder copied elsewhere, as a user's own model folder would be."""
    return Path(shutil.copytree(ASSETS / asset, tmp_path / f"my-{asset}"))


def _build(experiment: str, pretrained: Path) -> object:
    cfg = compose_config([f"+experiment={experiment}", f"model.pretrained={pretrained}", "output_dir=/tmp/unused"])
    return build_model(to_config(cfg).model, torch.device("cpu"))


@torch.no_grad()
def _classify(images: torch.Tensor) -> torch.Tensor:
    return torch.softmax(load_digits_cnn().eval()(images), dim=1)


def _samples(model: object, steps: int, n: int, seed: int = 5) -> tuple[torch.Tensor, SampleSet]:
    samples = SampleSet.draw(n, model.sample_shape, model.num_classes, seed)  # type: ignore[attr-defined]
    generator = ImageGenerator(model, "ddim", clip_x0=True, batch_size=n)  # type: ignore[arg-type]
    T = model.num_train_timesteps  # type: ignore[attr-defined]
    genome = Genome.from_steps([round(T - 1 - i * (T - 1) / steps) for i in range(steps)])
    return generator.generate(genome, samples), samples


def test_digits_dit_loads_as_a_users_pipeline_folder_and_samples_its_classes(tmp_path: Path) -> None:
    folder = _user_copy(tmp_path, "digits-dit")
    assert json.loads((folder / "model_index.json").read_text())["vae"] == [None, None]
    model = _build("digits_dit", folder)
    assert isinstance(model, ClassGuidedModel)
    assert model.sample_shape == (1, 8, 8) and model.num_classes == 10 and model.null_class == 10
    assert model.decode is None  # pixel space: samples are the images
    assert len(discover_layers(model.denoiser, "blocks")) >= 12
    assert len(discover_layers(model.denoiser, "sub_blocks")) == 2 * len(discover_layers(model.denoiser, "blocks"))
    images, samples = _samples(model, steps=20, n=200)
    probs = _classify(images)
    real = _classify(load_digits_images("heldout")[0]).max(dim=1).values.mean()
    assert probs.max(dim=1).values.mean() >= 0.85 * real  # confident digits, close to real images'
    agreement = (probs.argmax(dim=1) == samples.class_labels).float().mean()
    assert agreement >= 0.8  # and mostly the class they were drawn for


def test_digits_deep_loads_as_a_users_unet_folder_and_samples_confident_digits(tmp_path: Path) -> None:
    folder = _user_copy(tmp_path, "digits-deep")
    model = _build("digits_deep", folder)
    assert model.sample_shape == (1, 8, 8) and model.num_classes is None  # type: ignore[attr-defined]
    layers = discover_layers(model.denoiser)  # type: ignore[attr-defined]
    assert len(layers) >= 24
    assert {layer.kind for layer in layers} == {"resnet", "attention"}
    images, _ = _samples(model, steps=20, n=200)
    real = _classify(load_digits_images("heldout")[0]).max(dim=1).values.mean()
    assert _classify(images).max(dim=1).values.mean() >= 0.85 * real


def test_shipped_deep_models_are_small() -> None:
    for asset in ("digits-dit", "digits-deep"):
        size = sum(p.stat().st_size for p in (ASSETS / asset).rglob("*") if p.is_file())
        assert size < 10 * 2**20, (asset, size)


@pytest.mark.slow
def test_train_deep_smoke_writes_folders_the_loaders_take(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "experiments" / "train_deep.py"), "--smoke", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dit = _build("digits_dit", tmp_path / "digits-dit")
    deep = _build("digits_deep", tmp_path / "digits-deep")
    for model in (dit, deep):
        images, _ = _samples(model, steps=2, n=4)
        assert images.shape == (4, 1, 8, 8) and images.dtype == torch.uint8


@pytest.mark.slow
def test_bench_stage2_smoke_scores_every_method_within_the_budget(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "experiments" / "bench_stage2.py"), "--smoke", "--models", "digits-dit",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    methods = {r["method"] for r in runs["rows"]}
    assert {"uniform", "stage1", "two-stage blocks/0.25/+1", "cache:first_block", "cache:taylorseer"} <= methods
    for row in runs["rows"]:
        assert row["cost"] <= row["budget"] + 1e-6, row  # equal (or lower) FLOPs: the comparison's premise
        assert len(row["fids"]) == 2 and all(f == f and f > 0 for f in row["fids"]), row
    assert (tmp_path / "table.md").read_text().count("| digits-dit | 2 |") == len(methods)
    assert (tmp_path / "fid_vs_flops.html").stat().st_size > 1000
