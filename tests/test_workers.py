"""Several worker processes on one study: real PostgreSQL server, journal files, SIGKILL, the launcher.

The cheap workers (tests/cheap_worker.py) run the real AutoDiffusionPaperSampler with a pure-Python
objective that sleeps, so generations fill in seconds. What is checked, per storage:
  * every trial accounted for: only COMPLETE trials (and the killed one, FAIL) remain;
  * each generation 0..G-1 has exactly `population` COMPLETE trials, none beyond G;
  * no genome evaluated twice and no slot taken twice (the sampler's study lock: zero, not "few");
  * a SIGKILLed worker's trial is failed by heartbeat and retried with the same genome, generation, slot.
The bare sampler's race (two workers taking one slot) is reproduced deterministically with threads,
and shown gone under the study lock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

import cheap_worker as cw
from audit import EVALUATED, assert_budget_spent, audit, spent
from autodiff_opt.search.recovery import fail_orphaned_trials
from autodiff_opt.search.space import GENERATION_ATTR, GENOME_ATTR, SLOT_ATTR
from cli_helpers import TESTS_DIR, cli_env, tiny_overrides

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)

WORKER = TESTS_DIR / "cheap_worker.py"
POPULATION, GENERATIONS = 8, 4
# Workers that may be killed: a 1 s beat and 10 s of grace. Under contention the journal's file lock backs
# off up to 1 s per write; 2 s of grace was not enough on a loaded 2-core machine, 4 s failed live trials
# with the load average at 12 (docs/workers.md). A dead worker's trial is then retried 10 s after the kill.
LIVENESS = {"storage.heartbeat_interval": 1, "storage.grace_period": 10}


@pytest.fixture(params=["postgresql", "journal"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return f"journal:{tmp_path / 'study.journal'}"


def create_study(url: str, name: str = "s") -> optuna.Study:
    return cw.create(cw.open_storage(url, 0, 2), name, POPULATION)


def load(url: str, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=cw.open_storage(url, 0, 2))


def spawn(url: str, n: int, tmp_path: Path, extra: dict[int, list[str]] | None = None, *args: str,
          first_index: int = 0) -> list[subprocess.Popen]:
    procs = []
    for i in range(first_index, first_index + n):
        log = open(tmp_path / f"worker-{i}.log", "w")
        cmd = [sys.executable, str(WORKER), "--storage", url, "--study", "s", "--worker", str(i),
               "--population", str(POPULATION), "--generations", str(GENERATIONS), *args, *(extra or {}).get(i, [])]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"worker {p.pid} still running after {timeout}s")
    return codes


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("worker-*.log")))


def wait_for_slow_trial(url: str, timeout: float = 90.0) -> optuna.trial.FrozenTrial:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = load(url).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception:  # the storage is busy being created or written: read again
            running = []
        slow = [t for t in running if t.user_attrs.get("slow") and GENOME_ATTR in t.system_attrs]
        if slow:
            return slow[0]
        time.sleep(0.05)
    pytest.fail("the slow trial never started")


def check_generations(study: optuna.Study, max_overshoot: int = 0) -> None:
    a = audit(study, GENERATIONS)
    assert a.generations_complete(POPULATION, GENERATIONS), a
    assert a.overshoot <= max_overshoot, a
    assert a.duplicate_genomes == 0 and a.duplicate_slots == 0, a
    assert a.untracked == 0, a
    for g in range(GENERATIONS):
        slots = sorted(t.system_attrs[SLOT_ATTR] for t in study.get_trials(states=(TrialState.COMPLETE,))
                       if t.system_attrs[GENERATION_ATTR] == g)
        assert slots == list(range(POPULATION)), (g, slots)


def test_four_workers_fill_every_generation_exactly(storage_url: str, tmp_path: Path) -> None:
    create_study(storage_url)
    # no worker dies here, so no trial may go stale: a 60 s grace, far above any write stall (4 s was not
    # enough for the journal with the machine's load average at 12 on 2 cores: live trials were failed)
    procs = spawn(storage_url, 4, tmp_path, None, "--sleep", "0.05", "--ready", str(tmp_path / "ready"), "--parties", "4",
                  "--grace", "60")
    codes = wait_all(procs, 150)
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    study = load(storage_url)
    # SearchBudget checks "all slots taken" after a trial and the next ask can still lose that race to
    # another worker: at most workers-1 candidates of generation G (measured: 0 in practice)
    check_generations(study, max_overshoot=3)
    states = {t.state for t in study.trials}
    assert states == {TrialState.COMPLETE}, states
    ran = [json.loads(line) for p in sorted(tmp_path.glob("worker-*.log")) for line in p.read_text().splitlines()
           if line.startswith("{")]
    assert sum(r["trials"] for r in ran) == len(study.trials)
    assert all(r["trials"] > 0 for r in ran), ran  # the work was shared
    baselines = [t for t in study.trials if t.system_attrs.get("autodiff:operator") == "enqueued"]
    assert len(baselines) == len(cw.BASELINES)


def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(storage_url: str, tmp_path: Path) -> None:
    create_study(storage_url)
    hb = ["--sleep", "0.1", "--heartbeat", "1", "--grace", str(LIVENESS["storage.grace_period"])]
    procs = spawn(storage_url, 1, tmp_path, {0: ["--slow-trial", "2", "--slow-sleep", "120"]}, *hb)
    slow = wait_for_slow_trial(storage_url)  # worker 0 is in its third trial, which would take 120 s
    assert slow.user_attrs["pid"] == procs[0].pid
    procs += spawn(storage_url, 3, tmp_path, None, *hb, first_index=1)
    procs[0].send_signal(signal.SIGKILL)
    killed_at = time.time()
    codes = wait_all(procs, 150)
    assert codes[0] == -signal.SIGKILL and codes[1:] == [0, 0, 0], logs(tmp_path)

    study = load(storage_url)
    dead = study.trials[slow.number]
    assert dead.state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == slow.number]
    assert len(retries) == 1, [t.system_attrs for t in retries]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE
    for key in (GENOME_ATTR, GENERATION_ATTR, SLOT_ATTR):
        assert retry.system_attrs[key] == dead.system_attrs[key], key
    assert retry.datetime_start.timestamp() > killed_at - 1  # evaluated again after the kill
    check_generations(study, max_overshoot=2)
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.FAIL}
    assert [t.number for t in study.trials if t.state == TrialState.FAIL] == [slow.number]


def test_plain_journal_keeps_a_killed_trial_running_until_the_launcher_recovers_it(tmp_path: Path) -> None:
    """Without heartbeats nothing can tell a dead worker from a slow one: its trial stays RUNNING and holds
    its slot; live workers wait (bounded), then stop. Once no worker is alive, fail_orphaned_trials (what
    `python -m autodiff_opt.workers` does before its final run) re-queues it and one more run finishes."""
    url = f"journal:{tmp_path / 'plain.journal'}"
    create_study(url)
    plain = ["--sleep", "0.05", "--heartbeat", "0", "--drain-timeout", "2"]
    procs = spawn(url, 1, tmp_path, {0: ["--slow-trial", "1", "--slow-sleep", "120"]}, *plain)
    slow = wait_for_slow_trial(url)
    procs += spawn(url, 2, tmp_path, None, *plain, first_index=1)
    procs[0].send_signal(signal.SIGKILL)
    codes = wait_all(procs, 150)
    assert codes[1:] == [0, 0], logs(tmp_path)
    study = load(url)
    assert study.trials[slow.number].state == TrialState.RUNNING
    gen = study.trials[slow.number].system_attrs[GENERATION_ATTR]
    assert audit(study, GENERATIONS).complete_by_generation[gen] == POPULATION - 1

    assert fail_orphaned_trials(study) == [slow.number]
    last = spawn(url, 1, tmp_path, None, "--sleep", "0.05", "--heartbeat", "0", first_index=9)
    assert wait_all(last, 90) == [0], logs(tmp_path)
    study = load(url)
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == slow.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].system_attrs[GENOME_ATTR] == study.trials[slow.number].system_attrs[GENOME_ATTR]
    check_generations(study, max_overshoot=2)


def _two_concurrent_asks(url: str, locked: bool, tmp_path: Path) -> list[list]:
    """Two worker processes ask once each; both pause between reading the trials and writing their slot."""
    rendezvous = tmp_path / f"rendezvous-{locked}"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--storage", url, "--study", "s", "--worker", str(i),
                               "--population", str(POPULATION), "--heartbeat", "0", "--ask-once", str(rendezvous),
                               # bare: wait for the other however late it starts; locked: the other cannot
                               # arrive while the first holds the lock, so a short wait
                               "--pause", "2" if locked else "60",
                               "--lock" if locked else "--no-lock"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_study_lock_removes_the_slot_race(storage_url: str, tmp_path: Path) -> None:
    study = create_study(storage_url)
    for trial in study.get_trials(states=(TrialState.WAITING,)):  # no queued baselines: the sampler draws
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    bare = _two_concurrent_asks(storage_url, False, tmp_path)
    assert bare[0][:2] == bare[1][:2], f"the bare sampler no longer races ({bare}): this half can go"
    locked = _two_concurrent_asks(storage_url, True, tmp_path)
    assert locked[0][:2] != locked[1][:2], locked
    assert locked[0][2] != locked[1][2]


# --- the launcher: python -m autodiff_opt.workers ----------------------------------------------------
def _launcher(args: list[str], tmp_path: Path, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autodiff_opt.workers", *args], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def test_launcher_runs_two_cli_workers_then_the_final_report_once(tiny_model_dir: Path, tiny_reference: Path,
                                                                   tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db",
                                           **{"search.generations": 1, **LIVENESS})  # a budget of 6
                 if not o.startswith("storage.url=")]
    run_dir = tmp_path / "run"
    proc = _launcher(["--workers", "2", "--storage", f"journal:{journal}", "--", *overrides,
                      f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "worker 0: exit 0" in proc.stderr and "worker 1: exit 0" in proc.stderr
    for i in range(2):
        log = (run_dir / f"worker-{i}.log").read_text()
        assert "final.enabled=false" in log.splitlines()[0]
        assert not (run_dir / f"worker-{i}" / "final.csv").exists()
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("final.csv")) == ["final.csv"]
    final = pd.read_csv(run_dir / "final.csv")
    assert set(final.schedule) >= {"searched", "ddim_uniform", "trailing"}
    study = optuna.load_study(study_name=optuna.get_all_study_names(cw.open_storage(f"journal:{journal}", 0, 2))[0],
                              storage=cw.open_storage(f"journal:{journal}", 0, 2))
    # the default sampler's budget (6 x 1 candidate-equivalents) shared: each worker at most one candidate past it
    assert_budget_spent(study, 6, 48, 4, workers=2)
    assert "autodiff:final" in study.user_attrs
    assert {t.state for t in study.trials} <= set(EVALUATED)
    finished = sum(len(re.findall(r"Trial \d+ (?:finished|pruned)", (run_dir / f"worker-{i}.log").read_text()))
                   for i in range(2))
    assert finished == len(study.trials)  # every trial was evaluated by a worker, none by the final run
    assert "search done" in proc.stdout + proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--workers", "0", "--storage", "journal:x.log"], "at least 1 worker"),
    (["--workers", "2", "--storage", "sqlite:///:memory:"], "cannot be shared"),
    (["--workers", "2", "--storage", "redis://h/0"], "--storage=redis://h/0"),
    (["--workers", "2", "--storage", "journal:x.log", "--", "storage.url=sqlite:///a.db"], "--storage URL"),
    (["--workers", "2", "--storage", "journal:x.log", "--devices", "cuda:0", "--", "device=cpu"], "not both"),
    (["--workers", "2", "--storage", "journal:x.log", "--devices", "gpu0"], "not a device"),
    (["--workers", "2", "--storage", "journal:x.log", "--", "search.num_stepz=3"], "num_stepz"),
    (["--workers", "2", "--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot be opened"),
])
def test_launcher_refuses_bad_arguments_before_starting(args: list[str], message: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from autodiff_opt import workers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workers.subprocess, "Popen", None)  # nothing may start
    assert workers.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "x.log").exists()


def test_launcher_gives_each_worker_its_device_and_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from autodiff_opt import workers

    monkeypatch.chdir(tmp_path)
    assert workers.main(["--workers", "3", "--storage", "postgresql://u@h/db?host=/tmp/s&x=y", "--devices",
                         "cuda:0,cuda:1", "--dry-run", "--", "search.num_steps=6", f"hydra.run.dir={tmp_path / 'r'}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for i, device in enumerate(["cuda:0", "cuda:1", "cuda:0"]):
        assert f"device={device}" in lines[i] and "final.enabled=false" in lines[i]
        assert f"hydra.run.dir={tmp_path / 'r' / f'worker-{i}'}" in lines[i]
        assert "storage.url='postgresql://u@h/db?host=/tmp/s&x=y'" in lines[i]  # the URL as given: every client reads it
    assert "final.enabled" not in lines[3] and "device=cuda:0" in lines[3]
    assert lines[3].endswith(f"hydra.run.dir={tmp_path / 'r'}")
    monkeypatch.setenv("AUTODIFF_OPT_DEVICES", "cuda:1")  # what `make workers` can pass
    assert workers.main(["--workers", "2", "--storage", "journal:j.log", "--dry-run"]) == 0
    assert all("device=cuda:1" in line for line in capsys.readouterr().out.strip().splitlines())


def test_launcher_survives_a_killed_cli_worker(tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    """SIGKILL one real CLI worker mid-candidate: finished trials stay, its candidate is redone (same genome),
    the launcher's final run completes the study and writes the report once."""
    journal = tmp_path / "study.journal"
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db",
                                           **{"search.num_samples": 360, "search.batch_size": 24,
                                              "search.generations": 3, **LIVENESS})
                 if not o.startswith("storage.url=")]
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "autodiff_opt.workers", "--workers", "2", "--storage",
                                 f"journal:{journal}", "--", *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                                env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    roster = run_dir / "workers.json"
    deadline = time.monotonic() + 240
    storage, victim, finished = None, None, {}
    while victim is None:
        assert time.monotonic() < deadline and launcher.poll() is None, "never saw both workers mid-candidate"
        time.sleep(0.05)
        if not journal.exists() or not roster.exists() or len(json.loads(roster.read_text())) < 2:
            continue
        storage = storage or cw.open_storage(f"journal:{journal}", 0, 2)
        names = optuna.get_all_study_names(storage)
        if not names:
            continue
        study = optuna.load_study(study_name=names[0], storage=storage)
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING and GENOME_ATTR in t.system_attrs]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        early = spent(study, 360, 4) <= 18 - 6  # far inside the budget: the killed candidate's retry must run
        if len(complete) >= 2 and len(running) == 2 and early:  # each worker is evaluating a candidate
            finished = {t.number: (t.system_attrs[GENOME_ATTR], t.value, t.state)
                        for t in study.get_trials(deepcopy=False, states=EVALUATED)}
            victim = next(w["pid"] for w in json.loads(roster.read_text()) if w["worker"] == 1)
    os.kill(victim, signal.SIGKILL)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-4000:]
    assert "worker 1: killed by SIGKILL" in out, out[-3000:]
    study = optuna.load_study(study_name=names[0], storage=cw.open_storage(f"journal:{journal}", 0, 2))
    for number, kept in finished.items():  # nothing finished was lost or changed
        t = study.trials[number]
        assert (t.system_attrs[GENOME_ATTR], t.value, t.state) == kept
    assert_budget_spent(study, 18, 360, 4, workers=2)  # 6 x 3 candidate-equivalents, no genome evaluated twice
    a = audit(study)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and [r[0] for r in a.retries] == [failed[0].number], a
    retry = study.trials[a.retries[0][1]]
    assert retry.state in EVALUATED and retry.system_attrs[GENOME_ATTR] == failed[0].system_attrs[GENOME_ATTR]
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("final.csv")) == ["final.csv"]


