"""`python -m autodiff_opt`: the Hydra app (configs in conf/)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

import autodiff_opt
from autodiff_opt.config import register_configs

log = logging.getLogger("autodiff_opt")

CONFIG_DIR = autodiff_opt.CONFIG_DIR  # shipped in the wheel; AUTODIFF_OPT_CONF overrides (autodiff_opt/__init__.py)

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> None:
    """Errors the user can fix end with their one-line message and exit code 2; bugs keep their traceback."""
    from autodiff_opt.core.errors import USER_ERRORS
    from autodiff_opt.runner import run

    try:
        run(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python -m autodiff_opt OVERRIDES` would run, composed in-process (benchmarks, tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_dir_problem(argv: list[str]) -> str | None:
    """Hydra creates its run (or sweep) folder before the app starts, with a traceback where it cannot:
    the folder given (or the default's fixed part, in the launch folder) is checked first."""
    from autodiff_opt.core.errors import ConfigError
    from autodiff_opt.preflight import check_writable_folder

    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(key + "=")]
    folder = given[-1] if given else ("multirun" if multirun else "outputs")
    try:
        check_writable_folder(folder.split("${")[0] or ".", key)
    except ConfigError as err:
        return str(err).replace(f"{key}={folder.split('${')[0] or '.'}", f"{key}={folder}", 1)
    return None


def main() -> None:
    if sys.argv[1:2] == ["cluster"]:  # `autodiff-opt cluster slurm ...` is `python -m autodiff_opt.cluster slurm ...`
        from autodiff_opt.cluster import main as cluster_main

        sys.exit(cluster_main(sys.argv[2:]))
    problem = run_dir_problem(sys.argv[1:])
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    _app()
