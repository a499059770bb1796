"""The search space, the genome <-> Optuna trial mapping, and the study's signature."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import optuna

from autodiff_opt.core.genome import Genome
from autodiff_opt.core.keys import GENERATION_ATTR, GENOME_ATTR, OPERATOR_ATTR, PARENTS_ATTR, SIGNATURE_ATTR, SLOT_ATTR, STAGE_ATTR
from autodiff_opt.search.storage_compat import trial_id



@dataclass(frozen=True)
class SearchSpace:
    """K time steps out of T; k_min/k_max > K only in stage 2, where a compute budget may buy steps.

    With ``solvers`` (the solver gene, search/solver_gene.py) num_steps is the NFE budget of every candidate
    and each solver gets the steps that fit it (``steps_for``).
    """

    num_steps: int
    num_train_timesteps: int
    k_min: int | None = None
    k_max: int | None = None
    solvers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.num_steps <= self.num_train_timesteps:
            raise ValueError(
                f"search.num_steps={self.num_steps} must be between 1 and T={self.num_train_timesteps}"
            )

    def steps_for(self, solver: str | None) -> int:
        """K of a candidate with this solver: num_steps, or the steps that fit the NFE budget (solver gene)."""
        if not self.solvers or solver is None:
            return self.num_steps
        from autodiff_opt.solvers import steps_for_nfe

        return steps_for_nfe(solver, self.num_steps)

    @property
    def min_steps(self) -> int:
        if self.solvers:
            return min(self.steps_for(s) for s in self.solvers)
        return self.k_min or self.num_steps

    @property
    def max_steps(self) -> int:
        if self.solvers:
            return max(self.steps_for(s) for s in self.solvers)
        return self.k_max or self.num_steps

    @property
    def variable_k(self) -> bool:
        """K is a gene of its own (stage 2); with the solver gene K follows the solver instead."""
        return not self.solvers and self.min_steps != self.max_steps

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SOLVER_PARAM = "solver"  # the solver gene's trial param (a categorical over search.solvers)


def step_param(i: int) -> str:
    return f"t{i}"


def genome_params(genome: Genome, space: SearchSpace) -> dict[str, int]:
    """The Optuna params of a genome: t0..t{K-1} (descending), plus num_steps when K varies."""
    params: dict[str, Any] = {step_param(i): t for i, t in enumerate(genome.timesteps)}
    if space.variable_k:
        params["num_steps"] = genome.num_steps
    if space.solvers:
        params[SOLVER_PARAM] = genome.solver
    return params


def genome_from_params(params: dict[str, Any], space: SearchSpace, skips: list[list[int]] | None = None) -> Genome:
    solver = params.get(SOLVER_PARAM) if space.solvers else None
    k = int(params.get("num_steps", space.steps_for(solver)))
    steps = [int(params[step_param(i)]) for i in range(k)]
    return Genome.from_steps(steps, skips, solver)


def fid_of(trial: optuna.trial.FrozenTrial) -> float | None:
    """The FID of a finished trial (the first objective; the second, in multi-objective mode, is cost)."""
    values = trial.values
    return float(values[0]) if values else None


def best_fid_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The completed trial with the lowest FID (single- or multi-objective study)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if fid_of(t) is not None]
    if not done:
        raise RuntimeError(f"study {study.study_name!r} has no completed candidate yet")
    return min(done, key=lambda t: (fid_of(t), t.number))


def pareto_front(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Completed trials no other trial beats on every objective (all minimised), sorted by the last objective."""
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values]
    front = [t for t in done if not any(
        all(b <= a for a, b in zip(t.values, u.values)) and any(b < a for a, b in zip(t.values, u.values)) for u in done)]
    return sorted(front, key=lambda t: (t.values[-1], t.values[0]))


def pareto_ranks(trials: list[optuna.trial.FrozenTrial]) -> dict[int, int]:
    """Non-dominated sorting: trial number -> front index (0 = Pareto front)."""
    remaining, ranks, rank = list(trials), {}, 0
    while remaining:
        front = pareto_front(remaining)
        for t in front:
            ranks[t.number] = rank
        numbers = {t.number for t in front}
        remaining = [t for t in remaining if t.number not in numbers]
        rank += 1
    return ranks


def trial_system_attrs(trial: optuna.trial.Trial | optuna.trial.FrozenTrial) -> dict[str, Any]:
    if isinstance(trial, optuna.trial.FrozenTrial):
        return trial.system_attrs
    return trial.storage.get_trial_system_attrs(trial_id(trial))


def suggest_genome(trial: optuna.trial.Trial, space: SearchSpace, stored_genome: Genome | None = None) -> Genome:
    """Ask the trial for its genome: the params make it visible in the dashboard, the masks come from attrs
    (or from ``stored_genome``, the genome the sampler of this process just stored for the trial)."""
    solver = trial.suggest_categorical(SOLVER_PARAM, list(space.solvers)) if space.solvers else None
    k = trial.suggest_int("num_steps", space.min_steps, space.max_steps) if space.variable_k else space.steps_for(solver)
    T = space.num_train_timesteps
    steps = [trial.suggest_int(step_param(i), 0, T - 1) for i in range(k)]
    saved = stored_genome
    if saved is None and (stored := trial_system_attrs(trial).get(GENOME_ATTR)) is not None:
        saved = Genome.from_json(stored)
    skips = None
    if saved is not None:
        if list(saved.timesteps) == sorted(steps, reverse=True):
            skips = [sorted(s) for s in saved.skips]
    if skips is None and "skips" in trial.user_attrs:  # an enqueued stage-2 candidate
        skips = trial.user_attrs["skips"]
    return Genome.from_steps(sorted(steps, reverse=True), skips, solver).validate(T)
