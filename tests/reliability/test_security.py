"""Security: no pickle anywhere, `torch.load` only with weights_only=True, never trust_remote_code=True; and
markup in a prompt set (or a model name) shows up escaped in every HTML page patchlab writes — checked
by parsing each page and, where a headless Chromium is at hand (kaleido 0.2.1 bundles one), by loading
each page in it and watching for the injected script."""

from __future__ import annotations

import ast
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from relhelp import ITEMS

from patchlab.core.prompts import TwoHopItem
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.methods import lens as LN
from patchlab.methods import locate as L
from patchlab.methods.editeval import evaluate_edits
from patchlab.methods.gap import evaluate_gap
from patchlab.results.report import build_report

PACKAGE = Path(__file__).resolve().parents[2] / "patchlab"
EVIL = "</script><img src=x onerror=alert(1)>"
EVIL_TITLE = "</script><img src=y onerror=\"document.title='pwned'\">"


# --- the source -----------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) for every pickle import, torch.load without weights_only=True, trust_remote_code=True,
    allow_pickle=True, and use of the eval / exec builtins."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"imports {n}") for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name in ("torch.load", "load") and name == "torch.load" or name.endswith("torch.serialization.load"):
            safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not safe:
                found.append((node.lineno, f"{name} without weights_only=True"))
        for key in ("trust_remote_code", "allow_pickle"):
            if key in kw and not (isinstance(kw[key], ast.Constant) and kw[key].value is False):
                found.append((node.lineno, f"{key}={ast.unparse(kw[key])}"))
        if name in ("eval", "exec"):
            found.append((node.lineno, f"{name}()"))
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "AutoModel.from_pretrained(n, trust_remote_code=True)\nnp.load(f, allow_pickle=True)\neval('1')\n"
    )
    assert [line for line, _ in unsafe_calls(bad)] == [1, 2, 4, 5, 6, 7, 8]
    good = "import torch\ntorch.load(p, weights_only=True)\nmodel.eval()\nf(trust_remote_code=False)\n"
    assert unsafe_calls(good) == []


def test_no_module_unpickles_or_runs_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    found = {
        str(f.relative_to(PACKAGE.parent)): hits for f in files if (hits := unsafe_calls(f.read_text(encoding="utf-8")))
    }
    assert found == {}, found


# --- the pages -----------------------------------------------------------------------------------------


class Tags(HTMLParser):
    """Every start tag with its attributes (script and style bodies are text to this parser, not tags)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def evil_items() -> list[TwoHopItem]:
    items = []
    for i, it in enumerate(ITEMS):
        items.append(
            TwoHopItem.from_dict(
                {**it, "id": f"{EVIL}-{i}", "kind": EVIL_TITLE if i else EVIL, "subject": f"{it['subject']} {EVIL}"}
            )
        )
    return items


@pytest.fixture(scope="module")
def pages(tiny, tmp_path_factory) -> dict[str, Path]:
    """figure.html of evaluate / lens / locate / edit, the lens's per-position page, and report.html, all
    made from a prompt set (and a model name) holding markup."""
    out = tmp_path_factory.mktemp("evil")
    items = evil_items()
    gap = evaluate_gap(tiny, items, progress=False)
    lens = LN.lens_items(tiny, items, gap=gap, extra=[EVIL_TITLE], progress=False)
    topk = LN.top_tokens(tiny, f"the capital of {EVIL}", track_words=[EVIL])
    enc = lambda s: tiny.to_tokens(s)[0].tolist()  # noqa: E731
    from patchlab.runtime.scoring import answer_token_id

    pair = L.PatchPair(
        items[0].id,
        enc("the capital of france is"),
        enc("the capital of germany is"),
        answer_token_id(tiny, "paris"),
        answer_token_id(tiny, "berlin"),
        setup=EVIL_TITLE,
    )
    loc = L.locate_pairs(tiny, [pair], method="exact", positions="each", progress=False)
    edit = E.compute_edit(tiny, items[:1], [Head(1, 2)], E.EditConfig(target="guide", covariance=False, n_prefixes=0))
    report = evaluate_edits(tiny, [(items[:1], edit, 0.0)], items, gap, progress=False)
    made = {}
    for name, result in (
        ("evaluate", gap),
        ("lens", lens),
        ("lens-positions", topk),
        ("locate", loc),
        ("edit", report),
    ):
        result.model = EVIL  # a model loaded from a folder whose path holds markup
        made[name] = result.save(out / name)["figure.html"]
    made["report"] = build_report(out, title=f"run {EVIL}")
    return made


PAGES = ["evaluate", "lens", "lens-positions", "locate", "edit", "report"]


@pytest.mark.parametrize("name", PAGES)
def test_markup_is_escaped_in_every_page(pages, name):
    page = pages[name].read_text(encoding="utf-8")
    parser = Tags()
    parser.feed(page)
    parser.close()
    tags = {t for t, _ in parser.tags}
    assert not tags & {"img", "iframe", "object", "embed", "svg", "form", "base"}, tags
    assert all(not v.strip().lower().startswith("javascript:") for _, attrs in parser.tags for _, v in attrs if v)
    handlers = [(t, a) for t, attrs in parser.tags for a, _ in attrs if a.lower().startswith("on")]
    assert handlers == []
    assert "<img" not in page and "</script><img" not in page
    assert "onerror=alert(1)" in page or "onerror=alert(1)" in json.dumps(page)  # it is there, as text
    if name == "report":
        assert parser.title == f"run {EVIL}"  # the title element holds the text, not markup


def _chromium():
    """kaleido 0.2.1's bundled headless Chromium, if it runs here."""
    kaleido = pytest.importorskip("kaleido", reason="no headless Chromium: kaleido 0.2.1 is not installed")
    from kaleido.scopes.plotly import PlotlyScope

    if not (Path(kaleido.__file__).parent / "executable" / "kaleido").exists():
        pytest.skip("kaleido has no bundled Chromium executable here")
    return PlotlyScope


