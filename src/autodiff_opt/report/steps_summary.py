""""How many steps do I need?": the final tables of a multirun's jobs (one per search.num_steps) as one table
and one FID-vs-NFE figure, every schedule on the fresh seeds of its job.

Written by the Hydra callback at the end of `python -m autodiff_opt -m search.num_steps=3,4,6,8,10`
(report/multirun.py), or again by hand: `python -m autodiff_opt.report.steps_summary MULTIRUN_DIR`."""

from __future__ import annotations

import argparse
import html
import json
import logging
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import yaml
from plotly.offline import get_plotlyjs

from autodiff_opt.report.page import AXES_SCRIPT, STYLE
from autodiff_opt.report.write import to_markdown

log = logging.getLogger(__name__)

COLUMNS = ["num_steps", "schedule", "kind", "nfe", "fid_final", "fid_final_std", "ratio_to_best_heuristic",
           "ratio_to_best_peer", "timesteps", "job"]


def _num_steps(job_dir: Path, final: pd.DataFrame) -> int:
    """search.num_steps of the job (its saved Hydra config), else the NFE of its heuristic schedules."""
    saved = job_dir / ".hydra" / "config.yaml"
    if saved.exists():
        cfg = yaml.safe_load(saved.read_text())
        if isinstance(cfg, dict) and "search" in cfg:
            return int(cfg["search"]["num_steps"])
    return int(final.nfe.max())


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per (job, schedule) from every job folder holding a final.csv; sorted by K, then FID."""
    tables = []
    for path in sorted(sweep_dir.glob("*/final.csv")):
        final = pd.read_csv(path)
        final["num_steps"] = _num_steps(path.parent, final)
        final["job"] = path.parent.name
        tables.append(final)
    if not tables:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(tables, ignore_index=True)
    return table[[c for c in COLUMNS if c in table]].sort_values(["num_steps", "fid_final"]).reset_index(drop=True)


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """FID on fresh seeds (mean ± std) by schedule (rows: searched first, then by mean FID) and K (columns)."""
    cells = table.assign(cell=[f"{m:.3f} ± {s:.3f}" if pd.notna(m) else "failed"
                               for m, s in zip(table.fid_final, table.fid_final_std.fillna(0.0))])
    wide = cells.pivot_table(index="schedule", columns="num_steps", values="cell", aggfunc="first")
    order = table.groupby("schedule").fid_final.mean().sort_values().index.tolist()
    order = ["searched", *[s for s in order if s != "searched"]] if "searched" in order else order
    wide = wide.reindex(order)
    wide.columns = [f"K={k}" for k in wide.columns]
    return wide.reset_index().fillna("")


def fid_vs_nfe_figure(table: pd.DataFrame) -> go.Figure:
    """One line per schedule across the jobs: FID (mean, std as error bars) against NFE; log FID axis."""
    fig = go.Figure()
    for name, rows in table.sort_values("nfe").groupby("schedule", sort=False):
        searched = rows.kind.iloc[0] == "searched"
        fig.add_trace(go.Scatter(
            x=rows.nfe, y=rows.fid_final, mode="lines+markers", name=name,
            error_y={"type": "data", "array": rows.fid_final_std.fillna(0.0), "visible": True, "thickness": 1},
            line={"width": 4 if searched else 1.5, "color": "seagreen" if searched else None,
                  "dash": "solid" if searched or rows.kind.iloc[0] == "peer" else "dot"},
            marker={"size": 9 if searched else 6, "symbol": "diamond" if searched else "circle"},
            hovertemplate=f"{name}<br>NFE %{{x}}<br>FID %{{y:.3f}}<extra></extra>"))
    fig.update_layout(title="FID on fresh seeds vs number of steps (NFE), each K searched separately",
                      xaxis_title="NFE (network evaluations per image)", yaxis_title="FID (fresh seeds)",
                      yaxis_type="log", template="plotly_white", xaxis={"dtick": 1})
    return fig


def render_summary(table: pd.DataFrame, wide: pd.DataFrame, fig: go.Figure, sweep_dir: Path) -> str:
    title = f"autodiff-opt: how many steps? ({sweep_dir})"
    return "\n".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Every schedule is scored on the fresh seeds of its own job's final evaluation (final.seed);"
        " the searched schedule was searched for each K separately.</p>",
        fig.to_html(full_html=False, include_plotlyjs=False, div_id="figure-0", default_height="560px",
                    default_width="100%"),
        "<h2>FID on fresh seeds (mean ± std)</h2>",
        wide.to_html(index=False, classes="final", border=0),
        "<h2>All rows</h2>",
        table.to_html(index=False, classes="final", float_format=lambda v: f"{v:.3f}", na_rep="", border=0),
        f"<script type='text/javascript'>{AXES_SCRIPT}</script>",
        "</body></html>",
    ])


def write_summary(sweep_dir: str | Path) -> dict[str, Path]:
    """summary.csv (long), summary.md (wide), summary.html (figure and both tables) in the sweep folder;
    nothing when no job has a final table."""
    sweep_dir = Path(sweep_dir)
    table = collect(sweep_dir)
    if table.empty:
        log.warning("no final.csv in the jobs of %s: no steps summary (final.enabled=false?)", sweep_dir)
        return {}
    wide = wide_table(table)
    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "html": sweep_dir / "summary.html"}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(to_markdown(wide))
    paths["html"].write_text(render_summary(table, wide, fid_vs_nfe_figure(table), sweep_dir))
    log.info("steps summary of %d jobs written to %s:\n%s", table.job.nunique(), paths["html"],
             wide.to_string(index=False))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (holds one folder per job)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_summary(args.sweep_dir)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
