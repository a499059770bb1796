"""The report as one self-contained HTML page: headline, final table, sample grids, figures, settings, command.

plotly.js is inlined once and the images are base64 PNGs, so the file opens anywhere without a network. A
small script writes each plot's axis types and ranges as computed by plotly.js, and the plotted data, into
the plot's `data-axes` / `data-traces` attributes, so a headless browser's DOM shows what the reader sees."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from autodiff_opt.report.headline import Headline

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1280px; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.headline { font-size: 1.15em; background: #f3f7f4; border-left: 4px solid seagreen; padding: 8px 16px; }
table.final { border-collapse: collapse; font-size: 0.9em; }
table.final td, table.final th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
table.final td:first-child { text-align: left; font-weight: 600; }
.grids { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; display: flex; flex-direction: column; width: min-content; }
figcaption { font-size: 0.85em; }
img.grid { image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 0.85em; }
"""

AXES_SCRIPT = """
window.addEventListener('load', function () {
  var list = function (a) { return a == null ? [] : Array.prototype.slice.call(a); };
  document.querySelectorAll('.plotly-graph-div').forEach(function (gd) {
    var layout = gd._fullLayout || {}, axes = {};
    Object.keys(layout).forEach(function (key) {
      if (/^[xy]axis[0-9]*$/.test(key)) axes[key] = {type: layout[key].type, range: list(layout[key].range)};
    });
    var traces = (gd._fullData || []).map(function (t) {
      return {type: t.type, xaxis: t.xaxis, yaxis: t.yaxis, x: list(t.x), y: list(t.y), orientation: t.orientation,
              error_y: t.error_y && t.error_y.visible ? list(t.error_y.array) : []};
    });
    gd.setAttribute('data-axes', JSON.stringify(axes));
    gd.setAttribute('data-traces', JSON.stringify(traces));
  });
  document.body.setAttribute('data-plots-ready', String(document.querySelectorAll('.plotly-graph-div').length));
});
"""


@dataclass(frozen=True)
class Grid:
    """A sample grid and its caption (schedule, steps, FID)."""

    name: str
    caption: str
    png: bytes


def _headline_html(head: Headline | None) -> str:
    if head is None:
        return "<p class='headline'>No final evaluation in this run (final.enabled=false): see the figures.</p>"
    items = "".join(f"<li>{html.escape(line)}</li>" for line in head.lines())
    return f"<ul class='headline'>{items}</ul>"


SHOWN = ["schedule", "kind", "nfe", "timesteps", "fid_final", "fid_final_std", "fid_search",
         "ratio_to_best_heuristic", "ratio_to_best_peer"]
STAGE2_SHOWN = ["skipped_layers", "cost_full_steps"]


def _table_html(final: pd.DataFrame | None) -> str:
    """The columns a reader compares (final.csv has them all); stage-2 columns only where layers are skipped."""
    if final is None or final.empty:
        return "<p>No final comparison.</p>"
    shown = [c for c in SHOWN if c in final]
    if "skipped_layers" in final and (final.skipped_layers > 0).any():
        shown += [c for c in STAGE2_SHOWN if c in final]
    table = final[shown].assign(timesteps=final.timesteps.map(lambda steps: ", ".join(map(str, steps))))
    return table.to_html(index=False, classes="final", float_format=lambda v: f"{v:.3f}", na_rep="", border=0)


def _grids_html(grids: list[Grid]) -> str:
    if not grids:
        return "<p>No sample grids (report.grid_size=0).</p>"
    figures = [f"<figure><img class='grid' alt='{html.escape(g.name)}' src='data:image/png;base64,"
               f"{base64.b64encode(g.png).decode()}'><figcaption>{html.escape(g.caption)}</figcaption></figure>"
               for g in grids]
    return "<div class='grids'>" + "".join(figures) + "</div>"


def _figures_html(figures: list[go.Figure]) -> str:
    return "\n".join(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}",
                                 default_height="520px", default_width="100%") for i, fig in enumerate(figures))


def render_page(title: str, head: Headline | None, final: pd.DataFrame | None, grids: list[Grid],
                figures: list[go.Figure], settings: str, command: str, grid_note: str = "", stop_note: str = "") -> str:
    return "\n".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<section id='headline'>" + _headline_html(head)
        + (f"<p id='search-stop'>{html.escape(stop_note)}</p>" if stop_note else "") + "</section>",
        "<section id='final'><h2>Final comparison (fresh seeds)</h2>" + _table_html(final) + "</section>",
        f"<section id='samples'><h2>Samples from the same noise</h2><p>{html.escape(grid_note)}</p>"
        + _grids_html(grids) + "</section>",
        "<section id='figures'><h2>Figures</h2>" + _figures_html(figures) + "</section>",
        "<section id='settings'><h2>Reproduce</h2><pre id='command'>" + html.escape(command) + "</pre>"
        "<h2>Settings (resolved)</h2><pre id='config'>" + html.escape(settings) + "</pre></section>",
        f"<script type='text/javascript'>{AXES_SCRIPT}</script>",
        "</body></html>",
    ])
