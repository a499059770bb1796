"""The whole experiment: load, open or resume the study, search, score on fresh seeds, report.

The orchestration layer: the composed config becomes the typed ``Config`` once (``config.to_config``), and the
layers below get the typed pieces they read (``FinalInputs``, ``SearchConfig``, ``StorageConfig``, ...)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from autodiff_opt.config import Config, SearchConfig, StorageConfig, to_config
from autodiff_opt.core.errors import ConfigError
from autodiff_opt.core.keys import BASELINE_ATTR, ENQUEUED_GENOME_ATTR, PEERS_ATTR, SEEDED_ATTR
from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.metrics.fid import FIDScorer, FIDStats
from autodiff_opt.metrics.reference import check_reference, reference_statistics
from autodiff_opt.arch.runtime import DenoiserRuntime
from autodiff_opt.models.base import DiffusionModel
from autodiff_opt.search.final import FinalInputs, compared_schedules, final_evaluation
from autodiff_opt.core.genome import Genome, GenomeError, validate_timesteps
from autodiff_opt.search import coding
from autodiff_opt.search.fidelity import PEER_COST_ATTR, ImageStepBudget, make_pruner, rung_sizes
from autodiff_opt.search.objective import Objective
from autodiff_opt.search.evolution import SamplerInputs
from autodiff_opt.search.sampler_choice import EVOLUTION_KEYS, SearchSetup, resolve
from autodiff_opt.search.space import SearchSpace, best_fid_trial, fid_of, genome_params
from autodiff_opt.search.lock import study_lock
from autodiff_opt.search.progress import Progress, SearchBudget
from autodiff_opt.search.recovery import fail_dead_local_trials
from autodiff_opt.search.stopping import SearchClock, StopRule, parse_timeout
from autodiff_opt.search.storage_compat import (
    record_heartbeat, set_study_system_attr, study_storage, study_system_attrs, trial_id, trials_without_heartbeat,
    unwrap_storage,
)
from autodiff_opt.search.study import _redact, open_study
from autodiff_opt.solvers import FLOW_HEURISTICS, flow_heuristic_schedule, heuristic_schedule
from autodiff_opt.utils import pick_device

if TYPE_CHECKING:  # report/write.py is imported when the report is written (it pulls in the figures)
    from autodiff_opt.report.write import ReportInputs

log = logging.getLogger(__name__)



@dataclass
class Experiment:
    """Everything a search needs, built once per process."""

    cfg: Config  # the typed config (config.to_config), built once
    model: DiffusionModel
    scorer: FIDScorer
    reference: FIDStats
    space: SearchSpace
    generator: ImageGenerator
    samples: SampleSet
    baselines: dict[str, Genome] = field(default_factory=dict)
    setup: SearchSetup | None = None
    peers: dict[str, Genome] = field(default_factory=dict)  # peer methods' schedules (filled once the study is open)
    stage2: Any = None  # Stage2Policy when search.stage2.enabled
    layer_costs: Any = None  # arch.LayerCosts when search.stage2.enabled
    caches: dict[str, tuple[str, Genome]] = field(default_factory=dict)  # row name -> (diffusers cache, schedule)

    @property
    def multi_objective(self) -> bool:
        return self.stage2 is not None and bool(self.cfg.search.stage2.multi_objective)

    @property
    def search_setup(self) -> SearchSetup:
        return self.setup if self.setup is not None else resolve(self.cfg.search)

    def all_baselines(self) -> dict[str, Genome]:
        """Heuristic and user schedules, then the peers' (what the search is compared against)."""
        return compared_schedules(self.baselines, self.peers)

    def final_inputs(self) -> FinalInputs:
        """What the final comparison (and the report's grids) read of the experiment."""
        return FinalInputs(self.generator, self.scorer, self.reference, self.model, self.cfg.final,
                           search_seed=int(self.cfg.search.seed), search_samples=int(self.cfg.search.num_samples),
                           baselines=dict(self.baselines), peers=dict(self.peers), caches=dict(self.caches),
                           budget=self.stage2.budget if self.stage2 is not None else None,
                           layer_costs=self.layer_costs)

    def report_inputs(self) -> ReportInputs:
        """What the report reads of the experiment (after the search: the peers are known)."""
        from autodiff_opt.report.provenance import settings_yaml
        from autodiff_opt.report.write import ReportInputs

        cfg = self.cfg
        return ReportInputs(self.final_inputs(), self.generator.runtime.layer_names, cfg.model, cfg.solver, cfg.report,
                            skip_units=str(cfg.search.stage2.units), search_solvers=tuple(cfg.search.solvers),
                            storage_url=str(cfg.storage.url), settings_yaml=settings_yaml(cfg))

    def params_of(self, genome: Genome) -> dict[str, Any]:
        """The trial params a sampler asks for this genome (to enqueue it)."""
        if self.search_setup.evolutionary:
            return genome_params(genome, self.space)
        return coding.params_of(genome, self.space.num_train_timesteps)


