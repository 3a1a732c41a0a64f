"""One-release aliases for the module paths before the layered layout (patchlab 0.1): `import patchlab.edit`
still works, with a DeprecationWarning naming the new path. To be removed in the next release."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "errors": "core.errors",
    "io": "core.io",
    "prompts": "core.prompts",
    "spec": "core.spec",
    "progress": "core.progress",
    "models": "runtime.models",
    "placement": "runtime.placement",
    "memory": "runtime.memory",
    "scoring": "runtime.scoring",
    "results": "results.base",
    "plots": "results.figures",
    "tables": "results.tables",
    "report": "results.report",
    "evaluate": "methods.gap",
    "lens": "methods.lens",
    "locate": "methods.locate",
    "edit": "methods.edit",
    "editeval": "methods.editeval",
    "carma": "studies.carma",
    "retune": "studies.retune",
    "tasks": "studies.tasks",
    "emergence": "studies.emergence",
    "mi": "studies.mi",
    "compose": "studies.compose",
    "mechanisms": "studies.mechanisms",
    "jobs": "runs.jobs",
    "backends": "runs.backends",
    "demo": "workflows.demo",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        old = fullname.partition("patchlab.")[2]
        if fullname.startswith("patchlab.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        new = "patchlab." + MOVED[module.__name__.partition("patchlab.")[2]]
        warnings.warn(
            f"{module.__name__} moved to {new}; the old path goes in the next release", DeprecationWarning, stacklevel=2
        )
        sys.modules[module.__name__] = importlib.import_module(new)  # the import system returns this module


def install_aliases() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
