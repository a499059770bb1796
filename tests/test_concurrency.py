"""The pieces many workers rely on, one at a time: URLs, the study lock, journal heartbeats, the end of a
search, orphan recovery, the slot rule, audits. (The processes themselves: tests/test_workers.py.)

Where they live: search/study.py (storages, journal heartbeats), search/lock.py (the lock),
search/evolution.py (the locked decision, the slot rule), search/recovery.py (owners, dead and orphaned
trials), search/progress.py (the end of a search), tests/audit.py (the audit)."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState, create_trial

import cheap_worker as cw
from audit import audit
from autodiff_opt.core.keys import HEARTBEAT_ATTR, OWNER_ATTR
from autodiff_opt.search.lock import study_lock
from autodiff_opt.search.progress import SearchBudget, budget_status
from autodiff_opt.search.recovery import fail_dead_local_trials, fail_orphaned_trials, process_start, this_host
from autodiff_opt.search.evolution import count_by_generation, next_slot
from autodiff_opt.search.sampler_choice import builtin_sampler
from autodiff_opt.search.space import GENERATION_ATTR, GENOME_ATTR, SLOT_ATTR
from autodiff_opt.search.study import HeartbeatJournalStorage, journal_storage, make_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def frozen(state: TrialState, generation: int | None, slot: int | None, genome: str = "g", value: float = 1.0,
           **attrs: object) -> optuna.trial.FrozenTrial:
    system = {**attrs}
    if generation is not None:
        system.update({GENERATION_ATTR: generation, SLOT_ATTR: slot, GENOME_ATTR: genome})
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None, system_attrs=system,
                        params={"t0": 1}, distributions={"t0": IntDistribution(0, 999)})


# --- URLs ------------------------------------------------------------------------------------------
def test_a_bare_postgresql_url_opens_a_real_server_with_psycopg_3(pg_url: str) -> None:
    assert pg_url.startswith("postgresql://")
    storage = make_storage(pg_url, heartbeat_interval=1, grace_period=2)
    assert storage.engine.dialect.driver == "psycopg"  # what every client (dashboard, optuna CLI) picks for it
    study = optuna.create_study(storage=storage, study_name="x")
    study.optimize(lambda t: t.suggest_int("a", 0, 3), n_trials=2)
    assert len(optuna.load_study(study_name="x", storage=pg_url).trials) == 2


# --- the study lock ----------------------------------------------------------------------------------
def _overlaps(make_study, threads: int = 3, hold: float = 0.15) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def hold_lock() -> None:
        try:
            study = make_study()
            with study_lock(study, timeout=30):
                start = time.monotonic()
                time.sleep(hold)
                spans.append((start, time.monotonic()))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    workers = [threading.Thread(target=hold_lock) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors
    assert len(spans) == threads
    return sorted(spans)


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql", "memory"])
def test_study_lock_is_exclusive(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 's.db'}"
    elif kind == "journal":
        url = f"journal:{tmp_path / 's.journal'}"
    elif kind == "postgresql":
        url = request.getfixturevalue("pg_url")
    memory = optuna.storages.InMemoryStorage()
    storage_of = (lambda: memory) if kind == "memory" else (lambda: cw.open_storage(url, 0, 2))
    optuna.create_study(storage=storage_of(), study_name="s")
    spans = _overlaps(lambda: optuna.load_study(study_name="s", storage=storage_of()))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 1e-3, spans  # one holder at a time


def test_the_sampler_decides_under_the_lock_and_keeps_its_generations(tmp_path: Path) -> None:
    sampler = cw.make_sampler(8, lock=True)
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, sampler=sampler)
    study.optimize(lambda t: cw.distance(cw.suggest_genome(t, cw.SPACE)), n_trials=24)
    assert count_by_generation(study) == {0: 8, 1: 8, 2: 8}
    assert audit(study).duplicate_genomes == 0 and audit(study).duplicate_slots == 0
    assert 0 < sampler.lock_wait_seconds < 30


def test_the_sampler_waits_for_another_holder_and_counts_the_wait() -> None:
    storage = optuna.storages.InMemoryStorage()
    sampler = cw.make_sampler(8, lock=True)
    study = optuna.create_study(storage=storage, sampler=sampler)
    held, released_at = threading.Event(), []

    def hold() -> None:
        with study_lock(optuna.load_study(study_name=study.study_name, storage=storage), timeout=30):
            held.set()
            time.sleep(1.0)
            released_at.append(time.monotonic())

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    before = time.monotonic()
    trial = study.ask()  # cannot pass before_trial while the other holder has the lock
    asked_at = time.monotonic()
    holder.join(30)
    assert asked_at >= released_at[0] and GENOME_ATTR in study.trials[trial.number].system_attrs
    # it waited from after `before` until after the release: the wait it counts lies within the ask
    assert 0 < sampler.lock_wait_seconds <= asked_at - before + 0.01


def test_optunas_samplers_take_no_study_lock() -> None:
    """Their before_trial writes nothing a lock could guard: an ask passes while another worker holds it."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, sampler=builtin_sampler("tpe", 0))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with study_lock(optuna.load_study(study_name=study.study_name, storage=storage), timeout=30):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        t0 = time.monotonic()
        trial = study.ask()
        assert time.monotonic() - t0 < 10  # not the 30 s the holder keeps the lock
        assert OWNER_ATTR in study.trials[trial.number].system_attrs  # but the trial is claimed
    finally:
        release.set()
        holder.join(30)


