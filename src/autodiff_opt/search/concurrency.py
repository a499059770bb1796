"""Many workers on one study: a study-wide lock, heartbeats for journal files, the end of a search, audits.

Why each piece exists (measured in tests/test_workers.py and experiments/bench_storage.py):

* ``AutoDiffusionSampler.before_trial`` reads the trials, decides (generation, slot, genome, the
  generation's parents, the stage-2 start) and writes the result back. Two workers that interleave
  there see the same snapshot: they take the same slot, or both add a trial to a generation that had
  one free slot (population + 1 trials), or draw the same genome. ``StudyLockedSampler`` runs that
  section under ``study_lock``: a PostgreSQL advisory lock (MySQL ``GET_LOCK``) for database storages,
  an ``flock`` on a file beside SQLite databases and journal files. The lock is released by the OS or
  the database server when its holder dies, so a killed worker cannot leave it taken.
* Optuna's heartbeat (fail a RUNNING trial whose worker stopped beating, then re-queue it with
  ``RetryHeartbeatStaleTrialCallback``) exists only for RDB storages. ``HeartbeatJournalStorage``
  adds it to the journal file storage: the beat is a trial system attribute, and a trial is stale when
  neither its last beat nor its start is younger than the grace period (a retry copies the attributes
  of the trial it retries, so a beat older than the retry's own start is ignored).
* A restart should not wait for a heartbeat to go stale when the dead worker was on this machine:
  ``StudyLockedSampler`` records each trial's owner (``OWNER_ATTR``: host, pid, the process's start
  time, when it was recorded), and ``fail_dead_local_trials`` fails, at once, the RUNNING trials
  whose owner was on this host and is gone (the pid is not running, or runs another process: pid
  reuse is told by its start time), then queues them again. Trials of live processes and of other
  hosts keep the heartbeat rule.
* ``SearchBudget`` ends a worker's loop once every slot of generations 0..G-1 is taken, and waits
  (bounded) for the trials still running elsewhere instead of starting generation G; while it waits it
  fails stale trials, so a dead worker's candidate is retried by a live one.
* ``audit`` counts what the tests and the benchmark check: complete trials per generation, the
  overshoot past the last generation, genomes evaluated twice, slots taken twice, retries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autodiff_opt.search.space import GENERATION_ATTR, GENOME_ATTR, SLOT_ATTR
from autodiff_opt.core.keys import HEARTBEAT_ATTR, OWNER_ATTR, RETRY_OF_ATTR

log = logging.getLogger(__name__)

# what Optuna raises on a write to a finished trial (its own class since Optuna 4.5, a RuntimeError before)
FINISHED_TRIAL_ERROR: type[Exception] = getattr(optuna.exceptions, "UpdateFinishedTrialError", RuntimeError)


def retry_callback(max_retry: int | None) -> Callable[[Study, FrozenTrial], None]:
    """Optuna's callback that queues a failed trial again with its attributes (renamed in Optuna 4.9)."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=max_retry)


def _backend(storage: BaseStorage) -> BaseStorage:
    """The storage under Optuna's cache wrapper (RDB storages are wrapped by create_study)."""
    from optuna.storages._cached_storage import _CachedStorage

    return storage._backend if isinstance(storage, _CachedStorage) else storage