def test_launcher_stops_when_the_first_worker_refuses_the_input(tiny_reference: Path, tmp_path: Path) -> None:
    proc = _launcher(["--workers", "3", "--storage", f"journal:{tmp_path / 'j.log'}", "--",
                      "model.pretrained=/nonexistent/model", f"dataset.reference={tiny_reference}",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker 0 failed") and "model.pretrained=/nonexistent/model" in last, last
    roster = json.loads((tmp_path / "run" / "workers.json").read_text())
    assert [w["worker"] for w in roster] == [0]  # the others were never started
    assert not (tmp_path / "run" / "final.csv").exists()


def test_two_cli_workers_share_the_default_sampler_and_its_budget(tiny_model_dir: Path, tiny_reference: Path,
                                                                 tmp_path: Path) -> None:
    """The surrogate sampler with pruning under the launcher: budget shared, no genome twice, one report."""
    journal = tmp_path / "study.journal"
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db",
                                           **{"search.sampler": "autodiffusion", "search.budget": 14,
                                              "search.num_samples": 96, "search.batch_size": 32, **LIVENESS})
                 if not o.startswith("storage.url=")]
    run_dir = tmp_path / "run"
    proc = _launcher(["--workers", "2", "--storage", f"journal:{journal}", "--", *overrides,
                      f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    storage = cw.open_storage(f"journal:{journal}", 0, 2)
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    keys = [t.system_attrs["autodiff:genome"] for t in finished]
    assert len(keys) == len(set(keys)), "two workers evaluated the same genome"
    spent = sum(t.user_attrs["image_steps"] for t in finished) / (96 * 4)
    assert 14 <= spent < 14 + 2, spent  # each worker stops at its next check: at most one candidate over each
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("final.csv")) == ["final.csv"]


# --- the launcher's edges: signals, --start-timeout, every worker failing -------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _start_launcher(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autodiff_opt.workers", *args], cwd=tmp_path, env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(ready, launcher: subprocess.Popen, what: str, timeout: float = 240) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not ready():
        assert launcher.poll() is None, f"the launcher ended before {what}: {launcher.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


def _roster(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "workers.json").read_text())
    except (OSError, ValueError):
        return []


