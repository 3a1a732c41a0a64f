"""The whole chain in one call — gap → lens → locate → head attention → edit → report — as `patchlab demo` runs it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from patchlab.core.errors import PatchlabError
from patchlab.core.io import atomic_write_json
from patchlab.core.prompts import PromptSet
from patchlab.results.base import Result
from patchlab.results.report import RUN_FILE, build_report


def run_demo(
    model,
    ps: PromptSet,
    out: str | Path,
    quick: bool = False,
    on_result: Callable[[str, Result], None] = lambda name, r: None,
    shown: str | Path | None = None,
) -> Path:
    """Evaluate, probe, locate and edit on `ps`, save every result under `out`, and return the HTML report's path
    (`shown`: the folder the report names as its source, when `out` is a staging folder)."""
    from patchlab.methods import lens as L
    from patchlab.methods.edit import EditConfig, edit_each
    from patchlab.methods.editeval import evaluate_edits, kl_prompts
    from patchlab.methods.gap import evaluate_gap
    from patchlab.methods.heads import attention_view
    from patchlab.methods.locate import locate

    out, timings = Path(out), {}

    def step(name: str, result: Result, sub: str, file: str | None = None) -> None:
        result.save(out / sub, name=file)
        on_result(name, result)

    start = time.perf_counter()
    gap = evaluate_gap(model, ps)
    timings["evaluate"] = time.perf_counter() - start
    step("gap", gap, "evaluate")
    fails = gap.failed_items(ps)
    if not fails:
        raise PatchlabError("the model has no composition failures on this slice: nothing to locate or edit")
    start = time.perf_counter()
    step("lens", L.lens_items(model, list(ps), gap=gap), "lens")
    correct = gap.correct_items(ps)[: 6 if quick else 16]
    if correct:
        layers = list(range(0, model.cfg.n_layers, 3 if quick else 2))
        step("intervention", L.bridge_intervention(model, correct, layers=layers), "lens", "intervention")
    timings["lens"] = time.perf_counter() - start
    start = time.perf_counter()
    loc = locate(model, fails[: 6 if quick else 12], setup="guide", method="both", verify=20)
    timings["locate"] = time.perf_counter() - start
    step("locate", loc, "locate")
    heads = loc.heads(2)
    start = time.perf_counter()
    n_view = 6 if quick else 12
    view = attention_view(model, fails[:n_view] + gap.correct_items(ps)[:n_view], heads, gap=gap)
    timings["heads"] = time.perf_counter() - start
    step("heads", view, "heads")
    start = time.perf_counter()
    unrelated, exclude = kl_prompts(list(ps), gap)
    edits = edit_each(model, fails[: 4 if quick else 20], heads, EditConfig(target="optimize"), unrelated=unrelated)
    report = evaluate_edits(model, edits, list(ps), gap, exclude=exclude)
    timings["edit"] = time.perf_counter() - start
    step("edit", report, "edit")
    atomic_write_json(
        out / RUN_FILE,
        {
            "type": "run",
            "command": "demo",
            "model": getattr(model, "patchlab_name", ""),
            "items": len(ps),
            "quick": quick,
            "timings": timings,
        },
    )
    return build_report(out, source=shown)
