"""Load every method and study module, so their result types (`Result.registry`) and shard tasks
(`patchlab.runtime.shards.TASKS`) are registered — found by walking the packages, not listed by hand."""

from __future__ import annotations

import importlib
import pkgutil


def load_plugins() -> None:
    """Import every module under `patchlab.methods` and `patchlab.studies` (idempotent, cheap once imported)."""
    import patchlab.methods
    import patchlab.studies

    for package in (patchlab.methods, patchlab.studies):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
