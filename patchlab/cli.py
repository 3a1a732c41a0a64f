"""The `patchlab` command line: a thin typer layer that parses, calls the Python API, prints, and writes.

Every command writes `result.json` + `figure.html` into `--out` (each file atomically). Bad input
raises `PatchlabError`, which `main` prints as one line on stderr with exit code 2.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import tables
from .errors import PatchlabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find and fix the attention heads behind failed two-hop compositions.",
)
console = Console()

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="Offline key (smollm2-135m, gemma3-270m), TL name or HF folder.")
PromptSetOpt = typer.Option(None, "--prompt-set", "-p", help="JSONL prompt set (default: the shipped twohop set).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cpu).")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 (refused for Gemma-3: it overflows).")
DeviceMapOpt = typer.Option(None, "--device-map", help="Spread the weights over devices: auto | balanced | sequential | "
                            "FILE.json ({module: device}); not with --device.")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="Per-device budget, e.g. 0=70GiB,1=70GiB,cpu=200GiB (the run is "
                            "refused when its memory estimate exceeds it).")
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


def _out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise PatchlabError("exists and is not a directory", where=f"--out {out}")
    return out


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise PatchlabError(f"unknown dtype '{name}' (use {', '.join(table)})", where="--dtype")
    return table[name]


def _prompt_set(spec: Optional[str], kinds: Optional[str], limit: Optional[int], per_kind: Optional[int]):
    from .prompts import PromptSet

    ps = PromptSet.resolve(spec)
    if per_kind is not None:
        if per_kind < 1:
            raise PatchlabError(f"must be >= 1, got {per_kind}", where="--per-kind")
        ps = ps.stratified(per_kind)
    return ps.filter(kinds=kinds.split(",") if kinds else None, limit=limit)


def _work(kind: str, ps=None, **kw):
    """A command's memory workload: `kind` over a prompt set (its longest prompt sets the sequence length)."""
    from .memory import Workload

    prompts = [getattr(it, f) for it in ps for f in ("hop1", "hop2", "composed")] if ps is not None else []
    return Workload.for_prompts(kind, prompts, **kw)


def _fits(model: str, dtype, place, work) -> None:
    """Print the memory estimate of loading `model` for `work`, and refuse (one line, with the sums) if it cannot fit."""
    from .memory import estimate

    est = estimate(model, dtype, work, place.device, place.device_map, place.max_memory)
    if est is None:
        console.print(f"[dim]memory estimate skipped: no config or weights of {model} on disk yet[/dim]")
        return
    for line in est.lines():
        console.print(f"[dim]{line}[/dim]", highlight=False)
    est.refuse()


def _placement(device: Optional[str], dtype: str, device_map: Optional[str], max_memory: Optional[str],
               models: list[str], work):
    """The parsed placement for `models`, each checked (dtype) and, given a `work`, estimated before any is loaded."""
    from . import placement
    from .models import model_type

    place = placement.parse(device, device_map, max_memory)
    for name in models:
        placement.refuse_dtype(model_type(name), _dtype(dtype), where="--dtype")
        if work is not None:
            _fits(name, _dtype(dtype), place, work)
    return place


def _load(model: str, device: Optional[str], dtype: str, device_map: Optional[str] = None,
          max_memory: Optional[str] = None, work=None):
    """Check the placement, estimate the memory `work` needs (refusing what cannot fit), then load the model."""
    from .models import load_model

    place = _placement(device, dtype, device_map, max_memory, [model], work)
    start = time.perf_counter()
    with console.status(f"loading {model} ..."):
        m = load_model(model, device=device, dtype=_dtype(dtype), **place.load_kwargs())
    console.print(f"[dim]loaded {model} in {time.perf_counter() - start:.1f} s[/dim]")
    return m


def _sharded(run_dir, resume, backend: str, workers: int, ray_address) -> bool:
    """A run goes through shards (patchlab.jobs) when asked for a run folder, a resume, workers or Ray."""
    if run_dir is not None and resume is not None:
        raise PatchlabError("give --run-dir or --resume, not both", where="--resume")
    return run_dir is not None or resume is not None or workers != 1 or backend != "local"


