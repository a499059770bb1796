"""The results where optuna-dashboard shows them: the final table as the study's note, the report's figures
as the study's plots, the sample grids as the study's artifacts.

The grids are study artifacts, not trial artifacts: they are made after the search, when the best trial has
finished, and Optuna (like the dashboard's own upload) refuses to change a finished trial."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import plotly.graph_objects as go
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna_dashboard import save_note, save_plotly_graph_object

log = logging.getLogger(__name__)


def publish_note(study: optuna.Study, body: str) -> None:
    """Markdown shown on the study's page (a new version only when the text changed)."""
    from optuna_dashboard import get_note

    if get_note(study) != body:
        save_note(study, body)


def publish_figures(study: optuna.Study, figures: dict[str, go.Figure]) -> None:
    """Each figure under a fixed id: a rerun replaces it instead of adding a copy."""
    for graph_id, fig in figures.items():
        save_plotly_graph_object(study, fig, graph_object_id=graph_id)


def _stored(store: FileSystemArtifactStore, study: optuna.Study) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for meta in get_all_artifact_meta(study):
        try:
            with store.open_reader(meta.artifact_id) as reader:
                out.setdefault(meta.filename, []).append(reader.read())
        except FileNotFoundError:  # the store folder was moved or cleaned: upload again
            continue
    return out


def publish_artifacts(study: optuna.Study, files: list[Path], artifact_dir: str | Path) -> list[str]:
    """Upload the files to the study in a FileSystemArtifactStore at artifact_dir; a file already stored
    with the same name and content is not uploaded again. Returns the artifact ids of the new uploads."""
    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_dir))
    stored = _stored(store, study)
    ids = [upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study, mimetype="image/png")
           for path in files if path.read_bytes() not in stored.get(path.name, [])]
    if ids:
        log.info("%d sample grid(s) stored as artifacts of study %s in %s (optuna-dashboard --artifact-dir %s)",
                 len(ids), study.study_name, artifact_dir, artifact_dir)
    return ids
