"""Plotly figures of a study: the search history against the baselines, and the schedules side by side."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

LABEL_HEIGHT = 0.06  # a label's height as a fraction of the plot's height


def label_sides(levels: list[float], data: list[float]) -> list[str]:
    """'top' or 'bottom' for the label of each horizontal line at levels (ascending, on a log axis spanning
    data): a label goes above its line, except the lower of two lines too close for two labels between them."""
    positive = [v for v in data + levels if v > 0]
    if not positive:
        return ["top"] * len(levels)
    span = max(math.log10(max(positive)) - math.log10(min(positive)), 1e-9)
    sides = ["top"] * len(levels)
    for i in range(1, len(levels)):
        if levels[i - 1] > 0 and math.log10(levels[i] / levels[i - 1]) / span < LABEL_HEIGHT:
            sides[i - 1] = "bottom"
    return sides


def history_figure(trials: pd.DataFrame, stop: dict | None = None) -> go.Figure:
    """FID of every candidate by trial number (coloured by generation where the sampler has them; pruned
    candidates in grey at their prefix FID); best so far; baselines and peers as labelled lines; where and
    why the search stopped (``stop``: the study's search_stop attribute) as a dotted vertical line."""
    done = trials[trials.state == "COMPLETE"].sort_values("trial")
    pruned = trials[(trials.state == "PRUNED") & trials.fid.notna()]
    fig = go.Figure()
    searched = done[done.baseline.isna()]
    by_generation = searched.generation.notna().all() and not searched.empty
    fig.add_trace(go.Scatter(
        x=pruned.trial, y=pruned.fid, mode="markers", name="pruned (FID on a prefix)",
        marker={"color": "lightgrey", "size": 4}, hovertemplate="trial %{x}<br>prefix FID %{y:.3f}<extra></extra>",
    ))
    marker = ({"color": searched.generation, "colorscale": "Viridis", "showscale": True,
               "colorbar": {"title": "generation"}, "size": 6} if by_generation else {"color": "teal", "size": 6})
    fig.add_trace(go.Scatter(
        x=searched.trial, y=searched.fid, mode="markers", name="candidates", marker=marker,
        text=[f"steps {s}<br>{op}" for s, op in zip(searched.timesteps, searched.operator)],
        hovertemplate="trial %{x}<br>FID %{y:.3f}<br>%{text}<extra></extra>",
    ))
    fig.add_trace(go.Scatter(x=done.trial, y=done.fid.cummin(), mode="lines", name="best so far",
                             line={"color": "black"}))
    last = int(trials.trial.max()) if not trials.empty else 1
    baselines = done[done.baseline.notna()].sort_values("fid")
    sides = label_sides(list(baselines.fid), list(trials.fid.dropna()))
    for side, (_, row) in zip(sides, baselines.iterrows()):  # a trace, not add_hline: its label sits right on a log axis
        fig.add_trace(go.Scatter(x=[0, last], y=[row.fid, row.fid], mode="lines+text", showlegend=False,
                                 line={"dash": "dash", "color": "firebrick", "width": 1}, opacity=0.6,
                                 text=["", f"{row.baseline} {row.timesteps}"], textposition=f"{side} left",
                                 hoverinfo="skip"))
    if stop and stop.get("trial") is not None and stop["trial"] >= 0:
        fig.add_vline(x=stop["trial"], line={"dash": "dot", "color": "royalblue"},
                      annotation={"text": f"stop: {stop.get('reason')} at {stop.get('candidates')} cand.",
                                  "font": {"color": "royalblue"}}, annotation_position="top left")
    fig.update_layout(title="Search history (same seeds for every candidate)", xaxis_title="trial",
                      yaxis_title="FID (search samples)", yaxis_type="log", template="plotly_white",
                      legend={"orientation": "h", "y": -0.18})  # beside the colour bar it would cover it
    return fig


def schedules_figure(final: pd.DataFrame, num_train_timesteps: int) -> go.Figure:
    """Each schedule's time steps on one axis, labelled with its FID on fresh seeds."""
    fig = go.Figure()
    ordered = final.sort_values("fid_final", ascending=False)
    for _, row in ordered.iterrows():
        label = f"{row.schedule} (FID {row.fid_final:.2f})"
        fig.add_trace(go.Scatter(x=row.timesteps, y=[label] * len(row.timesteps), mode="markers+lines",
                                 name=row.schedule, marker={"size": 11, "symbol": "diamond" if row.kind == "searched" else "circle"}))
    fig.update_layout(title="Schedules (final evaluation on fresh seeds)", xaxis_title="time step t",
                      xaxis_range=[-20, num_train_timesteps + 20], showlegend=False, template="plotly_white")
    return fig


def final_figure(final: pd.DataFrame) -> go.Figure:
    ordered = final.sort_values("fid_final")
    colors = ["seagreen" if k == "searched" else "steelblue" for k in ordered.kind]
    error = {"type": "data", "array": ordered.fid_final_std} if "fid_final_std" in ordered else None
    fig = go.Figure(go.Bar(x=ordered.schedule, y=ordered.fid_final, marker_color=colors, error_y=error,
                           text=[f"{v:.2f}" for v in ordered.fid_final], textposition="inside",
                           insidetextanchor="start", textfont={"color": "white"}))  # clear of the error bars
    fig.update_layout(title="FID on fresh seeds (mean and std over independent sample sets), same NFE",
                      yaxis_title="FID", template="plotly_white")
    return fig


def pareto_figure(trials: pd.DataFrame) -> go.Figure:
    """Multi-objective mode: FID against cost (in full network evaluations), the Pareto front joined."""
    done = trials[(trials.state == "COMPLETE") & trials.cost_full_steps.notna()]
    front = done.sort_values(["cost_full_steps", "fid"])
    front = front[front.fid <= front.fid.cummin()]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=done.cost_full_steps, y=done.fid, mode="markers", name="candidates",
                             marker={"color": done.generation.fillna(-1), "colorscale": "Viridis", "size": 6},
                             text=[str(s) for s in done.timesteps],
                             hovertemplate="cost %{x:.2f}<br>FID %{y:.3f}<br>%{text}<extra></extra>"))
    fig.add_trace(go.Scatter(x=front.cost_full_steps, y=front.fid, mode="lines+markers", name="Pareto front",
                             line={"color": "black"}))
    fig.update_layout(title="FID vs compute (full network evaluations)", xaxis_title="cost (full steps)",
                      yaxis_title="FID (search samples)", template="plotly_white")
    return fig


def sensitivity_figure(delta: list[list[float]], timesteps: list[int], layer_names: list[str], base_fid: float,
                       num_samples: int) -> go.Figure:
    """Stage 2's sensitivity map: FID change when one layer alone is skipped at one step of the stage-1 best."""
    finite = [v for row in delta for v in row if math.isfinite(v)]
    bound = max((abs(v) for v in finite), default=1.0) or 1.0
    z = [[v if math.isfinite(v) else None for v in row] for row in delta]
    fig = go.Figure(go.Heatmap(
        z=z, x=layer_names, y=[f"step {i} (t={t})" for i, t in enumerate(timesteps)], colorscale="RdBu_r",
        zmid=0.0, zmin=-bound, zmax=bound, colorbar={"title": "FID change"},
        hovertemplate="%{y}<br>%{x} skipped<br>FID change %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"Sensitivity: FID change when one layer alone is skipped at one step (stage-1 best,"
                            f" FID {base_fid:.3f} on the first {num_samples} search samples)",
                      xaxis_title="skipped layer", yaxis_title="step of the stage-1 best schedule",
                      yaxis_autorange="reversed", template="plotly_white")
    return fig
