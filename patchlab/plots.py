"""plotly figures for every result type; each function takes a result and returns a Figure."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import plotly.graph_objects as go

if TYPE_CHECKING:
    from .evaluate import GapResult


def esc(text: object) -> str:
    """HTML-escape any user text placed in a label, title or table of a figure."""
    return html.escape(str(text), quote=True)


def gap_figure(result: GapResult) -> go.Figure:
    """Grouped bars per kind: hop1, hop2, composed accuracy and the gap share."""
    kinds = [k for k in result.summary if k != "all"] + ["all"]
    fig = go.Figure()
    series = [("hop1_acc", "hop 1 correct"), ("hop2_acc", "hop 2 correct"), ("composed_acc", "composed correct"),
              ("gap_share", "gap (composed wrong | both hops right)")]
    for key, label in series:
        s = [result.summary[k] for k in kinds]
        fig.add_bar(
            name=label,
            x=[esc(k) for k in kinds],
            y=[row[key] for row in s],
            customdata=[[row["n"], row["both_hops"], row["gap_count"]] for row in s],
            hovertemplate="%{x}<br>" + label + ": %{y:.2f}<br>n=%{customdata[0]}, both hops right="
            "%{customdata[1]}, gap=%{customdata[2]}<extra></extra>",
        )
    fig.update_layout(
        barmode="group",
        title=f"Compositionality gap — {esc(result.model)}",
        yaxis=dict(title="share of items", range=[0, 1]),
        xaxis=dict(title="kind of two-hop chain"),
        legend=dict(orientation="h", y=-0.25),
        template="plotly_white",
    )
    return fig


GROUP_DASH = {"correct": "solid", "failed": "dash", "other": "dot", "all": "solid"}
TRACK_COLOR = {"bridge": "#1f77b4", "answer": "#d62728"}


def _color(name: str, i: int) -> str:
    palette = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    return TRACK_COLOR.get(name, palette[i % len(palette)])


def lens_figure(result) -> go.Figure:
    """Per-layer curves of each tracked token: geometric-mean rank (log axis, quartile band) and mean prob."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("rank (geometric mean, quartile band)", "probability (mean ± std)"))
    x = result.layers
    for gi, (group, tracks) in enumerate(result.summary.items()):
        for ti, (name, s) in enumerate(tracks.items()):
            color, dash = _color(name, ti), GROUP_DASH.get(group, "dashdot")
            label = f"{esc(name)} — {esc(group)} (n={s['n'][0]})"
            fig.add_scatter(x=x + x[::-1], y=s["rank_q75"] + s["rank_q25"][::-1], fill="toself", line=dict(width=0),
                            fillcolor=color, opacity=0.08, showlegend=False, hoverinfo="skip", row=1, col=1)
            fig.add_scatter(x=x, y=s["geo_rank"], name=label, legendgroup=label, line=dict(color=color, dash=dash),
                            hovertemplate="%{x}: rank %{y:.1f}<extra>" + label + "</extra>", row=1, col=1)
            fig.add_scatter(x=x, y=s["mean_prob"], name=label, legendgroup=label, showlegend=False,
                            error_y=dict(array=s["std_prob"], thickness=0.6), line=dict(color=color, dash=dash),
                            hovertemplate="%{x}: p %{y:.3f}<extra>" + label + "</extra>", row=1, col=2)
    fig.update_yaxes(type="log", autorange="reversed", title="rank (1 = top)", row=1, col=1)
    fig.update_yaxes(title="probability", rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title="residual stream entering layer")
    fig.update_layout(title=f"Logit lens at the last position — {esc(result.model)}", template="plotly_white",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def topk_figure(result) -> go.Figure:
    """Layer × position heatmap of the lens's top-1 probability, top token written in each cell, top-k on hover."""
    z = [[pos[0] for pos in layer] for layer in result.top_probs]
    text = [[esc(pos[0]) for pos in layer] for layer in result.top_tokens]
    hover = [
        ["<br>".join(f"{esc(t)!s}: {p:.3f}" for t, p in zip(toks, ps)) for toks, ps in zip(lt, lp)]
        for lt, lp in zip(result.top_tokens, result.top_probs)
    ]
    cols = [f"{i}:{esc(t)}" for i, t in enumerate(result.positions)]
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=result.layers, text=text, texttemplate="%{text}", customdata=hover,
                               hovertemplate="%{y} @ %{x}<br>%{customdata}<extra></extra>", colorscale="Blues",
                               zmin=0, zmax=1, colorbar=dict(title="top-1 p")))
    fig.update_layout(title=f"Logit lens, top token per layer and position — {esc(result.prompt)}",
                      xaxis_title="position: token", yaxis_title="residual stream entering layer",
                      template="plotly_white", height=max(500, 22 * len(result.layers)))
    return fig