# --- a study-wide lock ------------------------------------------------------------------------
def _lock_key(study_id: int) -> int:
    """A signed 64-bit key for pg_advisory_lock, fixed per study."""
    digest = hashlib.sha256(f"autodiff-opt:study:{study_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not take the study lock {path} in {timeout:.0f}s") from None
                time.sleep(0.005)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _rdb_lock(storage: RDBStorage, study_id: int, timeout: float) -> Iterator[None]:
    from sqlalchemy import text

    dialect = storage.engine.dialect.name
    if dialect == "sqlite":
        database = storage.engine.url.database
        if database and database != ":memory:":
            with _file_lock(Path(database).with_name(Path(database).name + ".autodiff-lock"), timeout):
                yield
            return
        with _thread_lock(study_id, timeout):
            yield
        return
    key = _lock_key(study_id)
    with storage.engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(text(f"SET LOCAL lock_timeout = {int(timeout * 1000)}"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=key))
            try:
                yield
            finally:
                conn.rollback()  # ends the transaction: releases the lock
        elif dialect in ("mysql", "mariadb"):
            name = f"autodiff-opt-{key & 0xFFFFFFFF:x}"
            if conn.execute(text("SELECT GET_LOCK(:name, :t)").bindparams(name=name, t=int(timeout))).scalar() != 1:
                raise TimeoutError(f"could not take the study lock {name} in {timeout:.0f}s")
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:name)").bindparams(name=name))
        else:
            log.warning("no study lock for %s storages: concurrent workers may race", dialect)
            yield


_THREAD_LOCKS: dict[int, threading.Lock] = {}


@contextlib.contextmanager
def _thread_lock(study_id: int, timeout: float) -> Iterator[None]:
    lock = _THREAD_LOCKS.setdefault(study_id, threading.Lock())
    if not lock.acquire(timeout=timeout):
        raise TimeoutError(f"could not take the in-process study lock in {timeout:.0f}s")
    try:
        yield
    finally:
        lock.release()


def study_lock(study: Study, timeout: float = 120.0) -> contextlib.AbstractContextManager[None]:
    """Mutual exclusion across all workers of `study`, whatever process or machine they run on.

    PostgreSQL: a transaction-scoped advisory lock on its own connection. MySQL: GET_LOCK. SQLite and
    journal files: flock on '<file>.autodiff-lock' beside them (local file systems; NFS flock support
    varies). In-memory storages: a lock of this process.
    """
    storage = _backend(study._storage)
    if isinstance(storage, RDBStorage):
        return _rdb_lock(storage, study._study_id, timeout)
    if isinstance(storage, JournalStorage):
        path = getattr(storage._backend, "_file_path", None)
        if path:
            return _file_lock(Path(path).with_name(Path(path).name + ".autodiff-lock"), timeout)
    return _thread_lock(study._study_id, timeout)


class StudyLockedSampler(BaseSampler):
    """Wraps a sampler so that its `before_trial` (read trials, decide, write attrs) runs under `study_lock`.

    Retries of stale trials already carry their genome and skip the lock. Every other method and
    attribute is the wrapped sampler's.
    """

    def __init__(self, inner: BaseSampler, timeout: float = 120.0) -> None:
        self.inner = inner
        self.timeout = timeout
        self.lock_wait_seconds = 0.0  # time spent waiting for the lock in this process (for benchmarks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        # A beat now (and again after a long wait for the lock): Optuna's heartbeat thread only starts after
        # ask() returns; a worker killed while it waits here must leave a trial that goes stale, and a
        # trial waiting here must not look dead to the stale check.
        _beat(study, trial)
        record_owner(study._storage, trial._trial_id)
        if GENOME_ATTR in trial.system_attrs:
            self.inner.before_trial(study, trial)
            return
        t0 = time.perf_counter()
        with study_lock(study, self.timeout):
            self.lock_wait_seconds += time.perf_counter() - t0
            self.inner.before_trial(study, trial)
        if time.perf_counter() - t0 > 1.0:  # a long wait or choice: beat again before Optuna's heartbeat thread starts
            _beat(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)


def _beat(study: Study, trial: FrozenTrial) -> None:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]


# --- owners: a restart fails its own host's dead trials at once ------------------------------------
def this_host() -> str | None:
    """Who can see whose pids: hostname, kernel boot and pid namespace (containers on one kernel with one
    hostname are told apart). None without /proc (not Linux): then only heartbeats tell a dead worker."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}|{boot}|{namespace}"


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks after boot (/proc/PID/stat field 22); None when no
    such process runs (zombies, killed but not yet reaped, count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


def record_owner(storage: BaseStorage, trial_id: int) -> None:
    """Mark the trial as this process's (one write; nothing where this_host() is unknown)."""
    host = this_host()
    if host is not None:
        storage.set_trial_system_attr(trial_id, OWNER_ATTR, [host, os.getpid(), process_start(os.getpid()), time.time()])


