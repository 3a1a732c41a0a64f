"""One self-contained HTML page from a folder of results: every section's table and figure, plus a summary.

`build_report(folder)` finds each `*.json` result under `folder` (as `patchlab demo` or separate
`evaluate / lens / locate / edit` runs write them), renders the summary (which heads were located, what
the edit changed, what it cost), one section per result, the timings and the versions, inlines
plotly.js once (the page works offline), and writes `report.html` atomically. The result types are
those registered on `Result` (each declares its heading, table and figure); `patchlab.workflows.report`
imports them all before building a page.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.core.io import atomic_write_text, recover_path
from patchlab.results.base import Result

RUN_FILE = "run.json"  # written by `patchlab demo`: the timings and options of the run
REPORT_FILE = "report.html"
MAX_DEPTH = 3  # how deep below the folder results are searched


def _load(kind: str, obj: dict[str, Any]) -> Result:
    """Rebuild a result object of a registered kind from its JSON."""
    return Result.registry[kind].from_json(obj)


def find_results(folder: str | Path) -> list[tuple[Path, Result]]:
    """Every readable result of a known type under `folder`, in value-chain order (then by path)."""
    folder = Path(folder)
    recover_path(folder)
    if not folder.is_dir():
        raise PatchlabError("not a folder of results", where=str(folder))
    sections = Result.sections()
    found = []
    for path in sorted(folder.rglob("*.json")):
        rel = path.relative_to(folder).parts
        if len(rel) > MAX_DEPTH or any(part.startswith(".") for part in rel):  # hidden: a writer's temp folder
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PatchlabError(f"cannot read result JSON ({exc})".splitlines()[0], where=str(path)) from None
        if isinstance(obj, dict) and obj.get("type") in sections:
            try:
                found.append((path, _load(obj["type"], obj)))
            except PatchlabError as exc:  # e.g. a field missing: say which file
                raise PatchlabError(str(exc), where=str(path)) from None
    return sorted(found, key=lambda pr: (pr[1].order, pr[1].kind, str(pr[0])))


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _first(results: list[tuple[Path, Result]], kind: str) -> Result | None:
    return next((r for _, r in results if r.kind == kind), None)


def _glance(results: list[tuple[Path, Result]], run: dict[str, Any]) -> list[tuple[str, str]]:
    """The answers a reader wants first: the gap, the heads, what the edit changed, what it cost."""
    rows: list[tuple[str, str]] = []
    gap, loc, edit = _first(results, "gap"), _first(results, "locate"), _first(results, "edit-report")
    if gap is not None:
        s = gap.summary["all"]
        rows.append(
            (
                "compositionality gap",
                f"{s['gap_count']} of {s['both_hops']} items with both hops right fail "
                f"composed ({s['gap_share']:.0%}); composed accuracy {s['composed_acc']:.2f} on {s['n']} items",
            )
        )
    if loc is not None and loc.site == "z":
        top = ", ".join(f"{r['unit']} ({r['mean']:+.2f})" for r in loc.ranking[:5])
        rows.append(
            ("located heads (mean normalised effect)", f"{top} — {loc.n} items, {loc.method}, {loc.seconds:.0f} s")
        )
    view = _first(results, "head-attention")
    if view is not None and {"correct", "failed"} <= set(view.summary):
        c, f = view.summary["correct"]["composed"], view.summary["failed"]["composed"]
        if c["subject"] and f["subject"]:
            shares = ", ".join(f"{h} {c['subject'][i]:.2f} vs {f['subject'][i]:.2f}" for i, h in enumerate(view.heads))
            rows.append(("last-token attention on the subject (correct vs failed)", shares))
    if edit is not None:
        rows.append(("edited heads", ", ".join(edit.heads) + f" ({edit.target} target, {len(edit.items)} edits)"))
        for name, s in edit.summary.items():
            if s.get("n") and s.get("before") is not None:
                rows.append((f"edit: {name}", f"{s['before']:.2f} → {s['after']:.2f} (n={s['n']})"))
        rows.append(("edit cost", f"{edit.seconds_per_edit:.1f} s per edit"))
    if run.get("timings"):
        total = sum(run["timings"].values())
        rows.append(
            ("run time", f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in run["timings"].items()) + ")")
        )
    return rows


def _versions(results: list[tuple[Path, Result]]) -> list[tuple[str, str]]:
    """Model, dtype, threads and library versions, from the first result's provenance."""
    meta = next((r.meta for _, r in results if getattr(r, "meta", None)), {})
    keys = (
        "model",
        "dtype",
        "n_layers",
        "n_heads",
        "threads",
        "patchlab",
        "torch",
        "transformers",
        "transformer_lens",
        "python",
    )
    return [(k, str(meta[k])) for k in keys if k in meta]


def _kv_table(rows: list[tuple[str, str]], caption: str) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><caption>{_e(caption)}</caption><tbody>{body}</tbody></table>'


