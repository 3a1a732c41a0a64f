"""plotly figures for every result type; each function takes a result and returns a Figure."""

from __future__ import annotations

import html

import plotly.graph_objects as go


def esc(text: object) -> str:
    """HTML-escape any user text placed in a label, title or table of a figure."""
    return html.escape(str(text), quote=True)


def wrap_label(text: object, width: int = 10) -> str:
    """An escaped tick label broken into lines of about `width` characters, after each '>' of a chain
    ("city>country>continent") or at spaces, so that a long label is shown whole, never cut."""
    import re

    parts = [p for p in re.split(r"(?<=>)|(?<= )", str(text)) if p]
    lines, line = [], ""
    for part in parts:
        if line and len(line) + len(part.rstrip()) > width:
            lines.append(line)
            line = ""
        line += part
    lines.append(line)
    return "<br>".join(esc(l.strip()) for l in lines if l.strip())


def gap_figure(result) -> go.Figure:
    """Grouped bars per kind: hop1, hop2, composed accuracy and the gap share; each kind's label written whole
    (wrapped onto lines under its bars)."""
    kinds = [k for k in result.summary if k != "all"] + ["all"]
    fig = go.Figure()
    series = [
        ("hop1_acc", "hop 1 correct"),
        ("hop2_acc", "hop 2 correct"),
        ("composed_acc", "composed correct"),
        ("gap_share", "gap (composed wrong | both hops right)"),
    ]
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
        xaxis=dict(
            title="kind of two-hop chain",
            tickmode="array",
            tickvals=[esc(k) for k in kinds],
            ticktext=[wrap_label(k) for k in kinds],
            tickangle=0,
            automargin=True,
        ),
        legend=dict(orientation="h", y=-0.35),
        margin=dict(b=150),
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

    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("rank (geometric mean, quartile band)", "probability (mean ± std)")
    )
    x = result.layers
    for group, tracks in result.summary.items():
        for ti, (name, s) in enumerate(tracks.items()):
            color, dash = _color(name, ti), GROUP_DASH.get(group, "dashdot")
            label = f"{esc(name)} — {esc(group)} (n={s['n'][0]})"
            fig.add_scatter(
                x=x + x[::-1],
                y=s["rank_q75"] + s["rank_q25"][::-1],
                fill="toself",
                line=dict(width=0),
                fillcolor=color,
                opacity=0.08,
                showlegend=False,
                hoverinfo="skip",
                row=1,
                col=1,
            )
            fig.add_scatter(
                x=x,
                y=s["geo_rank"],
                name=label,
                legendgroup=label,
                line=dict(color=color, dash=dash),
                hovertemplate="%{x}: rank %{y:.1f}<extra>" + label + "</extra>",
                row=1,
                col=1,
            )
            fig.add_scatter(
                x=x,
                y=s["mean_prob"],
                name=label,
                legendgroup=label,
                showlegend=False,
                error_y=dict(array=s["std_prob"], thickness=0.6),
                line=dict(color=color, dash=dash),
                hovertemplate="%{x}: p %{y:.3f}<extra>" + label + "</extra>",
                row=1,
                col=2,
            )
    fig.update_yaxes(type="log", autorange="reversed", title="rank (1 = top)", row=1, col=1)
    fig.update_yaxes(title="probability", rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title="residual stream entering layer")
    fig.update_layout(
        title=f"Logit lens at the last position — {esc(result.model)}",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.25),
    )
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
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cols,
            y=result.layers,
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{y} @ %{x}<br>%{customdata}<extra></extra>",
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar=dict(title="top-1 p"),
        )
    )
    fig.update_layout(
        title=f"Logit lens, top token per layer and position — {esc(result.prompt)}",
        xaxis_title="position: token",
        yaxis_title="residual stream entering layer",
        template="plotly_white",
        height=max(500, 22 * len(result.layers)),
    )
    return fig