def owner_is_dead(trial: FrozenTrial, host: str | None) -> bool:
    """True when the trial's recorded owner ran on `host` and that process is gone. A record older than the
    trial's start is inherited (a retry copies the attributes of the trial it retries) and says nothing."""
    owner = trial.system_attrs.get(OWNER_ATTR)
    if host is None or not owner or owner[0] != host:
        return False
    _, pid, started, since = owner
    if trial.datetime_start is not None and since < trial.datetime_start.timestamp():
        return False
    return started is None or process_start(int(pid)) != started


def _fail_and_requeue(study: Study, trials: Sequence[FrozenTrial], max_retry: int | None) -> list[int]:
    callback = retry_callback(max_retry)
    failed = []
    for trial in trials:
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except FINISHED_TRIAL_ERROR:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback(study, study._storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    return failed


def fail_dead_local_trials(study: Study, max_retry: int | None = 3) -> list[int]:
    """Fail the RUNNING trials whose owner ran on this host and is gone, and queue them again (same genome,
    generation, slot); returns their numbers. Certain, so no grace period: what a restart calls first."""
    host = this_host()
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if owner_is_dead(t, host)]
    failed = _fail_and_requeue(study, dead, max_retry)
    if failed:
        log.warning("failed %d trial(s) %s of dead processes on this host and queued them again", len(failed), failed)
    return failed


# --- heartbeats for journal files ----------------------------------------------------------------
class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage with the heartbeat protocol RDBStorage has.

    With it, `study.optimize` records a beat every `heartbeat_interval` seconds while a trial runs,
    fails RUNNING trials whose last sign of life (beat or start) is older than `grace_period`, and hands
    them to `heartbeat_stale_trial_callback` (e.g. RetryHeartbeatStaleTrialCallback, which re-queues
    the trial with the same system attributes: same genome, generation and slot).
    Clocks: beats are wall-clock times of the writing process, so workers sharing a journal file must
    share a clock (one machine, which is what journal files are for).
    """

    def __init__(self, backend: Any, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(backend)
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be a positive integer or None")
        if grace_period is not None and grace_period <= 0:
            raise ValueError("grace_period must be a positive integer or None")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period if grace_period is not None else (2 * heartbeat_interval if heartbeat_interval else None)
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except (FINISHED_TRIAL_ERROR, KeyError):
            pass  # finished (or failed as stale by another worker) meanwhile: nothing left to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self.grace_period is None:
            return []
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            last = max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
            if now - last > self.grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback

    get_failed_trial_callback = get_heartbeat_stale_trial_callback  # the name before Optuna 4.9


def journal_storage(path: str | Path, heartbeat_interval: int | None = 5, grace_period: int | None = 20,
                    max_retry: int | None = 3) -> JournalStorage:
    """A journal file storage; with `heartbeat_interval` set, dead workers' trials are failed and retried."""
    from optuna.storages.journal import JournalFileBackend

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(path))
    if not heartbeat_interval:
        return JournalStorage(backend)
    return HeartbeatJournalStorage(backend, heartbeat_interval, grace_period, retry_callback(max_retry))


def fail_orphaned_trials(study: Study, max_retry: int | None = 3) -> list[int]:
    """Fail every RUNNING trial and re-queue it (same genome, generation, slot); returns their numbers.

    Only for a storage without heartbeats (a plain journal file) and only once no worker of the study
    is alive any more: a RUNNING trial is then certainly an orphan of a killed worker.
    """
    failed = _fail_and_requeue(study, study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), max_retry)
    if failed:
        log.warning("failed %d orphaned RUNNING trial(s) %s and queued them again", len(failed), failed)
    return failed


