"""Shared pieces of the reliability battery: a prompt set in the tiny model's vocabulary, the CLI run
in-process (exit code + stderr), model stand-ins, and an inventory of every hook a model carries."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ITEMS = [
    {
        "id": "t-1",
        "kind": "landmark",
        "subject": "eiffel tower",
        "bridge": "france",
        "answer": "paris",
        "hop1": "the eiffel tower is located in",
        "hop2": "the capital of france is",
        "composed": "the capital of the country where the eiffel tower is located is",
        "paraphrases": ["the eiffel tower is located in a country and the capital is"],
    },
    {
        "id": "t-2",
        "kind": "city",
        "subject": "madrid",
        "bridge": "spain",
        "answer": "euro",
        "hop1": "madrid is located in",
        "hop2": "the currency of spain is",
        "composed": "the currency of the country where madrid is located is",
    },
    {
        "id": "t-3",
        "kind": "city",
        "subject": "paris",
        "bridge": "france",
        "answer": "euro",
        "hop1": "paris is located in",
        "hop2": "the currency of france is",
        "composed": "the currency of the country where paris is located is",
    },
]


def write_set(path: Path, items=ITEMS, **changes) -> Path:
    """Write `items` as JSONL; `changes` are applied to the first item."""
    rows = [dict(items[0], **changes), *items[1:]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run `patchlab ARGV` in this process: (exit code, non-blank stderr lines). Any exception other than
    SystemExit (a traceback for a user) propagates and fails the test."""
    from patchlab.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_refused(code: int, lines: list[str], needle: str, out: Path | None = None) -> None:
    """Exit 2, exactly one line on stderr holding `needle`, no traceback, nothing under `out`."""
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and lines[0].startswith("error: "), lines[0]
    assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists(), sorted(out.rglob("*"))


class Shape:
    """Stands in for a loaded model where only its name and shape matter (argument checks): a check that
    wrongly passes reaches an attribute this object lacks and fails loudly."""

    def __init__(self, name: str = "smollm2-135m", n_layers: int = 30, n_heads: int = 9):
        self.patchlab_name = name
        self.cfg = SimpleNamespace(n_layers=n_layers, n_heads=n_heads, model_name=name)


def serve_models(monkeypatch, table: dict) -> None:
    """`load_model(name)` returns table[name] (a session model or a stand-in); other names load for real."""
    from patchlab.runtime import models

    real = models.load_model

    def load(name, device=None, dtype=torch.float32):
        return table[name] if name in table else real(name, device, dtype)

    monkeypatch.setattr(models, "load_model", load)


# --- hooks -------------------------------------------------------------------------------------------

_TORCH_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
)


def hook_inventory(model) -> dict:
    """Every hook on every module (bridge and Hugging Face), every TransformerLens hook point's handles,
    the module tree (by identity: a swapped-out layer shows), and each parameter's requires_grad / grad."""
    inv: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        inv[("module", name)] = id(module)
        for attr in _TORCH_HOOKS:
            hooks = getattr(module, attr, None)
            if hooks:
                inv[(attr, name)] = tuple(id(h) for h in hooks.values())
    seen = set()
    for name, hp in model.hook_dict.items():
        if id(hp) in seen:
            continue
        seen.add(id(hp))
        if hp.fwd_hooks or hp.bwd_hooks:
            inv[("hookpoint", name)] = (tuple(id(h) for h in hp.fwd_hooks), tuple(id(h) for h in hp.bwd_hooks))
    for name, p in model.named_parameters():
        inv[("param", name)] = (p.requires_grad, p.grad is None)
    inv["edits"] = tuple(id(e) for e in getattr(model, "_patchlab_edits", []))
    inv["context_level"] = getattr(model, "context_level", 0)
    return inv


def warm(model) -> None:
    """One plain forward: TransformerLens wires its own capture hooks into every block on first use (once,
    and keeps them); after this, a model's hooks change only when someone adds or removes one."""
    with torch.inference_mode():
        model(model.to_tokens("the capital"))


def diff(before: dict, after: dict) -> list:
    keys = set(before) | set(after)
    return sorted((str(k), before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k))


@pytest.fixture
def pristine():
    """Yields a checker: `pristine(model)` asserts that the model has no hooks, edits or grads left over."""

    def check(model) -> None:
        inv = hook_inventory(model)
        stray = [k for k in inv if k[0] in _TORCH_HOOKS + ("hookpoint",)]
        assert not stray, stray
        assert not getattr(model, "_patchlab_edits", [])
        assert all(p.requires_grad and p.grad is None for p in model.parameters())

    return check


def enospc(*_args, **_kwargs):
    """Raise what a full disk raises."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class HalfWrite:
    """Wraps a real temp file: a write puts down half its bytes, then calls `then` (e.g. `enospc`, or a stop
    where the writer is killed)."""

    def __init__(self, fh, then=enospc):
        self._fh, self._then = fh, then

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        self._then()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)