# --- heartbeats for journal files ----------------------------------------------------------------------
def test_journal_heartbeat_fails_a_silent_trial_and_queues_it_again(tmp_path: Path) -> None:
    storage = journal_storage(tmp_path / "s.journal", heartbeat_interval=1, grace_period=2, max_retry=3)
    assert isinstance(storage, HeartbeatJournalStorage) and is_heartbeat_enabled(storage)
    study = optuna.create_study(storage=storage)
    alive, dead = study.ask(), study.ask()
    before_beats = time.time()
    for trial in (alive, dead):
        storage.set_trial_system_attr(trial._trial_id, GENOME_ATTR, f"genome-{trial.number}")
        storage.set_trial_system_attr(trial._trial_id, GENERATION_ATTR, 0)
        storage.record_heartbeat(trial._trial_id)
    deadline = time.monotonic() + 60
    while True:  # no fixed sleep: poll until the silent trial goes stale, the live one beating before each look
        storage.record_heartbeat(alive._trial_id)
        stale = storage._get_stale_trial_ids(study._study_id)
        if stale or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stale == [dead._trial_id]
    assert time.time() - before_beats > 2  # not stale before its grace period
    optuna.storages.fail_stale_trials(study)
    assert study.trials[dead.number].state == TrialState.FAIL and study.trials[alive.number].state == TrialState.RUNNING
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert len(retry) == 1 and retry[0].system_attrs["failed_trial"] == dead.number
    assert retry[0].system_attrs[GENOME_ATTR] == f"genome-{dead.number}"
    # the retry carries the dead trial's last beat; once it runs, its own start counts, so it is not stale
    popped = study.ask()
    assert popped.number == retry[0].number
    assert popped._trial_id not in storage._get_stale_trial_ids(study._study_id)
    study.tell(popped, 1.0)
    storage.record_heartbeat(popped._trial_id)  # a late beat of a finished trial is ignored, not an error
    assert HEARTBEAT_ATTR in study.trials[popped.number].system_attrs


def test_journal_without_heartbeat_is_the_plain_storage(tmp_path: Path) -> None:
    storage = journal_storage(tmp_path / "s.journal", heartbeat_interval=None)
    assert type(storage) is optuna.storages.JournalStorage and not is_heartbeat_enabled(storage)
    with pytest.raises(ValueError, match="positive"):
        HeartbeatJournalStorage(storage._backend, heartbeat_interval=0)