def intervention_figure(result) -> go.Figure:
    """Change of the answer's probability per layer: bridge direction removed vs control tokens."""
    s = result.summary
    fig = go.Figure()
    for key, label, color in (
        ("bridge", "bridge direction removed", "#1f77b4"),
        ("control", "control token removed", "#7f7f7f"),
    ):
        fig.add_scatter(
            x=result.layers,
            y=s[f"{key}_mean"],
            name=label,
            line=dict(color=color),
            error_y=dict(array=s[f"{key}_sem"], thickness=0.8),
            hovertemplate="layer %{x}: Δp %{y:.4f}<extra>" + label + "</extra>",
        )
    fig.add_hline(y=0, line=dict(color="black", width=0.5))
    fig.update_layout(
        title=f"Bridge-entity intervention (last position, n={len(result.ids)}) — {esc(result.model)}",
        xaxis_title="layer (residual stream entering the block)",
        yaxis_title="Δ p(answer), mean ± s.e.m.",
        template="plotly_white",
    )
    return fig


def locate_figure(result) -> go.Figure:
    """Layer × head heatmap of the mean normalised effect (hover: mean, std, n); a position × layer view
    of the first item when positions were patched one by one."""
    from plotly.subplots import make_subplots

    by_pos = next((r for r in result.items if r.get("by_pos")), None)
    cols = 2 if by_pos else 1
    fig = make_subplots(
        rows=1,
        cols=cols,
        column_widths=[0.5, 0.5] if by_pos else None,
        subplot_titles=("mean normalised effect", f"item {esc(by_pos['id'])}: sum over heads" if by_pos else ""),
    )
    units = [str(h) for h in range(result.n_heads)] if result.site == "z" else [result.site]
    hover = [
        [
            f"mean {m if m is not None else float('nan'):.3f}<br>std {s if s is not None else float('nan'):.3f}<br>n {result.n}"
            for m, s in zip(mr, sr)
        ]
        for mr, sr in zip(result.mean, result.std)
    ]
    top = max((abs(v) for row in result.mean for v in row if v is not None), default=1.0) or 1.0
    fig.add_heatmap(
        z=result.mean,
        x=units,
        y=list(range(result.n_layers)),
        customdata=hover,
        colorscale="RdBu",
        zmid=0,
        zmin=-top,
        zmax=top,
        hovertemplate="layer %{y}, head %{x}<br>%{customdata}<extra></extra>",
        colorbar=dict(title="effect", x=0.46 if by_pos else 1.0),
        row=1,
        col=1,
    )
    if by_pos:
        z = [[sum(v for v in pos) for pos in layer] for layer in by_pos["by_pos"]]
        fig.add_heatmap(
            z=z,
            y=list(range(result.n_layers)),
            colorscale="RdBu",
            zmid=0,
            showscale=False,
            hovertemplate="layer %{y}, position %{x}: %{z:.3f}<extra></extra>",
            row=1,
            col=2,
        )
        fig.update_xaxes(title="position", row=1, col=2)
    fig.update_xaxes(title="head" if result.site == "z" else "", row=1, col=1)
    fig.update_yaxes(title="layer", row=1, col=1)
    fig.update_layout(
        title=f"Activation patching ({esc(result.setup)}, {esc(result.method)}, {esc(result.site)}, "
        f"positions {esc(result.positions)}, n={result.n}) — {esc(result.model)}",
        template="plotly_white",
        height=max(500, 18 * result.n_layers),
    )
    return fig


def edit_figure(report) -> go.Figure:
    """Before / after event rate per test set (bars), with the relative probability increase C on hover."""
    names = [n for n, s in report.summary.items() if s.get("n")]
    fig = go.Figure()
    for key, label, color in (("before", "before edit", "#9e9e9e"), ("after", "after edit", "#1f77b4")):
        fig.add_bar(
            name=label,
            x=[esc(n) for n in names],
            y=[report.summary[n][key] for n in names],
            marker_color=color,
            customdata=[[report.summary[n]["n"], report.summary[n]["C"] or 0.0] for n in names],
            hovertemplate="%{x}: %{y:.2f} (n=%{customdata[0]}, C=%{customdata[1]:.2f})<extra>" + label + "</extra>",
        )
    fig.update_layout(
        barmode="group",
        template="plotly_white",
        yaxis=dict(title="event rate (greedy answer right)", range=[0, 1]),
        title=f"Edit of heads {esc(', '.join(report.heads))} ({esc(report.target)} target"
        f"{', batch' if report.batch else ''}; {report.seconds_per_edit:.1f} s/edit) — {esc(report.model)}",
    )
    return fig


