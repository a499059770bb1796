"""Write a study's report into the run directory: CSV/Markdown tables, HTML figures, the schedule JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd

from autodiff_opt.models.loading import resolve_pretrained
from autodiff_opt.report.export import diffusers_scheduler, diffusers_snippet, export_schedule, sd_snippet
from autodiff_opt.report.figures import final_figure, history_figure, pareto_figure, schedules_figure
from autodiff_opt.report.tables import generation_summary, trials_table
from autodiff_opt.search.final import best_genome
from autodiff_opt.search.space import best_fid_trial, fid_of
from autodiff_opt.search.study import _redact

if TYPE_CHECKING:
    from autodiff_opt.runner import Experiment

log = logging.getLogger(__name__)


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


def _write_figures(path: Path, figures: list[Any]) -> None:
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    path.write_text("<html><head><meta charset='utf-8'><title>autodiff-opt report</title></head><body>"
                    + "\n".join(parts) + "</body></html>")


def write_report(study: optuna.Study, exp: "Experiment", final: pd.DataFrame | None, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trials": out_dir / "trials.csv", "generations": out_dir / "generations.csv",
             "schedule": out_dir / "best_schedule.json", "figures": out_dir / "report.html"}
    trials = trials_table(study)
    trials.to_csv(paths["trials"], index=False)
    generation_summary(trials).to_csv(paths["generations"], index=False)
    figures = [history_figure(trials)]
    if len(study.directions) > 1:
        figures.append(pareto_figure(trials))
    if final is not None and not final.empty:
        paths["final_csv"], paths["final_md"] = out_dir / "final.csv", out_dir / "final.md"
        final.to_csv(paths["final_csv"], index=False)
        paths["final_md"].write_text(to_markdown(final))
        figures += [final_figure(final), schedules_figure(final, exp.space.num_train_timesteps)]
        log.info("final comparison on fresh seeds:\n%s", final.to_string(index=False))
    _write_figures(paths["figures"], figures)
    best = best_fid_trial(study)
    genome = best_genome(study)
    cfg = exp.cfg
    solver = exp.generator.solver_of(genome)  # the solver gene, or solver.name
    info = {
        "model": str(exp.model.extras.get("source", cfg.model.pretrained)), "subfolder": cfg.model.subfolder,
        "solver": solver, "clip_x0": cfg.solver.clip_x0,
        "nfe": exp.generator.nfe(genome), "fid_search": fid_of(best), "study": study.study_name,
        "storage": _redact(str(cfg.storage.url)), "trial": best.number,
        "diffusers_scheduler": diffusers_scheduler(solver, cfg.solver.clip_x0) if not genome.has_skips else None,
        "diffusers_snippet": (sd_snippet(genome, str(cfg.model.pretrained), solver, cfg.model.guidance_scale)
                              if cfg.model.prompts else
                              diffusers_snippet(genome, resolve_pretrained(str(exp.model.extras.get("source", cfg.model.pretrained))),
                                                solver, exp.model.sample_shape, exp.model.num_classes,
                                                cfg.model.subfolder, clip_x0=cfg.solver.clip_x0)),
    }
    if final is not None and not final.empty:
        info["final"] = json.loads(final.to_json(orient="records"))
    skipper = exp.model.extras.get("skipper")
    names = [layer.name for layer in skipper.layers] if skipper is not None else None
    export_schedule(paths["schedule"], genome, info, layer_names=names)
    log.info("report written to %s", out_dir)
    return paths