def test_fail_orphaned_trials_requeues_running_trials_with_their_attrs(tmp_path: Path) -> None:
    study = optuna.create_study(storage=journal_storage(tmp_path / "s.journal", heartbeat_interval=None))
    orphan = study.ask()
    study._storage.set_trial_system_attr(orphan._trial_id, GENOME_ATTR, "g")
    study._storage.set_trial_system_attr(orphan._trial_id, SLOT_ATTR, 3)
    done = study.ask()
    study.tell(done, 0.5)
    assert fail_orphaned_trials(study) == [orphan.number]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs[SLOT_ATTR] for t in waiting] == [3] and waiting[0].system_attrs[GENOME_ATTR] == "g"
    assert study.trials[done.number].state == TrialState.COMPLETE
    assert fail_orphaned_trials(study) == []


# --- owners: a restart fails its own host's dead trials at once --------------------------------------------
def _zombie() -> tuple[subprocess.Popen, int]:
    """A child killed but not reaped (a zombie until wait()), and its start time while it lived."""
    proc = subprocess.Popen(["sleep", "600"])
    started = process_start(proc.pid)
    proc.kill()
    deadline = time.monotonic() + 30
    while process_start(proc.pid) is not None:  # the kernel makes it a zombie as soon as it dies
        assert time.monotonic() < deadline, "the killed child never became a zombie"
        time.sleep(0.01)
    return proc, started