def test_launcher_stops_its_workers_on_sigint_and_exits_130(tiny_model_dir: Path, tiny_reference: Path,
                                                            tmp_path: Path) -> None:
    """Ctrl-C while worker 0 starts up: the worker is stopped, the launcher says how to resume, exit 130."""
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db")
                 if not o.startswith("storage.url=")]
    run_dir = tmp_path / "run"
    launcher = _start_launcher(["--workers", "2", "--storage", f"journal:{tmp_path / 'j.log'}", "--", *overrides,
                                f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(lambda: bool(_roster(run_dir)), launcher, "worker 0 in workers.json")  # the handler is installed
    launcher.send_signal(signal.SIGINT)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, out[-3000:]
    assert "SIGINT: stopping the workers; rerun the same command to resume" in out
    assert [w["worker"] for w in _roster(run_dir)] == [0] and not _alive(_roster(run_dir)[0]["pid"])
    assert not (run_dir / "final.csv").exists()


def test_launcher_on_sigterm_fails_the_trial_being_evaluated_and_exits_130(tiny_model_dir: Path,
                                                                          tiny_reference: Path, tmp_path: Path) -> None:
    """SIGTERM while a worker evaluates a candidate (Optuna's heartbeat thread, which runs only around the
    objective, has beaten): the worker is stopped with SIGINT, Optuna marks that trial failed, the launcher exits 130.
    (An interrupt inside study.ask leaves the trial RUNNING instead: the heartbeat fails it on resume.)"""
    from autodiff_opt.core.keys import HEARTBEAT_ATTR

    journal = tmp_path / "j.log"
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db",
                                           **{"search.num_samples": 4000, "search.batch_size": 25, **LIVENESS})
                 if not o.startswith("storage.url=")]  # a candidate takes tens of seconds
    run_dir = tmp_path / "run"
    launcher = _start_launcher(["--workers", "1", "--storage", f"journal:{journal}", "--", *overrides,
                                f"hydra.run.dir={run_dir}"], tmp_path)
    storage, beats, evaluated = None, {}, []

    def evaluating() -> bool:
        nonlocal storage
        if not journal.exists():
            return False
        storage = storage or cw.open_storage(f"journal:{journal}", 0, 2)
        names = optuna.get_all_study_names(storage)
        for t in optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False) if names else []:
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            if t.state == TrialState.RUNNING and beat is not None:
                beats.setdefault(t.number, set()).add(beat)
                if len(beats[t.number]) >= 3:  # ask beats at most twice: the third is Optuna's heartbeat thread
                    evaluated.append(t.number)
                    return True
        return False

    _wait_for(evaluating, launcher, "a candidate being evaluated")
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, out[-3000:]
    assert "SIGTERM: stopping the workers; rerun the same command to resume" in out
    assert "did not stop" not in out and not _alive(_roster(run_dir)[0]["pid"])
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0],
                              storage=cw.open_storage(f"journal:{journal}", 0, 2))
    assert study.trials[evaluated[0]].state == TrialState.FAIL, [t.state for t in study.trials]
    assert TrialState.RUNNING not in [t.state for t in study.trials]
    assert not (run_dir / "final.csv").exists()


