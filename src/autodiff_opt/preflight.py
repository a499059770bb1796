"""Checks of bad input that the run does not make yet, or makes only after expensive work.

Each raises one of the errors in `autodiff_opt.errors.USER_ERRORS` (one line on stderr, exit 2) with
the setting and the fix in its message. To be called at the start of `runner.build_experiment` /
`runner.run`, before the model is loaded and before reference statistics are computed (see
docs/errors.md for where each one goes). Nothing here loads a model or touches the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from autodiff_opt.core.errors import ConfigError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def _config_error(message: str) -> Exception:
    return ConfigError(message)


def check_device(name: str) -> None:
    """'auto', 'cpu', 'cuda', 'cuda:N' (N < the number of GPUs here), 'mps' where it exists."""
    import torch

    if name in ("auto", "cpu"):
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise _config_error(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _config_error(f"device={name}: CUDA is not available on this machine: use device=cpu (or device=auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise _config_error(f"device={name}: this machine has {count} CUDA device(s): use cuda:0 .. cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise _config_error(f"device={name}: MPS is not available on this machine: use device=cpu (or device=auto)")
    elif device.type not in ("cuda", "mps", "cpu"):
        raise _config_error(f"device={name}: unsupported device type {device.type!r}: use auto, cpu or cuda:N")


def check_search(search: Any) -> None:
    """The sampler and the evolution's sizes, before any model is loaded."""
    from autodiff_opt.search.samplers import SamplerChoiceError, resolve

    batch = search.get("batch_size")
    if batch is not None and batch != "auto" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise _config_error(f"search.batch_size={batch!r}: use a whole number of at least 1, or auto (from free GPU memory)")
    for key in ("population", "generations", "max_consecutive_failures", "num_parents"):
        if search.get(key) is not None and int(search[key]) < 1:
            raise _config_error(f"search.{key}={search[key]}: must be at least 1")
    for key in ("mutation_prob", "init_mutation_prob"):
        if search.get(key) is not None and not 0.0 <= float(search[key]) <= 1.0:
            raise _config_error(f"search.{key}={search[key]}: a probability must be in [0, 1]")
    try:
        setup = resolve(search)
    except SamplerChoiceError as err:
        raise _config_error(str(err)) from err
    stage2 = search.get("stage2") if hasattr(search, "get") else None
    if not setup.evolutionary and stage2 is not None and stage2.get("enabled"):
        raise _config_error(f"search.stage2.enabled=true needs search.sampler=autodiffusion or autodiffusion_paper:"
                            f" {setup.sampler} searches the time steps only")
    unknown = [p for p in (search.get("peers") or []) if p not in ("gits_dp", "ays")]
    if unknown:
        raise _config_error(f"search.peers: {unknown} unknown: use gits_dp and/or ays")


def _resolved_device(name: str):  # -> torch.device
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_runtime(cfg: Any) -> None:
    """precision and compile: known values, and a precision the device can run (after check_device)."""
    from autodiff_opt.utils import compile_problem, precision_problem

    problem = compile_problem(str(cfg.get("compile", "off")))
    if problem is None:
        problem = precision_problem(str(cfg.get("precision", "fp32")), _resolved_device(str(cfg.get("device", "auto"))))
    if problem is not None:
        raise _config_error(problem)


def _unet_folder(root: Path, subfolder: str | None) -> Path:
    if subfolder:
        return root / subfolder
    if (root / "model_index.json").is_file():
        return root / "unet"
    return root


def check_model_folder(pretrained: str, subfolder: str | None = None) -> None:
    """A local diffusers folder must have a readable config.json and a weights file beside it.

    Hub ids, builtin: names and missing paths are left to the loader (it already reports them).
    """
    from autodiff_opt.models.base import ModelLoadError

    if pretrained.startswith("builtin:"):
        return
    root = Path(pretrained).expanduser()
    if not root.is_dir():
        return
    folder = _unet_folder(root, subfolder)
    config = folder / "config.json"
    if not config.is_file():
        return  # the loader says what a diffusers folder must contain
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config} is not a readable JSON model config ({type(err).__name__}: {err}):"
                             " point model.pretrained at a folder written by save_pretrained") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{config} is not a model config (a JSON object): point model.pretrained at a folder"
                             " written by save_pretrained")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{folder} has a config.json but no weights ({WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}):"
                             " copy the whole folder written by save_pretrained")


def check_feature_layer(feature_extractor: str, feature_layer: str | None) -> None:
    """The layer must be one the (registered) extractor provides; an unknown extractor is reported by FIDScorer."""
    import torch_fidelity.registry as registry

    from autodiff_opt.metrics.fid import MetricError, ensure_registered

    ensure_registered()
    cls = registry.FEATURE_EXTRACTORS_REGISTRY.get(feature_extractor)
    if cls is None or feature_layer is None:
        return
    provided = [str(x) for x in cls.get_provided_features_list()]
    if str(feature_layer) not in provided:
        raise MetricError(f"metric.feature_layer={feature_layer!r} is not provided by {feature_extractor}:"
                          f" use one of {provided} (or null for its FID default)")


def _storage_error(url: str, err: BaseException) -> Exception:
    from autodiff_opt.search.study import StudyError, _redact

    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return StudyError(f"storage.url={_redact(url)} cannot be opened ({type(err).__name__}: {first}): check the URL,"
                      " that the database server is running and reachable, and the credentials")


def check_storage(url: str) -> None:
    """The storage can be reached, checked without creating a study, tables or files: a database server
    must accept a connection; for journal and SQLite files the folder must exist (it is created, as
    make_storage would) and be writable. Bare postgresql:// URLs are tried with the installed driver."""
    import os

    from autodiff_opt.search.concurrency import sqlalchemy_url

    url = str(url)
    path = url[len("journal:"):] if url.startswith("journal:") else url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
    if path is not None:
        if path in ("", ":memory:"):
            return
        folder = Path(path).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"{folder} is not writable")
        except OSError as err:
            raise _storage_error(url, err) from err
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(sqlalchemy_url(url))
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:  # driver missing, refused, unknown host, bad credentials: all the user's to fix
        raise _storage_error(url, err) from err


def open_storage(storage_cfg: Any):  # -> optuna.storages.BaseStorage
    """The study's storage, opened (and so checked). Bare postgresql:// URLs get the installed driver."""
    from autodiff_opt.search.concurrency import sqlalchemy_url
    from autodiff_opt.search.study import make_storage

    return make_storage(sqlalchemy_url(str(storage_cfg.url)), storage_cfg.heartbeat_interval,
                        storage_cfg.grace_period, storage_cfg.max_retry)


def run_all(cfg: Any):  # -> optuna.storages.BaseStorage
    """Every check above that needs no plugin, cheapest first, then the storage opened: call before anything
    is loaded, and use the storage it returns (check_storage alone creates no study, table or file)."""
    check_search(cfg.search)
    check_device(str(cfg.device))
    check_runtime(cfg)
    check_model_folder(str(cfg.model.pretrained), cfg.model.subfolder)
    check_storage(str(cfg.storage.url))
    return open_storage(cfg.storage)