def heuristic_steps(name: str, k: int, T: int, alphas_cumprod: Any, shift: float = 1.0,
                    dynamic_shift: bool = False) -> list[int]:
    """A heuristic schedule of k steps: a flow one (with the model's shift) or a VP one (on alpha_bar)."""
    if name in FLOW_HEURISTICS:
        return list(flow_heuristic_schedule(name, k, T, shift, dynamic_shift))
    return list(heuristic_schedule(name, k, alphas_cumprod))


def baseline_genomes(search: SearchConfig, alphas_cumprod: Any, T: int, shift: float = 1.0,
                     dynamic_shift: bool = False) -> dict[str, Genome]:
    """Heuristic schedules at the search's K (flow_* ones with the flow model's shift), then the user's own
    schedules (validated). With the solver gene, every heuristic with every listed solver at its K for the
    NFE budget ("karras@ipndm"), and the user's schedules with every listed solver whose K they have."""
    space = SearchSpace(search.num_steps, T, solvers=tuple(search.solvers))
    solvers: list[str | None] = list(space.solvers) or [None]
    out: dict[str, Genome] = {}
    for name in search.baselines:
        for solver in solvers:
            k = space.steps_for(solver)
            steps = heuristic_steps(name, k, T, alphas_cumprod, shift, dynamic_shift)
            out[name if solver is None else f"{name}@{solver}"] = Genome.from_steps(steps, solver=solver)
    for i, steps in enumerate(search.schedules):
        steps = [int(t) for t in steps]
        try:
            validate_timesteps(steps, T)
        except GenomeError as err:
            raise ConfigError(f"search.schedules[{i}]={steps}: {err}") from err
        for solver in solvers:
            if len(steps) == space.steps_for(solver):
                out[f"user{i}" if solver is None else f"user{i}@{solver}"] = Genome(tuple(steps), solver=solver)
    return out


def with_solvers(genomes: dict[str, Genome], space: SearchSpace) -> dict[str, Genome]:
    """Solver-less schedules (peers) with every listed solver whose K they have (no-op without the gene)."""
    if not space.solvers:
        return genomes
    return {f"{name}@{s}": g.with_solver(s) for name, g in genomes.items() for s in space.solvers
            if g.solver is None and g.num_steps == space.steps_for(s)}


