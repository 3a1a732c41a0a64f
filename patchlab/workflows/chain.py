"""The value chain as the commands run it: gap → lens → locate → edit → apply.

Each function takes what a user chose (a `ModelSpec`, a prompt set, a `Scale`, options) and returns
typed results; it decides what is computed (which items, in this process or sharded), never how it
is printed. The command line parses, calls one of these, prints the result's table and writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.core.forms import DEFAULT_FORM, check_forms
from patchlab.core.io import atomic_dir
from patchlab.core.prompts import PromptSet, TwoHopItem
from patchlab.core.spec import HeadSet, parse_layers
from patchlab.results.base import Result
from patchlab.workflows.setup import ModelSpec, Notify, Scale, file_sha256, gap_for, saved_gap, silent, workload


def evaluate(
    spec: ModelSpec,
    ps: PromptSet,
    out: Path,
    scale: Scale = Scale(),
    batch_size: int = 32,
    notify: Notify = silent,
    form: str = DEFAULT_FORM,
):
    """The compositionality gap of `ps` in a prompt `form` (sharded when `scale` asks for it)."""
    from patchlab.methods.gap import evaluate_gap

    if batch_size < 1:
        raise PatchlabError(f"batch size must be >= 1, got {batch_size}", param="batch_size")
    check_forms(list(ps), form)
    work = workload("evaluate", ps, batch=batch_size, form=form)
    if scale.sharded:
        from patchlab.runs import jobs

        config = {"batch_size": batch_size, **({} if form == DEFAULT_FORM else {"form": form})}
        with scale.open("evaluate", config, list(ps), out, spec.worker_load(work, notify)) as run:
            return jobs.evaluate(run, list(ps), ps.source, batch_size, form=form)
    return evaluate_gap(spec.load(work, notify), ps, batch_size=batch_size, form=form)


@dataclass
class LensRun:
    """What `lens` produced: the lens over items (or one prompt's top tokens), per-item views, the intervention."""

    main: Result
    positions: list[tuple[str, Result]] = field(default_factory=list)  # (item id, top-tokens view)
    intervention: Result | None = None
    correct: int = 0  # composed-correct items intervened on

    def save(self, out: Path) -> dict[str, Path]:
        """result.json + figure.html, positions/ITEM.json + .html, intervention.json + .html into `out`."""
        written = dict(self.main.save(out))
        for item_id, view in self.positions:
            written.update({f"positions/{k}": v for k, v in view.save(Path(out) / "positions", name=item_id).items()})
        if self.intervention is not None:
            written.update(self.intervention.save(out, name="intervention"))
        return written


def lens(
    spec: ModelSpec,
    ps: PromptSet | None = None,
    prompt: str | None = None,
    track: Sequence[str] = (),
    gap: Path | None = None,
    positions: str = "last",
    intervene: bool = True,
    intervene_layers: str = "all",
    intervene_items: int = 24,
    controls: int = 3,
    orthogonal: bool = False,
    top_k: int = 5,
    notify: Notify = silent,
) -> LensRun:
    """The logit lens of a prompt set (correct vs failed), or of one `prompt`; then the bridge intervention."""
    from patchlab.methods import lens as L

    if positions not in ("last", "all"):
        raise PatchlabError(f"must be 'last' or 'all', got '{positions}'", param="positions")
    if prompt is not None:
        m = spec.load(workload("forward", batch=1), notify)
        return LensRun(L.top_tokens(m, prompt, k=top_k, track_words=list(track)))
    m = spec.load(workload("forward", ps, with_gap=gap is None), notify)
    layers = parse_layers(intervene_layers, m.cfg.n_layers, "intervene_layers") if intervene else []
    g = gap_for(m, ps, gap)
    run = LensRun(L.lens_items(m, list(ps), gap=g, extra=list(track)))
    if positions == "all":
        run.positions = [
            (it.id, L.top_tokens(m, it.composed, k=top_k, track_words=[it.bridge, it.answer])) for it in list(ps)[:50]
        ]
    if intervene:
        correct = g.correct_items(ps)[:intervene_items]
        if not correct:
            raise PatchlabError("no composed-correct items to intervene on", param="prompt_set")
        run.intervention = L.bridge_intervention(m, correct, layers=layers, n_controls=controls, orthogonal=orthogonal)
        run.correct = len(correct)
    return run


def _no_items(items, setup: str) -> None:
    if not items:
        raise PatchlabError(
            f"no items for `setup` {setup} (guide needs composed failures with both hops right, "
            "template needs composed-correct items)",
            param="prompt_set",
        )


def locate(
    spec: ModelSpec,
    ps: PromptSet,
    out: Path,
    scale: Scale = Scale(),
    setup: str = "guide",
    method: str = "both",
    site: str = "z",
    positions: str = "last",
    top: int = 10,
    verify: int = 20,
    max_items: int = 40,
    ids: Sequence[str] | None = None,
    gap: Path | None = None,
    screen: str = "atp",
    notify: Notify = silent,
    form: str = DEFAULT_FORM,
    audit: int = 20,
):
    """Locate the heads behind the failures (guide) or the correct answers (template) of `ps`, every prompt in
    `form` (the gap that picks the items too)."""
    from patchlab.methods.locate import check_options
    from patchlab.methods.locate import locate as run_locate

    for name, value in (("top", top), ("verify", verify), ("max_items", max_items)):
        if value < 1:
            raise PatchlabError(f"must be >= 1, got {value}", param=name)
    if audit < 0:
        raise PatchlabError(f"must be >= 0, got {audit}", param="audit")
    check_options(method, site, top, screen)
    check_forms(list(ps), form)
    pick = lambda g: (g.failed_items(ps) if setup == "guide" else g.correct_items(ps))[:max_items]  # noqa: E731
    chosen = list(ps.filter(ids=list(ids)))[:max_items] if ids else None
    options = dict(setup=setup, method=method, site=site, positions=positions, top_k=top, verify=verify, screen=screen)
    if audit != 20:  # the default stays out of a sharded run's config: earlier runs keep their ids
        options["audit"] = audit
    work = workload("locate", ps, method=method, with_gap=gap is None and not ids, form=form)
    if scale.sharded:
        from patchlab.runs import jobs

        config = {
            **options,
            "ids": ",".join(ids) if ids else None,
            "max_items": max_items,
            "gap": str(gap) if gap else None,
            **({} if form == DEFAULT_FORM else {"form": form}),
        }
        with scale.open("locate", config, list(ps), out, spec.worker_load(work, notify)) as run:
            items = (
                chosen
                if chosen is not None
                else pick(
                    saved_gap(gap, run.identity["model"], form)
                    if gap
                    else jobs.evaluate(run, list(ps), ps.source, form=form)
                )
            )
            _no_items(items, setup)
            return jobs.locate(run, items, list(ps), **options, form=form)
    m = spec.load(work, notify)
    items = chosen if chosen is not None else pick(gap_for(m, ps, gap, form))
    _no_items(items, setup)
    return run_locate(m, items, pool=list(ps), form=form, **options)


def chosen_heads(model, heads: str | HeadSet | None, heads_from: Path | None, top: int) -> HeadSet:
    """The heads to edit: typed (`heads`), or the best `top` of a saved locate result (`heads_from`)."""
    from patchlab.methods.locate import heads_from as from_result

    if (heads is None) == (heads_from is None):
        raise PatchlabError(
            "give exactly one of `heads` (e.g. 14.3,17.9) or `heads_from` (a locate result.json)", param="heads"
        )
    if heads is not None:
        heads = heads if isinstance(heads, HeadSet) else HeadSet.parse(heads)
        return HeadSet(heads, model.cfg.n_layers, model.cfg.n_heads)
    if top < 1:
        raise PatchlabError(f"must be >= 1, got {top}", param="top")
    return from_result(heads_from, model, top)


def heads(
    spec: ModelSpec,
    ps: PromptSet,
    heads: str | HeadSet | None = None,
    heads_from: Path | None = None,
    top: int = 2,
    ids: Sequence[str] | None = None,
    max_items: int = 40,
    gap: Path | None = None,
    notify: Notify = silent,
):
    """The attention of the chosen heads (typed, or the best `top` of a locate result) from the last position of
    the chosen items' composed queries and guide prompts (by id, else the first `max_items`), correct vs failed."""
    from patchlab.methods.heads import attention_view

    if max_items < 1:
        raise PatchlabError(f"must be >= 1, got {max_items}", param="max_items")
    if isinstance(heads, str):
        heads = HeadSet.parse(heads)  # the syntax now; checked against the model once it is loaded
    items = list(ps.filter(ids=list(ids))) if ids else list(ps)[:max_items]
    m = spec.load(workload("forward", items, with_gap=gap is None), notify)
    chosen = chosen_heads(m, heads, heads_from, top)
    g = gap_for(m, items, gap)
    return attention_view(m, items, chosen, gap=g)


@dataclass
class EditRun:
    """What `edit` produced: the computed edits, their before/after report, and the routed modules (if asked)."""

    report: Any  # EditReport
    edits: list  # [ComputedEdit]
    modules: list = field(default_factory=list)
    batch: bool = False

    def save(self, out: Path) -> dict[str, Path]:
        """edits/ITEM.edit (+ .module.safetensors) and result.json + figure.html; the edits folder is renamed
        into place only after the result files are written, so a failed write leaves neither."""
        with atomic_dir(Path(out) / "edits") as tmp:
            for c in self.edits:
                c.edit.save(tmp / f"{'batch' if self.batch else c.items[0].id}.edit")
            for c, module in zip(self.edits, self.modules):
                module.save(tmp / f"{'batch' if self.batch else c.items[0].id}.module.safetensors")
            return self.report.save(out)


def edit(
    spec: ModelSpec,
    ps: PromptSet,
    heads: str | HeadSet | None = None,
    heads_from: Path | None = None,
    top: int = 2,
    ids: Sequence[str] | None = None,
    failures: bool = False,
    cfg=None,
    batch: bool = False,
    held_out: float = 0.0,
    max_items: int = 100,
    gap: Path | None = None,
    routed: bool = False,
    notify: Notify = silent,
    form: str = DEFAULT_FORM,
    scale: Scale = Scale(),
    out: Path | None = None,
) -> EditRun:
    """Edit the chosen failures (by id, or every failure with both hops right) on the chosen heads, then measure;
    every prompt (the gap's, the edit's keys and targets, the test sets) in `form`.

    With a sharded `scale` the per-item edits are computed by the run's workers (run folder: `scale`'s, else
    OUT/run), bit-identical to this process's when the workers use as many torch threads; the gap, the choice
    of items and the measurement stay in this process, on its own copy of the model. A `batch` edit is one
    computation and is refused with a sharded `scale`."""
    from patchlab.core.protocol import heldout_frames
    from patchlab.methods.edit import EditConfig, check_editable, edit_each
    from patchlab.methods.editeval import evaluate_edits, kl_prompts, preserved_prompts
    from patchlab.runtime.forms import render_items
    from patchlab.studies.mechanisms import modules_for

    if (ids is None) == (not failures):
        raise PatchlabError("give exactly one of `ids` or `failures`", param="ids")
    if not 0.0 <= held_out < 1.0 or (held_out and not batch):
        raise PatchlabError(f"must be in [0, 1) and needs `batch`, got {held_out}", param="held_out")
    if batch and scale.sharded:
        raise PatchlabError(
            "a batch edit is one least-squares computation and cannot be sharded: drop `batch`, or run it in "
            "one process (no `workers`, `backend`, `run_dir` or `resume`)",
            param="workers",
        )
    if scale.sharded and out is None and scale.run_dir is None and scale.resume is None:
        raise PatchlabError("a sharded edit needs `out` (its run folder is OUT/run) or `run_dir`", param="run_dir")
    cfg = cfg or EditConfig()
    if isinstance(heads, str):
        heads = HeadSet.parse(heads)  # the syntax now; checked against the model once it is loaded
    n_layers = len(heads.layers) if heads is not None else top
    check_forms(list(ps), form)
    work = workload("edit", ps, with_gap=gap is None, n_layers_cached=n_layers, form=form)
    m = spec.load(work, notify)
    chosen = chosen_heads(m, heads, heads_from, top)
    g = gap_for(m, ps, gap, form)
    plain = ps
    ps = PromptSet(render_items(m, list(ps), form), source=ps.source)  # every prompt below is in `form`
    items = list(ps.filter(ids=list(ids))) if ids else g.failed_items(ps)
    rows = {r["id"]: r for r in g.items}
    already = [it.id for it in items if rows.get(it.id, {}).get("composed")]
    if already:
        raise PatchlabError(f"item '{already[0]}' is already answered right: nothing to fix", param="ids")
    items = items[:max_items]
    if not items:
        raise PatchlabError("no failures to edit in this prompt set", param="prompt_set")
    kept_out = items[len(items) - int(round(held_out * len(items))) :] if held_out else []
    items = items[: len(items) - len(kept_out)]
    unrelated, exclude = kl_prompts(list(ps), g)
    keep, kept = preserved_prompts(list(ps), g, exclude) if cfg.null_space > 0 or cfg.preserve > 0 else ((), set())
    check_editable(m, chosen.layers)
    run_meta = None
    if scale.sharded:
        from patchlab.runs import jobs
        from patchlab.runtime.identity import base_hash

        config = {
            "heads": str(chosen),
            "ids": ",".join(ids) if ids else None,
            "max_items": max_items,
            "gap": str(gap) if gap else None,
            "cfg": dict(cfg.__dict__),
            **({} if form == DEFAULT_FORM else {"form": form}),
        }
        with scale.open("edit", config, list(plain), out, spec.worker_load(work, notify)) as run:
            if run.identity["weights_sha256"] != base_hash(m):
                raise PatchlabError(
                    f"the workers loaded other weights ({run.identity['weights_sha256'][:12]}) than this process: "
                    "every worker must see the same model files"
                )
            edits = jobs.compute_edits(run, items, chosen, cfg, unrelated, keep, form)
            run_meta = run.meta()
        if not edits:
            raise PatchlabError(
                "no edit was computed: every item was quarantined (it killed two workers)", where=str(run.dir.path)
            )
    else:
        edits = edit_each(m, items, chosen, cfg, batch=batch, unrelated=unrelated, preserved=keep, form=form)
    # the held-out frames (shipped items) are read here, for the evaluation only
    report = evaluate_edits(m, edits, list(ps), g, held_out=kept_out, exclude=exclude | kept,
                            frames=heldout_frames(list(plain)), form=form)  # fmt: skip
    if run_meta is not None:
        report.meta["run"] = run_meta
    modules = modules_for(m, [c.edit for c in edits], list(ps), g)[0] if routed else []
    return EditRun(report, edits, modules, batch)


def apply(
    spec: ModelSpec,
    edit_file: Path,
    ps: PromptSet,
    out: Path,
    scale: Scale = Scale(),
    gap: Path | None = None,
    notify: Notify = silent,
):
    """A saved edit measured on the items it was made for (refused on other weights)."""
    from patchlab.methods.edit import ComputedEdit, Edit
    from patchlab.methods.editeval import evaluate_edits
    from patchlab.runtime.identity import base_hash

    e = Edit.load(edit_file)
    form = e.method.get("form", DEFAULT_FORM)  # measured in the form the edit was made in
    items: list[TwoHopItem] = list(ps.filter(ids=e.item_ids))
    work = workload("forward", ps, with_gap=gap is None)
    if scale.sharded:
        from patchlab.runs import jobs

        config = {"edit_sha256": file_sha256(edit_file), "gap": str(gap) if gap else None}
        with scale.open("apply", config, list(ps), out, spec.worker_load(work, notify)) as run:
            g = (
                saved_gap(gap, run.identity["model"], form)
                if gap
                else jobs.evaluate(run, list(ps), ps.source, form=form)
            )
            return jobs.evaluate_edit(run, edit_file, items, list(ps), g)
    m = spec.load(work, notify)
    if base_hash(m) != e.weights_sha256:
        raise PatchlabError(
            f"edit was made for '{e.model}' weights {e.weights_sha256[:12]}…, not these", where=str(edit_file)
        )
    return evaluate_edits(m, [ComputedEdit(items, e, 0.0)], list(ps), gap_for(m, ps, gap, form), form=form)