def _retune_bars(result) -> tuple[list[str], dict[str, list[float | None]]]:
    """Bar labels and before / after values: accuracy per set, synonym retention, edit correction."""
    ev, labels, vals = result.evaluation, [], {"before": [], "after": []}
    if ev.get("before") and ev.get("after"):
        for name in ev["before"]["accuracy"]:
            labels.append(f"accuracy: {name}")
            for when in vals:
                vals[when].append(ev[when]["accuracy"].get(name))
        for name, rates in ev["before"]["synonyms"].items():
            for rate in rates:
                labels.append(f"synonyms {rate}: {name}")
                for when in vals:
                    vals[when].append(ev[when]["synonyms"][name][rate]["retention"])
    for name, s in result.edit.get("correction", {}).items():
        labels.append(f"edit {name}")
        for when in vals:
            vals[when].append(s.get(when))
    return labels, vals


def retune_figure(result) -> go.Figure:
    """Training curves (task, L_MI, L_stab, total loss per step) and before / after bars of the evaluation."""
    from plotly.subplots import make_subplots

    labels, vals = _retune_bars(result)
    cols = 2 if labels else 1
    fig = make_subplots(
        rows=1,
        cols=cols,
        column_widths=[0.55, 0.45] if labels else None,
        subplot_titles=("loss per step", "before / after re-tuning" if labels else ""),
    )
    steps = [r["step"] for r in result.history]
    series = [
        ("task", "task (answer cross-entropy)", "#1f77b4"),
        ("mi", "L_MI (word InfoNCE)", "#2ca02c"),
        ("stab", "L_stab (layer drift)", "#9467bd"),
        ("total", "total", "#d62728"),
    ]
    for key, label, color in series:
        if any(key in r for r in result.history) and (key != "total" or result.carma):
            fig.add_scatter(
                x=steps,
                y=[r.get(key) for r in result.history],
                name=label,
                line=dict(color=color),
                hovertemplate="step %{x}: %{y:.4f}<extra>" + label + "</extra>",
                row=1,
                col=1,
            )
    if result.resumed_from:
        fig.add_vline(
            x=result.resumed_from, line=dict(color="gray", dash="dot"), annotation_text="resumed", row=1, col=1
        )
    fig.update_xaxes(title="step", row=1, col=1)
    fig.update_yaxes(title="loss", rangemode="tozero", row=1, col=1)
    if labels:
        for when, color in (("before", "#9e9e9e"), ("after", "#1f77b4")):
            fig.add_bar(
                x=[esc(l) for l in labels],
                y=vals[when],
                name=f"{when} re-tuning",
                marker_color=color,
                hovertemplate="%{x}: %{y:.3f}<extra>" + when + "</extra>",
                row=1,
                col=2,
            )
        fig.update_yaxes(title="share", range=[0, 1], row=1, col=2)
        fig.update_layout(barmode="group")
    how = "CARMA" if result.carma else "plain"
    fig.update_layout(
        title=f"Re-tuning ({how}, {esc(result.task)}, params {esc(result.config.get('params'))}, "
        f"{len(result.history)} steps, lr {result.config.get('lr')}) — {esc(result.model)}",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


MECH_COLOR = {"plain": "#d62728", "routed": "#1f77b4"}


def mechanisms_figure(result) -> go.Figure:
    """One panel per test set: the share answered right vs number of stacked edits, one line per variant
    (plain = deltas summed into W_O, routed = gated modules); hover shows n and the relative Δp C."""
    from plotly.subplots import make_subplots

    metrics = [
        m
        for m in ("correction", "retention", "paraphrase", "irrelevance", "facts", "entity_facts", "edited")
        if any(s["n"] for c in result.curves.values() for s in c.get(m, []))
    ]
    cols = 3
    rows = -(-len(metrics) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[esc(m) for m in metrics])
    palette = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for vi, (variant, curve) in enumerate(result.curves.items()):
        color = MECH_COLOR.get(variant, palette[vi % len(palette)])
        for mi_, metric in enumerate(metrics):
            pts = [(n, s) for n, s in zip(result.stages, curve[metric]) if s["n"]]
            fig.add_scatter(
                x=[n for n, _ in pts],
                y=[s["after"] for _, s in pts],
                mode="lines+markers",
                name=esc(variant),
                legendgroup=esc(variant),
                showlegend=mi_ == 0,
                line=dict(color=color),
                customdata=[[s["n"], s["C"] or 0.0, s["before"] or 0.0] for _, s in pts],
                hovertemplate="%{x} edits: %{y:.2f} (before %{customdata[2]:.2f}, n=%{customdata[0]}, "
                "C=%{customdata[1]:.2f})<extra>" + esc(variant) + "</extra>",
                row=mi_ // cols + 1,
                col=mi_ % cols + 1,
            )
    fig.update_yaxes(range=[-0.02, 1.02], title="share right")
    fig.update_xaxes(title="edits stacked", type="log")
    dep = "; ".join(
        f"{esc(k)}: HSIC {v['hsic']:.3f}" for k, v in result.dependence.items() if v.get("hsic") is not None
    )
    fig.update_layout(
        title=f"Sequential edits of {esc(', '.join(result.heads))}, plain vs routed ({esc(result.gate)} gates)"
        f" — {esc(result.model)}" + (f"<br><sup>dependence between modules: {dep}</sup>" if dep else ""),
        template="plotly_white",
        height=330 * rows,
        legend=dict(orientation="h", y=-0.12),
    )
    return fig


EMERGENCE_PALETTE = ["#1f77b4", "#d62728", "#7f7f7f", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22"]


def emergence_figure(conditions: dict, model: str, experiment: str = "", summary: dict | None = None) -> go.Figure:
    """IE, macro MI and mean micro MI per block, one line per condition with its ± std band (bootstrap or
    seeds); for the icl experiment a fourth panel: layer-mean IE and next-token accuracy against k."""
    from plotly.subplots import make_subplots

    icl = bool(summary) and all("k" in s for s in summary.values())
    titles = ["information emergence E(l) (bits)", "macro MI (bits)", "mean micro MI (bits)"]
    fig = make_subplots(
        rows=1,
        cols=4 if icl else 3,
        subplot_titles=titles + (["layer-mean IE vs k"] if icl else []),
        specs=[[{}, {}, {}] + ([{"secondary_y": True}] if icl else [])],
    )
    first = next(iter(conditions.values()))
    for ci, (name, r) in enumerate(conditions.items()):
        color = EMERGENCE_PALETTE[ci % len(EMERGENCE_PALETTE)]
        label = f"{esc(name)} (n={r['n']}, T={r['T']})"
        for col, (key, std_key) in enumerate((("ie", "ie_std"), ("macro", "macro_std"), ("micro", "micro_std")), 1):
            x, y, sd = r["layers"], r[key], r.get(std_key)
            if sd:
                fig.add_scatter(
                    x=x + x[::-1],
                    y=[a + b for a, b in zip(y, sd)] + [a - b for a, b in zip(y, sd)][::-1],
                    fill="toself",
                    line=dict(width=0),
                    fillcolor=color,
                    opacity=0.12,
                    showlegend=False,
                    hoverinfo="skip",
                    row=1,
                    col=col,
                )
            fig.add_scatter(
                x=x,
                y=y,
                name=label,
                legendgroup=label,
                showlegend=col == 1,
                line=dict(color=color),
                customdata=sd or [0.0] * len(y),
                hovertemplate="block %{x}: %{y:.2f} ± %{customdata:.2f} bits<extra>" + label + "</extra>",
                row=1,
                col=col,
            )
    fig.add_hline(y=0, line=dict(color="black", width=0.5), row=1, col=1)
    if icl:
        ks = [s["k"] for s in summary.values()]
        fig.add_scatter(
            x=ks,
            y=[s["mean_ie"] for s in summary.values()],
            mode="lines+markers",
            name="layer-mean IE",
            error_y=dict(array=[s.get("mean_ie_std", 0.0) for s in summary.values()], thickness=0.8),
            line=dict(color="#1f77b4"),
            row=1,
            col=4,
            secondary_y=False,
        )
        fig.add_scatter(
            x=ks,
            y=[s["accuracy"] for s in summary.values()],
            mode="lines+markers",
            name="accuracy",
            line=dict(color="#d62728", dash="dash"),
            row=1,
            col=4,
            secondary_y=True,
        )
        fig.update_xaxes(title="demonstrations k", row=1, col=4)
        fig.update_yaxes(title="accuracy", range=[0, 1], row=1, col=4, secondary_y=True)
    for col in (1, 2, 3):
        fig.update_xaxes(title="block l (stream l -> l+1)", row=1, col=col)
    p = first["estimator_params"]
    est = f"{esc(first['estimator'])}, dim {p.get('dim')}" + (f", ridge {p['ridge']}" if "ridge" in p else "")
    ceiling = f", ceiling {p['ceiling_bits']:.1f} bits" if p.get("ceiling_bits") else ""
    fig.update_layout(
        title=f"Information emergence{' — ' + esc(experiment) if experiment else ''} — {esc(model)} "
        f"({est}{ceiling}; band: ± std over {esc(first['spread_kind'])})",
        template="plotly_white",
        height=480,
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def compare_figure(result) -> go.Figure:
    """Left: one bar group per task (entailment AUROC, over-generalisation layer-mean share, two-hop gap share)
    per model, chance dotted at 0.5. Right: over-generalisation share per layer against relative depth."""
    from plotly.subplots import make_subplots

    overgen = "overgeneralisation" in result.tasks
    fig = make_subplots(
        rows=1,
        cols=2 if overgen else 1,
        column_widths=[0.55, 0.45] if overgen else None,
        subplot_titles=("scores (chance 0.5 for the probes)", "over-generalisation share per layer")
        if overgen
        else ("scores (chance 0.5 for the probes)",),
    )
    columns = list(result.tasks) + (["two-hop gap share"] if result.gap else [])
    for mi_, name in enumerate(result.models):
        color = EMERGENCE_PALETTE[mi_ % len(EMERGENCE_PALETTE)]
        ys, hover = [], []
        for task in result.tasks:
            s = result.scores[name][task]
            if "auroc" in s:
                ys.append(s["auroc"])
                hover.append(
                    f"AUROC {s['auroc']:.3f} (p {s['p_value']:.3f})<br>accuracy {s['accuracy']:.2f}, "
                    f"calibrated {s['calibrated_accuracy']:.2f}, yes-rate {s['yes_rate']:.2f}, n={s['n']}"
                )
            else:
                ys.append(s["layer_mean"])
                hover.append(
                    f"layer-mean share {s['layer_mean']:.3f} (95% CI {s['ci95'][0]:.2f}–{s['ci95'][1]:.2f})"
                    f"<br>n={s['n']} triples, {s['n_compounds']} compounds"
                )
        if result.gap:
            g = result.gap[name]
            ys.append(g["gap_share"])
            hover.append(f"gap {g['gap_count']}/{g['both_hops']} (composed acc {g['composed_acc']:.2f})")
        info = result.info[name]
        label = f"{esc(name)} ({info['parameters'] / 1e6:.0f}M{', instruct' if info['instruction_tuned'] else ''})"
        fig.add_bar(
            x=[esc(c) for c in columns],
            y=ys,
            name=label,
            marker_color=color,
            customdata=hover,
            hovertemplate="%{x}: %{y:.3f}<br>%{customdata}<extra>" + label + "</extra>",
            row=1,
            col=1,
        )
        if overgen:
            share = result.scores[name]["overgeneralisation"]["share"]
            depth = [i / (len(share) - 1) for i in range(len(share))]
            fig.add_scatter(
                x=depth,
                y=share,
                mode="lines+markers",
                name=label,
                legendgroup=label,
                showlegend=False,
                line=dict(color=color),
                customdata=list(range(len(share))),
                hovertemplate="stream %{customdata} (depth %{x:.2f}): %{y:.2f}<extra>" + label + "</extra>",
                row=1,
                col=2,
            )
    fig.add_hline(y=0.5, line=dict(color="black", width=0.8, dash="dot"), row=1, col=1)
    if overgen:
        fig.add_hline(y=0.5, line=dict(color="black", width=0.8, dash="dot"), row=1, col=2)
        fig.update_xaxes(title="relative depth (0 = embeddings, 1 = final stream)", row=1, col=2)
        fig.update_yaxes(title="share: endocentric phrase closer to the noun", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title="score", range=[0, 1], row=1, col=1)
    fig.update_layout(
        barmode="group",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.2),
        title="Compositionality across models — " + esc(", ".join(result.models)),
    )
    return fig


HEAD_VIEW_ITEMS = 25  # items whose per-token patterns the figure can show (all are in the JSON)
SPAN_COLOR = {"subject": "#1f77b4", "bridge": "#ff7f0e"}


def token_labels(tokens, span) -> list[str]:
    """Escaped token labels for a tick axis, the tokens of `span` ([start, stop) or None) in bold."""
    inside = range(*span) if span else range(0)
    return [f"<b>{esc(t)}</b>" if i in inside else esc(t) for i, t in enumerate(tokens)]


def head_attention_figure(result) -> go.Figure:
    """Top: heads × tokens heatmaps of the last position's attention on the composed query and on the guide
    prompt of one item (a menu picks the item; the subject / bridge tokens in bold). Bottom: the mean share
    on the subject (composed) and the bridge (guide) per head, correct vs failed items."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2,
        cols=2,
        specs=[[{}, {}], [{"colspan": 2}, None]],
        vertical_spacing=0.2,
        subplot_titles=(
            "composed query, from the last token (subject in bold)",
            "guide prompt, from the last token (bridge in bold)",
            "share of the last token's attention, mean over items",
        ),
    )
    heads = [esc(h) for h in result.heads]
    shown = result.items[:HEAD_VIEW_ITEMS]
    first = next((i for i, it in enumerate(shown) if it["group"] == "failed"), 0)
    ticks = []
    for k, it in enumerate(shown):
        axes = {}
        for col, prompt in ((1, "composed"), (2, "guide")):
            view = it[prompt]
            labels = token_labels(view["tokens"], view["span"])
            positions = list(range(len(labels)))
            fig.add_heatmap(
                z=view["pattern"],
                x=positions,
                y=heads,
                name=f"{esc(it['id'])}: {prompt}",
                customdata=[labels] * len(heads),
                hovertemplate="head %{y} → %{customdata} (position %{x}): %{z:.3f}<extra></extra>",
                colorscale="Blues",
                zmin=0,
                zmax=1,
                showscale=col == 1,
                colorbar=dict(title="attention", len=0.4, y=0.8),
                visible=k == first,
                row=1,
                col=col,
            )
            axes[f"xaxis{'' if col == 1 else col}.tickvals"] = positions
            axes[f"xaxis{'' if col == 1 else col}.ticktext"] = labels
        ticks.append(axes)
    n_views = 2 * len(shown)
    for prompt, entity in (("composed", "subject"), ("guide", "bridge")):
        for group in ("correct", "failed"):
            s = result.summary.get(group)
            if not s or not s[prompt][entity]:
                continue
            label = f"{entity} ({prompt}), {group} (n={s[prompt]['n_found']})"
            fig.add_bar(
                x=heads,
                y=s[prompt][entity],
                name=label,
                marker=dict(color=SPAN_COLOR[entity], pattern_shape="/" if group == "failed" else ""),
                customdata=s[prompt]["rest"],
                hovertemplate="head %{x}: " + label + " %{y:.3f}, rest %{customdata:.3f}<extra></extra>",
                row=2,
                col=1,
            )
    if shown:
        fig.update_xaxes(tickmode="array", tickangle=-45, automargin=True, row=1)
        fig.update_layout(ticks[first])
    if len(shown) > 1:
        buttons = [
            dict(
                label=esc(f"{it['id']} ({it['group']})"),
                method="update",
                args=[
                    {"visible": [j // 2 == k for j in range(n_views)] + [True] * (len(fig.data) - n_views)},
                    ticks[k],
                ],
            )
            for k, it in enumerate(shown)
        ]
        fig.update_layout(
            updatemenus=[dict(buttons=buttons, active=first, x=1, xanchor="right", y=1.2, yanchor="bottom")]
        )
    fig.update_yaxes(title="head", row=1, col=1)
    fig.update_yaxes(title="share of attention", range=[0, 1], row=2, col=1)
    fig.update_xaxes(title="head", row=2, col=1)
    fig.update_layout(
        barmode="group",
        template="plotly_white",
        height=760,
        margin=dict(t=140),
        legend=dict(orientation="h", y=-0.15),
        title=f"Attention of heads {esc(', '.join(result.heads))} from the last position — {esc(result.model)}",
    )
    return fig
