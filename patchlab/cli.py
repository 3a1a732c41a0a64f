"""The `patchlab` command line: a thin typer layer that parses, calls the Python API, prints, and writes.

Every command writes `result.json` + `figure.html` into `--out` (each file atomically). Bad input
raises `PatchlabError`, which `main` prints as one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table  # noqa: F401  (commands build their own tables)

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
DtypeOpt = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16.")
KindsOpt = typer.Option(None, "--kinds", help="Comma-separated kinds to keep.")
LimitOpt = typer.Option(None, "--limit", help="Keep only the first N items (after --kinds).")
PerKindOpt = typer.Option(None, "--per-kind", help="Keep the first N items of every kind.")


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


def _load(model: str, device: Optional[str], dtype: str):
    from .models import load_model

    start = time.perf_counter()
    with console.status(f"loading {model} ..."):
        m = load_model(model, device=device, dtype=_dtype(dtype))
    console.print(f"[dim]loaded {model} in {time.perf_counter() - start:.1f} s[/dim]")
    return m


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
) -> None:
    """Measure hop1 / hop2 / composed accuracy and the compositionality gap per kind."""
    from .evaluate import evaluate_gap

    out = _out_dir(out)
    ps = _prompt_set(prompt_set, kinds, limit, per_kind)
    m = _load(model, device, dtype)
    result = evaluate_gap(m, ps, batch_size=batch_size)
    console.print(tables.gap_table(result).to_rich())
    _written(result.save(out))


def _gap_for(m, ps, gap_path: Optional[Path]):
    """A saved GapResult (must cover the items), or a fresh gap evaluation."""
    from .evaluate import GapResult, evaluate_gap

    if gap_path is None:
        return evaluate_gap(m, ps)
    gap = GapResult.from_json(gap_path)
    if gap.model != getattr(m, "patchlab_name", gap.model):
        raise PatchlabError(f"gap result was made on '{gap.model}', not this model", where=f"--gap {gap_path}")
    return gap


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
) -> None:
    """Logit lens (bridge vs answer, correct vs failed) and the bridge-entity intervention."""
    from . import lens as L
    from .spec import parse_layers

    out = _out_dir(out)
    if positions not in ("last", "all"):
        raise PatchlabError(f"must be 'last' or 'all', got '{positions}'", where="--positions")
    words = [w.strip() for w in track.split(",") if w.strip()] if track else []
    if prompt is not None:
        m = _load(model, device, dtype)
        result = L.top_tokens(m, prompt, k=top_k, track_words=words)
        for word, v in result.tracked.items():
            console.print(f"{word}: rank at the last position per layer: {[r[-1] for r in v['rank']]}")
        _written(result.save(out))
        return
    ps = _prompt_set(prompt_set, kinds, limit, per_kind)
    if ids:
        ps = ps.filter(ids=ids.split(","))
    m = _load(model, device, dtype)
    layers = parse_layers(intervene_layers, m.cfg.n_layers, "--intervene-layers") if intervene else []
    gap_result = _gap_for(m, ps, gap)
    result = L.lens_items(m, list(ps), gap=gap_result, extra=words)
    console.print(tables.lens_table(result).to_rich())
    _written(result.save(out))
    if positions == "all":
        for it in list(ps)[:50]:
            _written(L.top_tokens(m, it.composed, k=top_k, track_words=[it.bridge, it.answer]).save(out / "positions", name=it.id))
    if intervene:
        correct = [it for it in ps if it.id in set(gap_result.composed_correct)][:intervene_items]
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
) -> None:
    """Find the heads that carry the composition by activation patching (exact and attribution)."""
    from .locate import locate as run_locate

    out = _out_dir(out)
    for name, value in (("--top", top), ("--verify", verify), ("--max-items", max_items)):
        if value < 1:
            raise PatchlabError(f"must be >= 1, got {value}", where=name)
    ps = _prompt_set(prompt_set, kinds, None, None)
    m = _load(model, device, dtype)
    if ids:
        items = list(ps.filter(ids=ids.split(",")))
    else:
        g = _gap_for(m, ps, gap)
        wanted = set(g.failures if setup == "guide" else g.composed_correct)
        items = [it for it in ps if it.id in wanted]
    items = items[:max_items]
    if not items:
        raise PatchlabError(f"no items for --setup {setup} (guide needs composed failures with both hops right, "
                            "template needs composed-correct items)", where="--prompt-set")
    result = run_locate(m, items, setup=setup, pool=list(ps), method=method, site=site, positions=positions,
                        top_k=top, verify=verify)
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
    out: Path = typer.Option(Path("patchlab-out/edit"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Fix failed compositions with a rank-one update of the chosen heads' W_O columns, and measure it."""
    from .edit import EditConfig, edit_each
    from .editeval import evaluate_edits, kl_prompts
    from .io import atomic_dir

    out = _out_dir(out)
    if (ids is None) == (not failures):
        raise PatchlabError("give exactly one of --ids ... or --failures", where="--ids")
    if not 0.0 <= held_out < 1.0 or (held_out and not batch):
        raise PatchlabError(f"must be in [0, 1) and needs --batch, got {held_out}", where="--held-out")
    cfg = EditConfig(target=target, covariance=covariance)
    ps = _prompt_set(prompt_set, None, None, None)
    m = _load(model, device, dtype)
    chosen = _heads(m, heads, heads_from, top)
    g = _gap_for(m, ps, gap)
    items = list(ps.filter(ids=ids.split(","))) if ids else [it for it in ps if it.id in set(g.failures)]
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
    edits = edit_each(m, items, chosen, cfg, batch=batch, unrelated=unrelated)
    report = evaluate_edits(m, edits, list(ps), g, held_out=kept_out, exclude=exclude)
    console.print(tables.edit_table(report).to_rich())
    with atomic_dir(out / "edits") as tmp:
        for group, e, _ in edits:
            e.save(tmp / f"{'batch' if batch else group[0].id}.edit")
    console.print(f"[green]wrote[/green] {len(edits)} edit file(s) under {out / 'edits'}")
    _written(report.save(out))