def import_plugins(modules: list[str]) -> None:
    """Import user modules named in `imports` (they may register feature extractors with torch-fidelity)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"imports: cannot import {name!r} ({err}): check the name and PYTHONPATH") from err


def build_experiment(cfg: Config | DictConfig) -> Experiment:
    """The experiment of the typed config (a composed one is converted first: tests and benchmarks pass it)."""
    from autodiff_opt.models.factory import build_model
    from autodiff_opt.preflight import check_feature_layer

    cfg = to_config(cfg)
    import_plugins(list(cfg.imports))
    check_feature_layer(cfg.metric.feature_extractor, cfg.metric.feature_layer)
    device = pick_device(cfg.device)
    model = build_model(cfg.model, device, cfg.cache_dir)
    T = model.num_train_timesteps
    if cfg.search.num_steps > T:
        raise ConfigError(f"search.num_steps={cfg.search.num_steps} exceeds the model's T={T}: use K <= T")
    baselines = baseline_genomes(cfg.search, model.alphas_cumprod, T, getattr(model, "shift", 1.0),
                                 getattr(model, "dynamic_shift", False))
    scorer = FIDScorer(cfg.metric.feature_extractor, cfg.metric.feature_layer, cfg.metric.weights_path,
                       device=device, batch_size=cfg.metric.batch_size, allow_download=cfg.metric.allow_download)
    image_shape = (3 if model.decode is not None else model.sample_shape[0], *model.sample_shape[1:])
    reference = reference_statistics(cfg.dataset.reference, scorer, cfg.cache_dir, cfg.dataset.max_images)
    check_reference(reference, scorer, image_shape, cfg.dataset.reference)
    generator = ImageGenerator(model, cfg.solver.name, cfg.solver.clip_x0, cfg.search.batch_size, cfg.precision,
                               compile=str(cfg.compile), cuda_graphs=bool(cfg.cuda_graphs),
                               compile_scope="layers" if cfg.search.stage2.enabled else "unet",
                               units=cfg.search.stage2.units)  # its runtime: stage 2, compiled layers, export
    samples = SampleSet.draw(cfg.search.num_samples, model.sample_shape, model.num_classes, cfg.search.seed)
    space = SearchSpace(cfg.search.num_steps, T, solvers=tuple(cfg.search.solvers))
    stage2: dict[str, Any] = stage2_setup(cfg.search, cfg.cache_dir, generator.runtime) if cfg.search.stage2.enabled else {}
    return Experiment(cfg, model, scorer, reference, stage2.pop("space", space), generator, samples, baselines,
                      setup=resolve(cfg.search), **stage2)


def stage2_setup(search: SearchConfig, cache_dir: str, runtime: DenoiserRuntime) -> dict[str, Any]:
    """Stage 2's part of the experiment, built once: per-layer FLOPs measured, the budget, K widened to
    what the budget may buy, the cache baselines (``Experiment`` fields space, stage2, layer_costs, caches)."""
    from autodiff_opt.arch.budget import Budget
    from autodiff_opt.arch.flops import measure_model_costs
    from autodiff_opt.search.stage2 import Stage2Policy, warn_if_no_skips

    model = runtime.model
    s2, K, T = search.stage2, search.num_steps, model.num_train_timesteps
    costs = measure_model_costs(model, runtime.skipper, cache_path=Path(cache_dir).expanduser() / "layer_costs.json")
    k_max = min(K + s2.max_extra_steps, T)
    if s2.budget_layers is not None:
        budget = Budget.from_layer_count(len(costs.names), int(s2.budget_layers))
    elif s2.multi_objective:  # cost is an objective: the budget only bounds it at k_max full steps
        budget = costs.budget(float(k_max))
    else:
        budget = costs.budget(float(s2.budget_flops or K))
    log.info("stage 2: %d layers, budget %.2f full steps (%s), K in [1, %d]", len(costs.names),
             budget.full_steps, budget.unit, k_max)
    warn_if_no_skips(s2.max_prun, len(costs.names))
    return {"space": SearchSpace(K, T, k_min=1, k_max=k_max), "layer_costs": costs,
            "stage2": Stage2Policy(budget, s2.max_prun, s2.ramp_steps, s2.start_generation, s2.patience,
                                   min_steps=1, max_steps=k_max),
            "caches": cache_baselines(search, model, k_max)}


def cache_baselines(search: SearchConfig, model: DiffusionModel, num_steps: int) -> dict[str, tuple[str, Genome]]:
    """search.stage2.caches on the first heuristic baseline at ``num_steps`` (the most steps the search may
    use): ``"flow_default+taylorseer": ("taylorseer", genome)``. Transformer denoisers only."""
    from autodiff_opt.arch.layers import is_transformer

    names = list(search.stage2.caches or [])
    if not names:
        return {}
    if not is_transformer(model.denoiser):
        raise ConfigError(f"search.stage2.caches={names}: diffusers' caches hook transformer blocks; this model's"
                          f" denoiser is a {type(model.denoiser).__name__}: set search.stage2.caches=[]")
    if not search.baselines:
        raise ConfigError("search.stage2.caches needs a heuristic schedule to run on: list one in search.baselines")
    base = str(search.baselines[0])
    steps = heuristic_steps(base, num_steps, model.num_train_timesteps, model.alphas_cumprod,
                            getattr(model, "shift", 1.0), getattr(model, "dynamic_shift", False))
    return {f"{base}+{name}": (str(name), Genome.from_steps(steps)) for name in names}


RESUME_MAY_CHANGE = (  # settings that do not change what a candidate's FID means
    "model.name", "model.source_hint", "model.decode_batch_size", "dataset.name", "dataset.source_hint",
    "metric.batch_size", "metric.allow_download", "search.batch_size", "search.generations", "search.budget",
    "search.max_consecutive_failures", "search.baselines", "search.schedules", "search.peers",
    "search.peer_samples", "search.peer_grid", "search.pool_size", "search.stage2.start_generation",
    "search.stage2.patience", "search.stop", "search.patience", "search.patience_candidates", "search.timeout",
)
SIGNATURE_TREES = ("model", "dataset", "solver", "metric", "search", "precision")


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def study_signature(cfg: Config | DictConfig, space: SearchSpace) -> dict[str, Any]:
    """What must match for a study to be resumed: every setting of the config trees that define the
    objective and the search (model, dataset, solver, metric, search, precision), after the sampler's
    defaults are applied, except the short list RESUME_MAY_CHANGE. A new setting is covered by default."""
    flat = config_signature(cfg)
    flat.update({"num_steps": space.num_steps, "num_train_timesteps": space.num_train_timesteps})
    return flat


def _signature_trees(cfg: Config | DictConfig) -> dict[str, Any]:
    """SIGNATURE_TREES as plain values, of the typed Config or of a composed tree (workers compose without a
    Hydra run, where output_dir does not resolve, so they cannot build the whole Config). The same values:
    tests/test_typed_config.py checks it on every shipped experiment."""
    if isinstance(cfg, Config):
        return {k: asdict(v) if is_dataclass(v) else v for k in SIGNATURE_TREES for v in [getattr(cfg, k)]}
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
            for k in SIGNATURE_TREES}


def config_signature(cfg: Config | DictConfig) -> dict[str, Any]:
    """The config's part of ``study_signature`` (all of it but what the loaded model adds)."""
    trees = _signature_trees(cfg)
    flat = {k: v for k, v in _flatten(trees, "").items() if k not in RESUME_MAY_CHANGE}
    setup = resolve(cfg.search)
    flat.update({f"search.{k}": getattr(setup.evolution, k) for k in EVOLUTION_KEYS})
    flat.update({"search.prune": setup.prune, "search.rungs": list(setup.rung_fractions) if setup.prune else []})
    if not cfg.search.stage2.enabled:  # stage-2 settings mean nothing without stage 2
        flat = {k: v for k, v in flat.items() if not k.startswith("search.stage2.") or k == "search.stage2.enabled"}
    return flat


