"""The one validation pass over the typed config (``config.to_config``), before any model is loaded.

Each check raises one of the errors in `autodiff_opt.core.errors.USER_ERRORS` (one line on stderr,
exit 2) with the setting and the fix in its message. `validate(cfg)` runs them all, cheapest first
(settings, then files and their headers); `run_all(cfg)` adds the storage and returns it opened.
Each check reads the typed section it needs (``SearchConfig``, ``Stage2Config``, ``FinalConfig``,
``ModelConfig``, ...). Nothing here loads a model or touches the data (docs/errors.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from autodiff_opt.core.errors import ConfigError
from autodiff_opt.specs.options import CACHES, PEERS, SKIP_UNITS
from autodiff_opt.specs.samplers import SAMPLER_SPECS
from autodiff_opt.specs.solvers import SOLVER_SPECS, solver_mismatch

if TYPE_CHECKING:  # the typed config (a layer below); runner builds it once with config.to_config
    from autodiff_opt.config import Config, FinalConfig, ModelConfig, SearchConfig, Stage2Config, StorageConfig

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


def check_search(search: SearchConfig) -> None:
    """The sampler and the evolution's sizes, before any model is loaded."""
    from autodiff_opt.search.sampler_choice import SamplerChoiceError, resolve

    batch = search.batch_size
    if batch is not None and batch != "auto" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise _config_error(f"search.batch_size={batch!r}: use a whole number of at least 1, or auto (from free GPU memory)")
    for key in ("population", "generations", "max_consecutive_failures", "num_parents"):
        value = getattr(search, key)
        if value is not None and int(value) < 1:
            raise _config_error(f"search.{key}={value}: must be at least 1")
    for key in ("mutation_prob", "init_mutation_prob"):
        value = getattr(search, key)
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise _config_error(f"search.{key}={value}: a probability must be in [0, 1]")
    try:
        setup = resolve(search)
    except SamplerChoiceError as err:
        raise _config_error(str(err)) from err
    pool = search.pool_size
    if pool is not None and (isinstance(pool, bool) or int(pool) < 1):
        raise _config_error(f"search.pool_size={pool}: the surrogate ranks at least 1 offspring per candidate:"
                            " use a whole number of at least 1 (the default is 256)")
    rungs = list(setup.rung_fractions)
    if any(a >= b for a, b in zip(rungs, rungs[1:])):
        raise _config_error(f"search.rungs={rungs}: list the prefixes in increasing order, each once"
                            f" (e.g. {sorted(set(rungs))})")
    from autodiff_opt.search.stopping import StopChoiceError, check_stop

    try:
        check_stop(search.stop, search.patience, search.timeout, search.patience_candidates)
    except StopChoiceError as err:
        raise _config_error(str(err)) from err
    if not setup.spec.stage2 and search.stage2.enabled:
        raise _config_error(f"search.stage2.enabled=true needs search.sampler={' or '.join(STAGE2_SAMPLERS)}:"
                            f" {setup.sampler} searches the time steps only")
    check_stage2(search.stage2)
    unknown = [p for p in search.peers if p not in PEERS]
    if unknown:
        raise _config_error(f"search.peers: {unknown} unknown: use {' and/or '.join(PEERS)}")
    from autodiff_opt.solvers import FLOW_HEURISTICS, HEURISTICS

    known = [*HEURISTICS, *FLOW_HEURISTICS]  # which family fits the model is checked once it is loaded
    unknown = [b for b in search.baselines if b not in known]
    if unknown:
        raise _config_error(f"search.baselines: {unknown} unknown: use any of {', '.join(known)} (or [] for none)")


STAGE2_SAMPLERS = tuple(name for name, spec in SAMPLER_SPECS.items() if spec.stage2)


def check_stage2(stage2: Stage2Config) -> None:
    """search.stage2.units and search.stage2.caches: known names; the sensitivity map's prefix a fraction."""
    units = stage2.units
    if units not in SKIP_UNITS:
        raise _config_error(f"search.stage2.units={units}: use blocks or sub_blocks (transformer branches)")
    unknown = [c for c in stage2.caches if c not in CACHES]
    if unknown:
        raise _config_error(f"search.stage2.caches: {unknown} unknown: use any of {', '.join(CACHES)}")
    fraction = float(stage2.sensitivity_fraction)
    if not 0.0 < fraction <= 1.0:
        raise _config_error(f"search.stage2.sensitivity_fraction={fraction}: use a fraction of the search samples"
                            " in (0, 1], e.g. 0.1")
    flops = stage2.budget_flops
    if flops is not None and float(flops) <= 0:
        raise _config_error(f"search.stage2.budget_flops={flops}: the budget is in full network evaluations and must be"
                            " positive (e.g. 4.0), or null for K full steps")
    layers = stage2.budget_layers
    if layers is not None and int(layers) < 0:
        raise _config_error(f"search.stage2.budget_layers={layers}: a layer count cannot be negative (null: use budget_flops)")