@app.command()
def apply(
    edit_file: Path = typer.Argument(..., help="An .edit file written by `patchlab edit`."),
    model: str = ModelOpt,
    prompt_set: Optional[str] = PromptSetOpt,
    gap: Optional[Path] = typer.Option(None, "--gap"),
    out: Path = typer.Option(Path("patchlab-out/apply"), "--out", "-o"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Evaluate a saved edit on the items it was made for (refuses an edit made for other weights)."""
    from .edit import Edit, base_hash
    from .editeval import evaluate_edits

    out = _out_dir(out)
    e = Edit.load(edit_file)
    ps = _prompt_set(prompt_set, None, None, None)
    m = _load(model, device, dtype)
    if base_hash(m) != e.weights_sha256:
        raise PatchlabError(f"edit was made for '{e.model}' weights {e.weights_sha256[:12]}…, not these", where=str(edit_file))
    items = list(ps.filter(ids=e.item_ids))
    report = evaluate_edits(m, [(items, e, 0.0)], list(ps), _gap_for(m, ps, gap))
    console.print(tables.edit_table(report).to_rich())
    _written(report.save(out))


@app.command()
def demo(
    out: Path = typer.Option(Path("patchlab-demo"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="A small slice (4 items per kind, 4 edits)."),
    per_kind: Optional[int] = PerKindOpt,
    model: str = ModelOpt,
) -> None:
    """The whole chain on the offline default model and the shipped set: gap → lens → locate → edit → report."""
    from .demo import run_demo

    out = _out_dir(out)
    ps = _prompt_set(None, None, None, per_kind if per_kind is not None else (4 if quick else None))
    quick = quick or per_kind is not None
    m = _load(model, None, "float32")
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
