"""Bad input not covered in test_cli.py: each gives one line naming the fix, exit 2, before any work.

The table of inputs and messages is docs/errors.md. The checks of autodiff_opt.preflight (called by
runner.run before anything is loaded) are also tested on their own at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import optuna
import pytest
import torch
from safetensors.torch import save_file

from autodiff_opt import preflight
from autodiff_opt.metrics.fid import MetricError
from autodiff_opt.models.base import ModelLoadError
from autodiff_opt.config import FinalConfig, ModelConfig, SearchConfig, Stage2Config, to_config
from autodiff_opt.core.errors import ConfigError
from audit import EVALUATED, assert_budget_spent
from cli_helpers import cli_command, cli_env, tiny_overrides

pytestmark = pytest.mark.slow


def run_with(override: dict[str, object], model: Path, reference: Path, tmp_path: Path,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    overrides = tiny_overrides(model, reference, tmp_path / "s.db", **override)
    return subprocess.run(cli_command(overrides, tmp_path / "run"), cwd=tmp_path, env={**cli_env(tmp_path), **(env or {})},
                          capture_output=True, text=True, timeout=180)


def assert_refused(proc: subprocess.CompletedProcess[str], message: str, tmp_path: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-2500:]
    assert "error: " in proc.stderr, proc.stderr[-2500:]
    error = proc.stderr[proc.stderr.rindex("error: "):].strip()  # one line, or one line per missing input file
    assert message in error and "Traceback" not in error, error
    db = tmp_path / "s.db"
    assert not db.exists() or not optuna.get_all_study_names(f"sqlite:///{db}"), "a study was made before the check"


@pytest.fixture(scope="module")
def stats_of_another_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "mu_sigma_5.npz"
    np.savez(path, mu=np.zeros(5), sigma=np.eye(5))
    return path


@pytest.mark.parametrize("name,override,message", [
    ("not-a-model-folder", {"model.pretrained": "EMPTY"}, "is not a diffusers model folder"),
    ("stats-of-another-size", {"dataset.reference": "STATS"}, "have dimension 5, but test-randconv/32 gives 32"),
    ("schedule-of-another-length", {"search.schedules": "[[900,500,100]]"}, "has 3 steps but search.num_steps=4"),
    ("too-few-samples", {"search.num_samples": 1}, "FID needs at least 2 samples"),
    ("weights-file-missing", {"metric.weights_path": "/nonexistent/inception.pth"}, "metric.weights_path=/nonexistent"),
    ("journal-not-writable", {"storage.url": "journal:/proc/no/such/dir/study.log"}, "cannot be opened"),
    ("postgres-port-closed", {"storage.url": "postgresql://nobody@127.0.0.1:1/none"}, "Connection refused"),
    ("postgres-unknown-host", {"storage.url": "postgresql://nobody@no-such-host.invalid/none"},
     "failed to resolve host 'no-such-host.invalid'"),
    ("postgres-scheme", {"storage.url": "postgres://nobody@127.0.0.1:1/none"}, "write postgresql://"),
])
def test_bad_input_is_refused_with_one_line(name: str, override: dict[str, object], message: str, tiny_model_dir: Path,
                                            tiny_reference: Path, stats_of_another_size: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    values = {k: {"EMPTY": tmp_path / "empty", "STATS": stats_of_another_size}.get(v, v) if isinstance(v, str) else v
              for k, v in override.items()}
    assert_refused(run_with(values, tiny_model_dir, tiny_reference, tmp_path), message, tmp_path)


def test_missing_inception_weights_offline(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    proc = run_with({"metric.feature_extractor": "inception-v3-compat", "metric.feature_layer": "2048"},
                    tiny_model_dir, tiny_reference, tmp_path, env={"TORCH_HOME": str(tmp_path / "torch-home")})
    assert_refused(proc, "Inception weights are not cached", tmp_path)
    assert "metric.weights_path=/path/to/that/file" in proc.stderr


# --- inputs that ended in tracebacks, or were refused only after the expensive part, before 5a47475 ----------
def test_folder_with_config_but_no_weights(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    assert_refused(run_with({"model.pretrained": folder}, tiny_model_dir, tiny_reference, tmp_path),
                   "has a config.json but no weights", tmp_path)


def test_folder_whose_config_is_not_json(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "garbage"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").write_text("<html>not a config</html>")
    assert_refused(run_with({"model.pretrained": folder}, tiny_model_dir, tiny_reference, tmp_path),
                   "is not a readable JSON model config", tmp_path)


def test_a_device_this_machine_lacks(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    assert_refused(run_with({"device": "cuda:999"}, tiny_model_dir, tiny_reference, tmp_path), "device=cuda:999", tmp_path)


def test_a_feature_layer_the_extractor_lacks(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    assert_refused(run_with({"metric.feature_layer": "foo"}, tiny_model_dir, tiny_reference, tmp_path),
                   "metric.feature_layer='foo' is not provided by test-randconv", tmp_path)


def test_more_mutants_and_crossovers_than_the_population(tiny_model_dir: Path, tiny_reference: Path,
                                                         tmp_path: Path) -> None:
    assert_refused(run_with({"search.num_mutants": 9}, tiny_model_dir, tiny_reference, tmp_path),
                   "exceeds search.population", tmp_path)


def test_unreachable_storage_is_refused_before_reference_statistics(tiny_model_dir: Path, tiny_reference: Path,
                                                                     tmp_path: Path) -> None:
    proc = run_with({"storage.url": "postgresql://nobody@127.0.0.1:1/none"}, tiny_model_dir, tiny_reference,
                    tmp_path)
    assert_refused(proc, "Connection refused", tmp_path)
    assert not list((tmp_path / "cache").glob("ref-*.npz")), "reference statistics were computed first"


def test_a_plain_postgresql_url_works(pg_url: str, tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    proc = run_with({"storage.url": pg_url, "search.generations": 1, "final.enabled": "false"}, tiny_model_dir,
                    tiny_reference, tmp_path)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]

    studies = optuna.get_all_study_summaries(pg_url)
    assert len(studies) == 1  # in the server's database
    study = optuna.load_study(study_name=studies[0].study_name, storage=pg_url)
    assert_budget_spent(study, 6, 48, 4)  # population 6 x 1 generation: 6 candidate-equivalents of the default sampler
    assert studies[0].n_trials == len(study.trials) and {t.state for t in study.trials} <= set(EVALUATED)
    assert {t.user_attrs.get("baseline") for t in study.trials} >= {"ddim_uniform", "trailing"}


# --- inputs that ended in tracebacks, or were refused only after the search, before the edges branch ----------
def test_a_model_folder_whose_weights_are_cut_short(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    proc = run_with({"model.pretrained": folder}, tiny_model_dir, tiny_reference, tmp_path)
    assert_refused(proc, f"{weights} is not a readable safetensors file", tmp_path)
    assert "copy or download it again" in proc.stderr
    assert not list((tmp_path / "cache").glob("ref-*.npz")), "reference statistics were computed first"


def test_an_unknown_baseline(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    proc = run_with({"search.baselines": "[ddim_uniform,nope]"}, tiny_model_dir, tiny_reference, tmp_path)
    assert_refused(proc, "search.baselines: ['nope'] unknown: use any of ddim_uniform, ", tmp_path)


@pytest.mark.parametrize("final_seed,message", [(0, "final.seed = 0 is search.seed"),
                                                (-7919, "final.seed + 7919 x 1 (repeat 1) = 0 is search.seed")])
def test_final_seeds_that_are_the_search_seed(final_seed: int, message: str, tiny_model_dir: Path,
                                              tiny_reference: Path, tmp_path: Path) -> None:
    proc = run_with({"search.seed": 0, "final.seed": final_seed}, tiny_model_dir, tiny_reference, tmp_path)
    assert_refused(proc, message, tmp_path)
    assert "set final.seed to another value" in proc.stderr


class _Payload:
    """Unpickling it creates a file: the code a pickled checkpoint can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return open, (self.marker, "w")


