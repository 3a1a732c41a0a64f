"""The demo writes one self-contained HTML report; `patchlab report DIR` rebuilds it from the JSON results."""

import json
import re
import shutil

import pytest
from test_cli import run_cli

from patchlab.results.base import Result
from patchlab.results.report import build_report, find_results
from patchlab.runs.registry import load_plugins

SECTION_IDS = ["summary", "gap", "lens", "bridge-intervention", "locate", "head-attention", "edit-report"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, smol):
    """`patchlab demo` on 2 items per kind, run as a user would (a subprocess)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    code, stdout, err = run_cli("demo", "--per-kind", "2", "--out", str(out))
    assert code == 0, err
    assert str(out / "report.html") in stdout.replace("\n", "")
    return out


def _ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', page)


@pytest.mark.real
def test_demo_report_has_every_section_and_answers_the_three_questions(demo_dir):
    page = (demo_dir / "report.html").read_text(encoding="utf-8")
    assert _ids(page) == SECTION_IDS
    # self-contained: plotly.js inlined once, no script fetched from elsewhere, one figure per result section
    assert page.count("<script type='text/javascript'>") == 1 and "<script src=" not in page
    assert page.count("Plotly.newPlot") == len(SECTION_IDS) - 1
    locate = json.loads((demo_dir / "locate" / "result.json").read_text())
    edit = json.loads((demo_dir / "edit" / "result.json").read_text())
    top = [r["unit"] for r in locate["ranking"][:5]]
    summary = page.split('<section id="gap">')[0]
    assert all(h in summary for h in top)  # which heads were located
    assert all(h in summary for h in edit["heads"])  # which heads were edited
    c = edit["summary"]["correction"]
    assert f"{c['before']:.2f} → {c['after']:.2f}" in summary  # what the edit changed
    assert "s per edit" in summary and "run time" in summary  # what it cost
    run = json.loads((demo_dir / "run.json").read_text())
    assert set(run["timings"]) == {"evaluate", "lens", "locate", "heads", "edit"}
    assert all(v > 0 for v in run["timings"].values())
    for key in ("torch", "transformers", "transformer_lens", "smollm2-135m"):
        assert key in summary
    assert "<th>transformer_lens</th><td>unknown" not in summary
    assert "last-token attention on the subject" in summary  # the located heads' attention, correct vs failed


@pytest.mark.real
def test_report_command_rebuilds_from_separate_results(demo_dir, tmp_path):
    folder = tmp_path / "runs"
    for sub in ("evaluate", "locate"):  # results of separate runs, no run.json
        shutil.copytree(demo_dir / sub, folder / sub)
    code, stdout, err = run_cli("report", str(folder), "--out", str(tmp_path / "r.html"), "--title", "two runs")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert _ids(page) == ["summary", "gap", "locate"] and "<title>two runs</title>" in page
    assert not list(folder.glob(".patchlab-tmp*"))


@pytest.mark.real
def test_report_escapes_markup_from_the_prompt_set(demo_dir, tmp_path):
    evil = "</script><img src=x onerror=alert(1)>"
    gap = json.loads((demo_dir / "evaluate" / "result.json").read_text())
    first = next(k for k in gap["summary"] if k != "all")
    gap["summary"][evil] = gap["summary"].pop(first)
    gap["model"] = evil
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "result.json").write_text(json.dumps(gap))
    page = build_report(tmp_path).read_text(encoding="utf-8")
    assert evil not in page and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_report_of_a_folder_without_results_is_a_clear_error(tmp_path):
    (tmp_path / "notes.json").write_text('{"type": "something-else"}')
    code, _, err = run_cli("report", str(tmp_path))
    assert code == 2 and "no patchlab results found" in err and str(tmp_path) in err
    assert not (tmp_path / "report.html").exists()
    code, _, err = run_cli("report", str(tmp_path / "missing"))
    assert code == 2 and "not a folder of results" in err


def test_every_result_type_declares_its_section_in_its_class():
    load_plugins()
    sections = Result.sections()
    assert {
        "gap",
        "lens",
        "bridge-intervention",
        "locate",
        "edit-report",
        "retune",
        "emergence",
        "emergence-experiment",
        "compare",
        "mechanisms",
        "head-attention",
    } <= set(sections)
    assert list(sections)[:6] == [
        "gap",
        "lens",
        "bridge-intervention",
        "locate",
        "head-attention",
        "edit-report",
    ]  # the value chain first
    for kind, cls in sections.items():
        assert cls.kind == kind and cls.heading and cls.intro and cls.table is not Result.table, kind


@pytest.mark.real
def test_summary_picture_has_the_four_panels(demo_dir, tmp_path):
    from patchlab.results.report import summary_figure, summary_png

    fig = summary_figure(find_results(demo_dir))
    axes = {(t.xaxis or "x") for t in fig.data}
    assert axes == {"x", "x2", "x3", "x4"}
    pytest.importorskip("kaleido")
    png = summary_png(find_results(demo_dir), tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
