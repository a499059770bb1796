"""Write a study's report into the run directory (CSV/Markdown tables, the report page, sample grids, the
schedule JSON) and into the study for optuna-dashboard (note, plots, artifacts).

The report reads ``ReportInputs``, exactly what it needs of the run, built by the orchestration layer
(``runner.Experiment.report_inputs``)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd

from autodiff_opt.models.sources import resolve_pretrained
from autodiff_opt.report.dashboard import publish_artifacts, publish_figures, publish_note
from autodiff_opt.models.families import family_of_model
from autodiff_opt.report.export import (apply_snippet, diffusers_scheduler, diffusers_snippet, export_schedule,
                                       flow_snippet, pipeline_snippet, sd_snippet)
from autodiff_opt.report.figures import (final_figure, history_figure, pareto_figure, schedules_figure,
                                         sensitivity_figure)
from autodiff_opt.report.headline import Headline, headline
from autodiff_opt.report.page import Grid, render_page
from autodiff_opt.report.provenance import job_overrides, reproduce_command
from autodiff_opt.report.samples import labelled_strip, png_bytes, sample_grids
from autodiff_opt.report.tables import generation_summary, trials_table
from autodiff_opt.search.final import FinalInputs, best_genome, final_candidates, kind_of
from autodiff_opt.search.sensitivity import stored_map
from autodiff_opt.core.genome import Genome
from autodiff_opt.core.keys import STOP_ATTR
from autodiff_opt.search.space import best_fid_trial, fid_of
from autodiff_opt.search.study import _redact

if TYPE_CHECKING:  # layers below report: type-only imports that point down
    from autodiff_opt.config import ModelConfig, ReportConfig, SolverConfig
    from autodiff_opt.generate import ImageGenerator
    from autodiff_opt.models.base import DiffusionModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportInputs:
    """Exactly what the report reads of a run; built by the runner (``runner.Experiment.report_inputs``)."""

    final: FinalInputs  # the final comparison's candidates and their kinds (the grids), final.seed, model, generator
    layer_names: tuple[str, ...]  # the skippable layers' names by id (the schedule file, the sensitivity map)
    model_settings: ModelConfig  # the model section: the export snippet, the schedule file's model_config
    solver_settings: SolverConfig  # solver.name and solver.clip_x0
    report_settings: ReportConfig  # grid_size, dashboard, artifact_dir
    skip_units: str  # search.stage2.units (the schedule file: how apply finds the layers again)
    search_solvers: tuple[str, ...]  # search.solvers (the page title)
    storage_url: str  # storage.url, redacted where it is written
    settings_yaml: str  # the resolved settings, password hidden (report/provenance.settings_yaml)

    @property
    def model(self) -> DiffusionModel:
        return self.final.model

    @property
    def generator(self) -> ImageGenerator:
        return self.final.generator


def to_markdown(table: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub table without extra dependencies."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if v != v else format(v, floatfmt)
        return "" if v is None else str(v)

    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def _caption(name: str, kind: str, genome: Genome, final: pd.DataFrame | None) -> str:
    text = f"{name} ({kind}): steps {list(genome.timesteps)}"
    if genome.has_skips:
        text += f", {sum(len(s) for s in genome.skips)} skipped layers"
    row = final[final.schedule == name] if final is not None and not final.empty else None
    if row is not None and not row.empty and pd.notna(row.fid_final.iloc[0]):
        text += f", FID {row.fid_final.iloc[0]:.3f} (fresh seeds)"
    return text


def _write_grids(study: optuna.Study, inputs: ReportInputs, final: pd.DataFrame | None,
                 out_dir: Path) -> tuple[list[Grid], list[Path]]:
    """Every schedule of the final comparison on the same grid of noise (final.seed); one PNG each, and a
    labelled sheet of all of them (samples.png)."""
    size, seed = int(inputs.report_settings.grid_size), int(inputs.final.settings.seed)
    if size <= 0:
        return [], []
    schedules = final_candidates(study, inputs.final)
    log.info("sample grids: %d schedules x %d images (seed %d)", len(schedules), size * size, seed)
    images = sample_grids(inputs.generator, schedules, size, seed)
    captions = {name: _caption(name, kind_of(name, inputs.final), schedules[name], final) for name in images}
    folder = out_dir / "samples"
    folder.mkdir(exist_ok=True)
    grids, files = [], []
    for name, image in images.items():
        grids.append(Grid(name, captions[name], png_bytes(image)))
        files.append(folder / f"samples_{name}.png")
        files[-1].write_bytes(grids[-1].png)
    if images:
        files.append(out_dir / "samples.png")
        files[-1].write_bytes(png_bytes(labelled_strip(images, {k: v.replace(": ", "\n", 1) for k, v in captions.items()})))
    return grids, files


def stop_line(stop: dict | None) -> str:
    """Why the search stopped, in one line (the study's search_stop attribute)."""
    if not stop:
        return "Search stop: not recorded (a study from before search.stop)"
    return f"Search stopped: {stop.get('text')} ({stop.get('candidates')} candidate-equivalents in all)"


def note_markdown(head: Headline | None, final: pd.DataFrame | None, command: str, stop: dict | None = None) -> str:
    """The study's note in optuna-dashboard: the headline, why the search stopped, the final table, the command."""
    parts = ["## Result (fresh seeds)", *(f"- {line}" for line in (head.lines() if head else ["no final evaluation"])),
             f"- {stop_line(stop)}"]
    if final is not None and not final.empty:
        parts += ["", "## Final comparison", "", to_markdown(final)]
    parts += ["## Reproduce", "", "```", command, "```"]
    return "\n".join(parts) + "\n"


def write_report(study: optuna.Study, inputs: ReportInputs, final: pd.DataFrame | None, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trials": out_dir / "trials.csv", "generations": out_dir / "generations.csv",
             "schedule": out_dir / "best_schedule.json", "figures": out_dir / "report.html"}
    trials = trials_table(study)
    trials.to_csv(paths["trials"], index=False)
    generation_summary(trials).to_csv(paths["generations"], index=False)
    figures = {"search-history": history_figure(trials, study.user_attrs.get(STOP_ATTR))}
    if len(study.directions) > 1:
        figures["pareto-front"] = pareto_figure(trials)
    smap = stored_map(study)
    if smap is not None:  # stage 2 ran with search.stage2.sensitivity
        figures["sensitivity-map"] = sensitivity_figure([list(r) for r in smap.delta], list(smap.timesteps),
                                                        list(inputs.layer_names[: smap.num_layers]), smap.base_fid,
                                                        smap.num_samples)
    if final is not None and not final.empty:
        paths["final_csv"], paths["final_md"] = out_dir / "final.csv", out_dir / "final.md"
        final.to_csv(paths["final_csv"], index=False)
        paths["final_md"].write_text(to_markdown(final))
        figures["final-fid"] = final_figure(final)
        figures["schedules"] = schedules_figure(final, inputs.model.num_train_timesteps)
        log.info("final comparison on fresh seeds:\n%s", final.to_string(index=False))
    best = best_fid_trial(study)
    genome = best_genome(study)
    settings, model = inputs.model_settings, inputs.model
    solver = inputs.generator.solver_of(genome)  # the solver gene, or solver.name
    clip_x0 = inputs.solver_settings.clip_x0
    info = {
        "model": str(model.source or settings.pretrained), "subfolder": settings.subfolder,
        "solver": solver, "clip_x0": clip_x0,
        "nfe": inputs.generator.nfe(genome), "fid_search": fid_of(best), "study": study.study_name,
        "storage": _redact(inputs.storage_url), "trial": best.number,
        "diffusers_scheduler": diffusers_scheduler(solver, clip_x0) if not genome.has_skips else None,
        "diffusers_snippet": snippet_for(model, settings, inputs.solver_settings, genome, solver),
        "model_config": {**asdict(settings), "skip_units": inputs.skip_units},
    }
    if final is not None and not final.empty:
        info["final"] = json.loads(final.to_json(orient="records"))
    export_schedule(paths["schedule"], genome, info, layer_names=list(inputs.layer_names))
    _page_and_dashboard(study, inputs, final, figures, paths["figures"], run_title(study.study_name, inputs, genome))
    log.info("report written to %s", out_dir)
    return paths


def snippet_for(model: DiffusionModel, settings: ModelConfig, solver_settings: SolverConfig, genome: Genome,
                solver: str) -> str:
    """The export's code: the family's own snippet (``ModelFamily.snippet``), else in the style of the model's
    family (``ModelFamily.export``): the model's own pipeline (DiT, SD3, Flux), Stable Diffusion's pipeline, or a
    plain UNet loop. ``solver`` is the schedule's (the solver gene's, or solver.name)."""
    clip_x0 = bool(solver_settings.clip_x0)
    source = resolve_pretrained(str(model.source or settings.pretrained))
    family = family_of_model(model)
    style = family.export if family is not None else "unet"
    if family is not None and family.snippet is not None:
        code = family.snippet(genome, source, solver, model, settings, clip_x0)
        return code if code is not None else apply_snippet(genome, solver, clip_x0,
                                                           f"no {family.name} snippet runs {solver} in diffusers")
    if style == "pipeline" and family is not None:
        if "vae" not in getattr(model, "components", {}):  # a latent pipeline cannot load a pixel-space folder
            return apply_snippet(genome, solver, clip_x0,
                                 f"{family.pipeline_class} needs a VAE and this model samples pixels")
        return pipeline_snippet(family.name, genome, source, solver, float(settings.guidance_scale), clip_x0,
                                settings.image_size)
    if style == "text_to_image":
        return sd_snippet(genome, str(settings.pretrained), solver, settings.guidance_scale)
    if model.prediction_type == "flow":
        return flow_snippet(genome, source, solver_settings.name, model.sample_shape, model.num_classes, clip_x0,
                            settings.subfolder)
    return diffusers_snippet(genome, source, solver, model.sample_shape, model.num_classes, settings.subfolder,
                             clip_x0=clip_x0)


def run_title(study_name: str, inputs: ReportInputs, genome: Genome) -> str:
    """The page title: model, the best schedule's solver (with the solver gene: which it was chosen from), K."""
    solver = inputs.generator.solver_of(genome)
    if inputs.search_solvers:
        solver = f"{solver} chosen from {'/'.join(str(s) for s in inputs.search_solvers)}"
    return f"autodiff-opt: {study_name} ({inputs.model_settings.name}, {solver}, K={genome.num_steps})"


def _page_and_dashboard(study: optuna.Study, inputs: ReportInputs, final: pd.DataFrame | None,
                        figures: dict[str, Any], page: Path, title: str) -> None:
    """report.html with the grids, then the note, plots and grids in the study for optuna-dashboard."""
    report = inputs.report_settings
    grids, grid_files = _write_grids(study, inputs, final, page.parent)
    head = headline(final) if final is not None else None
    command = reproduce_command(*job_overrides())
    note = (f"the same {report.grid_size}x{report.grid_size} initial noise"
            f"{' and class labels' if inputs.model.num_classes else ''} (seed final.seed={inputs.final.settings.seed})"
            " for every schedule")
    stop = study.user_attrs.get(STOP_ATTR)
    page.write_text(render_page(title, head, final, grids, list(figures.values()), inputs.settings_yaml, command,
                                grid_note=note, stop_note=stop_line(stop)))
    if report.dashboard:
        publish_note(study, note_markdown(head, final, command, stop))
        publish_figures(study, figures)
    if report.artifact_dir and grid_files:
        publish_artifacts(study, grid_files, report.artifact_dir)
