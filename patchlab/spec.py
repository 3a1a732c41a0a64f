"""Parsers for the layer and head specs users type: `0-29:3`, `3,6,9`, `14.3,17.9`."""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import PatchlabError

# ASCII digits only: `\d` and str.isdigit() also accept e.g. Arabic-Indic '١' or '²' (which int()
# then reads as 1 or rejects with a ValueError), so "1١.2" used to parse as head 11.2.
_HEAD = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)", re.ASCII)
_RANGE = re.compile(r"([0-9]+)-([0-9]+)(?::([0-9]+))?", re.ASCII)
_INT = re.compile(r"[0-9]+", re.ASCII)
_MAX_DIGITS = 9  # no model has a billion layers or heads; int() refuses > 4300 digits outright


def _show(part: str) -> str:
    """`part` quoted for a one-line message: repr escapes newlines / U+2028 etc.; long input is cut."""
    return repr(part if len(part) <= 40 else part[:40] + "...")


def _int(digits: str, arg: str) -> int:
    """An ASCII digit string as an int, refusing absurdly long numbers before int() sees them."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > _MAX_DIGITS:
        raise PatchlabError(f"number {_show(digits)} is too large", where=arg)
    return int(significant)


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
            lo, hi, step = _int(m[1], arg), _int(m[2], arg), _int(m[3] or "1", arg)
            if step < 1 or hi < lo:
                raise PatchlabError(f"bad range {_show(part)}", where=arg)
            # check the end before expanding, so "0-999999999" cannot build a huge list
            if hi >= n_layers:
                raise PatchlabError(f"layer {hi} does not exist (model has layers 0..{n_layers - 1})", where=arg)
            layers.extend(range(lo, hi + 1, step))
        elif _INT.fullmatch(part):  # not str.isdigit(): that is True for '١' and '²'
            layers.append(_int(part, arg))
        else:
            raise PatchlabError(f"{_show(part)} is not a layer number or range a-b[:step]", where=arg)
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
            raise PatchlabError(f"{_show(part)} is not a head (expected layer.head, e.g. 14.3)", where=arg)
        head = Head(_int(m[1], arg), _int(m[2], arg))
        if head.layer >= n_layers:
            raise PatchlabError(f"head {part}: layer {head.layer} does not exist (model has 0..{n_layers - 1})", where=arg)
        if head.head >= n_heads:
            raise PatchlabError(f"head {part}: head {head.head} does not exist (model has 0..{n_heads - 1} per layer)", where=arg)
        if head in heads:
            raise PatchlabError(f"head {part} is listed twice", where=arg)
        heads.append(head)
    return heads
