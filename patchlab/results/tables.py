"""The summary table of each result type, as plain rows: the CLI prints them with rich, the report as HTML."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any


@dataclass
class TableData:
    """A titled table of strings; `bold` marks rows to emphasise (e.g. the 'all' row)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    bold: list[bool] | None = None

    def to_rich(self):
        """A rich Table (first column left-aligned, numbers right-aligned)."""
        from rich.table import Table

        table = Table(title=self.title)
        for i, col in enumerate(self.columns):
            table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for i, row in enumerate(self.rows):
            table.add_row(*row, style="bold" if self.bold and self.bold[i] else None)
        return table

    def to_html(self) -> str:
        """An HTML table with every cell escaped (prompt sets may hold markup)."""
        e = lambda s: html.escape(str(s), quote=True)  # noqa: E731
        head = "".join(f"<th>{e(c)}</th>" for c in self.columns)
        bold = self.bold or [False] * len(self.rows)
        body = "".join(
            ('<tr class="bold">' if b else "<tr>") + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
            for b, row in zip(bold, self.rows)
        )
        return f"<table><caption>{e(self.title)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any, spec: str) -> str:
    """Format a number, or '-' for a missing one."""
    return "-" if value is None else format(value, spec)


def gap_table(result) -> TableData:
    """Per kind: n, hop accuracies, composed accuracy, both-hops count, gap count and share."""
    rows = [
        [
            kind,
            str(s["n"]),
            f"{s['hop1_acc']:.2f}",
            f"{s['hop2_acc']:.2f}",
            f"{s['composed_acc']:.2f}",
            str(s["both_hops"]),
            str(s["gap_count"]),
            f"{s['gap_share']:.2f}",
        ]
        for kind, s in result.summary.items()
    ]
    flagged = result.summary.get("all", {}).get("flagged", 0)
    return TableData(
        f"Compositionality gap — {result.model}"
        + (f" ({flagged} item(s) flagged: NaN / inf logits, left out)" if flagged else ""),
        ["kind", "n", "hop1", "hop2", "composed", "both hops", "gap", "gap share"],
        rows,
        bold=[kind == "all" for kind in result.summary],
    )


def lens_table(result) -> TableData:
    """Per item group: the first layer where each tracked token's geometric-mean rank is <= 10."""
    tracks = list(next(iter(result.first_top10.values()), {}))
    rows = []
    for group, firsts in result.first_top10.items():
        n = result.summary[group][next(iter(firsts))]["n"][0]
        rows.append([f"{group} (n={n})", *[result.layers[v] if v is not None else "never" for v in firsts.values()]])
    return TableData("Logit lens: first layer where the geometric-mean rank is <= 10", ["group", *tracks], rows)


def intervention_table(result) -> TableData:
    """The layers where removing the bridge direction lowers p(answer) most, beside the control tokens."""
    s = result.summary
    order = sorted(range(len(result.layers)), key=lambda i: s["bridge_mean"][i])[:5]
    rows = [[str(result.layers[i]), f"{s['bridge_mean'][i]:+.4f}", f"{s['control_mean'][i]:+.4f}"] for i in order]
    return TableData(
        f"Bridge-entity intervention on {len(result.ids)} correct items (strongest layers)",
        ["layer", "Δp(answer), bridge removed", "Δp(answer), control removed"],
        rows,
    )


def locate_table(result, top: int = 10) -> TableData:
    """The top heads (or layers) by mean normalised patching effect."""
    unit = "head" if result.site == "z" else "layer"
    rows = [
        [r["unit"], f"{r['mean']:+.3f}", f"{r['std']:.3f}", f"{r['share_top_k']:.2f}"] for r in result.ranking[:top]
    ]
    return TableData(
        f"Top {unit}s by mean normalised effect ({result.setup}, {result.method}, n={result.n})",
        [unit, "mean", "std", f"share in item top-{result.top_k}"],
        rows,
    )


def edit_table(report) -> TableData:
    """Per test set: before / after event rate, relative probability increase C, and 'beats the wrong answer'."""
    rows = [
        [
            name,
            str(s["n"]),
            _fmt(s["before"], ".2f"),
            _fmt(s["after"], ".2f"),
            _fmt(s["C"], "+.2f"),
            _fmt(s["beats_wrong"], ".2f"),
        ]
        for name, s in report.summary.items()
        if s.get("n")
    ]
    return TableData(
        f"Edit of {', '.join(report.heads)} ({report.target}{', batch' if report.batch else ''}), "
        f"{report.seconds_per_edit:.1f} s/edit",
        ["test set", "n", "before", "after", "C (rel. Δp)", "beats wrong"],
        rows,
    )


