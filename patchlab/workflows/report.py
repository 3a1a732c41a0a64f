"""The report as the command builds it: every result type registered first, then one HTML page (and a picture)."""

from __future__ import annotations

from pathlib import Path

from patchlab.runs.registry import load_plugins


def report(folder: Path, out: Path | None = None, title: str | None = None, png: Path | None = None) -> list[Path]:
    """Build FOLDER/report.html (or `out`) from the results under `folder`; with `png`, also the summary picture."""
    from patchlab.results.report import build_report, find_results, summary_png

    load_plugins()  # every result type declares its section in its class: import them all
    written = [build_report(folder, out=out, title=title)]
    if png is not None:
        written.append(summary_png(find_results(folder), png))
    return written