PROBE = r"""
// Stands in for plotly.js inside kaleido's page: "rendering" loads each given HTML page into a same-origin
// iframe whose alert / confirm / prompt are recorders, waits for it to load and draw, and reports.
window.Plotly = {version: "2.0.0", purge: function () {}, toImage: function (fig) {
  var pages = fig.layout.meta.pages, results = [];
  function one(i, done) {
    if (i >= pages.length) { done(); return; }
    var frame = document.createElement("iframe");
    document.body.appendChild(frame);
    var win = frame.contentWindow, hits = [];
    win.alert = win.confirm = win.prompt = function (m) { hits.push(String(m)); };
    var doc = win.document, start = Date.now();
    doc.open(); doc.write(pages[i]); doc.close();
    (function wait() {
      var drawn = doc.querySelectorAll(".main-svg").length;
      if ((doc.readyState === "complete" && drawn) || Date.now() - start > 30000) {
        setTimeout(function () {
          results.push({title: doc.title, hits: hits, drawn: doc.querySelectorAll(".main-svg").length,
                        imgs: doc.getElementsByTagName("img").length});
          document.body.removeChild(frame);
          one(i + 1, done);
        }, 300);
      } else { setTimeout(wait, 100); }
    })();
  }
  return new Promise(function (resolve) { one(0, function () { resolve(JSON.stringify(results)); }); });
}};
"""

CONTROL = (
    "<html><head><title>control</title></head><body><div class='main-svg'></div>"
    "<img src=x onerror=alert(1)><img src=y onerror=\"document.title='pwned'\"></body></html>"
)


def test_no_injected_script_runs_in_a_headless_browser(pages, tmp_path):
    scope_cls = _chromium()
    probe = tmp_path / "probe.js"
    probe.write_text(PROBE)
    html = [CONTROL] + [pages[n].read_text(encoding="utf-8") for n in PAGES]
    scope = scope_cls(plotlyjs=str(probe), mathjax=False)
    try:
        raw = scope.transform({"data": [], "layout": {"meta": {"pages": html}}}, format="json")
    except Exception as exc:  # noqa: BLE001 - a Chromium that cannot start here is a skip, not a failure
        pytest.skip(f"kaleido's Chromium did not run here ({str(exc).splitlines()[0][:120]})")
    finally:
        scope._shutdown_kaleido()
    control, *seen = json.loads(raw)
    assert control == {"title": "pwned", "hits": ["1"], "drawn": 1, "imgs": 2}  # the detector sees an injection
    for name, page in zip(PAGES, seen):
        assert page["hits"] == [] and page["imgs"] == 0 and page["title"] != "pwned", (name, page)
        assert page["drawn"] > 0, (name, page)  # the page's own scripts ran: plotly drew its figure(s)
    assert seen[-1]["title"] == f"run {EVIL}"
