"""Figures without a model: long labels shown whole, user text escaped, versions recorded however installed."""

from __future__ import annotations

import json

from patchlab.methods.gap import gap_from_rows
from patchlab.methods.heads import HeadAttentionResult, summarize_heads
from patchlab.results.figures import esc, gap_figure, head_attention_figure, wrap_label

KINDS = ["city>country>continent", "work>creator>birth-country", "landmark>country>currency"]


def _gap():
    rows = [
        {"id": f"{k}-{i}", "kind": k, "hop1": True, "hop2": True, "composed": i == 0} for k in KINDS for i in range(2)
    ]
    return gap_from_rows(rows, "m", "<items>", {})


def test_gap_figure_shows_each_kind_label_whole():
    fig = gap_figure(_gap())
    axis = fig.layout.xaxis
    shown = [t.replace("<br>", "") for t in axis.ticktext]
    for kind in KINDS:
        assert esc(kind) in shown  # the whole label, only broken onto lines
        assert esc(kind) in axis.tickvals  # on the bars' own category
    assert any("<br>" in t for t in axis.ticktext) and axis.tickangle == 0 and axis.automargin
    assert "…" not in json.dumps(fig.to_plotly_json()["layout"])


def test_wrap_label_escapes_and_keeps_every_character():
    evil = "<img src=x onerror=alert(1)> kind>with>a>very>long>name"
    wrapped = wrap_label(evil)
    assert "<img" not in wrapped and wrapped.replace("<br>", "").replace(" ", "") == esc(evil).replace(" ", "")


def _view(token: str) -> HeadAttentionResult:
    item = {
        "id": token,
        "kind": "k",
        "group": "failed",
        "subject": token,
        "bridge": "B",
        "composed": {
            "tokens": ["The", f" {token}", " is"],
            "span": [1, 2],
            "pattern": [[0.5, 0.25, 0.25]],
            "share": {"subject": [0.25], "rest": [0.75]},
        },
        "guide": {
            "tokens": [" B", " is"],
            "span": [0, 1],
            "pattern": [[0.6, 0.4]],
            "share": {"bridge": [0.6], "rest": [0.4]},
        },
    }
    result = HeadAttentionResult(model="<m>", heads=["1.2"], items=[item, {**item, "group": "correct", "id": "x"}])
    summarize_heads(result)
    return result


def test_head_attention_figure_escapes_every_token_label():
    evil = "<img src=x onerror=alert(1)>"
    fig = head_attention_figure(_view(evil))
    text = json.dumps(fig.to_plotly_json())
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert fig.layout.xaxis.ticktext[1] == f"<b> {esc(evil)}</b>"  # the subject's token, marked
    assert len(fig.layout.updatemenus[0].buttons) == 2  # one view per item


def test_head_attention_summary_shares_sum_to_one_per_group():
    result = _view("Tower")
    for s in result.summary.values():
        assert abs(s["composed"]["subject"][0] + s["composed"]["rest"][0] - 1) < 1e-12
        assert abs(s["guide"]["bridge"][0] + s["guide"]["rest"][0] - 1) < 1e-12
    assert [r[1] for r in result.table().rows] == ["correct (n=1)", "failed (n=1)"]


def test_transformer_lens_version_is_found_under_any_distribution_name(monkeypatch):
    import importlib.metadata as md

    import transformer_lens  # noqa: F401  (imported before `version` is broken below: it reads versions itself)

    from patchlab.runtime.identity import _dist_version, provenance

    real = md.version
    assert provenance()["transformer_lens"] != "unknown"

    def only_underscore(name):  # an install whose metadata is named transformer_lens, not transformer-lens
        if name == "transformer-lens":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", only_underscore)
    assert _dist_version("transformer-lens", "transformer_lens") == real("transformer-lens")

    def none(name):  # no name resolves: the metadata beside the imported package still says
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", none)
    monkeypatch.setattr(md, "packages_distributions", lambda: {})
    assert _dist_version("transformer-lens", "transformer_lens") == real("transformer-lens")