def study_name_of(cfg: Config | DictConfig) -> str:
    """storage.study_name, or (null) a name of what the study's signature protects: model, solver(s), K,
    sampler (and stage 2) to read, then a short hash of the whole signature, so two runs whose objective or
    search differ never meet in one study by accident, while a rerun of the same settings resumes it."""
    if cfg.storage.study_name:
        return str(cfg.storage.study_name)
    import hashlib
    import json

    solvers = "+".join(str(s) for s in cfg.search.solvers) or str(cfg.solver.name)
    parts = [str(cfg.model.name), solvers, f"k{cfg.search.num_steps}", resolve(cfg.search).sampler]
    if cfg.search.stage2.enabled:
        parts.append("stage2")
    digest = hashlib.sha256(json.dumps(config_signature(cfg), sort_keys=True, default=str).encode()).hexdigest()[:6]
    return "-".join([*parts, digest])




def peer_clip_x0(exp: Experiment) -> bool:
    """The DP's first-order jumps clip x0 to the data range for pixel models whatever the solver does:
    unclipped, x0 = x / sqrt(alpha_bar) explodes near t = T and the DP degenerates (digits, DPM-Solver++:
    [999, 989, 969, 888], FID 24). Latents have no fixed range: there the solver's setting is kept."""
    return True if exp.model.decode is None else bool(exp.cfg.solver.clip_x0)


def compute_peers(study: optuna.Study, exp: Experiment) -> dict[str, Genome]:
    """The peer schedules, computed once per study and kept in it (their cost counts in the budget)."""
    from autodiff_opt.search.peers import ays_schedule, trajectory_dp

    attrs = study_system_attrs(study)
    if PEERS_ATTR in attrs:
        return with_solvers({name: Genome.from_json(g) for name, g in attrs[PEERS_ATTR].items()}, exp.space)
    cfg, out, cost = exp.cfg, {}, 0
    if "gits_dp" in cfg.search.peers:
        peer = trajectory_dp(exp.generator, exp.space.num_steps, cfg.search.peer_samples, cfg.search.peer_grid,
                             seed=cfg.search.seed + 1, clip_x0=peer_clip_x0(exp))
        out[peer.name], cost = peer.genome, cost + peer.image_steps
    if "ays" in cfg.search.peers:
        if cfg.model.prompts is not None:  # AYS publishes schedules for Stable Diffusion, not for other models
            out["ays"] = ays_schedule(exp.space.num_steps, exp.model.alphas_cumprod)
        else:
            log.info("peer ays: published for Stable Diffusion only; not used for %s", cfg.model.name)
    set_study_system_attr(study, PEERS_ATTR, {k: g.to_json() for k, g in out.items()})
    set_study_system_attr(study, PEER_COST_ATTR, cost)
    return with_solvers(out, exp.space)


