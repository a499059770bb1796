"""The paper's experiments: every config composes with the paper's settings; without the files each stops
before any work naming the file, where it is published and the override; tiny replicas in the users' exact
formats (diffusers DDPMPipeline folders, a Stable Diffusion pipeline folder) run one generation end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from audit import EVALUATED, assert_budget_spent
from autodiff_opt.cli import CONFIG_DIR
from autodiff_opt.config import to_config
from autodiff_opt.models.factory import missing_files
from autodiff_opt.search.evolution import genome_of
from cli_helpers import cli_command, cli_env, run_cli, tiny_overrides
from replicas import (
    blob_images,
    make_tiny_ddpm_pipeline,
    make_tiny_sd_pipeline,
    write_coco_captions,
    write_image_npz,
    write_png_folder,
)

REPRODUCE = Path(__file__).resolve().parents[1] / "experiments" / "reproduce_paper.py"
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))

# name: (samples per candidate, final samples, options that name input files)
PAPER = {
    "imagenet64": (5000, 50_000, ["model.checkpoint", "model.classifier", "dataset.reference", "metric.weights_path"]),
    "lsun_bedroom": (3000, 50_000, ["model.checkpoint", "dataset.reference", "metric.weights_path"]),
    "lsun_cat": (3000, 50_000, ["model.checkpoint", "dataset.reference", "metric.weights_path"]),
    "lsun_church": (3000, 50_000, ["model.pretrained", "dataset.reference", "metric.weights_path"]),
    "cifar10": (5000, 50_000, ["model.pretrained", "dataset.reference", "metric.weights_path"]),
    "sd_coco": (2000, 10_000, ["model.pretrained", "model.prompts", "dataset.reference", "metric.weights_path"]),
    "sd3_coco": (2000, 10_000, ["model.pretrained", "model.prompts", "dataset.reference", "metric.weights_path"]),
    "flux_coco": (2000, 10_000, ["model.pretrained", "model.prompts", "dataset.reference", "metric.weights_path"]),
    "dit_imagenet256": (5000, 50_000, ["model.pretrained", "dataset.reference", "metric.weights_path"]),
}
OFFLINE_READY = {"digits_flow", "digits_dit", "digits_deep"}  # embedded models and data: nothing to download (tests/test_flow.py, tests/test_deep_models.py run them)
# Experiments in the user's format that run end to end: (replica builder, reference format)
TINY_RUNS = ("cifar10", "lsun_church", "sd_coco", "sd3_coco", "flux_coco", "dit_imagenet256")


def _compose(name: str, overrides: list[str] | None = None):  # type: ignore[no-untyped-def]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={name}", *(overrides or [])])


def test_every_experiment_file_is_covered() -> None:
    assert set(EXPERIMENTS) == set(PAPER) | OFFLINE_READY


@pytest.mark.parametrize("name", sorted(PAPER))
def test_experiment_composes_with_the_papers_hyperparameters(name: str) -> None:
    cfg = _compose(name)
    samples, final, _ = PAPER[name]
    s = cfg.search
    assert (s.num_steps, s.num_samples, s.population, s.generations) == (4, samples, 50, 10)
    assert (s.num_parents, s.num_mutants, s.mutation_prob) == (10, 25, 0.25) and 10 <= s.num_crossovers <= 15
    assert cfg.final.num_samples == final
    assert cfg.metric.feature_extractor == "inception-v3-compat" and cfg.metric.feature_layer == "2048"
    text = (Path(CONFIG_DIR) / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"{samples:,}" in text


def test_sd_coco_settings() -> None:
    cfg = _compose("sd_coco")
    assert cfg.model.guidance_scale == 7.5 and cfg.model.pretrained == "CompVis/stable-diffusion-v1-4"
    assert not cfg.solver.clip_x0 and cfg.model.prompts.endswith("captions_val2014.json")
    text = (Path(CONFIG_DIR) / "experiment" / "sd_coco.yaml").read_text()
    assert "PLMS" in text and "DPM-Solver++(2M)" in text and "DDIM" in text


@pytest.mark.parametrize("name", sorted(PAPER))
def test_missing_files_name_each_file_its_source_and_override(name: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODIFF_OPT_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("AUTODIFF_OPT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("autodiff_opt.models.factory._hub_cached", lambda repo_id: False)
    messages = missing_files(to_config(_compose(name, [f"output_dir={tmp_path}"])))
    options = [m.split("=", 1)[0] for m in messages]
    assert sorted(options) == sorted(PAPER[name][2])
    for message in messages:
        option = message.split("=", 1)[0]
        assert f"set {option}=" in message and "(" in message  # the override, and where the file is published


def _offline_env(tmp: Path) -> dict[str, str]:
    env = cli_env(tmp)
    env.update(AUTODIFF_OPT_WEIGHTS=str(tmp / "weights"), AUTODIFF_OPT_DATA=str(tmp / "data"), HF_HOME=str(tmp / "hf"),
               HF_HUB_OFFLINE="1")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_RUNS)
def test_without_files_the_cli_stops_before_any_work(name: str, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    proc = subprocess.run(cli_command([f"+experiment={name}", f"storage.url=sqlite:///{db}", "device=cpu"], tmp_path / "run"),
                          cwd=tmp_path, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nothing was started" in proc.stderr and not db.exists()
    for option in PAPER[name][2]:
        assert f"set {option}=" in proc.stderr, option
    assert "huggingface-cli download" in proc.stderr and "Traceback" not in proc.stderr


def _tiny_overrides(model: Path, reference: Path, tmp: Path, **extra: object) -> list[str]:
    return tiny_overrides(model, reference, tmp / "s.db", **{
        "search.num_samples": 16, "search.batch_size": 16, "search.population": 4, "search.generations": 1,
        "search.num_parents": 2, "search.num_mutants": 1, "search.num_crossovers": 1, "search.init_random": 1,
        "final.num_samples": 16, "metric.weights_path": "null", "metric.feature_layer": "null", **extra})


def _tiny_run(name: str, model: Path, reference: Path, tmp: Path, **extra: object) -> subprocess.CompletedProcess[str]:
    return run_cli([f"+experiment={name}", *_tiny_overrides(model, reference, tmp, **extra)], tmp, tmp / "run", timeout=240)


def _check_run(proc: subprocess.CompletedProcess[str], tmp: Path, budget: int = 4) -> optuna.Study:
    """The run's budget (population 4 x generations, in candidate-equivalents of 16 samples x 4 steps) spent."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = f"sqlite:///{tmp / 's.db'}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    assert_budget_spent(study, budget, 16, 4)
    final = pd.read_csv(tmp / "run" / "final.csv")
    assert {"searched", "ddim_uniform", "trailing"} <= set(final.schedule) and final.fid_final.notna().all()
    return study