def test_a_restart_fails_its_hosts_dead_trials_at_once_and_keeps_the_others(tmp_path: Path) -> None:
    host = this_host()
    assert host is not None and host.startswith(os.uname().nodename)  # Linux: /proc is there
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=3600)
    study = optuna.create_study(storage=storage)
    alive = subprocess.Popen(["sleep", "600"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    zombie, zombie_start = _zombie()
    try:
        started = process_start(alive.pid)
        assert started is not None and started >= process_start(os.getpid())  # ticks after boot, the child later
        assert process_start(gone.pid) is None
        owners = {"live": (host, alive.pid, started, 0), "gone": (host, gone.pid, started, 0),
                  "pid reused": (host, alive.pid, started - 1, 0), "zombie": (host, zombie.pid, zombie_start, 0),
                  "other host": ("elsewhere|boot|pid:[1]", gone.pid, started, 0),
                  "inherited by a retry": (host, gone.pid, started, -60)}
        trials = {}
        for name, (where, pid, start, age) in owners.items():
            trial = study.ask()
            storage.set_trial_system_attr(trial._trial_id, GENOME_ATTR, name)
            since = study.trials[trial.number].datetime_start.timestamp() + (age or 0.001)
            storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, [where, pid, start, since])
            trials[name] = trial.number
        failed = fail_dead_local_trials(study)
        assert sorted(failed) == sorted(trials[n] for n in ("gone", "pid reused", "zombie"))
        for name, number in trials.items():
            expected = TrialState.FAIL if number in failed else TrialState.RUNNING
            assert study.trials[number].state == expected, name
        retries = {t.system_attrs["failed_trial"]: t.system_attrs[GENOME_ATTR]
                   for t in study.get_trials(states=(TrialState.WAITING,))}
        assert retries == {trials[n]: n for n in ("gone", "pid reused", "zombie")}  # queued again, same genome
        assert fail_dead_local_trials(study) == []
    finally:
        alive.kill()
        alive.wait()
        zombie.wait()


@pytest.mark.parametrize("name", ["autodiffusion", "tpe", "cmaes", "gp", "random"])
def test_every_sampler_records_each_trials_owner(name: str, tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=2)
    sampler = cw.make_sampler(4, lock=True) if name == "autodiffusion" else builtin_sampler(name, 0)
    study = optuna.create_study(storage=storage, sampler=sampler)
    study.optimize(lambda t: cw.distance(cw.suggest_genome(t, cw.SPACE)), n_trials=3)
    for trial in study.trials:
        host, pid, started, since = trial.system_attrs[OWNER_ATTR]
        assert (host, pid, started) == (this_host(), os.getpid(), process_start(os.getpid()))
        assert trial.datetime_start.timestamp() <= since <= trial.datetime_complete.timestamp()


# --- the slot rule ---------------------------------------------------------------------------------------
def test_next_slot_refills_the_oldest_gap_first() -> None:
    full0 = [frozen(TrialState.COMPLETE, 0, s, f"a{s}") for s in range(4)]
    gen1 = [frozen(TrialState.COMPLETE, 1, 0), frozen(TrialState.COMPLETE, 1, 1), frozen(TrialState.FAIL, 1, 2),
            frozen(TrialState.RUNNING, 1, 3)]
    gen2 = [frozen(TrialState.RUNNING, 2, 0), frozen(TrialState.RUNNING, 2, 1)]
    assert next_slot(full0 + gen1 + gen2, 4) == (1, 2)  # the late failure's slot, not generation 2's
    assert next_slot(full0 + gen1[:2] + [frozen(TrialState.WAITING, 1, 2)] + gen1[3:] + gen2, 4) == (2, 2)
    assert next_slot(full0, 4) == (1, 0)
    assert next_slot([], 4) == (0, 0)
    assert next_slot([frozen(TrialState.WAITING, None, None)], 4) == (0, 0)


# --- the end of a search ----------------------------------------------------------------------------------
def _study_with(trials: list[optuna.trial.FrozenTrial]) -> optuna.Study:
    study = optuna.create_study()
    for t in trials:
        study.add_trial(t)
    return study


def _complete(population: int, generations: int) -> list[optuna.trial.FrozenTrial]:
    return [frozen(TrialState.COMPLETE, g, s, f"{g}-{s}") for g in range(generations) for s in range(population)]


def test_search_budget_stops_when_every_generation_is_complete() -> None:
    study = _study_with(_complete(3, 2))
    assert SearchBudget(3, 2, poll=0.01, drain_timeout=1).should_stop(study)


def test_search_budget_goes_on_while_slots_are_free() -> None:
    study = _study_with(_complete(3, 2)[:-1])
    assert not SearchBudget(3, 2, poll=0.01, drain_timeout=1).should_stop(study)


def test_search_budget_waits_for_running_trials_then_stops(caplog: pytest.LogCaptureFixture) -> None:
    study = _study_with(_complete(3, 2)[:-1] + [frozen(TrialState.RUNNING, 1, 2, "r")])
    running = study.trials[-1]

    waiting = threading.Event()
    budget = SearchBudget(3, 2, poll=0.02, drain_timeout=120)
    status = budget._status

    def observed_status(study: optuna.Study):  # noqa: ANN202
        waiting.set()  # should_stop has looked at the study (and found the last trial running)
        return status(study)

    budget._status = observed_status  # type: ignore[method-assign]

    def finish_later() -> None:
        assert waiting.wait(60)
        time.sleep(0.1)
        study._storage.set_trial_state_values(running._trial_id, TrialState.COMPLETE, [1.0])

    finisher = threading.Thread(target=finish_later)
    finisher.start()
    t0 = time.monotonic()
    assert budget.should_stop(study)
    assert study.trials[-1].state == TrialState.COMPLETE  # it returned because the trial finished ...
    assert time.monotonic() - t0 < 60  # ... not at its 120 s drain timeout
    finisher.join(10)

    stuck = _study_with(_complete(3, 2)[:-1] + [frozen(TrialState.RUNNING, 1, 2, "r")])
    with caplog.at_level(logging.WARNING, logger="autodiff_opt.search.progress"):
        assert SearchBudget(3, 2, poll=0.02, drain_timeout=0.2).should_stop(stuck)
    assert "still running elsewhere" in caplog.text


def test_search_budget_returns_to_evaluate_a_queued_retry() -> None:
    study = _study_with(_complete(3, 2)[:-1] + [frozen(TrialState.RUNNING, 1, 2, "r")])

    def retry_later() -> None:
        time.sleep(0.2)
        study._storage.set_trial_state_values(study.trials[-1]._trial_id, TrialState.FAIL)
        study.add_trial(frozen(TrialState.WAITING, 1, 2, "r"))

    threading.Thread(target=retry_later).start()
    assert not SearchBudget(3, 2, poll=0.02, drain_timeout=10).should_stop(study)


def test_search_budget_stops_when_the_sampler_moved_past_a_gap(caplog: pytest.LogCaptureFixture) -> None:
    trials = _complete(3, 2)
    trials[2] = frozen(TrialState.FAIL, 0, 2)  # failed after generation 1 began: never refilled by the sampler
    study = _study_with(trials + [frozen(TrialState.COMPLETE, 2, 0, "beyond")])
    status = budget_status(study.trials, 3, 2)
    assert (status.complete, status.assigned, status.beyond, status.running) == (5, 5, 1, 0)
    with caplog.at_level(logging.WARNING, logger="autodiff_opt.search.progress"):
        assert SearchBudget(3, 2, poll=0.01, drain_timeout=5).should_stop(study)
    assert "nothing left running" in caplog.text


# --- audits -------------------------------------------------------------------------------------------------
def test_audit_counts_duplicates_overshoot_and_retries() -> None:
    trials = [frozen(TrialState.COMPLETE, 0, 0, "a"), frozen(TrialState.COMPLETE, 0, 0, "b"),
              frozen(TrialState.COMPLETE, 0, 1, "a"), frozen(TrialState.FAIL, 0, 2, "c"),
              frozen(TrialState.COMPLETE, 0, 2, "c", failed_trial=3), frozen(TrialState.COMPLETE, 1, 0, "d"),
              frozen(TrialState.COMPLETE, None, None)]
    a = audit(_study_with(trials), generations=1)
    assert a.complete_by_generation == {0: 4, 1: 1} and a.overshoot == 1 and a.untracked == 1
    assert a.duplicate_genomes == 1 and a.duplicate_slots == 1 and a.retries == [(3, 4)]
    assert a.states == {"COMPLETE": 6, "FAIL": 1}
    assert not a.generations_complete(3, 1) and a.generations_complete(4, 1)


# --- the throwaway server (tests/pg.py) ---------------------------------------------------------------------
def test_missing_postgres_binaries_are_an_error_that_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                         pytester: pytest.Pytester) -> None:
    import pg

    monkeypatch.setattr(pg, "which", lambda name: None)
    monkeypatch.setattr(pg, "glob", lambda pattern: [])
    with pytest.raises(pg.PostgresUnavailable, match="apt-get install -y postgresql"):
        pg.find_pg_ctl()
    with pytest.raises(pg.PostgresUnavailable):
        pg.start_server()
    # a test that needs the server fails at its setup with that message (in process: the patches hold)
    pytester.makeconftest("from pg import pg_proc, pg_server, pg_url  # noqa: F401")
    pytester.makepyfile("def test_needs_a_server(pg_url):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*were not found: install them with `apt-get install -y postgresql`*"])


def test_the_throwaway_server_listens_on_loopback_only_and_asks_for_a_password(pg_server) -> None:  # noqa: ANN001
    import psycopg

    con = psycopg.connect(host="127.0.0.1", port=pg_server.port, user="postgres", password=pg_server.password,
                          dbname="postgres", connect_timeout=10)
    try:
        with con.cursor() as cur:
            cur.execute("SHOW listen_addresses")
            assert cur.fetchone()[0] == "127.0.0.1"
            cur.execute("SHOW unix_socket_directories")
            assert cur.fetchone()[0] == pg_server.unixsocketdir
            cur.execute("SELECT current_setting('fsync')")
            assert cur.fetchone()[0] == "off"  # a test server: nothing to keep after a crash
    finally:
        con.close()
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(host="127.0.0.1", port=pg_server.port, user="postgres", dbname="postgres", connect_timeout=10)
