"""Parsers for the layer and head specs users type: `0-29:3`, `3,6,9`, `14.3,17.9`."""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import PatchlabError

_HEAD = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)")
_RANGE = re.compile(r"(\d+)-(\d+)(?::(\d+))?")


class Head(NamedTuple):
    """An attention head, layer.head, both 0-based."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"


def parse_layers(spec: str, n_layers: int, arg: str = "--layers") -> list[int]:
    """`all`, `a-b[:step]` (inclusive) or a comma list; each layer must exist (no negative wrap-around)."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = _RANGE.fullmatch(part)
        if m:
            lo, hi, step = int(m[1]), int(m[2]), int(m[3] or 1)
            if step < 1 or hi < lo:
                raise PatchlabError(f"bad range '{part}'", where=arg)
            layers.extend(range(lo, hi + 1, step))
        elif part.isdigit():
            layers.append(int(part))
        else:
            raise PatchlabError(f"'{part}' is not a layer number or range a-b[:step]", where=arg)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise PatchlabError(f"layer {layer} does not exist (model has layers 0..{n_layers - 1})", where=arg)
    if len(set(layers)) != len(layers):
        raise PatchlabError("a layer is listed twice", where=arg)
    return layers


def parse_heads(spec: str, n_layers: int, n_heads: int, arg: str = "--heads") -> list[Head]:
    """A comma list of `layer.head`; each must exist, no repeats, no leading zeros or signs."""
    parts = [p.strip() for p in spec.split(",")] if spec.strip() else []
    if not parts:
        raise PatchlabError("no heads given (expected e.g. 14.3,17.9)", where=arg)
    heads: list[Head] = []
    for part in parts:
        m = _HEAD.fullmatch(part)
        if not m:
            raise PatchlabError(f"'{part}' is not a head (expected layer.head, e.g. 14.3)", where=arg)
        head = Head(int(m[1]), int(m[2]))
        if head.layer >= n_layers:
            raise PatchlabError(f"head {part}: layer {head.layer} does not exist (model has 0..{n_layers - 1})", where=arg)
        if head.head >= n_heads:
            raise PatchlabError(f"head {part}: head {head.head} does not exist (model has 0..{n_heads - 1} per layer)", where=arg)
        if head in heads:
            raise PatchlabError(f"head {part} is listed twice", where=arg)
        heads.append(head)
    return heads
