"""The package's shape: layers as folders (import-linter's contract), no import cycle, one place that installs
hooks, library errors that name parameters (not flags), and a public API importable from `patchlab`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "patchlab"


def test_layers_contract_holds():
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    done = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    out.append(comp)
    return out


def test_no_import_cycle_anywhere():
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("patchlab")
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert cycles == [], cycles
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()})[0] == ["b", "a"]  # the finder finds one


def test_only_the_trace_primitive_installs_hooks():
    offenders = []
    for path in PKG.rglob("*.py"):
        if path == PKG / "runtime" / "trace.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.hooks\(fwd_hooks|\.add_hook\(|register_forward_hook", line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert offenders == []


def test_hook_names_are_built_in_one_place():
    offenders = [
        str(p.relative_to(ROOT))
        for p in PKG.rglob("*.py")
        if p != PKG / "runtime" / "sites.py" and re.search(r"[\"']blocks\.", p.read_text())
    ]
    assert offenders == []


def test_library_errors_name_parameters_not_flags():
    offenders = []
    for path in PKG.rglob("*.py"):
        if path == PKG / "cli.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(where|param)=f?\"--", line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert offenders == []


def test_public_api_from_the_package():
    code = (
        "import patchlab, sys; print(','.join(patchlab.__all__)); "
        "assert 'torch' not in sys.modules, 'import patchlab must stay light'; "
        "from patchlab import load_model, PromptSet, evaluate_gap, locate, edit_each, evaluate_edits, HeadSet; "
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = done.stdout.splitlines()[0].split(",")
    assert {
        "load_model",
        "PromptSet",
        "evaluate_gap",
        "lens_items",
        "locate",
        "compute_edit",
        "edit_each",
        "Edit",
        "EditConfig",
        "evaluate_edits",
        "HeadSet",
        "PatchlabError",
        "trace",
    } <= set(names)
    assert done.stdout.splitlines()[-1] == "ok"