def check_seeds(search_seed: int, final: FinalConfig) -> None:
    """The final comparison draws repeat r from seed final.seed + 7919 r (search/final.py): none may be the
    search's seed, or the 'fresh' images are the ones the search was scored on."""
    if not final.enabled:
        return
    seeds = [int(final.seed) + 7919 * r for r in range(max(1, int(final.repeats or 1)))]
    if int(search_seed) in seeds:
        r = seeds.index(int(search_seed))
        which = "final.seed" if r == 0 else f"final.seed + 7919 x {r} (repeat {r})"
        raise _config_error(f"{which} = {search_seed} is search.seed: the final comparison needs fresh seeds:"
                            " set final.seed to another value (the default is 1000003)")


def check_final(final: FinalConfig) -> None:
    """final.repeats and final.num_samples: the final comparison must be able to compute an FID."""
    if not final.enabled:
        return
    repeats = final.repeats
    if repeats is not None and int(repeats) < 1:
        raise _config_error(f"final.repeats={repeats}: the final comparison needs at least 1 repeat (the default is 3);"
                            " to skip it, set final.enabled=false")
    n = final.num_samples
    if n is not None and int(n) < 2:
        raise _config_error(f"final.num_samples={n}: FID needs at least 2 samples (use thousands; null: twice"
                            " search.num_samples)")


def budget_in_force(search: SearchConfig) -> str:
    """The search budget in candidate-equivalents and where it comes from, for messages."""
    from autodiff_opt.search.sampler_choice import resolve

    setup = resolve(search)
    if search.budget is not None:
        return f"{setup.budget:g} candidate-equivalents (search.budget={search.budget})"
    return (f"{setup.budget:g} candidate-equivalents (search.budget unset: search.population={setup.evolution.population}"
            f" x search.generations={setup.generations} of search.sampler={setup.sampler})")


def check_budget(search: SearchConfig) -> None:
    """The trajectory-DP peer's teacher (search.peer_grid steps on search.peer_samples samples; T >= peer_grid
    for every model here) counts in the budget of the image-step samplers: it must leave room for a candidate."""
    from autodiff_opt.search.sampler_choice import resolve

    setup = resolve(search)
    if setup.spec.counts == "generations" or "gits_dp" not in search.peers:
        return  # the paper's evolution counts generations, not image-steps
    teacher = int(search.peer_grid) * int(search.peer_samples)
    candidate = int(search.num_samples) * int(search.num_steps)
    if teacher >= setup.budget * candidate:
        raise _config_error(
            f"the search budget, {budget_in_force(search)}, is already spent by the gits_dp peer's teacher"
            f" ({teacher / candidate:.1f} candidate-equivalents: search.peer_grid={search.peer_grid} x"
            f" search.peer_samples={search.peer_samples} image-steps): raise search.budget, lower search.peer_samples,"
            " or set search.peers=[]")


def check_reference_source(source: str) -> None:
    """dataset.reference: builtin:NAME, an image folder or an .npz archive (a missing one is named by check_files)."""
    import zipfile

    path = Path(str(source)).expanduser()
    if str(source).startswith("builtin:") or not path.is_file():
        return
    if path.suffix.lower() != ".npz" or not zipfile.is_zipfile(path):
        raise _config_error(f"dataset.reference={source} is neither an image folder nor an .npz archive (uint8 images"
                            " under arr_0, or mu/sigma): point it at one (python -m autodiff_opt.stats builds statistics)")


def check_writable_folder(folder: str | Path, option: str) -> None:
    """A folder the run will create and write: a file can be made in it, or in the nearest folder above it
    that exists (tried, not read from permission bits: root may write anywhere but /proc, a read-only mount,
    a path under a file). Nothing is left behind."""
    import errno
    import tempfile

    path = Path(str(folder)).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise _config_error(f"{option}={folder} cannot be written ({reason}): choose a folder you can write to") from err


def check_adm_presets(model: ModelConfig) -> None:
    """model.preset names a guided-diffusion architecture when a checkpoint is converted or a classifier used."""
    from autodiff_opt.models.adm.config import CLASSIFIER_PRESETS, UNET_PRESETS

    preset = model.preset
    if preset is None:
        return
    if model.converter == "adm" and preset not in UNET_PRESETS:
        raise _config_error(f"model.preset={preset!r} is not an ADM preset: use one of {', '.join(sorted(UNET_PRESETS))}")
    if model.classifier and preset not in CLASSIFIER_PRESETS:
        raise _config_error(f"model.preset={preset!r} has no ADM classifier preset (model.classifier is set): use one of"
                            f" {', '.join(sorted(CLASSIFIER_PRESETS))}")