def _open_run(command: str, config: dict, items, out: Path, load, run_dir, resume, scale, shard_size: int):
    """A started `patchlab.jobs.Run` for a sharded command (run folder: --resume, --run-dir or OUT/run)."""
    from .jobs import Run

    if shard_size < 1:
        raise PatchlabError(f"must be >= 1, got {shard_size}", where="--shard-size")
    folder = resume or run_dir or out / "run"
    return Run(command, {**config, "shard_size": shard_size}, items, folder, load, scale, resume=resume is not None)


def _worker_load(model: str, device: Optional[str], dtype: str, device_map: Optional[str], max_memory: Optional[str],
                 work):
    """How each worker loads the model: the placement checked and the memory estimated (per worker) first."""
    from .backends import Load

    place = _placement(device, dtype, device_map, max_memory, [model], work)
    return Load(model, dtype, kwargs={**({"device": device} if device else {}), **place.load_kwargs()})


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _backend(backend: str, workers: int, threads: Optional[int], ray_address: Optional[str]):
    from .jobs import Backend

    return Backend(backend, workers, threads, ray_address)


def _report_run(meta: dict) -> None:
    console.print(f"[dim]run {meta['run_id']} in {meta['run_dir']}: {meta['shards_run']} shard(s) run, "
                  f"{meta['shards_reused']} reused, {meta['workers']} {meta['backend']} worker(s)[/dim]")
    if meta["quarantined"]:
        console.print(f"[yellow]quarantined (killed a worker twice): {', '.join(meta['quarantined'])}[/yellow]")


def _quiet(quiet: bool) -> None:
    import os

    if quiet:
        os.environ["PATCHLAB_QUIET"] = "1"


def _written(paths: dict) -> None:
    for name, path in paths.items():
        console.print(f"[green]wrote[/green] {name}: {path}")


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
) -> None:
    """Measure hop1 / hop2 / composed accuracy and the compositionality gap per kind."""
    from .evaluate import evaluate_gap

    out = _out_dir(out)
    _quiet(quiet)
    if batch_size < 1:
        raise PatchlabError(f"batch size must be >= 1, got {batch_size}", where="--batch-size")
    ps = _prompt_set(prompt_set, kinds, limit, per_kind)
    if _sharded(run_dir, resume, backend, workers, ray_address):
        from . import jobs

        load = _worker_load(model, device, dtype, device_map, max_memory, _work("evaluate", ps, batch=batch_size))
        with _open_run("evaluate", {"batch_size": batch_size}, list(ps), out, load, run_dir, resume,
                       _backend(backend, workers, threads, ray_address), shard_size) as run:
            result = jobs.evaluate(run, list(ps), ps.source, batch_size)
        _report_run(result.meta["run"])
    else:
        result = evaluate_gap(_load(model, device, dtype, device_map, max_memory, _work("evaluate", ps, batch=batch_size)),
                              ps, batch_size=batch_size)
    console.print(tables.gap_table(result).to_rich())
    _written(result.save(out))


def _gap_for(m, ps, gap_path: Optional[Path]):
    """A saved GapResult (must cover the items), or a fresh gap evaluation."""
    from .evaluate import evaluate_gap

    if gap_path is None:
        return evaluate_gap(m, ps)
    return _saved_gap(gap_path, getattr(m, "patchlab_name", None))


def _saved_gap(gap_path: Path, model: Optional[str]):
    """A saved GapResult, refused when it was made on another model."""
    from .evaluate import GapResult

    gap = GapResult.from_json(gap_path)
    if model is not None and gap.model != model:
        raise PatchlabError(f"gap result was made on '{gap.model}', not this model", where=f"--gap {gap_path}")
    return gap