# --- the end of a search ------------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetStatus:
    complete: int  # COMPLETE trials of generations < G
    assigned: int  # trials of generations < G that hold a slot (not FAIL), plus queued trials without one yet
    waiting: int  # WAITING trials (queued baselines, retries of stale trials)
    running: int  # RUNNING trials of generations < G
    beyond: int  # trials (not FAIL) of generations >= G: the sampler has moved past the budget


def budget_status(trials: Sequence[FrozenTrial], population: int, generations: int) -> BudgetStatus:
    complete = assigned = waiting = running = beyond = 0
    for t in trials:
        generation = t.system_attrs.get(GENERATION_ATTR)
        waiting += t.state == TrialState.WAITING
        if t.state == TrialState.FAIL:
            continue
        if generation is None:
            assigned += t.state == TrialState.WAITING
        elif generation < generations:
            assigned += 1
            complete += t.state == TrialState.COMPLETE
            running += t.state == TrialState.RUNNING
        else:
            beyond += 1
    return BudgetStatus(complete, assigned, waiting, running, beyond)


class SearchBudget:
    """A study.optimize callback: stop once generations 0..G-1 are complete, without starting generation G.

    While slots are free it lets the worker go on. Once every slot is taken but trials of other workers
    still run, it waits for them (polling every `poll` seconds, at most `drain_timeout`), failing stale
    ones meanwhile, and returns as soon as a trial is queued (a retry of a dead worker's candidate) so
    that this worker evaluates it. A worker that started generation G by a race (`beyond`) also waits.
    """

    def __init__(self, population: int, generations: int, poll: float = 1.0, drain_timeout: float = 3600.0) -> None:
        self.total = population * generations
        self.population, self.generations = population, generations
        self.poll, self.drain_timeout = poll, drain_timeout

    def _status(self, study: Study) -> BudgetStatus:
        return budget_status(study.get_trials(deepcopy=False), self.population, self.generations)

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        if self.should_stop(study):
            study.stop()

    def should_stop(self, study: Study) -> bool:
        """False at once while there is work; else waits (bounded) for other workers' trials."""
        status = self._status(study)
        deadline = time.monotonic() + self.drain_timeout
        while True:
            if status.complete >= self.total:
                break
            if status.assigned < self.total and not status.beyond:
                return False  # free slots: the sampler fills them
            if status.waiting:
                return False  # a queued trial (a retry) to evaluate
            if not status.running:
                # a slot freed late in an older generation: the sampler only fills its newest one
                log.warning("search budget: %d of %d candidates complete and nothing left running: stopping",
                            status.complete, self.total)
                break
            if time.monotonic() > deadline:
                log.warning("search budget: %d trial(s) still running elsewhere after %.0fs: this worker stops",
                            status.running, self.drain_timeout)
                break
            time.sleep(self.poll)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            status = self._status(study)
        return True


# --- audits ------------------------------------------------------------------------------------
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


# --- a slot rule that survives late failures (proposed for AutoDiffusionSampler._next_slot) ------
def next_slot(trials: Sequence[FrozenTrial], population: int) -> tuple[int, int]:
    """The lowest free slot of the oldest generation that has one; a new generation when all are full.

    The sampler's rule looks only at its newest generation. With one worker that is the same thing,
    but with N workers a candidate of generation g can fail after generation g+1 has begun: its slot is
    then never refilled and generation g ends one short. Here the oldest gap is refilled first (with
    generation g's cached parents, so the candidate is one generation g would have had).
    """
    counts: Counter[int] = Counter()
    used: dict[int, set[int]] = {}
    for t in trials:
        generation = t.system_attrs.get(GENERATION_ATTR)
        if t.state == TrialState.FAIL or generation is None:
            continue
        counts[generation] += 1
        used.setdefault(generation, set()).add(t.system_attrs.get(SLOT_ATTR))
    newest = max(counts) if counts else 0
    for generation in range(newest + 1):
        if counts[generation] < population:
            taken = used.get(generation, set())
            return generation, next(s for s in range(population + len(taken) + 1) if s not in taken)
    return newest + 1, 0
