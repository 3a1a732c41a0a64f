"""Layer and head specs: `0-29:3`, `3,6,9`, and heads as one type, `HeadSet` (`14.3,17.9`).

A `HeadSet` is parsed and validated once against the model's shape; locate returns one, edit takes
one, and everything downstream asks it for what it needs (`by_layer()`, `columns(layer, d_head)`).
Errors name the parameter (`heads`, `layers`, ...); the command line maps those to its flags.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from patchlab.core.errors import PatchlabError

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
        raise PatchlabError(f"number {_show(digits)} is too large", param=arg)
    return int(significant)


class Head(NamedTuple):
    """An attention head, layer.head, both 0-based."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"


def parse_layers(spec: str, n_layers: int, arg: str = "layers") -> list[int]:
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
                raise PatchlabError(f"bad range {_show(part)}", param=arg)
            # check the end before expanding, so "0-999999999" cannot build a huge list
            if hi >= n_layers:
                raise PatchlabError(f"layer {hi} does not exist (model has layers 0..{n_layers - 1})", param=arg)
            layers.extend(range(lo, hi + 1, step))
        elif _INT.fullmatch(part):  # not str.isdigit(): that is True for '١' and '²'
            layers.append(_int(part, arg))
        else:
            raise PatchlabError(f"{_show(part)} is not a layer number or range a-b[:step]", param=arg)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise PatchlabError(f"layer {layer} does not exist (model has layers 0..{n_layers - 1})", param=arg)
    if len(set(layers)) != len(layers):
        raise PatchlabError("a layer is listed twice", param=arg)
    return layers


def parse_heads(spec: str, n_layers: int, n_heads: int, arg: str = "heads") -> HeadSet:
    """A comma list of `layer.head`; each must exist, no repeats, no leading zeros or signs."""
    return HeadSet.parse(spec, n_layers, n_heads, arg)


class HeadSet(tuple):
    """An ordered set of attention heads that exist in one model shape (immutable; `str()` gives `23.4,23.5`)."""

    def __new__(cls, heads=(), n_layers: int | None = None, n_heads: int | None = None, arg: str = "heads"):
        items = tuple(Head(*h) if not isinstance(h, Head) else h for h in heads)
        for h in items:
            if n_layers is not None and not 0 <= h.layer < n_layers:
                raise PatchlabError(
                    f"head {h}: layer {h.layer} does not exist (model has 0..{n_layers - 1})", param=arg
                )
            if n_heads is not None and not 0 <= h.head < n_heads:
                raise PatchlabError(
                    f"head {h}: head {h.head} does not exist (model has 0..{n_heads - 1} per layer)", param=arg
                )
        seen = set()
        for h in items:
            if h in seen:
                raise PatchlabError(f"head {h} is listed twice", param=arg)
            seen.add(h)
        return super().__new__(cls, items)

    @classmethod
    def parse(cls, spec: str, n_layers: int | None = None, n_heads: int | None = None, arg: str = "heads") -> HeadSet:
        """Parse `14.3,17.9` (ASCII digits, no leading zeros or signs) and validate it against the shape
        (without a shape: the syntax and repeats only; `HeadSet(heads, n_layers, n_heads)` checks it later)."""
        parts = [p.strip() for p in spec.split(",")] if spec.strip() else []
        if not parts:
            raise PatchlabError("no heads given (expected e.g. 14.3,17.9)", param=arg)
        heads: list[Head] = []
        for part in parts:
            m = _HEAD.fullmatch(part)
            if not m:
                raise PatchlabError(f"{_show(part)} is not a head (expected layer.head, e.g. 14.3)", param=arg)
            heads.append(Head(_int(m[1], arg), _int(m[2], arg)))
        return cls(heads, n_layers, n_heads, arg)

    @classmethod
    def from_by_layer(cls, by_layer: dict[int, list[int]]) -> HeadSet:
        return cls(Head(l, h) for l, hs in sorted(by_layer.items()) for h in hs)

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [head, ...]}, layers ascending, heads sorted: the order edits are computed and stored in."""
        out: dict[int, list[int]] = {}
        for h in self:
            out.setdefault(h.layer, []).append(h.head)
        return {l: sorted(v) for l, v in sorted(out.items())}

    @property
    def layers(self) -> list[int]:
        return sorted({h.layer for h in self})

    def columns(self, layer: int, d_head: int):
        """Indices into a layer's concatenated head outputs (and W_O's columns) of this set's heads there."""
        return columns(self.by_layer().get(layer, []), d_head)

    def __str__(self) -> str:
        return ",".join(str(h) for h in self)

    def __repr__(self) -> str:
        return f"HeadSet({str(self)!r})"


def columns(heads, d_head: int):
    """Column indices of heads `heads` in a [.., n_heads * d_head] layout: head h is h*d_head:(h+1)*d_head."""
    import torch

    if not len(heads):
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * d_head, (h + 1) * d_head) for h in heads])