@pytest.mark.slow
def test_cifar10_through_reproduce_paper_search_then_final(tmp_path: Path) -> None:
    """DDPMPipeline folder + .npz of images; the script's two CLI calls share one study."""
    model = make_tiny_ddpm_pipeline(tmp_path / "ddpm-cifar10-32", image_size=8)
    reference = write_image_npz(tmp_path / "cifar10_train.npz", blob_images(64, 8))
    overrides = [o for o in _tiny_overrides(model, reference, tmp_path) if not o.startswith("storage.url=")]
    cmd = [sys.executable, str(REPRODUCE), "--experiment", "cifar10", "--storage", f"sqlite:///{tmp_path / 's.db'}",
           "--output-dir", str(tmp_path / "out"), "--", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert "1. search:  python -m autodiff_opt +experiment=cifar10" in proc.stdout
    (tmp_path / "run").symlink_to(tmp_path / "out" / "cifar10-default" / "final")
    _check_run(proc, tmp_path)
    assert not (tmp_path / "out" / "cifar10-default" / "search" / "final.csv").exists()
    assert re.search(r"already spent [\d.]+ of 4 candidate-equivalents", proc.stdout + proc.stderr)


def test_reproduce_paper_prints_the_plan_and_stops_without_files(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPRODUCE), "--experiment", "sd_coco", "--variant", "dpm10"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "solver.name=dpmpp_2m" in proc.stdout and "search.num_steps=10" in proc.stdout
    assert "final evaluation: 10000 fresh samples" in proc.stdout
    for option in PAPER["sd_coco"][2]:
        assert f"set {option}=" in proc.stderr


@pytest.mark.slow
def test_lsun_church_ddpm_pipeline_folder_with_png_reference(tmp_path: Path) -> None:
    model = make_tiny_ddpm_pipeline(tmp_path / "ddpm-church-256", image_size=8, seed=1)
    reference = write_png_folder(tmp_path / "lsun_church", blob_images(64, 8, seed=1))
    _check_run(_tiny_run("lsun_church", model, reference, tmp_path), tmp_path)


@pytest.mark.slow
def test_sd_coco_pipeline_folder_with_coco_captions_dpm_solver_and_stage2(tmp_path: Path) -> None:
    """Generation 0 (the first 4 slots) searches time steps; generation 1 (stage 2) also skips layers of the SD UNet."""
    model = make_tiny_sd_pipeline(tmp_path / "stable-diffusion-v1-4")
    captions = write_coco_captions(tmp_path / "annotations" / "captions_val2014.json")
    reference = write_image_npz(tmp_path / "coco_val2014.npz", blob_images(64, 32))
    proc = _tiny_run("sd_coco", model, reference, tmp_path, **{
        "model.prompts": captions, "model.dtype": "float32", "solver.name": "dpmpp_2m", "search.generations": 2,
        "search.stage2.enabled": "true", "search.stage2.start_generation": 1, "search.stage2.ramp_steps": 1,
        "search.stage2.max_prun": 0.5})
    study = _check_run(proc, tmp_path, budget=8)
    assert "60 prompts" in proc.stderr + proc.stdout
    skipped = [t for t in study.trials if genome_of(t) is not None and genome_of(t).has_skips]
    assert skipped and all(t.state in EVALUATED for t in skipped)
