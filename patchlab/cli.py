"""The `patchlab` command line: a thin typer layer that parses, calls the Python API, prints, and writes.

Every command holds its `--out` folder for the whole run (a second run into it is refused) and writes
`result.json` + `figure.html` (and its other files) into it as one unit (`patchlab.core.io.OutFolder`).
Bad input raises `PatchlabError`, which `main` prints as one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from patchlab.core.errors import PatchlabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find and fix the attention heads behind failed two-hop compositions.",
)
console = Console()

ModelOpt = typer.Option(
    "smollm2-135m", "--model", "-m", help="Offline key (smollm2-135m, gemma3-270m), TL name or HF folder."
)
PromptSetOpt = typer.Option(None, "--prompt-set", "-p", help="JSONL prompt set (default: the shipped twohop set).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cpu).")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 (refused for Gemma-3: it overflows).")
DeviceMapOpt = typer.Option(
    None,
    "--device-map",
    help="Spread the weights over devices: auto | balanced | sequential | "
    "FILE.json ({module: device}); not with --device.",
)
MaxMemoryOpt = typer.Option(
    None,
    "--max-memory",
    help="Per-device budget, e.g. 0=70GiB,1=70GiB,cpu=200GiB (the run is refused when its memory estimate exceeds it).",
)
KindsOpt = typer.Option(None, "--kinds", help="Comma-separated kinds to keep.")
LimitOpt = typer.Option(None, "--limit", help="Keep only the first N items (after --kinds).")
PerKindOpt = typer.Option(None, "--per-kind", help="Keep the first N items of every kind.")
RunDirOpt = typer.Option(None, "--run-dir", help="Run sharded and resumable, keeping shards in this folder.")
ResumeOpt = typer.Option(None, "--resume", help="Resume the run in this folder (verified shards are kept).")
BackendOpt = typer.Option("local", "--backend", help="local (this process, or --workers spawned ones) | ray.")
WorkersOpt = typer.Option(1, "--workers", help="Workers, one model each (>1 or ray: sharded run).")
ThreadsOpt = typer.Option(None, "--threads", help="Torch threads per worker (default: cores // workers).")
RayAddressOpt = typer.Option(None, "--ray-address", help="A Ray cluster to join (default: start one here).")
ShardSizeOpt = typer.Option(8, "--shard-size", help="Items per shard (part of the run id).")
QuietOpt = typer.Option(False, "--quiet", help="No progress bars (logs only).")
FormOpt = typer.Option(
    "plain",
    "--form",
    help="Prompt form: plain (the items' cloze text) | qa (Q: question A:) | chat (the model's chat template).",
)


def _output(out: Path):
    """The `--out` folder, locked for the command (refused while another run holds it); written as one unit."""
    from patchlab.core.io import OutFolder

    return OutFolder(out)


def _prompt_set(
    spec: Optional[str], kinds: Optional[str] = None, limit: Optional[int] = None, per_kind: Optional[int] = None
):
    from patchlab.core.prompts import PromptSet

    ps = PromptSet.resolve(spec)
    if per_kind is not None:
        if per_kind < 1:
            raise PatchlabError(f"must be >= 1, got {per_kind}", where="--per-kind")
        ps = ps.stratified(per_kind)
    return ps.filter(kinds=kinds.split(",") if kinds else None, limit=limit)


def _given(**options) -> dict:
    """The options the user gave (None: the API's default, so the two never disagree)."""
    return {k: v for k, v in options.items() if v is not None}


def _ids(ids: Optional[str]) -> Optional[list[str]]:
    return ids.split(",") if ids else None


def _spec(
    model: str, device: Optional[str], dtype: str, device_map: Optional[str] = None, max_memory: Optional[str] = None
):
    from patchlab.workflows.setup import ModelSpec

    return ModelSpec(model, device, dtype, device_map, max_memory)


def _scale(run_dir, resume, backend, workers, threads, ray_address, shard_size):
    from patchlab.workflows.setup import Scale

    return Scale(run_dir, resume, backend, workers, threads, ray_address, shard_size)


def _note(line: str) -> None:
    console.print(f"[dim]{line}[/dim]", highlight=False)


def _report_run(result) -> None:
    meta = result.meta.get("run")
    if not meta:
        return
    console.print(
        f"[dim]run {meta['run_id']} in {meta['run_dir']}: {meta['shards_run']} shard(s) run, "
        f"{meta['shards_reused']} reused, {meta['workers']} {meta['backend']} worker(s)[/dim]"
    )
    if meta["quarantined"]:
        console.print(f"[yellow]quarantined (killed a worker twice): {', '.join(meta['quarantined'])}[/yellow]")


def _quiet(quiet: bool) -> None:
    import os

    if quiet:
        os.environ["PATCHLAB_QUIET"] = "1"


def _written(paths: dict) -> None:
    for name, path in paths.items():
        console.print(f"[green]wrote[/green] {name}: {path}")


def _show(result, out, **table_kw) -> None:
    """Print a result's table and write its JSON + figure into `out` (an `OutFolder`), as one unit."""
    table = result.table(**table_kw)
    if table is not None:
        console.print(table.to_rich())
    _written(out.write(result.save))


@app.command()
def evaluate(
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    kinds: Optional[str] = KindsOpt,
    limit: Optional[int] = LimitOpt,
    per_kind: Optional[int] = PerKindOpt,
    batch_size: int = typer.Option(32, "--batch-size"),
    out: Path = typer.Option(Path("patchlab-out/evaluate"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    run_dir: Optional[Path] = RunDirOpt,
    resume: Optional[Path] = ResumeOpt,
    backend: str = BackendOpt,
    workers: int = WorkersOpt,
    threads: Optional[int] = ThreadsOpt,
    ray_address: Optional[str] = RayAddressOpt,
    shard_size: int = ShardSizeOpt,
    quiet: bool = QuietOpt,
    form: str = FormOpt,
) -> None:
    """Measure hop1 / hop2 / composed accuracy and the compositionality gap per kind."""
    from patchlab.workflows import chain

    _quiet(quiet)
    with _output(out) as o:
        result = chain.evaluate(
            _spec(model, device, dtype, device_map, max_memory),
            _prompt_set(prompt_set, kinds, limit, per_kind),
            out,
            _scale(run_dir, resume, backend, workers, threads, ray_address, shard_size),
            batch_size,
            notify=_note,
            form=form,
        )
        _report_run(result)
        _show(result, o)


@app.command()
def lens(
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt: top-k per layer and position."),
    track: Optional[str] = typer.Option(None, "--track", help="Comma-separated words to track (e.g. France,Paris)."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated item ids."),
    kinds: Optional[str] = KindsOpt,
    limit: Optional[int] = LimitOpt,
    per_kind: Optional[int] = PerKindOpt,
    positions: str = typer.Option("last", "--positions", help="last | all (all: a layer x position view per item)."),
    gap: Optional[Path] = typer.Option(None, "--gap", help="result.json of `patchlab evaluate` (else evaluated now)."),
    intervene: bool = typer.Option(True, "--intervene/--no-intervene", help="Run the bridge-entity intervention."),
    intervene_layers: str = typer.Option("all", "--intervene-layers", help="e.g. all, 0-29:2, 20,25"),
    intervene_items: int = typer.Option(24, "--intervene-items", help="Composed-correct items to intervene on."),
    controls: int = typer.Option(3, "--controls", help="Control tokens per item."),
    orthogonal: bool = typer.Option(
        False, "--orthogonal", help="Remove only the bridge part orthogonal to the answer."
    ),
    top_k: int = typer.Option(5, "--top-k"),
    out: Path = typer.Option(Path("patchlab-out/lens"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Logit lens (bridge vs answer, correct vs failed) and the bridge-entity intervention."""
    from patchlab.workflows import chain

    with _output(out) as o:
        words = [w.strip() for w in track.split(",") if w.strip()] if track else []
        ps = None if prompt is not None else _prompt_set(prompt_set, kinds, limit, per_kind)
        if ps is not None and ids:
            ps = ps.filter(ids=_ids(ids))
        run = chain.lens(
            _spec(model, device, dtype, device_map, max_memory),
            ps,
            prompt,
            words,
            gap,
            positions,
            intervene,
            intervene_layers,
            intervene_items,
            controls,
            orthogonal,
            top_k,
            notify=_note,
        )
        if prompt is not None:
            for word, v in run.main.tracked.items():
                console.print(f"{word}: rank at the last position per layer: {[r[-1] for r in v['rank']]}")
        else:
            console.print(run.main.table().to_rich())
            flagged = [it["id"] for it in run.main.items if it.get("flagged")]
            if flagged:
                console.print(f"[yellow]flagged (non-finite lens logits): {', '.join(flagged)}[/yellow]")
        if run.intervention is not None:
            iv = run.intervention
            if iv.summary["bridge_mean"] and all(v is not None for v in iv.summary["bridge_mean"]):
                best = min(range(len(iv.layers)), key=lambda i: iv.summary["bridge_mean"][i])
                console.print(
                    f"bridge intervention on {run.correct} correct items: strongest at layer {iv.layers[best]}: "
                    f"Δp(answer) {iv.summary['bridge_mean'][best]:+.4f} "
                    f"(control {iv.summary['control_mean'][best]:+.4f})"
                )
        _written(o.write(run.save))


@app.command()
def locate(
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    setup: str = typer.Option(
        "guide", "--setup", help="guide (failing composed <- guide prompt) | template (correct <- other subject)."
    ),
    method: str = typer.Option("both", "--method", help="attribution | exact | both (screen, then verify exactly)."),
    site: str = typer.Option(
        "z", "--site", help="z (per head) | attn_out | mlp_out (whole layers, CREME's granularity)."
    ),
    positions: str = typer.Option("last", "--positions", help="last | all | each (each: per position)."),
    top: int = typer.Option(10, "--top", help="Heads shown, and k of the per-item top-k share."),
    verify: int = typer.Option(20, "--verify", help="With --method both: heads verified exactly."),
    screen: str = typer.Option(
        "atp",
        "--screen",
        help="atp | atp* (AtP with GradDrop over 8 blocks of layers: better recall, ~2.7x the screen's cost).",
    ),
    audit: int = typer.Option(
        20,
        "--audit",
        help="With --method both: heads the screen left out, drawn at random and patched exactly "
        "(the bound on missed heads; 0: none).",
    ),
    max_items: int = typer.Option(40, "--max-items", help="Patch at most this many items."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated item ids (default: all eligible)."),
    kinds: Optional[str] = KindsOpt,
    gap: Optional[Path] = typer.Option(None, "--gap", help="result.json of `patchlab evaluate` (else evaluated now)."),
    out: Path = typer.Option(Path("patchlab-out/locate"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    run_dir: Optional[Path] = RunDirOpt,
    resume: Optional[Path] = ResumeOpt,
    backend: str = BackendOpt,
    workers: int = WorkersOpt,
    threads: Optional[int] = ThreadsOpt,
    ray_address: Optional[str] = RayAddressOpt,
    shard_size: int = ShardSizeOpt,
    quiet: bool = QuietOpt,
    form: str = FormOpt,
) -> None:
    """Find the heads that carry the composition by activation patching (exact and attribution)."""
    from patchlab.workflows import chain

    _quiet(quiet)
    with _output(out) as o:
        result = chain.locate(
            _spec(model, device, dtype, device_map, max_memory),
            _prompt_set(prompt_set, kinds),
            out,
            _scale(run_dir, resume, backend, workers, threads, ray_address, shard_size),
            setup,
            method,
            site,
            positions,
            top,
            verify,
            max_items,
            _ids(ids),
            gap,
            screen=screen,
            notify=_note,
            form=form,
            audit=audit,
        )
        _report_run(result)
        console.print(result.table(top).to_rich())
        if result.audit:
            a = result.audit
            console.print(
                f"[dim]audit: {len(a['sampled'])} of the {a['left_out']} heads the screen left out patched exactly; "
                f"{len(a['above_threshold'])} reach the top {top}; missed heads <= {a['heads_bound']:.0f} "
                f"({a['confidence']:.0%} bound)[/dim]"
            )
        console.print(
            f"[dim]{result.n} items patched in {result.seconds:.1f} s; "
            f"{sum(r['flagged'] for r in result.items)} flagged[/dim]"
        )
        _written(o.write(result.save))


@app.command()
def heads(
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    heads: Optional[str] = typer.Option(None, "--heads", help="Heads to look at, e.g. 23.4,23.5."),
    heads_from: Optional[Path] = typer.Option(None, "--heads-from", help="A `patchlab locate` result.json."),
    top: int = typer.Option(2, "--top", help="With --heads-from: how many heads."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated item ids (default: the first --max-items)."),
    kinds: Optional[str] = KindsOpt,
    per_kind: Optional[int] = PerKindOpt,
    max_items: int = typer.Option(40, "--max-items", help="Without --ids: look at the first N items."),
    gap: Optional[Path] = typer.Option(None, "--gap", help="result.json of `patchlab evaluate` (else evaluated now)."),
    out: Path = typer.Option(Path("patchlab-out/heads"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Where located heads look from the last position: composed query vs guide prompt, correct vs failed."""
    from patchlab.workflows import chain

    with _output(out) as o:
        result = chain.heads(
            _spec(model, device, dtype, device_map, max_memory),
            _prompt_set(prompt_set, kinds, None, per_kind),
            heads,
            heads_from,
            top,
            _ids(ids),
            max_items,
            gap,
            notify=_note,
        )
        _show(result, o)


@app.command()
def edit(
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated item ids to edit."),
    failures: bool = typer.Option(False, "--failures", help="Edit every composed failure with both hops right."),
    heads: Optional[str] = typer.Option(None, "--heads", help="Heads to edit, e.g. 23.4,23.5."),
    heads_from: Optional[Path] = typer.Option(None, "--heads-from", help="A `patchlab locate` result.json."),
    top: int = typer.Option(2, "--top", help="With --heads-from: how many heads."),
    target: Optional[str] = typer.Option(
        None, "--target", help="optimize (ROME-style v*) | guide (CREME's v*) (default: the API's, optimize)."
    ),
    batch: bool = typer.Option(False, "--batch", help="One least-squares edit for all items (MEMIT-style)."),
    held_out: float = typer.Option(
        0.0, "--held-out", help="With --batch: share of the failures kept out of the edit and tested."
    ),
    covariance: bool = typer.Option(
        True, "--covariance/--no-covariance", help="ROME's C over the heads' z (else C = I)."
    ),
    phrasings: Optional[int] = typer.Option(
        None, "--phrasings", help="Also key on the first N paraphrases of each item (default: the API's)."
    ),
    whole_answer: Optional[bool] = typer.Option(
        None, "--whole-answer/--first-token", help="Optimise every answer token (default: the API's)."
    ),
    null_space: Optional[float] = typer.Option(
        None, "--null-space", help="Project the update off what preserved prompts use (0: off; default: the API's)."
    ),
    preserve: Optional[float] = typer.Option(
        None, "--preserve", help="Weight of the preserved prompts' keys inside C (0: off; default: the API's)."
    ),
    max_items: int = typer.Option(100, "--max-items"),
    gap: Optional[Path] = typer.Option(None, "--gap", help="result.json of `patchlab evaluate` (else evaluated now)."),
    routed: bool = typer.Option(
        False,
        "--routed",
        help="Also store each edit as a routed module (key + gate calibration): NAME.module.safetensors.",
    ),
    out: Path = typer.Option(Path("patchlab-out/edit"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    run_dir: Optional[Path] = RunDirOpt,
    resume: Optional[Path] = ResumeOpt,
    backend: str = BackendOpt,
    workers: int = WorkersOpt,
    threads: Optional[int] = ThreadsOpt,
    ray_address: Optional[str] = RayAddressOpt,
    shard_size: int = ShardSizeOpt,
    quiet: bool = QuietOpt,
    form: str = FormOpt,
) -> None:
    """Fix failed compositions with a rank-one update of the chosen heads' W_O columns, and measure it."""
    from patchlab.methods.edit import EditConfig
    from patchlab.workflows import chain

    _quiet(quiet)
    with _output(out) as o:
        run = chain.edit(
            _spec(model, device, dtype, device_map, max_memory),
            _prompt_set(prompt_set),
            heads,
            heads_from,
            top,
            _ids(ids),
            failures,
            EditConfig(
                covariance=covariance,
                **_given(
                    target=target,
                    phrasings=phrasings,
                    whole_answer=whole_answer,
                    null_space=null_space,
                    preserve=preserve,
                ),
            ),
            batch,
            held_out,
            max_items,
            gap,
            routed,
            notify=_note,
            form=form,
            scale=_scale(run_dir, resume, backend, workers, threads, ray_address, shard_size),
            out=out,
        )
        _report_run(run.report)
        console.print(run.report.table().to_rich())
        written = o.write(run.save)
        console.print(
            f"[green]wrote[/green] {len(run.edits)} edit file(s){' and routed modules' if routed else ''} under "
            f"{out / 'edits'}"
        )
        _written(written)


@app.command()
def apply(
    edit_file: Path = typer.Argument(..., help="An .edit file written by `patchlab edit`."),
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    gap: Optional[Path] = typer.Option(None, "--gap"),
    out: Path = typer.Option(Path("patchlab-out/apply"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    run_dir: Optional[Path] = RunDirOpt,
    resume: Optional[Path] = ResumeOpt,
    backend: str = BackendOpt,
    workers: int = WorkersOpt,
    threads: Optional[int] = ThreadsOpt,
    ray_address: Optional[str] = RayAddressOpt,
    shard_size: int = ShardSizeOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Evaluate a saved edit on the items it was made for (refuses an edit made for other weights)."""
    from patchlab.workflows import chain

    _quiet(quiet)
    with _output(out) as o:
        report = chain.apply(
            _spec(model, device, dtype, device_map, max_memory),
            edit_file,
            _prompt_set(prompt_set),
            out,
            _scale(run_dir, resume, backend, workers, threads, ray_address, shard_size),
            gap,
            notify=_note,
        )
        _report_run(report)
        _show(report, o)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="The peer data file (CREME's or MQuAKE's JSON list)."),
    source_format: str = typer.Option(..., "--from", help="creme | mquake"),
    out: Path = typer.Option(..., "--out", "-o", help="The JSONL prompt set to write (atomically)."),
) -> None:
    """Convert a peer data set (CREME, MQuAKE) into a patchlab JSONL prompt set."""
    from patchlab.core.formats import convert as run_convert

    if out.exists() and out.is_dir():
        raise PatchlabError("is a directory, not a file", where=f"--out {out}")
    for line in run_convert(source_format, source, out).lines():
        console.print(line, highlight=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("patchlab-demo"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="A small slice (4 items per kind, 4 edits)."),
    per_kind: Optional[int] = PerKindOpt,
    model: str = ModelOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """The whole chain on the offline default model and the shipped set: gap → lens → locate → edit → report."""
    from patchlab.workflows.demo import run_demo
    from patchlab.workflows.setup import workload

    with _output(out) as o:
        ps = _prompt_set(None, None, None, per_kind if per_kind is not None else (4 if quick else None))
        quick = quick or per_kind is not None
        m = _spec(model, None, dtype, device_map, max_memory).load(workload("demo", ps), notify=_note)
        show = {"locate": {"top": 8}}
        pages = o.write(
            lambda stage: {
                "report": run_demo(
                    m,
                    ps,
                    stage,
                    quick=quick,
                    on_result=lambda name, r: console.print(r.table(**show.get(name, {})).to_rich()),
                    shown=out,
                )
            }
        )
        page = pages["report"]
        console.print(f"[bold green]report:[/bold green] {page}")


@app.command()
def report(
    folder: Path = typer.Argument(..., help="A folder holding results of evaluate / lens / locate / edit runs."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default FOLDER/report.html)."),
    title: Optional[str] = typer.Option(None, "--title"),
    png: Optional[Path] = typer.Option(
        None, "--png", help="Also write a PNG picture of the summary (needs patchlab[docs])."
    ),
) -> None:
    """Build one self-contained HTML page from the JSON results found under FOLDER."""
    from patchlab.core.io import OutFolder
    from patchlab.workflows.report import report as build

    with OutFolder((out or folder / "report.html").parent, whole=False):  # one writer at a time in that folder
        page, *picture = build(folder, out=out, title=title, png=png)
    console.print(f"[bold green]report:[/bold green] {page}")
    for path in picture:
        console.print(f"[green]wrote[/green] {path}")


@app.command("retune")
def retune_cmd(
    model: str = ModelOpt,
    task: str = typer.Option("idm", "--task", help="idm (definition -> word) | twohop (hops + some composed queries)."),
    edit_file: Optional[Path] = typer.Option(
        None, "--edit", help="An .edit file: applied first, then re-tuned around."
    ),
    carma: bool = typer.Option(True, "--carma/--no-carma", help="Add the CARMA regulariser (else plain fine-tuning)."),
    lam: float = typer.Option(0.3, "--lambda", help="CARMA: weight of the regulariser vs the task loss, in [0, 1]."),
    gamma: float = typer.Option(0.3, "--gamma", help="CARMA: weight of L_MI (word-level InfoNCE)."),
    eta: float = typer.Option(0.2, "--eta", help="CARMA: weight of L_stab (layer-to-layer drift)."),
    params: str = typer.Option("all", "--params", help="all | attn | edit-heads (only the edit's W_O columns)."),
    steps: int = typer.Option(30, "--steps"),
    lr: float = typer.Option(6e-5, "--lr"),
    warmup: int = typer.Option(0, "--warmup", help="Steps of linear learning-rate warmup."),
    clip: float = typer.Option(1.0, "--clip", help="Max global gradient norm (0: none)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="Data order, train/test split and synonym draws."),
    checkpoint_every: int = typer.Option(
        10, "--checkpoint-every", help="Steps between checkpoints (0: only the last)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint under OUT/checkpoints."),
    eval_items: int = typer.Option(150, "--eval-items", help="At most N queries per evaluated set (seeded sample)."),
    prompt_set: Optional[str] = PromptSetOpt,
    out: Path = typer.Option(Path("patchlab-out/retune"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Fine-tune on a task, plain or with CARMA; measure accuracy, synonym robustness and an edit's correction."""
    from patchlab.workflows import studies

    with _output(out) as o:
        result = studies.retune(
            _spec(model, device, dtype, device_map, max_memory),
            task,
            edit_file,
            carma,
            lam,
            gamma,
            eta,
            params,
            steps,
            lr,
            warmup,
            clip,
            batch_size,
            seed,
            checkpoint_every,
            resume,
            eval_items,
            prompt_set,
            out,
            notify=_note,
        )
        console.print(result.table().to_rich())
        console.print(f"[green]wrote[/green] checkpoint: {result.checkpoint}")
        _written(o.write(result.save))


@app.command()
def mechanisms(
    more: Optional[list[str]] = typer.Argument(
        None, help="More edit / module files (a shell glob after --edits lands here)."
    ),
    edits: Optional[str] = typer.Option(
        None,
        "--edits",
        help="Edits to stack, in order: .module.safetensors (routed) or .edit files; a file, a folder or a glob.",
    ),
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    gap: Optional[Path] = typer.Option(None, "--gap", help="result.json of `patchlab evaluate` (else evaluated now)."),
    stages: str = typer.Option("1,10,50,all", "--stages", help="Numbers of stacked edits to measure at."),
    gate: str = typer.Option("hard", "--gate", help="hard (open above tau) | soft (ramp from lo to hi)."),
    orthogonal: bool = typer.Option(
        True, "--orthogonal/--no-orthogonal", help="Keying .edit files: Gram-Schmidt each key against earlier ones."
    ),
    key_heads: str = typer.Option(
        "layer",
        "--key-heads",
        help="Keying .edit files: gates read every head's z at the layer, or only the edited heads'.",
    ),
    n_test: int = typer.Option(60, "--n-test", help="Irrelevance and facts queries."),
    out: Path = typer.Option(Path("patchlab-out/mechanisms"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Stack edits one stage after another, plain (summed into W_O) vs routed modules: retention, correction, locality."""
    from patchlab.workflows import studies

    with _output(out) as o:
        result = studies.mechanisms(
            _spec(model, device, dtype, device_map, max_memory),
            _prompt_set(prompt_set),
            edits,
            more or [],
            gap,
            stages,
            gate,
            orthogonal,
            key_heads,
            n_test,
            notify=_note,
        )
        console.print(result.table().to_rich())
        for name, d in result.dependence.items():
            console.print(
                f"dependence ({name}): HSIC {d['hsic']:.4f} (shuffled {d['hsic_null']:.4f}), mean |r| {d['abs_r']:.3f}"
                if d.get("hsic") is not None
                else f"dependence ({name}): one module"
            )
        console.print(f"routing costs {result.cost['ratio']:.2f}x a plain forward ({result.cost['modules']} modules)")
        _written(o.write(result.save))


@app.command()
def emergence(
    model: str = ModelOpt,
    texts: Optional[Path] = typer.Option(
        None, "--texts", help="Texts, one per line (natural; default: the shipped sentences)."
    ),
    prompt_set: Optional[str] = typer.Option(
        None, "--prompt-set", "-p", help="twohop: JSONL prompt set (default: shipped)."
    ),
    experiment: Optional[str] = typer.Option(
        None,
        "--experiment",
        "-e",
        help="natural (vs shuffled, random init) | icl | twohop (default: twohop with --prompt-set, else natural).",
    ),
    layers: str = typer.Option("all", "--layers", help="Blocks, e.g. all, 0-29:2, 5,10."),
    length: Optional[int] = typer.Option(
        None, "--length", help="natural: tokens per text T (default: largest 75% reach)."
    ),
    estimator: str = typer.Option("gaussian", "--estimator", help="gaussian | infonce | mine."),
    dim: int = typer.Option(8, "--dim", help="Principal components per side seen by the estimator."),
    ridge: float = typer.Option(0.1, "--ridge", help="gaussian: noise floor (variance per whitened component)."),
    n_boot: int = typer.Option(10, "--n-boot", help="gaussian: bootstrap resamples of the sequences for the std."),
    seeds: str = typer.Option(
        "0", "--seeds", help="Comma-separated seeds (neural estimators: mean and std over them)."
    ),
    random_init: bool = typer.Option(
        True, "--random-init/--no-random-init", help="natural: add the random-weights control."
    ),
    demos: str = typer.Option("0-6", "--demos", help="icl: numbers of demonstrations k, e.g. 0-6 or 0,2,4."),
    n: int = typer.Option(150, "--n", help="icl: prompts per k."),
    failed: str = typer.Option(
        "wrong", "--failed", help="twohop: wrong (any composed failure) | gap (both hops right)."
    ),
    min_group: int = typer.Option(10, "--min-group", help="twohop: least queries per outcome in a length group."),
    gap: Optional[Path] = typer.Option(
        None, "--gap", help="twohop: result.json of `patchlab evaluate` (else evaluated now)."
    ),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Hidden-state cache (default: $PATCHLAB_CACHE/hidden)."
    ),
    out: Path = typer.Option(Path("patchlab-out/emergence"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    run_dir: Optional[Path] = RunDirOpt,
    resume: Optional[Path] = ResumeOpt,
    backend: str = BackendOpt,
    workers: int = WorkersOpt,
    threads: Optional[int] = ThreadsOpt,
    ray_address: Optional[str] = RayAddressOpt,
    shard_size: int = ShardSizeOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Information emergence per block (Chen et al. 2024): natural vs shuffled text, in-context demos, two-hop."""
    from patchlab.workflows import studies

    _quiet(quiet)
    with _output(out) as o:
        result = studies.emergence(
            _spec(model, device, dtype, device_map, max_memory),
            out,
            experiment,
            texts,
            prompt_set,
            layers,
            length,
            estimator,
            dim,
            ridge,
            n_boot,
            seeds,
            random_init,
            demos,
            n,
            failed,
            min_group,
            gap,
            cache_dir,
            _scale(run_dir, resume, backend, workers, threads, ray_address, shard_size),
            notify=_note,
        )
        _show(result, o)


@app.command("compare")
def compare_cmd(
    models: str = typer.Option(
        "smollm2-135m,gemma3-270m", "--models", help="Comma-separated: offline keys, TL names, folders."
    ),
    tasks: str = typer.Option("substitutivity,systematicity,overgeneralisation", "--tasks"),
    shots: int = typer.Option(2, "--shots", help="Demonstrations in each entailment prompt (a yes, then a no, ...)."),
    gap: bool = typer.Option(True, "--gap/--no-gap", help="Also measure the two-hop gap (evaluate) per model."),
    prompt_set: Optional[str] = PromptSetOpt,
    per_kind: Optional[int] = PerKindOpt,
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass (Gemma's logits are large)."),
    out: Path = typer.Option(Path("patchlab-out/compare"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Compositionality probes (substitutivity, systematicity, over-generalisation) and the two-hop gap across models."""
    from patchlab.workflows import studies

    with _output(out) as o:
        names = [n.strip() for n in models.split(",") if n.strip()]
        ps = _prompt_set(prompt_set, None, None, per_kind) if gap else None
        result = studies.compare(
            names,
            [t.strip() for t in tasks.split(",") if t.strip()],
            gap,
            ps,
            shots,
            batch_size,
            _spec(names[0] if names else "", device, dtype, device_map, max_memory),
            notify=_note,
        )
        _show(result, o)


# Library parameters that a command exposes under another name (param -> the command's parameter).
RENAMED = {"lens": {"layers": "intervene_layers", "n_controls": "controls"}, "locate": {"top_k": "top"}}


def flag_for(argv: list[str]):
    """param name -> the invoked command's flag (`device_map` -> `--device-map`), read from its typer options."""
    import typer.main

    group = typer.main.get_command(app)
    name = next((a for a in argv if not a.startswith("-")), None)
    command = getattr(group, "commands", {}).get(name) if name else None
    flags = {p.name: next((o for o in p.opts if o.startswith("--")), None) for p in getattr(command, "params", [])}
    renamed = RENAMED.get(name or "", {})
    return lambda param: flags.get(renamed.get(param, param))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: runs the typer app; a `PatchlabError` becomes one line on stderr (parameters shown as this
    command's flags) and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="patchlab", standalone_mode=True)
    except PatchlabError as exc:
        from rich.markup import escape

        text = exc.shown(flag_for(args))
        Console(stderr=True).print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
