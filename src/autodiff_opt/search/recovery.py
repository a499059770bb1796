"""Trials of dead workers: who owns each trial, and failing the ones nobody runs any more.

* A restart should not wait for a heartbeat to go stale when the dead worker was on this machine. Every
  sampler of ours (``AutoDiffusionSampler``, and Optuna's through ``OwnerRecording``) records each
  trial's owner (``OWNER_ATTR``: host, pid, the process's start time, when it was recorded) as it takes
  the trial up, and ``fail_dead_local_trials`` fails, at once, the RUNNING trials whose owner was on this
  host and is gone (the pid is not running, or runs another process: pid reuse is told by its start
  time), then queues them again. Trials of live processes and of other hosts keep the heartbeat rule.
* Optuna's heartbeat thread only starts after ``ask`` returns. ``claim_trial`` beats once as the trial
  is taken up, so that a worker killed inside ``ask`` leaves a trial that can go stale.
* A plain journal file has no heartbeat: once no worker of the study is alive, ``fail_orphaned_trials``
  fails and queues again every RUNNING trial (what the launcher does before its final run).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autodiff_opt.core.keys import OWNER_ATTR
from autodiff_opt.search.storage_compat import FINISHED_TRIAL_ERROR, record_heartbeat, study_storage, trial_id
from autodiff_opt.search.study import retry_callback

log = logging.getLogger(__name__)


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


def beat(study: Study, trial: FrozenTrial) -> None:
    """One heartbeat now, where the storage has heartbeats."""
    record_heartbeat(study_storage(study), trial_id(trial))


def claim_trial(study: Study, trial: FrozenTrial) -> None:
    """What every sampler does first in before_trial: a beat (a worker killed while it waits for the study
    lock or samples must leave a trial that goes stale), then the owner record."""
    beat(study, trial)
    record_owner(study_storage(study), trial_id(trial))


class OwnerRecording:
    """Mixin for Optuna's samplers (``class X(OwnerRecording, optuna.samplers.TPESampler)``): claim_trial
    before the sampler's own before_trial; everything else is the sampler as shipped."""

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        claim_trial(study, trial)
        super().before_trial(study, trial)  # type: ignore[misc]


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
            if not study_storage(study).set_trial_state_values(trial_id(trial), state=TrialState.FAIL):
                continue
        except FINISHED_TRIAL_ERROR:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback(study, study_storage(study).get_trial(trial_id(trial)))
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


def fail_orphaned_trials(study: Study, max_retry: int | None = 3) -> list[int]:
    """Fail every RUNNING trial and re-queue it (same genome, generation, slot); returns their numbers.

    Only for a storage without heartbeats (a plain journal file) and only once no worker of the study
    is alive any more: a RUNNING trial is then certainly an orphan of a killed worker.
    """
    failed = _fail_and_requeue(study, study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), max_retry)
    if failed:
        log.warning("failed %d orphaned RUNNING trial(s) %s and queued them again", len(failed), failed)
    return failed
