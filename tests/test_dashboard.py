"""The real optuna-dashboard serves a study made by the sampler, on 127.0.0.1 only; after a CLI run it shows
the metric name, the final table as the note, the report's figures as plots and the sample grids as artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from autodiff_opt.core.genome import Genome
from autodiff_opt.search.evolution import AutoDiffusionPaperSampler, EvolutionConfig
from autodiff_opt.search.space import SearchSpace, suggest_genome
from ports import held_port

SPACE = SearchSpace(4, 1000)


def _serve(url: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """The optuna-dashboard command as `make dashboard` runs it."""
    exe = Path(sys.executable).with_name("optuna-dashboard")
    return subprocess.Popen([str(exe), "--host", "127.0.0.1", "--port", str(port), *extra, url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(port: int, proc: subprocess.Popen[bytes]) -> dict:
    """The study list once the server answers (its start takes long on a busy machine: up to 3 min)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"optuna-dashboard did not answer on 127.0.0.1 (exit code {proc.poll()})")


def test_dashboard_lists_the_study_and_its_genome_params(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    sampler = AutoDiffusionPaperSampler(SPACE, EvolutionConfig(population=5, num_parents=2, num_mutants=2,
                                                          num_crossovers=1, init_random=2),
                                   anchor=Genome((750, 500, 250, 0)), seed=0)
    study = optuna.create_study(storage=url, study_name="digits-ddim-k4", sampler=sampler)
    study.optimize(lambda t: float(sum(suggest_genome(t, SPACE).timesteps)), n_trials=6)
    port, holder = held_port()  # held until the server answers: no other process can take it meanwhile
    proc = _serve(url, port)
    try:
        with holder:
            body = _wait_for(port, proc)
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


def _get(app, path: str, query: str = "") -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    """One GET through the dashboard's WSGI app (the same app `optuna-dashboard` serves)."""
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, object] = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], body


@pytest.mark.slow
def test_dashboard_shows_the_note_the_figures_and_the_sample_grids(report_run: dict[str, Path]) -> None:
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    import pandas as pd

    url = f"sqlite:///{report_run['db']}"
    app = wsgi(url, artifact_store=FileSystemArtifactStore(str(report_run["artifacts"])))
    status, body = _get(app, "/api/studies")
    assert status.startswith("200")
    (summary,) = json.loads(body)["study_summaries"]
    status, body = _get(app, f"/api/studies/{summary['study_id']}", "after=0")
    detail = json.loads(body)
    assert detail["objective_names"] == ["FID"]
    note = detail["note"]["body"]
    final = pd.read_csv(report_run["run"] / "final.csv")
    for row in final.itertuples():
        assert f"| {row.schedule} | {row.kind} |" in note and f"{row.fid_final:.3f}" in note
    assert "python -m autodiff_opt" in note
    plots = {p["id"]: json.loads(p["graph_object"]) for p in detail["plotly_graph_objects"]}
    assert set(plots) == {"search-history", "final-fid", "schedules"}
    bars = plots["final-fid"]["data"][0]
    assert list(bars["x"]) == list(final.sort_values("fid_final").schedule)
    assert plots["search-history"]["layout"]["yaxis"]["type"] == "log"
    artifacts = {a["filename"]: a for a in detail["artifacts"]}
    expected = {"samples.png", *(f"samples_{name}.png" for name in final.schedule)}
    assert set(artifacts) == expected
    for name, meta in artifacts.items():
        status, content = _get(app, f"/artifacts/{summary['study_id']}/{meta['artifact_id']}")
        assert status.startswith("200") and meta["mimetype"] == "image/png"
        on_disk = report_run["run"] / (name if name == "samples.png" else f"samples/{name}")
        assert content == on_disk.read_bytes()


def _system_attrs(db: Path) -> dict[str, object]:
    study = optuna.load_study(study_name=optuna.get_all_study_names(f"sqlite:///{db}")[0], storage=f"sqlite:///{db}")
    return study._storage.get_study_system_attrs(study._study_id)


@pytest.mark.slow
def test_the_same_command_again_adds_no_note_version_or_artifact(report_run: dict[str, Path], tiny_model_dir: Path,
                                                                 tiny_reference: Path, tmp_path: Path) -> None:
    """The report_run command run again (search done, final table reused): still one note version and one
    stored copy of each grid; the figures keep their ids."""
    from cli_helpers import REPORT_FINAL_SEED, REPORT_GRID, run_cli, tiny_overrides

    before = _system_attrs(report_run["db"])
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, report_run["db"], **{
        "search.peers": "[gits_dp]", "search.peer_samples": 16, "search.peer_grid": 20, "final.seed": REPORT_FINAL_SEED,
        "final.repeats": 2, "report.grid_size": REPORT_GRID, "report.artifact_dir": str(report_run["artifacts"])})
    proc = run_cli(overrides, report_run["tmp"], tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _system_attrs(report_run["db"])
    assert after == before
    assert after["dashboard:note_ver"] == 1
    stored = [k for k in after if k.startswith("artifacts:")]
    assert len(stored) == len(list(report_run["artifacts"].iterdir())) > 0


@pytest.mark.slow
def test_dashboard_server_with_artifact_dir_serves_the_grids(report_run: dict[str, Path]) -> None:
    """`optuna-dashboard --artifact-dir DIR STORAGE` (the `make dashboard` command) serves the stored grids."""
    port, holder = held_port()  # held until the server answers
    proc = _serve(f"sqlite:///{report_run['db']}", port, "--artifact-dir", str(report_run["artifacts"]))
    try:
        with holder:
            study_id = _wait_for(port, proc)["study_summaries"][0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0", timeout=5) as resp:
            artifacts = {a["filename"]: a["artifact_id"] for a in json.loads(resp.read())["artifacts"]}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/artifacts/{study_id}/{artifacts['samples.png']}",
                                    timeout=5) as resp:
            assert resp.read() == (report_run["run"] / "samples.png").read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