def retune_table(result) -> TableData:
    """Before / after accuracy, synonym retention and (with an edit) the edit's correction of a re-tuning run."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ev, rows = result.evaluation, []
    for name, acc in ev["before"]["accuracy"].items():
        rows.append([f"accuracy: {name}", str(ev["before"]["n"][name]), fmt(acc), fmt(ev["after"]["accuracy"][name])])
    for name, rates in ev["before"]["synonyms"].items():
        for rate, s in rates.items():
            a = ev["after"]["synonyms"][name][rate]
            rows.append(
                [f"synonym retention {rate}: {name}", f"{s['n']}/{a['n']}", fmt(s["retention"]), fmt(a["retention"])]
            )
    for name, s in result.edit.get("correction", {}).items():
        rows.append(
            [f"edit correction: {name} (unedited {fmt(s['base'])})", str(s["n"]), fmt(s["before"]), fmt(s["after"])]
        )
    return TableData(
        f"Re-tuning ({'CARMA' if result.carma else 'plain'}, {result.task}, params "
        f"{result.config['params']}, {len(result.history)} steps, {result.seconds:.0f} s)",
        ["metric", "n", "before", "after"],
        rows,
    )


def mechanisms_table(result) -> TableData:
    """Each stack variant's metrics after the last stage of sequential edits."""
    names = ("correction", "retention", "edited", "paraphrase", "irrelevance", "facts", "entity_facts")
    rows = [
        [variant, *["-" if not curve[k][-1]["n"] else f"{curve[k][-1]['after']:.3f}" for k in names]]
        for variant, curve in result.curves.items()
    ]
    return TableData(
        f"Sequential edits of {', '.join(result.heads)}: after {result.stages[-1]} edits ({result.gate} gates)",
        ["variant", *names],
        rows,
    )


def emergence_table(result) -> TableData:
    """Per condition: mean information emergence over blocks, its spread, macro / micro MI, the peak block."""
    first = next(iter(result.conditions.values()))
    p = first["estimator_params"]
    est = f"{first['estimator']}, dim {p.get('dim')}" + (f", ridge {p['ridge']}" if "ridge" in p else "")
    extra = [k for k in ("accuracy",) if all(k in s for s in result.summary.values())]
    rows = []
    for name, s in result.summary.items():
        r = result.conditions[name]
        top = r["layers"][max(range(len(r["ie"])), key=lambda i: r["ie"][i])]
        rows.append(
            [
                name,
                str(s["n"]),
                str(s["T"]),
                f"{s['mean_ie']:+.2f}",
                f"{s.get('mean_ie_std', float('nan')):.2f}",
                f"{s['mean_macro']:.2f}",
                f"{s['mean_micro']:.2f}",
                str(top),
                *[f"{s[k]:.2f}" for k in extra],
            ]
        )
    return TableData(
        f"Information emergence ({result.experiment}) — {result.model} [{est}; bits, mean over blocks]",
        ["condition", "n", "T", "IE", "± std", "macro MI", "micro MI", "IE max at block", *extra],
        rows,
    )


def compare_table(result) -> TableData:
    """Per model: size, layers, instruction tuning, each probe's score and the two-hop gap."""
    rows = []
    for name in result.models:
        i = result.info[name]
        cells = []
        for task in result.tasks:
            s = result.scores[name][task]
            cells.append(
                f"{s['auroc']:.2f} (acc {s['accuracy']:.2f}, p {s['p_value']:.3f})"
                if "auroc" in s
                else f"{s['layer_mean']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"
            )
        gap_cell = (
            [f"{result.gap[name]['gap_share']:.2f} ({result.gap[name]['gap_count']}/{result.gap[name]['both_hops']})"]
            if result.gap
            else []
        )
        tuned = {True: "yes", False: "no", None: "?"}[i["instruction_tuned"]]
        rows.append([name, f"{i['parameters'] / 1e6:.0f}M", str(i["n_layers"]), tuned, *cells, *gap_cell])
    return TableData(
        "Compositionality probes (entailment: AUROC, chance 0.5; over-generalisation: layer-mean share, chance 0.5)",
        ["model", "params", "layers", "instr.", *result.tasks, *(["gap share"] if result.gap else [])],
        rows,
    )


def head_attention_table(result) -> TableData:
    """Per head and outcome group: the last position's attention share on the subject (composed query) and on
    the bridge (guide prompt), the rest beside each."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = []
    for hi, head in enumerate(result.heads):
        for group, s in result.summary.items():
            cells = []
            for prompt, entity in (("composed", "subject"), ("guide", "bridge")):
                p = s[prompt]
                cells += [fmt(p[entity][hi] if p[entity] else None), fmt(p["rest"][hi] if p["rest"] else None)]
            rows.append([head, f"{group} (n={s['n']})", *cells])
    return TableData(
        f"Attention from the last position — {result.model}",
        ["head", "items", "subject (composed)", "rest (composed)", "bridge (guide)", "rest (guide)"],
        rows,
    )
