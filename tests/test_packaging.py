"""The built wheel works on its own: configs and assets ship inside it (not only in an editable checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, installed (without its dependencies) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("autodiff_opt-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return tmp / "site"


def _run(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AUTODIFF_OPT_CONF"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO / "tests")]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               AUTODIFF_OPT_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_wheel_composes_its_config_from_any_folder(installed: Path, tmp_path: Path) -> None:
    where = _run(installed, ["-c", "import autodiff_opt, autodiff_opt.cli as c; print(autodiff_opt.__file__); print(c.CONFIG_DIR)"], tmp_path)
    module, config_dir = where.stdout.split()
    assert module.startswith(str(installed)) and config_dir.startswith(str(installed)), where.stdout
    proc = _run(installed, ["-m", "autodiff_opt", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pretrained: builtin:digits-ddpm" in proc.stdout and "sampler: autodiffusion" in proc.stdout
    proc = _run(installed, ["-m", "autodiff_opt", "+experiment=imagenet64", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0 and "num_samples: 5000" in proc.stdout, proc.stderr[-2000:]


def test_installed_wheel_runs_a_tiny_search(installed: Path, tiny_model_dir: Path, tiny_reference: Path,
                                            tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "s.db", **{"search.generations": 1})
    proc = _run(installed, ["-m", "autodiff_opt", *overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final.csv").is_file()