def intervention_figure(result) -> go.Figure:
    """Change of the answer's probability per layer: bridge direction removed vs control tokens."""
    s = result.summary
    fig = go.Figure()
    for key, label, color in (("bridge", "bridge direction removed", "#1f77b4"), ("control", "control token removed", "#7f7f7f")):
        fig.add_scatter(x=result.layers, y=s[f"{key}_mean"], name=label, line=dict(color=color),
                        error_y=dict(array=s[f"{key}_sem"], thickness=0.8),
                        hovertemplate="layer %{x}: Δp %{y:.4f}<extra>" + label + "</extra>")
    fig.add_hline(y=0, line=dict(color="black", width=0.5))
    fig.update_layout(title=f"Bridge-entity intervention (last position, n={len(result.ids)}) — {esc(result.model)}",
                      xaxis_title="layer (residual stream entering the block)",
                      yaxis_title="Δ p(answer), mean ± s.e.m.", template="plotly_white")
    return fig


def locate_figure(result) -> go.Figure:
    """Layer × head heatmap of the mean normalised effect (hover: mean, std, n); a position × layer view
    of the first item when positions were patched one by one."""
    from plotly.subplots import make_subplots

    by_pos = next((r for r in result.items if r.get("by_pos")), None)
    cols = 2 if by_pos else 1
    fig = make_subplots(rows=1, cols=cols, column_widths=[0.5, 0.5] if by_pos else None,
                        subplot_titles=("mean normalised effect", f"item {esc(by_pos['id'])}: sum over heads" if by_pos else ""))
    units = [str(h) for h in range(result.n_heads)] if result.site == "z" else [result.site]
    hover = [[f"mean {m if m is not None else float('nan'):.3f}<br>std {s if s is not None else float('nan'):.3f}<br>n {result.n}"
              for m, s in zip(mr, sr)] for mr, sr in zip(result.mean, result.std)]
    top = max((abs(v) for row in result.mean for v in row if v is not None), default=1.0) or 1.0
    fig.add_heatmap(z=result.mean, x=units, y=list(range(result.n_layers)), customdata=hover, colorscale="RdBu",
                    zmid=0, zmin=-top, zmax=top, hovertemplate="layer %{y}, head %{x}<br>%{customdata}<extra></extra>",
                    colorbar=dict(title="effect", x=0.46 if by_pos else 1.0), row=1, col=1)
    if by_pos:
        z = [[sum(v for v in pos) for pos in layer] for layer in by_pos["by_pos"]]
        fig.add_heatmap(z=z, y=list(range(result.n_layers)), colorscale="RdBu", zmid=0, showscale=False,
                        hovertemplate="layer %{y}, position %{x}: %{z:.3f}<extra></extra>", row=1, col=2)
        fig.update_xaxes(title="position", row=1, col=2)
    fig.update_xaxes(title="head" if result.site == "z" else "", row=1, col=1)
    fig.update_yaxes(title="layer", row=1, col=1)
    fig.update_layout(title=f"Activation patching ({esc(result.setup)}, {esc(result.method)}, {esc(result.site)}, "
                            f"positions {esc(result.positions)}, n={result.n}) — {esc(result.model)}",
                      template="plotly_white", height=max(500, 18 * result.n_layers))
    return fig


def edit_figure(report) -> go.Figure:
    """Before / after event rate per test set (bars), with the relative probability increase C on hover."""
    names = [n for n, s in report.summary.items() if s.get("n")]
    fig = go.Figure()
    for key, label, color in (("before", "before edit", "#9e9e9e"), ("after", "after edit", "#1f77b4")):
        fig.add_bar(name=label, x=[esc(n) for n in names], y=[report.summary[n][key] for n in names], marker_color=color,
                    customdata=[[report.summary[n]["n"], report.summary[n]["C"] or 0.0] for n in names],
                    hovertemplate="%{x}: %{y:.2f} (n=%{customdata[0]}, C=%{customdata[1]:.2f})<extra>" + label + "</extra>")
    fig.update_layout(barmode="group", template="plotly_white", yaxis=dict(title="event rate (greedy answer right)", range=[0, 1]),
                      title=f"Edit of heads {esc(', '.join(report.heads))} ({esc(report.target)} target"
                            f"{', batch' if report.batch else ''}; {report.seconds_per_edit:.1f} s/edit) — {esc(report.model)}")
    return fig
