"""patchlab: find and fix the attention heads behind failed two-hop compositions.

The public API, importable from here (loaded on first use, so `import patchlab` stays light):

    from patchlab import load_model, PromptSet, evaluate_gap, locate, edit_each, evaluate_edits

The package reads as layers, each a folder importing only those below it:
core → runtime → results → methods → studies → runs → workflows → cli.
"""

from __future__ import annotations

import importlib

from patchlab._compat import install_aliases
from patchlab.core.errors import PatchlabError
from patchlab.core.version import __version__

_API = {
    # core
    "PromptSet": "patchlab.core.prompts",
    "TwoHopItem": "patchlab.core.prompts",
    "load_mquake": "patchlab.core.prompts",
    "Head": "patchlab.core.spec",
    "HeadSet": "patchlab.core.spec",
    "parse_heads": "patchlab.core.spec",
    "parse_layers": "patchlab.core.spec",
    # runtime
    "load_model": "patchlab.runtime.models",
    "trace": "patchlab.runtime.trace",
    "recording": "patchlab.runtime.trace",
    "greedy_continuations": "patchlab.runtime.scoring",
    "correct": "patchlab.runtime.scoring",
    # results
    "Result": "patchlab.results.base",
    "build_report": "patchlab.results.report",
    # methods: the value chain
    "evaluate_gap": "patchlab.methods.gap",
    "GapResult": "patchlab.methods.gap",
    "lens_items": "patchlab.methods.lens",
    "bridge_intervention": "patchlab.methods.lens",
    "top_tokens": "patchlab.methods.lens",
    "locate": "patchlab.methods.locate",
    "LocateResult": "patchlab.methods.locate",
    "attention_view": "patchlab.methods.heads",
    "HeadAttentionResult": "patchlab.methods.heads",
    "compute_edit": "patchlab.methods.edit",
    "edit_each": "patchlab.methods.edit",
    "Edit": "patchlab.methods.edit",
    "EditConfig": "patchlab.methods.edit",
    "ComputedEdit": "patchlab.methods.edit",
    "evaluate_edits": "patchlab.methods.editeval",
    "kl_prompts": "patchlab.methods.editeval",
    "EditReport": "patchlab.methods.editeval",
    # studies
    "retune": "patchlab.studies.retune",
    "CarmaConfig": "patchlab.studies.carma",
    "information_emergence": "patchlab.studies.emergence",
    "compare": "patchlab.studies.compose",
    "run_stack": "patchlab.studies.mechanisms",
}

__all__ = ["PatchlabError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'patchlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


install_aliases()