def test_start_timeout_stops_worker_0_and_starts_no_other(tiny_model_dir: Path, tiny_reference: Path,
                                                          tmp_path: Path) -> None:
    """--start-timeout 0: the launcher gives up at its first look, before worker 0 can have made the study."""
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db")
                 if not o.startswith("storage.url=")]
    run_dir = tmp_path / "run"
    proc = _launcher(["--workers", "3", "--storage", f"journal:{tmp_path / 'j.log'}", "--start-timeout", "0", "--",
                      *overrides, f"hydra.run.dir={run_dir}"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: study ") and "was not created within --start-timeout=0s" in last, last
    assert str(run_dir / "worker-0.log") in last
    roster = _roster(run_dir)
    assert [w["worker"] for w in roster] == [0] and not _alive(roster[0]["pid"])


def test_every_worker_failing_ends_with_worker_0s_error_and_no_final_run(tiny_reference: Path, tmp_path: Path) -> None:
    """A model whose weights are NaN passes every check but fails every candidate, in every worker."""
    from conftest import make_tiny_unet, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "nan-model")
    unet = make_tiny_unet()
    with torch.no_grad():
        for p in unet.parameters():
            p.fill_(float("nan"))
    unet.save_pretrained(model_dir)
    overrides = [o for o in tiny_overrides(model_dir, tiny_reference, tmp_path / "unused.db",
                                           **{"search.max_consecutive_failures": 2, **LIVENESS})
                 if not o.startswith("storage.url=")]
    run_dir = tmp_path / "run"
    proc = _launcher(["--workers", "2", "--storage", f"journal:{tmp_path / 'j.log'}", "--", *overrides,
                      f"hydra.run.dir={run_dir}"], tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every worker failed; worker 0 says: 2 candidates failed in a row"), last
    assert "worker 0: exit 2" in proc.stderr and "worker 1: exit 2" in proc.stderr
    assert [w["worker"] for w in _roster(run_dir)] == [0, 1]
    assert not list(run_dir.rglob("final.csv")) and not (run_dir / "trials.csv").exists()  # no final run