def test_a_guided_diffusion_checkpoint_holding_a_pickled_object(tiny_model_dir: Path, tiny_reference: Path,
                                                                tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "64x64_diffusion.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(2), "payload": _Payload(marker)}, checkpoint)
    proc = run_with({"model.converter": "adm", "model.preset": "imagenet64", "model.checkpoint": checkpoint},
                    tiny_model_dir, tiny_reference, tmp_path)
    assert_refused(proc, f"model.checkpoint={checkpoint} is not a plain state dict", tmp_path)
    assert "weights_only=False and torch.save its state_dict()" in proc.stderr
    assert not marker.exists(), "the checkpoint's code ran"
    assert not (tmp_path / "cache" / "converted").exists(), "the conversion started"
    torch.load(checkpoint, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


# --- the preflight functions themselves --------------------------------------------------------------------------
def test_check_device() -> None:
    preflight.check_device("auto")
    preflight.check_device("cpu")
    with pytest.raises(ConfigError, match="is not a device"):
        preflight.check_device("gpu0")
    with pytest.raises(ConfigError, match="device=cuda:999"):
        preflight.check_device("cuda:999")


def test_check_search() -> None:
    good = {"population": 6, "generations": 2, "batch_size": 4, "max_consecutive_failures": 3, "num_parents": 3,
            "num_mutants": 3, "num_crossovers": 1, "init_random": 2, "mutation_prob": 0.25, "init_mutation_prob": 0.1,
            "max_attempts": 10}
    preflight.check_search(SearchConfig(**good))
    for bad, message in (({"num_mutants": 9}, "exceeds search.population"), ({"generations": 0}, "generations=0"),
                         ({"mutation_prob": 1.5}, "probability"), ({"init_random": 7}, "init_random=7")):
        with pytest.raises(ConfigError, match=message):
            preflight.check_search(SearchConfig(**{**good, **bad}))


def test_check_model_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    preflight.check_model_folder(str(tiny_model_dir))
    preflight.check_model_folder("builtin:digits-ddpm")
    preflight.check_model_folder(str(tmp_path / "missing"))  # the loader reports missing paths
    pipeline = tmp_path / "pipe"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ModelLoadError, match="no weights"):
        preflight.check_model_folder(str(pipeline))
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a readable safetensors file"):  # an empty (cut) download
        preflight.check_model_folder(str(pipeline))
    save_file({"w": torch.zeros(3)}, pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    preflight.check_model_folder(str(pipeline))
    (pipeline / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"],
                                                           "vae": ["diffusers", "AutoencoderKL"]}))
    (pipeline / "vae").mkdir()
    (pipeline / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"<html>404</html>")
    with pytest.raises(ModelLoadError, match="vae/diffusion_pytorch_model.safetensors is not a readable"):
        preflight.check_model_folder(str(pipeline))  # every component of a pipeline, not only its UNet
    shutil.rmtree(pipeline / "vae")
    (pipeline / "unet" / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="not a model config"):
        preflight.check_model_folder(str(pipeline))