def _no_items(items, setup: str) -> None:
    if not items:
        raise PatchlabError(f"no items for --setup {setup} (guide needs composed failures with both hops right, "
                            "template needs composed-correct items)", where="--prompt-set")


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
    orthogonal: bool = typer.Option(False, "--orthogonal", help="Remove only the bridge part orthogonal to the answer."),
    top_k: int = typer.Option(5, "--top-k"),
    out: Path = typer.Option(Path("patchlab-out/lens"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Logit lens (bridge vs answer, correct vs failed) and the bridge-entity intervention."""
    from . import lens as L
    from .spec import parse_layers

    out = _out_dir(out)
    if positions not in ("last", "all"):
        raise PatchlabError(f"must be 'last' or 'all', got '{positions}'", where="--positions")
    words = [w.strip() for w in track.split(",") if w.strip()] if track else []
    if prompt is not None:
        m = _load(model, device, dtype, device_map, max_memory, _work("forward", batch=1))
        result = L.top_tokens(m, prompt, k=top_k, track_words=words)
        for word, v in result.tracked.items():
            console.print(f"{word}: rank at the last position per layer: {[r[-1] for r in v['rank']]}")
        _written(result.save(out))
        return
    ps = _prompt_set(prompt_set, kinds, limit, per_kind)
    if ids:
        ps = ps.filter(ids=ids.split(","))
    m = _load(model, device, dtype, device_map, max_memory, _work("forward", ps, with_gap=gap is None))
    layers = parse_layers(intervene_layers, m.cfg.n_layers, "--intervene-layers") if intervene else []
    gap_result = _gap_for(m, ps, gap)
    result = L.lens_items(m, list(ps), gap=gap_result, extra=words)
    console.print(tables.lens_table(result).to_rich())
    _written(result.save(out))
    if positions == "all":
        for it in list(ps)[:50]:
            _written(L.top_tokens(m, it.composed, k=top_k, track_words=[it.bridge, it.answer]).save(out / "positions", name=it.id))
    if intervene:
        correct = gap_result.correct_items(ps)[:intervene_items]
        if not correct:
            raise PatchlabError("no composed-correct items to intervene on", where="--prompt-set")
        iv = L.bridge_intervention(m, correct, layers=layers, n_controls=controls, orthogonal=orthogonal)
        best = min(range(len(layers)), key=lambda i: iv.summary["bridge_mean"][i])
        console.print(
            f"bridge intervention on {len(correct)} correct items: strongest at layer {layers[best]}: "
            f"Δp(answer) {iv.summary['bridge_mean'][best]:+.4f} (control {iv.summary['control_mean'][best]:+.4f})"
        )
        _written(iv.save(out, name="intervention"))


@app.command()
def locate(
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    setup: str = typer.Option("guide", "--setup", help="guide (failing composed <- guide prompt) | template (correct <- other subject)."),
    method: str = typer.Option("both", "--method", help="attribution | exact | both (screen, then verify exactly)."),
    site: str = typer.Option("z", "--site", help="z (per head) | attn_out | mlp_out (whole layers, CREME's granularity)."),
    positions: str = typer.Option("last", "--positions", help="last | all | each (each: per position)."),
    top: int = typer.Option(10, "--top", help="Heads shown, and k of the per-item top-k share."),
    verify: int = typer.Option(20, "--verify", help="With --method both: heads verified exactly."),
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
) -> None:
    """Find the heads that carry the composition by activation patching (exact and attribution)."""
    from .locate import check_options
    from .locate import locate as run_locate

    out = _out_dir(out)
    _quiet(quiet)
    for name, value in (("--top", top), ("--verify", verify), ("--max-items", max_items)):
        if value < 1:
            raise PatchlabError(f"must be >= 1, got {value}", where=name)
    check_options(method, site, top)
    ps = _prompt_set(prompt_set, kinds, None, None)
    pick = lambda g: (g.failed_items(ps) if setup == "guide" else g.correct_items(ps))[:max_items]  # noqa: E731
    chosen = list(ps.filter(ids=ids.split(",")))[:max_items] if ids else None
    options = dict(setup=setup, method=method, site=site, positions=positions, top_k=top, verify=verify)
    if _sharded(run_dir, resume, backend, workers, ray_address):
        from . import jobs

        config = {**options, "ids": ids, "max_items": max_items, "gap": str(gap) if gap else None}
        load = _worker_load(model, device, dtype, device_map, max_memory,
                            _work("locate", ps, method=method, with_gap=gap is None and not ids))
        with _open_run("locate", config, list(ps), out, load, run_dir, resume,
                       _backend(backend, workers, threads, ray_address), shard_size) as run:
            items = chosen if chosen is not None else pick(_saved_gap(gap, run.identity["model"]) if gap else
                                                            jobs.evaluate(run, list(ps), ps.source))
            _no_items(items, setup)
            result = jobs.locate(run, items, list(ps), **options)
        _report_run(result.meta["run"])
    else:
        m = _load(model, device, dtype, device_map, max_memory,
                  _work("locate", ps, method=method, with_gap=gap is None and not ids))
        items = chosen if chosen is not None else pick(_gap_for(m, ps, gap))
        _no_items(items, setup)
        result = run_locate(m, items, pool=list(ps), **options)
    console.print(tables.locate_table(result, top).to_rich())
    console.print(f"[dim]{result.n} items patched in {result.seconds:.1f} s; "
                  f"{sum(r['flagged'] for r in result.items)} flagged[/dim]")
    _written(result.save(out))


def _heads(m, heads: Optional[str], heads_from: Optional[Path], top: int):
    from .locate import heads_from as from_result
    from .spec import parse_heads

    if (heads is None) == (heads_from is None):
        raise PatchlabError("give exactly one of --heads 14.3,17.9 or --heads-from locate/result.json", where="--heads")
    if heads is not None:
        return parse_heads(heads, m.cfg.n_layers, m.cfg.n_heads)
    if top < 1:
        raise PatchlabError(f"must be >= 1, got {top}", where="--top")
    return from_result(heads_from, m, top)


@app.command()
def edit(
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated item ids to edit."),
    failures: bool = typer.Option(False, "--failures", help="Edit every composed failure with both hops right."),
    heads: Optional[str] = typer.Option(None, "--heads", help="Heads to edit, e.g. 23.4,23.5."),
    heads_from: Optional[Path] = typer.Option(None, "--heads-from", help="A `patchlab locate` result.json."),
    top: int = typer.Option(2, "--top", help="With --heads-from: how many heads."),
    target: str = typer.Option("optimize", "--target", help="optimize (ROME-style v*) | guide (CREME's v*)."),
    batch: bool = typer.Option(False, "--batch", help="One least-squares edit for all items (MEMIT-style)."),
    held_out: float = typer.Option(0.0, "--held-out", help="With --batch: share of the failures kept out of the edit and tested."),
    covariance: bool = typer.Option(True, "--covariance/--no-covariance", help="ROME's C over the heads' z (else C = I)."),
    max_items: int = typer.Option(100, "--max-items"),
    gap: Optional[Path] = typer.Option(None, "--gap", help="result.json of `patchlab evaluate` (else evaluated now)."),
    routed: bool = typer.Option(False, "--routed", help="Also store each edit as a routed module (key + gate calibration): NAME.module.safetensors."),
    out: Path = typer.Option(Path("patchlab-out/edit"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Fix failed compositions with a rank-one update of the chosen heads' W_O columns, and measure it."""
    from .edit import EditConfig, check_editable, edit_each
    from .editeval import evaluate_edits, kl_prompts
    from .io import atomic_dir
    from .mechanisms import modules_for

    out = _out_dir(out)
    if (ids is None) == (not failures):
        raise PatchlabError("give exactly one of --ids ... or --failures", where="--ids")
    if not 0.0 <= held_out < 1.0 or (held_out and not batch):
        raise PatchlabError(f"must be in [0, 1) and needs --batch, got {held_out}", where="--held-out")
    cfg = EditConfig(target=target, covariance=covariance)
    ps = _prompt_set(prompt_set, None, None, None)
    m = _load(model, device, dtype, device_map, max_memory, _work(
        "edit", ps, with_gap=gap is None, n_layers_cached=len({h.split(".")[0] for h in heads.split(",")}) if heads else top))
    chosen = _heads(m, heads, heads_from, top)
    g = _gap_for(m, ps, gap)
    items = list(ps.filter(ids=ids.split(","))) if ids else g.failed_items(ps)
    rows = {r["id"]: r for r in g.items}
    already = [it.id for it in items if rows.get(it.id, {}).get("composed")]
    if already:
        raise PatchlabError(f"item '{already[0]}' is already answered right: nothing to fix", where="--ids")
    items = items[:max_items]
    if not items:
        raise PatchlabError("no failures to edit in this prompt set", where="--prompt-set")
    kept_out = items[len(items) - int(round(held_out * len(items))):] if held_out else []
    items = items[: len(items) - len(kept_out)]
    unrelated, exclude = kl_prompts(list(ps), g)
    check_editable(m, sorted({h.layer for h in chosen}))
    edits = edit_each(m, items, chosen, cfg, batch=batch, unrelated=unrelated)
    report = evaluate_edits(m, edits, list(ps), g, held_out=kept_out, exclude=exclude)
    console.print(tables.edit_table(report).to_rich())
    modules = modules_for(m, [e for _, e, _ in edits], list(ps), g)[0] if routed else []
    # the edits folder is renamed into place only after result.json is written: a failed write leaves neither
    with atomic_dir(out / "edits") as tmp:
        for group, e, _ in edits:
            e.save(tmp / f"{'batch' if batch else group[0].id}.edit")
        for (group, _, _), module in zip(edits, modules):
            module.save(tmp / f"{'batch' if batch else group[0].id}.module.safetensors")
        written = report.save(out)
    console.print(f"[green]wrote[/green] {len(edits)} edit file(s){' and routed modules' if routed else ''} under {out / 'edits'}")
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
    from .edit import Edit, base_hash
    from .editeval import evaluate_edits

    out = _out_dir(out)
    _quiet(quiet)
    e = Edit.load(edit_file)
    ps = _prompt_set(prompt_set, None, None, None)
    items = list(ps.filter(ids=e.item_ids))
    work = _work("forward", ps, with_gap=gap is None)
    if _sharded(run_dir, resume, backend, workers, ray_address):
        from . import jobs

        load = _worker_load(model, device, dtype, device_map, max_memory, work)
        config = {"edit_sha256": _file_sha256(edit_file), "gap": str(gap) if gap else None}
        with _open_run("apply", config, list(ps), out, load, run_dir, resume,
                       _backend(backend, workers, threads, ray_address), shard_size) as run:
            g = _saved_gap(gap, run.identity["model"]) if gap else jobs.evaluate(run, list(ps), ps.source)
            report = jobs.evaluate_edit(run, edit_file, items, list(ps), g)
        _report_run(report.meta["run"])
    else:
        m = _load(model, device, dtype, device_map, max_memory, work)
        if base_hash(m) != e.weights_sha256:
            raise PatchlabError(f"edit was made for '{e.model}' weights {e.weights_sha256[:12]}…, not these", where=str(edit_file))
        report = evaluate_edits(m, [(items, e, 0.0)], list(ps), _gap_for(m, ps, gap))
    console.print(tables.edit_table(report).to_rich())
    _written(report.save(out))


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
    from .demo import run_demo

    out = _out_dir(out)
    ps = _prompt_set(None, None, None, per_kind if per_kind is not None else (4 if quick else None))
    quick = quick or per_kind is not None
    m = _load(model, None, dtype, device_map, max_memory, _work("demo", ps))
    printers = {"gap": tables.gap_table, "lens": tables.lens_table, "intervention": tables.intervention_table,
                "locate": lambda r: tables.locate_table(r, 8), "edit": tables.edit_table}
    page = run_demo(m, ps, out, quick=quick, on_result=lambda name, r: console.print(printers[name](r).to_rich()))
    console.print(f"[bold green]report:[/bold green] {page}")


@app.command()
def report(
    folder: Path = typer.Argument(..., help="A folder holding results of evaluate / lens / locate / edit runs."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default FOLDER/report.html)."),
    title: Optional[str] = typer.Option(None, "--title"),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write a PNG picture of the summary (needs patchlab[docs])."),
) -> None:
    """Build one self-contained HTML page from the JSON results found under FOLDER."""
    from .report import build_report, find_results, summary_png

    console.print(f"[bold green]report:[/bold green] {build_report(folder, out=out, title=title)}")
    if png is not None:
        console.print(f"[green]wrote[/green] {summary_png(find_results(folder), png)}")


def _edit_queries(edit_file: Path, prompt_set: Optional[str]):
    """The composed queries and paraphrases of the items an edit was made for."""
    from .edit import Edit
    from .editeval import Query
    from .prompts import PromptSet

    e = Edit.load(edit_file)
    ps = PromptSet.resolve(prompt_set)
    missing = [i for i in e.item_ids if i not in {it.id for it in ps}]
    if missing:
        raise PatchlabError(f"edit item '{missing[0]}' is not in the prompt set {ps.source}", where=f"--edit {edit_file}")
    items = list(ps.filter(ids=e.item_ids))
    return e, {"composed": [Query(it.composed, it.answers) for it in items],
               "paraphrase": [Query(p, it.answers) for it in items for p in it.paraphrases]}


def _correction(m, queries) -> dict:
    from .editeval import measure

    return {name: float(sum(r["correct"] for r in rows) / len(rows)) if rows else None
            for name, rows in ((n, measure(m, q)) for n, q in queries.items())}


@app.command("retune")
def retune_cmd(
    model: str = ModelOpt,
    task: str = typer.Option("idm", "--task", help="idm (definition -> word) | twohop (hops + some composed queries)."),
    edit_file: Optional[Path] = typer.Option(None, "--edit", help="An .edit file: applied first, then re-tuned around."),
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
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", help="Steps between checkpoints (0: only the last)."),
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
    import math

    from . import tasks as T
    from .carma import CarmaConfig
    from .prompts import PromptSet
    from .retune import RetuneConfig, retune

    out = _out_dir(out)
    for name, value in (("--lambda", lam), ("--gamma", gamma), ("--eta", eta)):
        if not math.isfinite(value) or value < 0 or (name == "--lambda" and value > 1):
            raise PatchlabError(f"must be a finite number in {'[0, 1]' if name == '--lambda' else '[0, inf)'}, got {value}", where=name)
    if eval_items < 1:
        raise PatchlabError(f"must be >= 1, got {eval_items}", where="--eval-items")
    if task not in T.TASKS:
        raise PatchlabError(f"unknown task '{task}' (use {' | '.join(T.TASKS)})", where="--task")
    if params == "edit-heads" and edit_file is None:
        raise PatchlabError("params 'edit-heads' needs --edit", where="--params")
    RetuneConfig(params, steps, lr, warmup, clip, batch_size, seed, 0.0, checkpoint_every)  # fail before loading
    cfg = CarmaConfig(lam=lam, gamma=gamma, eta=eta, seed=seed) if carma else None
    work = T.load(task, seed=seed, prompt_set=PromptSet.resolve(prompt_set) if task == "twohop" else None)
    e, queries = _edit_queries(edit_file, prompt_set) if edit_file is not None else (None, {})
    m = _load(model, device, dtype, device_map, max_memory, _work("train", batch=batch_size, seq_len=64, trainable=params))
    base = _correction(m, queries) if e is not None else {}
    if e is not None:
        e.apply(m)
    before_edit = _correction(m, queries) if e is not None else {}
    with console.status("evaluating before re-tuning ..."):
        before = T.evaluate_task(m, work, seed=seed, limit=eval_items)
    result = retune(m, work.train, carma=cfg, params=params, edit=e, steps=steps, lr=lr, warmup=warmup, clip=clip,
                    batch_size=batch_size, seed=seed, checkpoint_dir=out / "checkpoints",
                    checkpoint_every=checkpoint_every, resume=resume, task=task)
    with console.status("evaluating after re-tuning ..."):
        after = T.evaluate_task(m, work, seed=seed, limit=eval_items)
    result.evaluation = {"before": before, "after": after, "eval_items": eval_items}
    if e is not None:
        after_edit = _correction(m, queries)
        result.edit["correction"] = {n: {"n": len(queries[n]), "base": base[n], "before": before_edit[n],
                                         "after": after_edit[n]} for n in queries if queries[n]}
    console.print(tables.retune_table(result).to_rich())
    console.print(f"[green]wrote[/green] checkpoint: {result.checkpoint}")
    _written(result.save(out))


@app.command()
def mechanisms(
    more: Optional[list[str]] = typer.Argument(None, help="More edit / module files (a shell glob after --edits lands here)."),
    edits: Optional[str] = typer.Option(None, "--edits", help="Edits to stack, in order: .module.safetensors (routed) or .edit files; a file, a folder or a glob."),
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    gap: Optional[Path] = typer.Option(None, "--gap", help="result.json of `patchlab evaluate` (else evaluated now)."),
    stages: str = typer.Option("1,10,50,all", "--stages", help="Numbers of stacked edits to measure at."),
    gate: str = typer.Option("hard", "--gate", help="hard (open above tau) | soft (ramp from lo to hi)."),
    orthogonal: bool = typer.Option(True, "--orthogonal/--no-orthogonal", help="Keying .edit files: Gram-Schmidt each key against earlier ones."),
    key_heads: str = typer.Option("layer", "--key-heads", help="Keying .edit files: gates read every head's z at the layer, or only the edited heads'."),
    n_test: int = typer.Option(60, "--n-test", help="Irrelevance and facts queries."),
    out: Path = typer.Option(Path("patchlab-out/mechanisms"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Stack edits one stage after another, plain (summed into W_O) vs routed modules: retention, correction, locality."""
    from . import mechanisms as M

    out = _out_dir(out)
    if n_test < 1:
        raise PatchlabError(f"must be >= 1, got {n_test}", where="--n-test")
    if gate not in M.GATES:
        raise PatchlabError(f"must be one of {', '.join(M.GATES)}, got '{gate}'", where="--gate")
    cfg = M.RouteConfig(key_heads=key_heads, orthogonal=orthogonal)
    stack = [M.load_any(p) for p in M.stack_paths(edits, more or [])]
    M.parse_stages(stages, len(stack))
    ps = _prompt_set(prompt_set, None, None, None)
    m = _load(model, device, dtype, device_map, max_memory, _work("forward", ps, with_gap=gap is None))
    result = M.run_stack(m, stack, list(ps), _gap_for(m, ps, gap), stages, gate, cfg, n_test)
    console.print(tables.mechanisms_table(result).to_rich())
    for name, d in result.dependence.items():
        console.print(f"dependence ({name}): HSIC {d['hsic']:.4f} (shuffled {d['hsic_null']:.4f}), mean |r| {d['abs_r']:.3f}"
                      if d.get("hsic") is not None else f"dependence ({name}): one module")
    console.print(f"routing costs {result.cost['ratio']:.2f}x a plain forward ({result.cost['modules']} modules)")
    _written(result.save(out))


@app.command()
def emergence(
    model: str = ModelOpt,
    texts: Optional[Path] = typer.Option(None, "--texts", help="Texts, one per line (natural; default: the shipped sentences)."),
    prompt_set: Optional[str] = typer.Option(None, "--prompt-set", "-p", help="twohop: JSONL prompt set (default: shipped)."),
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e",
                                             help="natural (vs shuffled, random init) | icl | twohop (default: twohop "
                                                  "with --prompt-set, else natural)."),
    layers: str = typer.Option("all", "--layers", help="Blocks, e.g. all, 0-29:2, 5,10."),
    length: Optional[int] = typer.Option(None, "--length", help="natural: tokens per text T (default: largest 75% reach)."),
    estimator: str = typer.Option("gaussian", "--estimator", help="gaussian | infonce | mine."),
    dim: int = typer.Option(8, "--dim", help="Principal components per side seen by the estimator."),
    ridge: float = typer.Option(0.1, "--ridge", help="gaussian: noise floor (variance per whitened component)."),
    n_boot: int = typer.Option(10, "--n-boot", help="gaussian: bootstrap resamples of the sequences for the std."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds (neural estimators: mean and std over them)."),
    random_init: bool = typer.Option(True, "--random-init/--no-random-init", help="natural: add the random-weights control."),
    demos: str = typer.Option("0-6", "--demos", help="icl: numbers of demonstrations k, e.g. 0-6 or 0,2,4."),
    n: int = typer.Option(150, "--n", help="icl: prompts per k."),
    failed: str = typer.Option("wrong", "--failed", help="twohop: wrong (any composed failure) | gap (both hops right)."),
    min_group: int = typer.Option(10, "--min-group", help="twohop: least queries per outcome in a length group."),
    gap: Optional[Path] = typer.Option(None, "--gap", help="twohop: result.json of `patchlab evaluate` (else evaluated now)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Hidden-state cache (default: $PATCHLAB_CACHE/hidden)."),
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
    from . import emergence as E
    from .spec import parse_layers

    out = _out_dir(out)
    experiment = experiment or ("twohop" if prompt_set else "natural")
    if experiment not in E.EXPERIMENTS:
        raise PatchlabError(f"unknown experiment '{experiment}' (use {', '.join(E.EXPERIMENTS)})", where="--experiment")
    if texts is not None and experiment != "natural":
        raise PatchlabError(f"--texts is for --experiment natural, not {experiment}", where="--texts")
    if prompt_set is not None and experiment != "twohop":
        raise PatchlabError(f"--prompt-set is for --experiment twohop, not {experiment}", where="--prompt-set")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise PatchlabError(f"must be comma-separated ints, got {seeds!r}", where="--seeds") from None
    kw = dict(estimator=estimator, n_boot=n_boot if estimator == "gaussian" else 0, seeds=seed_list, dim=dim,
              cache_dir=cache_dir, **({"ridge": ridge} if estimator == "gaussian" else {}))
    text_list = E.read_texts(texts) if texts is not None else None
    ps = _prompt_set(prompt_set, None, None, None) if experiment == "twohop" else None
    _quiet(quiet)
    work = _work("forward", ps, seq_len=length or 64)
    m = _load(model, device, dtype, device_map, max_memory, work)
    kw["layers"] = parse_layers(layers, m.cfg.n_layers, "--layers")
    with contextlib.ExitStack() as stack:
        if _sharded(run_dir, resume, backend, workers, ray_address):  # hidden states captured by the run's workers
            config = {"experiment": experiment, "texts": _file_sha256(texts) if texts else None, "length": length,
                      "demos": demos, "n": n, "failed": failed}
            run = stack.enter_context(_open_run("emergence", config, list(ps or []), out,
                                                _worker_load(model, device, dtype, device_map, max_memory, work),
                                                run_dir, resume, _backend(backend, workers, threads, ray_address),
                                                shard_size))
            stack.enter_context(E.captured_by(run))
        if experiment == "natural":
            result = E.natural_vs_shuffled(m, text_list, length=length, random_init=random_init, **kw)
        elif experiment == "icl":
            result = E.icl_emergence(m, demos=parse_layers(demos, 10**6, "--demos"), n=n, **kw)
        else:
            result = E.twohop_emergence(m, ps, gap=_gap_for(m, ps, gap) if gap else None, failed=failed,
                                        min_group=min_group, **kw)
    console.print(tables.emergence_table(result).to_rich())
    _written(result.save(out))


@app.command("compare")
def compare_cmd(
    models: str = typer.Option("smollm2-135m,gemma3-270m", "--models", help="Comma-separated: offline keys, TL names, folders."),
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
    from .compose import compare as run_compare

    out = _out_dir(out)
    names = [n.strip() for n in models.split(",") if n.strip()]
    if not names:
        raise PatchlabError("give at least one model", where="--models")
    ps = _prompt_set(prompt_set, None, None, per_kind) if gap else None
    place = _placement(device, dtype, device_map, max_memory, names, _work("forward", ps, batch=batch_size, with_gap=gap))
    result = run_compare(names, [t.strip() for t in tasks.split(",") if t.strip()], gap=gap, prompt_set=ps, shots=shots,
                         device=device, dtype=_dtype(dtype), batch_size=batch_size, placement=place.load_kwargs())
    console.print(tables.compare_table(result).to_rich())
    _written(result.save(out))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: runs the typer app; a `PatchlabError` becomes one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="patchlab", standalone_mode=True)
    except PatchlabError as exc:
        from rich.markup import escape

        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