def _resolved_device(name: str):  # -> torch.device
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_runtime(cfg: Config) -> None:
    """precision and compile: known values, and a precision the device can run (after check_device)."""
    from autodiff_opt.utils import compile_problem, precision_problem

    problem = compile_problem(str(cfg.compile))
    if problem is None:
        problem = precision_problem(str(cfg.precision), _resolved_device(str(cfg.device)))
    if problem is not None:
        raise _config_error(problem)


def _unet_folder(root: Path, subfolder: str | None) -> Path:
    """The denoiser's folder: model.subfolder, else inside a pipeline folder the one its model family names
    (``unet/``, a transformer pipeline's ``transformer/``), else the folder itself."""
    if subfolder:
        return root / subfolder
    if (root / "model_index.json").is_file():
        from autodiff_opt.models.families import ModelRef, family_named, pipeline_families

        family = pipeline_families().get(ModelRef(pretrained=str(root)).pipeline_class or "")
        return root / (family_named(family).subfolder if family else "unet")
    return root


def check_model_folder(pretrained: str, subfolder: str | None = None) -> None:
    """A local diffusers folder must have a readable config.json and whole weights files beside it (for a
    pipeline folder: in every component folder).

    Hub ids, builtin: names and missing paths are left to the loader (it already reports them).
    """
    from autodiff_opt.core.errors import ModelLoadError

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
    for component in _components(root, folder):
        check_weights(component)


def _components(root: Path, unet_folder: Path) -> list[Path]:
    """The UNet folder, and for a pipeline folder every component folder it names (vae, text_encoder, ...)."""
    folders = [unet_folder]
    index = root / "model_index.json"
    if index.is_file():
        try:
            names = [k for k, v in json.loads(index.read_text()).items() if not k.startswith("_") and isinstance(v, list)]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            names = []  # the loader reports an unreadable model_index.json
        folders += [root / n for n in names if (root / n).is_dir() and root / n != unet_folder]
    return folders


def check_weights(folder: Path) -> None:
    """Each weights file diffusers would read is whole: safetensors headers parse and cover their files; a
    pickled .bin (read only where no safetensors file is) holds nothing but tensors. No tensor data is read."""
    from autodiff_opt.models.loading import check_safetensors, plain_state_dict

    safetensors = sorted(folder.glob("*.safetensors"))
    for path in safetensors:
        check_safetensors(path)
    if not safetensors:
        for path in sorted(folder.glob("*.bin")):
            plain_state_dict(path, "model.pretrained", mmap=True)


def check_checkpoints(model: ModelConfig) -> None:
    """guided-diffusion .pt files (model.checkpoint with model.converter, model.classifier) are plain state
    dicts: checked with the tensors memory-mapped, not read; a missing file is reported by missing_files."""
    from autodiff_opt.models.loading import plain_state_dict

    for option, used in (("model.checkpoint", model.converter), ("model.classifier", True)):
        value = getattr(model, option.split(".")[1])
        if used and value and Path(str(value)).expanduser().is_file():
            plain_state_dict(Path(str(value)).expanduser(), option, mmap=True)