def _section(path: Path, result: Result, folder: Path) -> str:
    """One result: heading, explanation, its table and its interactive figure."""
    table = result.table()
    table = table.to_html() if table is not None else ""
    fig = result.figure().to_html(full_html=False, include_plotlyjs=False, default_height=480)
    anchor = _e(result.kind)
    return (
        f'<section id="{anchor}"><h2>{_e(result.heading)}</h2><p>{_e(result.intro)}</p>'
        f'<p class="src">from {_e(path.relative_to(folder))}</p>{table}{fig}</section>'
    )


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}caption{text-align:left;font-weight:600;padding:.3em 0}
td,th{border-bottom:1px solid #ddd;padding:.25em .7em;text-align:right}th{background:#f6f6f6}
td:first-child,th:first-child,.kv td{text-align:left}tr.bold td{font-weight:700}
section{border-top:2px solid #eee;margin-top:2em}.src{color:#888;font-size:.85em}nav a{margin-right:1em}
"""


def render_report(
    results: list[tuple[Path, Result]], folder: Path, run: dict[str, Any], title: str, source: str | Path | None = None
) -> str:
    """The whole page as one HTML string (plotly.js inlined once); `source`: the folder it names (default `folder`)."""
    from plotly.offline import get_plotlyjs

    nav = "".join(f'<a href="#{_e(r.kind)}">{_e(r.heading)}</a>' for _, r in results)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>{_e(title)}</h1><p class='sub'>built {stamp} from {_e(source or folder)}</p><nav>{nav}</nav>",
        '<section id="summary"><h2>Summary</h2>',
        _kv_table(_glance(results, run), "at a glance"),
        _kv_table(_versions(results), "model and versions"),
        "</section>",
        *(_section(p, r, folder) for p, r in results),
        "</body></html>",
    ]
    return "".join(parts)


def build_report(
    folder: str | Path, out: str | Path | None = None, title: str | None = None, source: str | Path | None = None
) -> Path:
    """Render every result under `folder` into one self-contained HTML page (default `folder/report.html`);
    `source` is the folder the page names (default `folder`)."""
    folder = Path(folder)
    results = find_results(folder)
    if not results:
        raise PatchlabError(
            f"no patchlab results found (looked for result JSON files of types {', '.join(Result.sections())})",
            where=str(folder),
        )
    run_path = folder / RUN_FILE
    run = json.loads(run_path.read_text(encoding="utf-8")) if run_path.is_file() else {}
    model = next((getattr(r, "model", None) for _, r in results if getattr(r, "model", None)), "a model")
    page = render_report(results, folder, run, title or f"patchlab report — {model}", source)
    return atomic_write_text(Path(out) if out else folder / REPORT_FILE, page)


PICTURE_KINDS = ("gap", "lens", "locate", "edit-report")  # the four panels of the summary picture


def summary_figure(results: list[tuple[Path, Result]]):
    """A 2 x 2 picture of the run (gap, lens, located heads, edit), each panel built from its result's own figure."""
    from plotly.subplots import make_subplots

    picked = [r for r in (_first(results, k) for k in PICTURE_KINDS) if r is not None]
    if not picked:
        raise PatchlabError("no gap / lens / locate / edit results to draw")
    titles = [r.heading for r in picked]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.12, vertical_spacing=0.16)
    for i, result in enumerate(picked):
        row, col = divmod(i, 2)
        source = result.figure()
        for trace in source.data:
            if trace.xaxis not in (None, "x"):  # a figure with its own subplots: keep the first panel only
                continue
            if trace.type == "heatmap":
                trace.update(colorbar=dict(len=0.4, x=0.45 + 0.55 * col, y=0.8 - 0.58 * row))
            fig.add_trace(trace, row=row + 1, col=col + 1)
        for axis, update in (("xaxis", fig.update_xaxes), ("yaxis", fig.update_yaxes)):
            src = source.layout[axis]
            title = (
                src.title.text if (axis == "yaxis" or row == 1) else None
            )  # top-row x titles would hit the titles below
            ticks = {k: src[k] for k in ("tickmode", "tickvals", "ticktext") if src[k] is not None}
            update(
                type=src.type,
                title_text=title,
                range=src.range,
                autorange=src.autorange,
                **ticks,
                row=row + 1,
                col=col + 1,
            )
    fig.update_layout(
        template="plotly_white",
        showlegend=False,
        width=1400,
        height=900,
        title="patchlab report — " + html.escape(str(getattr(picked[0], "model", ""))),
    )
    return fig


def summary_png(results: list[tuple[Path, Result]], out: str | Path) -> Path:
    """Render `summary_figure` to a PNG with kaleido 0.2.1 (its own headless Chromium; `pip install patchlab[docs]`)."""
    import os

    import plotly

    try:
        from kaleido.scopes.plotly import PlotlyScope
    except ImportError:
        raise PatchlabError("writing a PNG needs kaleido 0.2.1: pip install 'patchlab[docs]'", param="png") from None
    js = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")
    fig = summary_figure(results)
    png = PlotlyScope(plotlyjs=js, mathjax=False).transform(
        json.loads(fig.to_json()), format="png", width=1400, height=900
    )
    from patchlab.core.io import atomic_write_bytes

    return atomic_write_bytes(Path(out), png)