def test_check_weights_of_bin_files_and_checkpoints(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.bin")
    preflight.check_weights(tmp_path)
    torch.save({"w": torch.nn.Linear(2, 2)}, tmp_path / "diffusion_pytorch_model.bin")  # a pickled module
    with pytest.raises(ModelLoadError, match="is not a plain state dict"):
        preflight.check_weights(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(ModelLoadError, match="is not a readable PyTorch checkpoint"):
        preflight.check_weights(tmp_path)
    save_file({"w": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    preflight.check_weights(tmp_path)  # diffusers reads the safetensors file: the .bin beside it is not read
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="is not a state dict"):
        preflight.check_checkpoints(ModelConfig(converter="adm", checkpoint=str(tmp_path / "list.pt"), classifier=None))
    preflight.check_checkpoints(ModelConfig(converter=None, checkpoint=str(tmp_path / "list.pt"), classifier=None))


def test_check_feature_layer() -> None:
    preflight.check_feature_layer("test-randconv", None)
    preflight.check_feature_layer("test-randconv", "32")
    preflight.check_feature_layer("inception-v3-compat", "2048")
    preflight.check_feature_layer("not-registered", "x")  # FIDScorer names the known extractors
    with pytest.raises(MetricError, match="use one of \\['32'\\]"):
        preflight.check_feature_layer("test-randconv", "2048")


def test_check_storage(pg_url: str, tmp_path: Path) -> None:
    from autodiff_opt.search.study import StudyError

    preflight.check_storage(pg_url)  # a bare postgresql:// URL, a live server
    preflight.check_storage(f"journal:{tmp_path / 'new' / 'study.log'}")
    preflight.check_storage(f"sqlite:///{tmp_path / 'other' / 's.db'}")
    assert not (tmp_path / "new" / "study.log").exists() and not (tmp_path / "other" / "s.db").exists()
    with pytest.raises(StudyError, match="Connection refused"):
        preflight.check_storage("postgresql://nobody:pw@127.0.0.1:1/none")
    with pytest.raises(StudyError, match=r"postgresql://\*\*\*@127.0.0.1:1/none"):  # no password in messages
        preflight.check_storage("postgresql://nobody:pw@127.0.0.1:1/none")
    with pytest.raises(StudyError, match="cannot be opened"):
        preflight.check_storage("journal:/proc/no/such/dir/study.log")


def test_run_all_returns_the_opened_storage(tmp_path: Path, tiny_model_dir: Path, tiny_reference: Path) -> None:
    from cli_helpers import compose_cfg, tiny_overrides

    cfg = compose_cfg(tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db"), tmp_path)
    storage = preflight.run_all(to_config(cfg))
    assert isinstance(storage, optuna.storages.RDBStorage)
    optuna.create_study(storage=storage, study_name="kept")
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 's.db'}") == ["kept"]


def test_a_budget_the_peers_already_spend_is_refused(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    """The peer DP costs more than search.budget: one line naming the budget and the fix, exit 2, before any work."""
    proc = run_with({"search.sampler": "autodiffusion", "search.budget": 0.5, "search.peers": "[gits_dp]",
                     "search.peer_samples": 32, "search.peer_grid": 20}, tiny_model_dir, tiny_reference, tmp_path)
    assert_refused(proc, "already spent by the gits_dp peer's teacher", tmp_path)
    assert "(search.budget=0.5)" in proc.stderr and "search.peers=[]" in proc.stderr


# --- issue 25: inputs that ended in tracebacks after the search, or were run silently ------------------------
SMOKE = ["search.population=6", "search.generations=1", "search.num_samples=100", "search.num_parents=3",
         "search.num_mutants=3", "search.num_crossovers=1", "search.init_random=2"]


def test_the_budget_message_names_the_budget_in_force(tmp_path: Path) -> None:
    from cli_helpers import compose_cfg

    unset = to_config(compose_cfg(SMOKE, tmp_path)).search
    with pytest.raises(ConfigError, match=r"budget, 6 candidate-equivalents \(search.budget unset: search.population=6"
                                          r" x search.generations=1 of search.sampler=autodiffusion\), is already spent"
                                          r" by the gits_dp peer's teacher \(64.0 candidate-equivalents"):
        preflight.check_budget(unset)
    with pytest.raises(ConfigError, match=r"budget, 10 candidate-equivalents \(search.budget=10"):
        preflight.check_budget(to_config(compose_cfg([*SMOKE, "search.budget=10"], tmp_path)).search)
    preflight.check_budget(to_config(compose_cfg([*SMOKE, "search.budget=65"], tmp_path)).search)  # 64 for the teacher, 1 left
    preflight.check_budget(to_config(compose_cfg([*SMOKE, "search.peers=[]"], tmp_path)).search)
    preflight.check_budget(to_config(compose_cfg([*SMOKE, "search.sampler=autodiffusion_paper"], tmp_path)).search)  # generations


def test_check_final() -> None:
    preflight.check_final(FinalConfig(enabled=True, repeats=1, num_samples=2))
    preflight.check_final(FinalConfig(enabled=True, repeats=3, num_samples=None))  # null: 2 x search.num_samples
    preflight.check_final(FinalConfig(enabled=False, repeats=0, num_samples=1))  # no final comparison: not read
    with pytest.raises(ConfigError, match=r"^final.repeats=0: .*at least 1 repeat.*final.enabled=false$"):
        preflight.check_final(FinalConfig(enabled=True, repeats=0, num_samples=None))
    with pytest.raises(ConfigError, match=r"^final.num_samples=1: FID needs at least 2 samples"):
        preflight.check_final(FinalConfig(enabled=True, repeats=3, num_samples=1))


def test_check_search_rungs_and_pool_size() -> None:
    good = {"population": 6, "num_parents": 3, "num_mutants": 3, "num_crossovers": 1, "init_random": 2,
            "rungs": [0.25, 0.5], "pool_size": 1}
    preflight.check_search(SearchConfig(**good))
    for rungs in ([0.5, 0.25], [0.25, 0.25, 0.5]):
        with pytest.raises(ConfigError, match=r"search.rungs=.*: list the prefixes in increasing order, each once"
                                              r" \(e.g. \[0.25, 0.5\]\)"):
            preflight.check_search(SearchConfig(**{**good, "rungs": rungs}))
    with pytest.raises(ConfigError, match=r"^search.pool_size=0: .*at least 1"):
        preflight.check_search(SearchConfig(**{**good, "pool_size": 0}))


def test_check_stage2_budget() -> None:
    preflight.check_stage2(Stage2Config(units="blocks", caches=[], budget_flops=3.5, budget_layers=None))
    preflight.check_stage2(Stage2Config(units="blocks", caches=[], budget_flops=None, budget_layers=0))
    for flops in (0, -1.0):
        with pytest.raises(ConfigError, match=rf"^search.stage2.budget_flops={flops}: .*must be positive"):
            preflight.check_stage2(Stage2Config(units="blocks", caches=[], budget_flops=flops))
    with pytest.raises(ConfigError, match=r"^search.stage2.budget_layers=-2"):
        preflight.check_stage2(Stage2Config(units="blocks", caches=[], budget_layers=-2))


def test_check_reference_source(tiny_reference: Path, tmp_path: Path) -> None:
    preflight.check_reference_source(str(tiny_reference))
    preflight.check_reference_source("builtin:digits-train")
    preflight.check_reference_source(str(tmp_path))  # an image folder: its images are checked when read
    preflight.check_reference_source(str(tmp_path / "missing.npz"))  # check_files names missing inputs
    for name in ("notes.txt", "text.npz"):
        (tmp_path / name).write_text("not images\n")
        with pytest.raises(ConfigError, match=rf"^dataset.reference=.*{name} is neither an image folder nor an .npz"):
            preflight.check_reference_source(str(tmp_path / name))


def test_check_writable_folder(tmp_path: Path) -> None:
    preflight.check_writable_folder(tmp_path / "new" / "deeper", "report.artifact_dir")
    assert not any(tmp_path.iterdir())  # tried in the nearest folder that exists, nothing made or left behind
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"^report.artifact_dir=.*a-file/artifacts cannot be written"
                                          r" \(Not a directory\): choose a folder you can write to$"):
        preflight.check_writable_folder(tmp_path / "a-file" / "artifacts", "report.artifact_dir")


def test_an_unwritable_run_folder_is_refused_before_hydra_starts(tiny_model_dir: Path, tiny_reference: Path,
                                                                  tmp_path: Path) -> None:
    from autodiff_opt.cli import run_dir_problem

    (tmp_path / "a-file").write_text("x")
    assert run_dir_problem([f"hydra.run.dir={tmp_path / 'run'}"]) is None
    assert run_dir_problem(["-m", f"hydra.run.dir={tmp_path / 'a-file' / 'x'}"]) is None  # a sweep writes elsewhere
    problem = run_dir_problem(["-m", f"hydra.sweep.dir={tmp_path / 'a-file'}/${{now:%H}}"])
    assert problem is not None and problem.startswith(f"hydra.sweep.dir={tmp_path / 'a-file'}/${{now:%H}} cannot be")
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db")
    proc = subprocess.run(cli_command(overrides, tmp_path / "a-file" / "run"), cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert_refused(proc, f"hydra.run.dir={tmp_path / 'a-file' / 'run'} cannot be written (Not a directory)", tmp_path)
    assert proc.stderr.strip().count("\n") == 0  # the one line, nothing else


def test_adm_presets_are_user_errors() -> None:
    from autodiff_opt.core.errors import USER_ERRORS
    from autodiff_opt.models.adm.config import AdmConfigError, unet_preset

    assert issubclass(AdmConfigError, ConfigError) and issubclass(AdmConfigError, USER_ERRORS)
    with pytest.raises(ConfigError, match="unknown ADM preset 'imagenet46'"):
        unet_preset("imagenet46")
    preflight.check_adm_presets(ModelConfig(converter="adm", preset="imagenet64", classifier=None))
    preflight.check_adm_presets(ModelConfig(converter=None, preset=None, classifier=None))
    with pytest.raises(ConfigError, match=r"^model.preset='imagenet46' is not an ADM preset: use one of .*imagenet64"):
        preflight.check_adm_presets(ModelConfig(converter="adm", preset="imagenet46", classifier=None))
    with pytest.raises(ConfigError, match=r"^model.preset='lsun256' has no ADM classifier preset"):
        preflight.check_adm_presets(ModelConfig(converter=None, preset="lsun256", classifier="64x64_classifier.pt"))


@contextlib.contextmanager
def _case(name: str) -> Iterator[None]:
    try:
        yield
    except BaseException as err:
        raise AssertionError(f"{name}: {err}") from err


def test_validate_runs_the_new_checks(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    """Each new check is part of the one validation pass (the CLI runs it before any model work)."""
    from cli_helpers import compose_cfg

    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a-file").write_text("x")
    base = tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db")
    for override, message in (("final.repeats=0", "final.repeats=0"), ("final.num_samples=1", "final.num_samples=1"),
                              ("search.rungs=[0.5,0.25]", "increasing order"), ("search.pool_size=0", "pool_size=0"),
                              (f"dataset.reference={tmp_path / 'notes.txt'}", "is neither an image folder"),
                              (f"report.artifact_dir={tmp_path / 'a-file' / 'art'}", "report.artifact_dir="),
                              ("search.budget=0.5", "already spent by the gits_dp"),
                              ("model.preset=imagenet46", "is not an ADM preset")):
        overrides = [*base, override]
        if override == "search.budget=0.5":
            overrides += ["search.peers=[gits_dp]", "search.sampler=autodiffusion"]
        if override.startswith("model.preset"):
            overrides += ["model.converter=adm"]
        with _case(override), pytest.raises(ConfigError, match=message.replace("[", "\\[")):
            preflight.validate(to_config(compose_cfg(overrides, tmp_path)))
    cfg = compose_cfg([*base, "search.stage2.enabled=true", "search.stage2.budget_flops=0"], tmp_path)
    with pytest.raises(ConfigError, match="budget_flops=0"):
        preflight.validate(to_config(cfg))
