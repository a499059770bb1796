"""The real optuna-dashboard serves a study made by the sampler, on 127.0.0.1 only."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna

from autodiff_opt.core.genome import Genome
from autodiff_opt.search.sampler import AutoDiffusionSampler, EvolutionConfig
from autodiff_opt.search.space import SearchSpace, suggest_genome

SPACE = SearchSpace(4, 1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_lists_the_study_and_its_genome_params(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    sampler = AutoDiffusionSampler(SPACE, EvolutionConfig(population=5, num_parents=2, num_mutants=2,
                                                          num_crossovers=1, init_random=2),
                                   anchor=Genome((750, 500, 250, 0)), seed=0)
    study = optuna.create_study(storage=url, study_name="digits-ddim-k4", sampler=sampler)
    study.optimize(lambda t: float(sum(suggest_genome(t, SPACE).timesteps)), n_trials=6)
    port = _free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(exe), "--host", "127.0.0.1", "--port", str(port), url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = None
        for _ in range(150):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                time.sleep(0.2)
        assert body is not None, "optuna-dashboard did not answer on 127.0.0.1"
        studies = body["study_summaries"]
        assert [s["study_name"] for s in studies] == ["digits-ddim-k4"]
        study_id = studies[0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0", timeout=5) as resp:
            detail = json.loads(resp.read())
        params = {p["name"] for t in detail["trials"] for p in t["params"]}
        assert params == {"t0", "t1", "t2", "t3"} and len(detail["trials"]) == 6
    finally:
        proc.terminate()
        proc.wait(timeout=10)
