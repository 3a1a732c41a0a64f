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
