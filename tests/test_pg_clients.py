"""Optuna's own clients open a PostgreSQL study the project's CLI made, with the same plain URL.

A plain `postgresql://` URL means psycopg 3 to SQLAlchemy 2.1; the project depends on it
(`psycopg[binary]`), so `optuna studies`, `optuna trials` and `optuna-dashboard` (real executables,
subprocesses) read what the workers wrote without a `+psycopg2` rewrite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ports import held_port
from audit import assert_budget_spent
from cli_helpers import run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def _exe(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _get_json(url: str, timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_optuna_cli_and_dashboard_read_a_study_the_cli_made(pg_url: str, tiny_model_dir: Path, tiny_reference: Path,
                                                            tmp_path: Path) -> None:
    assert pg_url.startswith("postgresql://")
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, tmp_path / "unused.db",
                               **{"storage.url": pg_url, "storage.study_name": "pg-k4", "search.generations": 1,
                                  "final.enabled": "false"})
    proc = run_cli(overrides, tmp_path, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = optuna.load_study(study_name="pg-k4", storage=pg_url)
    values = {t.number: t.value for t in ours.trials if t.state == TrialState.COMPLETE}
    assert_budget_spent(ours, 6, 48, 4)  # the default sampler's 6 candidate-equivalents
    assert len(values) >= 2

    listed = subprocess.run([_exe("optuna"), "studies", "--storage", pg_url, "-f", "json"], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    studies = json.loads(listed.stdout)
    assert [(s["name"], s["n_trials"]) for s in studies] == [("pg-k4", len(ours.trials))]
    trials = subprocess.run([_exe("optuna"), "trials", "--storage", pg_url, "--study-name", "pg-k4", "-f", "json"],
                            capture_output=True, text=True, timeout=120)
    assert trials.returncode == 0, trials.stderr[-2000:]
    # the value is named by the study's metric name
    assert {t["number"]: t["value"]["FID"] for t in json.loads(trials.stdout) if t["state"] == "COMPLETE"} == values

    port, holder = held_port()  # held until the server answers: no other process can take it meanwhile
    server = subprocess.Popen([_exe("optuna-dashboard"), "--host", "127.0.0.1", "--port", str(port), pg_url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with holder:
            summaries = _get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]  # type: ignore[index]
        assert [s["study_name"] for s in summaries] == ["pg-k4"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}?after=0")
        seen = {t["number"]: t["values"][0] for t in detail["trials"] if t["state"] == "Complete"}  # type: ignore[index]
        assert seen == pytest.approx(values)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=20)
    assert "psycopg" not in err, err[-2000:]  # no driver error on the way
