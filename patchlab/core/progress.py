"""Progress bars for long loops (rich), silenced with PATCHLAB_QUIET=1 or quiet=True."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str | None, total: int | None = None) -> Iterator[T]:
    """Yield from `items` under a rich progress bar; no bar when `description` is None or quiet."""
    if description is None or os.environ.get("PATCHLAB_QUIET") == "1":
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)
