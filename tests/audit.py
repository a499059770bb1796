"""What the many-worker tests and experiments/bench_storage.py count in a study: complete trials per
generation, the overshoot past the last generation, genomes evaluated twice, slots taken twice, retries."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.study import Study
from optuna.trial import TrialState

from autodiff_opt.core.keys import GENERATION_ATTR, GENOME_ATTR, RETRY_OF_ATTR, SLOT_ATTR


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


def assert_lost_worker_recovered(study: Study, number: int, genome: Any, run_dir: Path, generations: int,
                                 population: int, overshoot: int) -> Any:
    """A search that lost the worker evaluating trial ``number`` (a genome) still ended as an intact one: its
    budget spent, no genome completed twice, that trial failed and retried once with the same genome, nothing
    left running, the final table written once. Returns the retry."""
    a = audit(study, generations)
    assert a.generations_complete(population, generations), a  # the budget is spent
    assert a.duplicate_genomes == 0 and a.overshoot <= overshoot, a  # no genome completed twice
    assert study.trials[number].state == TrialState.FAIL, a
    retries = [t for t in study.trials if t.system_attrs.get(RETRY_OF_ATTR) == number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, a
    assert retries[0].system_attrs[GENOME_ATTR] == genome
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING}, a
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("final.csv")) == ["final.csv"]
    assert "autodiff:final" in study.user_attrs
    return retries[0]