def check_solver_fits_model(solver: str, pretrained: str, subfolder: str | None = None,
                            peers: Sequence[str] = ()) -> None:
    """A flow solver on a rectified flow, a VP solver on a noise-prediction model, read from the local
    folder's scheduler config (hub ids and absent folders are checked once the model is loaded); AYS
    publishes time steps of VP models only."""
    from autodiff_opt.models.flow import is_flow_scheduler
    from autodiff_opt.models.sources import resolve_pretrained

    root = Path(resolve_pretrained(pretrained))
    folder = _unet_folder(root, subfolder)
    for candidate in (folder / "scheduler_config.json", root / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return  # the loader reports an unreadable config
            flow = isinstance(config, dict) and is_flow_scheduler(config)
            problem = solver_mismatch(solver, flow)
            if problem:
                raise _config_error(problem)
            if flow and "ays" in peers:
                raise _config_error("search.peers: ays publishes time steps of VP diffusion models and this model is a"
                                    " rectified flow: drop it (search.peers=[gits_dp] or [])")
            return


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
    if url.startswith("postgres://"):  # Heroku-style: SQLAlchemy, optuna and optuna-dashboard all refuse it
        first += "; write postgresql:// instead of postgres://"
    return StudyError(f"storage.url={_redact(url)} cannot be opened ({type(err).__name__}: {first}): check the URL,"
                      " that the database server is running and reachable, and the credentials")


def check_storage(url: str) -> None:
    """The storage can be reached, checked without creating a study, tables or files: a database server
    must accept a connection; for journal and SQLite files the folder must exist (it is created, as
    make_storage would) and be writable. Bare postgresql:// URLs are tried with the installed driver."""
    import os

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
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:  # driver missing, refused, unknown host, bad credentials: all the user's to fix
        raise _storage_error(url, err) from err


def open_storage(storage_cfg: StorageConfig):  # -> optuna.storages.BaseStorage
    """The study's storage, opened (and so checked). Bare postgresql:// URLs get the installed driver."""
    from autodiff_opt.search.study import make_storage

    return make_storage(str(storage_cfg.url), storage_cfg.heartbeat_interval,
                        storage_cfg.grace_period, storage_cfg.max_retry)


def check_config(cfg: Config) -> None:
    """Checks that need no model: fail before any work."""
    if cfg.search.num_steps < 1:
        raise _config_error(f"search.num_steps={cfg.search.num_steps}: K must be at least 1")
    if cfg.search.num_samples < 2:
        raise _config_error(f"search.num_samples={cfg.search.num_samples}: FID needs at least 2 samples (use thousands)")
    for i, steps in enumerate(cfg.search.schedules):
        if len(steps) != cfg.search.num_steps and not cfg.search.solvers:
            raise _config_error(f"search.schedules[{i}] has {len(steps)} steps but search.num_steps={cfg.search.num_steps}")
    check_solver_gene(cfg)


def check_solver_gene(cfg: Config) -> None:
    """search.solvers: known names, no repeats, and a sampler that carries the gene."""
    solvers = list(cfg.search.solvers)
    unknown = [s for s in solvers if s not in SOLVER_SPECS]
    if unknown:
        raise _config_error(f"search.solvers={solvers}: {unknown} unknown; use names from {sorted(SOLVER_SPECS)}")
    if len(set(solvers)) != len(solvers):
        raise _config_error(f"search.solvers={solvers} lists a solver twice: list each once")
    from autodiff_opt.search.sampler_choice import resolve

    if solvers and not resolve(cfg.search).spec.solver_gene:
        genes = " or ".join(n for n, spec in SAMPLER_SPECS.items() if spec.solver_gene)
        raise _config_error(f"search.solvers needs search.sampler={genes}"
                          f" (got {cfg.search.sampler}): the built-in samplers see steps only")
    if solvers and cfg.search.stage2.enabled:
        raise _config_error("search.solvers with search.stage2.enabled=true is not supported: leave one of them off")
    if solvers:
        lengths = {SOLVER_SPECS[s].steps_for_nfe(cfg.search.num_steps) for s in solvers}
        for i, steps in enumerate(cfg.search.schedules):
            if len(steps) not in lengths:
                raise _config_error(f"search.schedules[{i}] has {len(steps)} steps but the solvers of search.solvers"
                                  f" take {sorted(lengths)} at NFE search.num_steps={cfg.search.num_steps}")


def check_files(cfg: Config) -> None:
    """Every configured input file that is absent, all named at once."""
    from autodiff_opt.models.factory import missing_files

    missing = missing_files(cfg)
    if missing:
        raise _config_error("input files are missing, nothing was started:\n  " + "\n  ".join(missing))


def validate(cfg: Config) -> None:
    """Every check above that needs no plugin and no storage, cheapest first: settings, then files."""
    check_config(cfg)
    check_search(cfg.search)
    check_budget(cfg.search)
    check_final(cfg.final)
    check_seeds(cfg.search.seed, cfg.final)
    check_device(str(cfg.device))
    check_runtime(cfg)
    check_model_folder(str(cfg.model.pretrained), cfg.model.subfolder)
    check_adm_presets(cfg.model)
    check_checkpoints(cfg.model)
    check_files(cfg)
    check_reference_source(str(cfg.dataset.reference))
    if cfg.report.artifact_dir:
        check_writable_folder(cfg.report.artifact_dir, "report.artifact_dir")
    check_solver_fits_model(str(cfg.solver.name), str(cfg.model.pretrained), cfg.model.subfolder, list(cfg.search.peers))


def run_all(cfg: Config):  # -> optuna.storages.BaseStorage
    """``validate``, then the storage checked and opened: call before anything is loaded, and use the
    storage it returns (check_storage alone creates no study, table or file)."""
    validate(cfg)
    check_storage(str(cfg.storage.url))
    return open_storage(cfg.storage)
