"""What the many-worker tests and experiments/bench_storage.py count in a study: complete trials per
generation, the overshoot past the last generation, genomes evaluated twice, slots taken twice, retries;
and, for the default sampler (a budget of image-steps, not whole generations), the candidate-equivalents
spent."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autodiff_opt.core.keys import GENERATION_ATTR, GENOME_ATTR, IMAGE_STEPS_ATTR, RETRY_OF_ATTR, SLOT_ATTR

EVALUATED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class Audit:
    states: dict[str, int]
    complete_by_generation: dict[int, int]
    overshoot: int  # COMPLETE trials in generations >= G
    duplicate_genomes: int  # COMPLETE evaluations of a genome beyond the first
    duplicate_slots: int  # COMPLETE trials sharing (generation, slot) with an earlier one
    retries: list[tuple[int, int]] = field(default_factory=list)  # (failed trial, its retry)
    untracked: int = 0  # trials without a generation (not made by the sampler)

    def generations_complete(self, population: int, generations: int) -> bool:
        return all(self.complete_by_generation.get(g, 0) == population for g in range(generations))


def audit(study: Study, generations: int | None = None) -> Audit:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    by_generation = Counter(t.system_attrs.get(GENERATION_ATTR) for t in complete)
    untracked = by_generation.pop(None, 0)
    genomes = Counter(t.system_attrs.get(GENOME_ATTR) for t in complete)
    slots = Counter((t.system_attrs.get(GENERATION_ATTR), t.system_attrs.get(SLOT_ATTR)) for t in complete)
    retries = [(int(t.system_attrs[RETRY_OF_ATTR]), t.number) for t in trials if RETRY_OF_ATTR in t.system_attrs]
    overshoot = sum(n for g, n in by_generation.items() if generations is not None and g >= generations)
    return Audit(
        states=dict(Counter(t.state.name for t in trials)),
        complete_by_generation=dict(sorted(by_generation.items())),
        overshoot=overshoot,
        duplicate_genomes=sum(n - 1 for n in genomes.values() if n > 1),
        duplicate_slots=sum(n - 1 for n in slots.values() if n > 1),
        retries=retries,
        untracked=untracked,
    )


def spent(study: Study, num_samples: int, num_steps: int, nfe: Callable[[FrozenTrial], int] | None = None) -> float:
    """Candidate-equivalents the finished trials spent, from each trial's own record: a complete candidate
    costs its samples x steps, a pruned one its last rung's prefix x steps (counted here, not read from the
    stop rule), checked against the image-steps the trial stored; a failed one what it stored (none if killed).
    ``nfe``: a trial's network evaluations per sample where they differ from num_steps (the solver gene)."""
    total = 0
    for t in study.get_trials(deepcopy=False, states=(*EVALUATED, TrialState.FAIL)):
        if t.state == TrialState.FAIL:
            total += int(t.user_attrs.get(IMAGE_STEPS_ATTR, 0))
            continue
        images = num_samples if t.state == TrialState.COMPLETE else max(t.intermediate_values)
        steps = nfe(t) if nfe is not None else num_steps
        assert t.user_attrs[IMAGE_STEPS_ATTR] == images * steps, (t.number, t.state, t.user_attrs)
        total += images * steps
    return total / (num_samples * num_steps)


def assert_budget_spent(study: Study, budget: float, num_samples: int, num_steps: int, workers: int = 1,
                        nfe: Callable[[FrozenTrial], int] | None = None) -> float:
    """The default sampler's stop: the budget is spent and each worker went at most one candidate past it;
    no genome was evaluated twice (complete or pruned). Returns the candidate-equivalents spent."""
    used = spent(study, num_samples, num_steps, nfe)
    assert budget <= used < budget + workers, (used, budget, workers)
    genomes = Counter(t.system_attrs[GENOME_ATTR] for t in study.get_trials(deepcopy=False, states=EVALUATED))
    assert max(genomes.values()) == 1, [g for g, n in genomes.items() if n > 1]
    return used


def assert_lost_worker_recovered(study: Study, number: int, genome: Any, run_dir: Path, budget: float,
                                 num_samples: int, num_steps: int, workers: int) -> Any:
    """A search that lost the worker evaluating trial ``number`` (a genome) still ended as an intact one: its
    budget spent, no genome evaluated twice, that trial failed and retried once with the same genome, nothing
    left running, the final table written once. Returns the retry."""
    assert_budget_spent(study, budget, num_samples, num_steps, workers)
    a = audit(study)
    assert study.trials[number].state == TrialState.FAIL, a
    retries = [t for t in study.trials if t.system_attrs.get(RETRY_OF_ATTR) == number]
    assert len(retries) == 1 and retries[0].state in EVALUATED, a
    assert retries[0].system_attrs[GENOME_ATTR] == genome
    assert {t.state for t in study.trials} <= {*EVALUATED, TrialState.FAIL, TrialState.WAITING}, a
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("final.csv")) == ["final.csv"]
    assert "autodiff:final" in study.user_attrs
    return retries[0]
