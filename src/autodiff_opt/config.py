"""Structured configs: the one source of defaults and types. Hydra refuses unknown keys and wrong types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from autodiff_opt.core.errors import ConfigError

DEFAULT_BASELINES = ["ddim_uniform", "trailing", "quadratic", "logsnr", "karras"]


@dataclass
class ModelConfig:
    name: str = "digits"
    pretrained: str = "builtin:digits-ddpm"  # diffusers folder, pipeline folder, hub id, or builtin:NAME
    subfolder: Optional[str] = None
    noise_schedule: Optional[Dict[str, Any]] = None  # used when the folder has no scheduler_config.json
    dtype: str = "float32"
    # Checkpoints in another layout (guided-diffusion .pt) are converted once into a diffusers folder.
    converter: Optional[str] = None  # null | adm
    checkpoint: Optional[str] = None
    preset: Optional[str] = None
    classifier: Optional[str] = None  # ADM noisy-image classifier checkpoint: enables classifier guidance
    classifier_scale: float = 1.0
    source_hint: str = ""  # where the weights are published (for the missing-file message)
    # Text-to-image latent models (Stable Diffusion pipeline folder or hub id): prompts and guidance.
    prompts: Optional[str] = None  # COCO captions JSON (captions_val2014.json) or .txt, one prompt a line
    guidance_scale: float = 7.5  # classifier-free guidance s: eps_u + s * (eps_c - eps_u); 1.0 = conditional only
    decode_batch_size: int = 8  # latents decoded by the VAE this many at a time
    image_size: Optional[int] = None  # SD3 / Flux image side in pixels (null: the pipeline's default)


@dataclass
class DatasetConfig:
    name: str = "digits"
    reference: str = "builtin:digits-train"  # builtin:NAME, image folder, .npz of images or of mu/sigma
    max_images: Optional[int] = None
    source_hint: str = ""  # where the reference data (and prompts) are published (for the missing-file message)


@dataclass
class SolverConfig:
    name: str = "ddim"  # a SolverSpec name (specs/solvers.py): ddim, dpmpp_2m, dpmpp_3m, ipndm, unipc, euler, heun, flow_*
    clip_x0: bool = True


@dataclass
class MetricConfig:
    feature_extractor: str = "digits-cnn"
    feature_layer: Optional[str] = None  # null: the extractor's default layer for FID
    weights_path: Optional[str] = None
    allow_download: bool = False
    batch_size: int = 500


@dataclass
class Stage2Config:
    enabled: bool = False
    start_generation: int = 5  # stage 2 starts here at the latest ...
    patience: int = 1  # ... or once the best candidate did not improve for this many generations
    max_prun: float = 0.1  # final maximum fraction of skipped layers per step
    ramp_steps: int = 5  # the maximum fraction ramps up in this many equal increments
    budget_flops: Optional[float] = None  # in full network evaluations, e.g. 4.0 (null: K full steps)
    budget_layers: Optional[int] = None  # the authors' layer count N_max (alternative to budget_flops)
    max_extra_steps: int = 1  # how many steps beyond K the budget may buy
    multi_objective: bool = False  # minimise (FID, FLOPs) instead of a fixed budget
    units: str = "blocks"  # transformers: whole blocks, or sub_blocks (each attention / feed-forward branch)
    # per-step sensitivity map on the stage-1 best (a prefix of the search samples, its cost counted in the
    # budget: about K x layers x sensitivity_fraction candidates), drawn in the report and used as the masks'
    # prior (search/sensitivity.py, docs/arch.md)
    sensitivity: bool = False
    sensitivity_fraction: float = 0.1  # the prefix, as a fraction of search.num_samples
    # diffusers' caches scored next to the searched masks (transformers; docs/arch.md): first_block, taylorseer,
    # pab, faster, mag
    caches: list = field(default_factory=list)


@dataclass
class SearchConfig:
    num_steps: int = 4
    num_samples: int = 1000
    batch_size: Any = 500  # images per network call, or "auto": from free CUDA memory (docs/gpu.md); CPU: 256
    # a SamplerSpec name (specs/samplers.py): autodiffusion (default), autodiffusion_paper, tpe, cmaes, gp, random
    sampler: str = "autodiffusion"
    budget: Optional[float] = None  # candidate-equivalents of image-steps; null: population x generations
    # converged: end once the best FID improved by less than its own noise over a window of at least
    # `patience` candidate-equivalents and `patience_candidates` candidates (the budget stays the
    # ceiling); budget: spend it all (search/stopping.py, docs/search.md)
    stop: str = "converged"
    patience: float = 30.0
    patience_candidates: int = 75
    timeout: Optional[str] = None  # search time across resumes: 2h, 30m, 1h30m, 90s or seconds; null: none
    # null: the chosen sampler's preset (specs/samplers.py; the paper's are 50/10/25/0.25/15/25/0.1)
    generations: Optional[int] = None
    population: Optional[int] = None
    num_parents: Optional[int] = None
    num_mutants: Optional[int] = None
    mutation_prob: Optional[float] = None
    num_crossovers: Optional[int] = None
    init_random: Optional[int] = None
    init_mutation_prob: Optional[float] = None
    max_attempts: Optional[int] = None
    prune: Optional[bool] = None  # multi-fidelity: stop candidates on sample prefixes (null: sampler default)
    rungs: List[float] = field(default_factory=lambda: [0.25, 0.5])  # prefixes, as fractions of num_samples
    pool_size: int = 256  # offspring the surrogate ranks per candidate (autodiffusion)
    seed: int = 0
    baselines: List[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    peers: List[str] = field(default_factory=lambda: ["gits_dp", "ays"])  # peer methods' schedules, scored alongside
    peer_samples: int = 256  # teacher samples of the trajectory-DP peer
    peer_grid: int = 100  # teacher steps of the trajectory-DP peer
    schedules: List[List[int]] = field(default_factory=list)  # your own schedules, scored alongside
    # The solver gene: the search picks one of these with the steps, and num_steps is then the NFE budget
    # (Heun gets (NFE + 1) // 2 steps); empty: every candidate uses solver.name (search/solver_gene.py).
    solvers: List[str] = field(default_factory=list)
    max_consecutive_failures: int = 10
    stage2: Stage2Config = field(default_factory=Stage2Config)


@dataclass
class StorageConfig:
    url: str = "sqlite:///autodiff_opt.db"
    # null: MODEL-SOLVER-kK-SAMPLER-HASH, HASH of the settings a resume must keep (runner.study_name_of)
    study_name: Optional[str] = None
    heartbeat_interval: int = 5
    grace_period: int = 12
    max_retry: int = 3


@dataclass
class FinalConfig:
    enabled: bool = True
    num_samples: Optional[int] = None  # null: 2x search.num_samples
    seed: int = 1_000_003  # fresh seeds: never the search's
    repeats: int = 3  # independent fresh sample sets; the table reports their mean FID and its std


@dataclass
class ReportConfig:
    grid_size: int = 8  # sample grids of grid_size x grid_size images per schedule, from the final seed (0: none)
    # the grids as study artifacts in an Optuna FileSystemArtifactStore (optuna-dashboard --artifact-dir DIR);
    # relative to the launch folder, where the default SQLite storage also lives; null: no artifacts
    artifact_dir: Optional[str] = "artifacts"
    dashboard: bool = True  # the final table as the study's note and the figures as its optuna-dashboard plots


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    imports: List[str] = field(default_factory=list)  # modules imported first (e.g. to register a feature extractor)
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the denoiser (bf16 also on CPU; fp16 needs CUDA)
    compile: str = "off"  # off | default | max-autotune: torch.compile of each skippable layer, once per process
    cuda_graphs: bool = True  # with compile on CUDA: CUDA graphs (mode reduce-overhead); ignored on CPU
    progress: bool = True
    cache_dir: str = "${oc.env:AUTODIFF_OPT_CACHE,'~/.cache/autodiff_opt'}"  # reference stats, converted models
    output_dir: str = "${hydra:runtime.output_dir}"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in (("model", ModelConfig), ("dataset", DatasetConfig), ("solver", SolverConfig),
                        ("metric", MetricConfig), ("search", SearchConfig), ("storage", StorageConfig)):
        cs.store(group=group, name=f"base_{group}", node=node)


def to_config(cfg: Config | DictConfig | dict) -> Config:
    """The composed config as the typed ``Config`` (``OmegaConf.to_object`` on the structured schema): built once
    by the orchestration layer (runner), which hands its typed pieces down. A tree not composed on
    ``base_config`` (``OmegaConf.create``, a dict) is merged onto the schema first, so unknown keys and wrong
    types are refused the same way. An interpolation that does not resolve, a missing value (``???``), an
    unknown key or a wrong type is a ``ConfigError``: one line naming the setting (exit 2)."""
    if isinstance(cfg, Config):
        return cfg
    try:
        tree = cfg if OmegaConf.get_type(cfg) is Config else OmegaConf.merge(OmegaConf.structured(Config), cfg)
        config = OmegaConf.to_object(tree)
    except OmegaConfBaseException as err:
        raise ConfigError(_schema_problem(err)) from err
    assert isinstance(config, Config)  # the schema's type, by the merge above
    return config


def as_tree(node: Any) -> DictConfig:
    """A typed config, or a piece of it, as a DictConfig (the benchmarks in experiments/ update a copy with
    ``OmegaConf.update``); the package's own code reads the typed config."""
    return node if isinstance(node, DictConfig) else OmegaConf.structured(node)


def _schema_problem(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "the config"
    first = (str(getattr(err, "msg", None) or err).strip().splitlines() or [type(err).__name__])[0]
    return f"{key}: {first} ({type(err).__name__}): fix this setting (its type and default are in autodiff_opt/config.py)"
