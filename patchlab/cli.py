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
from rich.table import Table

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


def _gap_table(result) -> Table:
    table = Table(title=f"Compositionality gap — {result.model}")
    for col in ("kind", "n", "hop1", "hop2", "composed", "both hops", "gap", "gap share"):
        table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=col == "kind")
    for kind, s in result.summary.items():
        table.add_row(
            kind, str(s["n"]), f"{s['hop1_acc']:.2f}", f"{s['hop2_acc']:.2f}", f"{s['composed_acc']:.2f}",
            str(s["both_hops"]), str(s["gap_count"]), f"{s['gap_share']:.2f}",
            style="bold" if kind == "all" else None,
        )
    return table


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
    console.print(_gap_table(result))
    _written(result.save(out))


@app.command()
def demo(
    out: Path = typer.Option(Path("patchlab-demo"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="A small slice (4 items per kind)."),
    model: str = ModelOpt,
) -> None:
    """The whole chain on the offline default model and the shipped prompt set."""
    from .evaluate import evaluate_gap
    from .prompts import PromptSet

    out = _out_dir(out)
    ps = PromptSet.shipped()
    if quick:
        ps = ps.stratified(4)
    m = _load(model, None, "float32")
    result = evaluate_gap(m, ps)
    console.print(_gap_table(result))
    _written(result.save(out / "evaluate"))
    console.print(f"failures (both hops right, composed wrong): {len(result.failures)}")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: runs the typer app; a `PatchlabError` becomes one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="patchlab", standalone_mode=True)
    except PatchlabError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
