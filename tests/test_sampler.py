"""The evolutionary sampler: invariants, generation accounting, storage-held state, Optuna's interfaces."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autodiff_opt.core.genome import Genome, GenomeError
from autodiff_opt.search.evolution import PARENT_CACHE_PREFIX, AutoDiffusionPaperSampler, EvolutionConfig, count_by_generation, genome_of
from autodiff_opt.search.study import make_storage
from autodiff_opt.search.space import GENERATION_ATTR, OPERATOR_ATTR, SLOT_ATTR, SearchSpace, genome_params, suggest_genome

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = SearchSpace(num_steps=4, num_train_timesteps=1000)
SMALL = EvolutionConfig(population=10, num_parents=4, num_mutants=5, num_crossovers=3, init_random=4)
TARGET = (900, 600, 300, 50)


def distance(genome: Genome) -> float:
    return float(sum(abs(a - b) for a, b in zip(genome.timesteps, TARGET)))


def objective(trial: optuna.Trial) -> float:
    return distance(suggest_genome(trial, SPACE))


def make_study(storage: str | None = None, evolution: EvolutionConfig = SMALL, seed: int = 0) -> optuna.Study:
    sampler = AutoDiffusionPaperSampler(SPACE, evolution, anchor=Genome((750, 500, 250, 0)), seed=seed)
    return optuna.create_study(sampler=sampler, storage=storage, direction="minimize")


def test_invariants_and_generation_accounting() -> None:
    study = make_study()
    study.enqueue_trial(genome_params(Genome((999, 749, 499, 249)), SPACE))
    study.optimize(objective, n_trials=60)
    genomes = [genome_of(t) for t in study.trials]
    assert all(g is not None for g in genomes)
    for g in genomes:
        assert len(set(g.timesteps)) == 4 and all(0 <= t < 1000 for t in g.timesteps)
        assert list(g.timesteps) == sorted(g.timesteps, reverse=True)
    assert len({g.key() for g in genomes}) == 60, "an already-seen genome was evaluated again"
    assert count_by_generation(study) == {g: 10 for g in range(6)}
    for g in range(6):
        slots = sorted(t.system_attrs[SLOT_ATTR] for t in study.trials if t.system_attrs[GENERATION_ATTR] == g)
        assert slots == list(range(10))
    ops = Counter(t.system_attrs[OPERATOR_ATTR] for t in study.trials if t.system_attrs[GENERATION_ATTR] >= 1)
    assert ops["mutation"] + ops["crossover"] + ops["random"] == 50 and ops["mutation"] >= 25
    first = study.trials[0]
    assert first.system_attrs[OPERATOR_ATTR] == "enqueued" and genome_of(first).timesteps == (999, 749, 499, 249)
    # the names a study stores (reports and lineage show them; older studies hold the same ones), stage 1 only
    gen0 = [t.system_attrs[OPERATOR_ATTR] for t in study.trials if t.system_attrs[GENERATION_ATTR] == 0]
    assert gen0 == ["enqueued"] + ["anchor_mutation"] * 5 + ["random"] * 4
    assert {t.system_attrs["autodiff:stage"] for t in study.trials} == {1}


def test_evolution_beats_random_search_on_a_known_objective() -> None:
    evolved = make_study(evolution=EvolutionConfig())
    evolved.optimize(objective, n_trials=300)
    randoms = []
    for seed in range(3):
        rnd = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        rnd.optimize(lambda t: distance(Genome.from_steps(t.suggest_int(f"t{i}", 0, 999) for i in range(4))), n_trials=300)
        randoms.append(rnd.best_value)
    assert evolved.best_value < 0.5 * min(randoms)


def test_parents_are_top_k_of_earlier_generations_and_cached_in_storage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = make_study(url)
    study.optimize(objective, n_trials=25)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    cached = attrs[f"{PARENT_CACHE_PREFIX}1"]
    gen0 = [t for t in study.trials if t.system_attrs[GENERATION_ATTR] == 0]
    assert cached == [t.number for t in sorted(gen0, key=lambda t: (t.value, t.number))[:4]]
    for t in study.trials:
        if t.system_attrs[OPERATOR_ATTR] == "mutation":
            parent = t.system_attrs["autodiff:parents"][0]
            assert parent in attrs[f"{PARENT_CACHE_PREFIX}{t.system_attrs[GENERATION_ATTR]}"]


def test_ask_tell_interface_and_failed_trials_free_their_slot() -> None:
    study = make_study()
    for i in range(12):
        trial = study.ask()
        genome = suggest_genome(trial, SPACE)
        if i == 3:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, distance(genome))
    counts = count_by_generation(study)
    assert counts == {0: 10, 1: 1}
    gen0_slots = sorted(t.system_attrs[SLOT_ATTR] for t in study.get_trials(states=(TrialState.COMPLETE,))
                        if t.system_attrs[GENERATION_ATTR] == 0)
    assert gen0_slots == list(range(10))


def test_resume_in_new_process_objects_continues_generations(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    make_study(url).optimize(objective, n_trials=15)
    sampler = AutoDiffusionPaperSampler(SPACE, SMALL, anchor=Genome((750, 500, 250, 0)), seed=0)
    resumed = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url, sampler=sampler)
    resumed.optimize(objective, n_trials=15)
    assert count_by_generation(resumed) == {0: 10, 1: 10, 2: 10}
    assert len({genome_of(t).key() for t in resumed.trials}) == 30


def test_same_seed_gives_same_candidates() -> None:
    a, b = make_study(seed=7), make_study(seed=7)
    a.optimize(objective, n_trials=25)
    b.optimize(objective, n_trials=25)
    assert [genome_of(t).key() for t in a.trials] == [genome_of(t).key() for t in b.trials]


def test_retry_of_a_stale_trial_keeps_genome_generation_and_slot(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = make_storage(url, heartbeat_interval=1, grace_period=1)
    sampler = AutoDiffusionPaperSampler(SPACE, SMALL, anchor=Genome((750, 500, 250, 0)), seed=0)
    study = optuna.create_study(storage=storage, sampler=sampler)
    study.optimize(objective, n_trials=3)
    dead = study.ask()  # a worker that dies: RUNNING, no heartbeat ever recorded after this
    storage.record_heartbeat(dead._trial_id)
    import time

    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    retry = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert len(retry) == 1
    study.optimize(objective, n_trials=1)
    original = study.trials[dead.number]
    redone = study.trials[retry[0].number]
    assert original.state == TrialState.FAIL and redone.state == TrialState.COMPLETE
    for key in ("autodiff:genome", GENERATION_ATTR, SLOT_ATTR):
        assert redone.system_attrs[key] == original.system_attrs[key]


def test_genome_validation_messages() -> None:
    with pytest.raises(GenomeError, match="not strictly descending"):
        Genome((1, 2)).validate(1000)
    with pytest.raises(GenomeError, match="more than once"):
        Genome((5, 5)).validate(1000)
    with pytest.raises(GenomeError, match="outside"):
        Genome((1000, 5)).validate(1000)
    with pytest.raises(GenomeError, match="K <= T"):
        Genome(tuple(range(20, 0, -1))).validate(10)
    assert Genome.from_json(Genome.from_steps([3, 9], [[1], []]).key()) == Genome((9, 3), (frozenset(), frozenset({1})))


def test_sampler_refuses_maximize() -> None:
    study = optuna.create_study(sampler=AutoDiffusionPaperSampler(SPACE, SMALL, seed=0), direction="maximize")
    with pytest.raises(ValueError, match="minimi"):
        study.optimize(objective, n_trials=1)


def test_enqueued_trials_take_the_genome_stored_with_them() -> None:
    """The seeding stores each baseline's genome with its trial (masks and all); a trial a user enqueued with
    plain params gets the genome of those params."""
    from autodiff_opt.core.keys import ENQUEUED_GENOME_ATTR
    from autodiff_opt.search.space import GENOME_ATTR

    study = make_study()
    seeded = Genome.from_steps([900, 600, 300, 50], [[1], [], [0, 2], []])
    plain = Genome((800, 500, 200, 10))
    study.enqueue_trial(genome_params(seeded, SPACE), user_attrs={ENQUEUED_GENOME_ATTR: seeded.key()})
    study.enqueue_trial(genome_params(plain, SPACE))
    first, second = study.ask(), study.ask()
    stored = [Genome.from_json(t.storage.get_trial_system_attrs(t._trial_id)[GENOME_ATTR]) for t in (first, second)]
    assert stored == [seeded, plain] and stored[0].has_skips
    assert [study._storage.get_trial_system_attrs(t._trial_id)[OPERATOR_ATTR] for t in (first, second)] == ["enqueued"] * 2