def seed_study(study: optuna.Study, exp: Experiment) -> None:
    """Enqueue the heuristic, user and peer schedules once, as the first candidates of generation 0."""
    if study_system_attrs(study).get(SEEDED_ATTR):
        return
    for name, genome in exp.all_baselines().items():
        study.enqueue_trial(exp.params_of(genome), skip_if_exists=True,
                            user_attrs={BASELINE_ATTR: name, ENQUEUED_GENOME_ATTR: genome.key()})
    set_study_system_attr(study, SEEDED_ATTR, True)


def _ensure_heartbeats(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
    """A trial killed before its first heartbeat would stay RUNNING forever: give it one to go stale from."""
    storage = unwrap_storage(study_storage(study))
    missing = set(trials_without_heartbeat(storage, [trial_id(t) for t in trials]))
    for t in trials:
        if trial_id(t) in missing:
            log.info("trial %d has no heartbeat (killed at its start): recording one so it can go stale", t.number)
            record_heartbeat(storage, trial_id(t))


def recover_stale_trials(study: optuna.Study, storage: StorageConfig) -> None:
    """RUNNING trials left by killed processes: those of this host whose process is gone are failed and
    queued again at once; the others (live workers', other hosts') keep the heartbeat rule: failed once
    stale, by the stale check Optuna runs before every trial and SearchBudget's while it waits. No waiting
    here (a crash loop shorter than the grace period would make no progress)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return
    fail_dead_local_trials(study, storage.max_retry)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running and storage.heartbeat_interval:
        _ensure_heartbeats(study, running)
        optuna.storages.fail_stale_trials(study)
        log.info("%d trial(s) of other processes still RUNNING: they are retried if their heartbeat goes stale",
                 len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))))


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def make_objective(exp: Experiment) -> Objective:
    setup, T, K = exp.search_setup, exp.space.num_train_timesteps, exp.space.num_steps
    cost_fn = exp.layer_costs.genome_flops if exp.layer_costs is not None else None
    scored = setup.prune or converges(exp)  # the convergence stop measures the noise on the rungs' prefix FIDs
    rungs = rung_sizes(len(exp.samples), setup.rung_fractions) if scored and not exp.multi_objective else []
    genome_fn = None if setup.evolutionary else (lambda trial: coding.suggest(trial, K, T))
    return Objective(exp.generator, exp.scorer, exp.reference, exp.samples, exp.space, cost_fn=cost_fn,
                     cost_objective=exp.stage2.budget.in_full_steps if exp.multi_objective else None,
                     rungs=rungs, genome_fn=genome_fn)


def make_sampler(exp: Experiment, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The configured sampler (seeded by search.seed unless given), built by its spec's factory
    (specs/samplers.py); ours decide under the study lock."""
    from autodiff_opt.search.sampler_choice import make_sampler as build

    setup = exp.search_setup
    anchor = exp.baselines.get("ddim_uniform") or exp.baselines.get("flow_uniform") or next(
        (g for name, g in exp.baselines.items() if name.startswith("ddim_uniform@")), None)
    return build(SamplerInputs(setup.sampler, exp.space, setup.evolution, exp.cfg.search.seed if seed is None else seed,
                               anchor=anchor, stage2=exp.stage2, sensitivity=sensitivity_mapper(exp),
                               pool_size=setup.pool_size))


def sensitivity_mapper(exp: Experiment) -> Any:
    """search.stage2.sensitivity: the map's computer, on a prefix of the search samples."""
    s2 = exp.cfg.search.stage2
    if exp.stage2 is None or not s2.sensitivity:
        return None
    from autodiff_opt.search.sensitivity import SensitivityMapper

    prefix = min(len(exp.samples), max(2, int(round(float(s2.sensitivity_fraction) * len(exp.samples)))))
    return SensitivityMapper(exp.generator, exp.scorer, exp.reference, exp.samples, prefix, exp.stage2.budget.num_layers)


def _stop_rule(study: optuna.Study, exp: Experiment) -> SearchBudget | ImageStepBudget:
    setup, cfg = exp.search_setup, exp.cfg
    if setup.spec.counts == "generations":  # whole generations, waiting for other workers' last trials
        return SearchBudget(setup.evolution.population, setup.generations, poll=max(1, cfg.storage.heartbeat_interval or 1))
    unit = len(exp.samples) * exp.space.num_steps
    return ImageStepBudget(int(round(setup.budget * unit)), unit)


def converges(exp: Experiment) -> bool:
    """search.stop=converged, on a single objective (a Pareto search runs to its budget)."""
    return str(exp.cfg.search.stop) == "converged" and not exp.multi_objective


def stop_rule(study: optuna.Study, exp: Experiment, budget: SearchBudget | ImageStepBudget) -> StopRule:
    """The budget as the ceiling, with the convergence stop and search.timeout (search/stopping.py)."""
    search = exp.cfg.search
    return StopRule(budget, len(exp.samples) * exp.space.num_steps, len(exp.samples), converges(exp),
                    float(search.patience), parse_timeout(search.timeout), SearchClock(study),
                    int(search.patience_candidates))


def run_search(study: optuna.Study, exp: Experiment) -> None:
    cfg = exp.cfg
    budget = _stop_rule(study, exp)
    rule = stop_rule(study, exp, budget)
    if isinstance(budget, ImageStepBudget):
        done, total = budget.spent(study), budget.candidates
    else:
        done, total = _finished(study), budget.total
    if done >= total and not _finished(study):
        from autodiff_opt.preflight import budget_in_force

        raise ConfigError(f"the search budget, {budget_in_force(cfg.search)}, is already spent by the peer schedules"
                          f" ({done:.1f}) before any candidate ran: raise search.budget or set search.peers=[]")
    if (reason := rule.check(study, after_trial=False)) is not None and reason["reason"] != "budget":
        log.info("study %s: search done (%s)", study.study_name, reason["text"])
        return
    # the image-step budget's verdict is the check just made (it holds the study for a queued retry)
    spent = reason is not None if isinstance(budget, ImageStepBudget) else done >= total
    if spent:
        if isinstance(budget, ImageStepBudget):
            log.info("study %s already spent %.1f of %.0f candidate-equivalents: search done", study.study_name, done, total)
        else:
            log.info("study %s already has %d/%d candidates: search done", study.study_name, done, total)
        return
    progress = Progress(budget, done, cfg.search.max_consecutive_failures, cfg.progress,
                        every=exp.search_setup.evolution.population, stop=rule)
    if _finished(study):
        progress.best = fid_of(best_fid_trial(study)) or float("inf")
    if cfg.progress:  # the bar says it all; Optuna's per-trial lines stay in DEBUG
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = make_objective(exp)
    if rule.should_stop(study, after_trial=False):  # every slot taken (others finish them): no new generation
        progress.bar.close()
        return
    try:
        study.optimize(objective, callbacks=[progress], catch=(Exception,), gc_after_trial=False)
    finally:
        progress.bar.close()
        rule.finish()


def prepare_study(cfg: Config | DictConfig) -> tuple[optuna.Study, Experiment]:
    """Checks, the experiment, the study opened (or created), dead trials recovered, peers and baselines
    queued once: everything before the search (what a cluster's study-creator job runs alone)."""
    from autodiff_opt.preflight import run_all

    cfg = to_config(cfg)  # compose -> the typed Config, once: its types and interpolations
    storage = run_all(cfg)  # the one validation pass, then the storage opened (checked), before any model
    exp = build_experiment(cfg)
    study = open_study(storage, study_name_of(cfg), study_signature(cfg, exp.space), make_sampler(exp),
                       num_objectives=2 if exp.multi_objective else 1,
                       pruner=make_pruner(exp.search_setup.prune and not exp.multi_objective,
                                          exp.search_setup.evolution.num_parents))
    log.info("study %s in %s: %d trials so far (sampler %s)", study.study_name, _redact(str(cfg.storage.url)),
             len(study.trials), exp.search_setup.sampler)
    recover_stale_trials(study, cfg.storage)
    with study_lock(study):  # workers starting together compute the peers and enqueue the baselines once
        exp.peers = compute_peers(study, exp)
        seed_study(study, exp)
    return study, exp


def run(cfg: Config | DictConfig) -> pd.DataFrame:
    """The default experiment end to end; returns the final comparison table."""
    from autodiff_opt.report import write_report

    study, exp = prepare_study(cfg)
    t0 = time.perf_counter()
    run_search(study, exp)
    log.info("search took %.1fs", time.perf_counter() - t0)
    table = final_evaluation(study, exp.final_inputs()) if exp.cfg.final.enabled else None
    out_dir = Path(exp.cfg.output_dir)
    write_report(study, exp.report_inputs(), table, out_dir)
    return table if table is not None else pd.DataFrame()
