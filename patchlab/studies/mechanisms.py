"""Independent, routed edit modules: every edit acts only where the input resembles the prompts it was made for.

After Gendron et al. 2024, "Can Large Language Models Learn Independent Causal Mechanisms?" (ICLM): domain
modules behind a router that assigns each input to a module from its hidden state, beside an always-on
invariant part, with a penalty on the dependence between modules. Here the invariant part is the unedited
model, the modules are head-restricted W_O edits (`patchlab.edit.Edit`), and the router is one gate per
module, edited layer and position:

  x      the layer's z at one position (all heads, or only the edited ones: `RouteConfig.key_heads`)
  x̂      = A (x − c) / ‖A (x − c)‖      centred on a reference set, whitened (A = Σ^{-1/2}), unit length
  s      = ⟨x̂, key⟩                     the module's score: cosine to its key in the whitened space
  gate   hard: 1[s > τ];   soft: clamp((s − lo) / (hi − lo), 0, 1)
  out    = o_proj(z) + Σ_modules gate · z_S ΔW_Sᵀ

A W_O column delta ΔW_S changes `o_proj`'s output by z_S ΔW_Sᵀ (out = z_flat W_Oᵀ), so the routed model
adds exactly that, scaled by the gate, at `blocks.L.attn.o.hook_out`, with z read at `blocks.L.attn.hook_z`
of the same forward pass (also inside `generate`, token by token). The weights are never touched: with
every gate shut the model is the original one.

The key is the mean x̂ at the last token of the prompts the edit was made for (its composed query and
paraphrases, each under the editor's prefixes). The thresholds are calibrated on a reference set no gate
may open on (every position of held-out correct composed queries, their paraphrases and hop-2 facts, and of
the shipped neutral corpus): lo = the highest reference score, hi = a low quantile of the module's own
scores, τ in between.

Independence: the dependence between modules is the mean normalised HSIC (Gaussian kernels) between their
scores over a set of prompts. The construction that lowers it is Gram–Schmidt on the keys: each new
module's key is made orthogonal, in the whitened space, to the keys of the modules before it (then it is
calibrated), so that on whitened inputs two modules' scores are uncorrelated.
"""

from __future__ import annotations

import contextlib
import glob
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.progress import track
from patchlab.core.prompts import TwoHopItem
from patchlab.core.spec import columns
from patchlab.methods import edit as E
from patchlab.results.base import Result
from patchlab.runtime import sites
from patchlab.runtime.bridge import model_name
from patchlab.runtime.capture import per_prompt
from patchlab.runtime.identity import provenance
from patchlab.runtime.scoring import encode, pad_id, pad_right
from patchlab.runtime.trace import attached

FORMAT = "patchlab-module/1"
GATES = ("hard", "soft")
KEY_HEADS = ("layer", "edited")


# --- z at every position --------------------------------------------------------------------------------


def all_z(model, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 64) -> dict[int, list[Tensor]]:
    """Each layer's concatenated head outputs z at every real position of every prompt: {layer: [[len_i, H*dh]]}."""
    stop = max(layers) + 1
    got = per_prompt(model, prompts, [sites.z(l) for l in layers], "real", batch_size,
                     stop if stop < model.cfg.n_layers else None)  # fmt: skip
    return {l: [z.reshape(z.shape[0], -1) for z in got[sites.z(l)]] for l in layers}


def corpus_sentences() -> list[str]:
    """The neutral sentences shipped with patchlab (also the editor's covariance corpus)."""
    text = (resources.files("patchlab") / "data" / "corpus.txt").read_text(encoding="utf-8")
    return [l.strip() for l in text.splitlines() if l.strip()]


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def project(x: Float[Tensor, "... s"], center: Tensor, whiten: Tensor) -> Float[Tensor, "... s"]:
    """x̂: x centred on the reference, whitened, scaled to unit length."""
    return unit((x.float() - center) @ whiten.T)


def whitener(x: Float[Tensor, "n s"], ridge: float) -> tuple[Float[Tensor, " s"], Float[Tensor, "s s"]]:
    """Centre and Σ^{-1/2} of reference activations (Σ + ridge·mean(diag Σ)·I)."""
    center = x.mean(0)
    d = (x - center).double()
    cov = d.T @ d / max(1, d.shape[0] - 1)
    cov = cov + ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    vals, vecs = torch.linalg.eigh(cov)
    return center.float(), (vecs @ torch.diag(vals.clamp_min(1e-12).rsqrt()) @ vecs.T).float()


# --- the reference set: what no gate may open on -------------------------------------------------------


@dataclass
class Reference:
    """z at every position of prompts no module may fire on (held-out questions the model answers right and
    the neutral corpus), per layer, with the whitening of every column set asked for (cached)."""

    z: dict[int, Tensor]  # layer -> [n_positions, H*dh]
    n_prompts: int
    ridge: float = 0.01
    _whiteners: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        model,
        questions: Sequence[str],
        layers: Sequence[int],
        sentences: Sequence[str] | None = None,
        ridge: float = 0.01,
    ) -> Reference:
        """Reference activations from `questions` (held-out prompts, see `reference_prompts`) plus the neutral corpus."""
        if not questions:
            raise PatchlabError("the reference set needs at least one held-out question (a correct composed query)")
        if not layers:
            raise PatchlabError("the reference set needs at least one layer")
        prompts = list(questions) + (corpus_sentences() if sentences is None else list(sentences))
        got = all_z(model, prompts, sorted(set(layers)))
        return cls({l: torch.cat(v) for l, v in got.items()}, len(prompts), ridge)

    def at(self, layer: int, cols: Tensor) -> Tensor:
        if layer not in self.z:
            raise PatchlabError(f"the reference set has no activations at layer {layer} (has {sorted(self.z)})")
        return self.z[layer][:, cols]

    def whitening(self, layer: int, cols: Tensor) -> tuple[Tensor, Tensor]:
        key = (layer, tuple(cols.tolist()))
        if key not in self._whiteners:
            self._whiteners[key] = whitener(self.at(layer, cols), self.ridge)
        return self._whiteners[key]


def reference_prompts(
    pool: Sequence[TwoHopItem], gap, n: int = 40, seed: int = 0, exclude: set[str] = frozenset()
) -> tuple[list[str], set[str]]:
    """The composed queries, paraphrases and hop-2 facts of a seeded sample of at most `n` items answered right
    (none in `exclude`; at most half of them, the rest are left to test), and their ids, which the irrelevance
    and facts tests then leave out."""
    right = [it for it in gap.correct_items(pool) if it.id not in exclude]
    chosen = random.Random(seed).sample(right, min(n, max(1, len(right) // 2)))
    return [p for it in chosen for p in (it.composed, *it.paraphrases, it.hop2)], {it.id for it in chosen}


# --- modules ----------------------------------------------------------------------------------------------


@dataclass
class RouteConfig:
    """How a module's gates are keyed and calibrated."""

    key_heads: str = "layer"  # layer: every head's z at the edited layer | edited: only the edited heads' z
    orthogonal: bool = True  # Gram–Schmidt each new key against the earlier modules' keys
    n_prefixes: int = 20  # the editor's prefixes: each own prompt is read under all of them
    paraphrases: bool = True  # key on the paraphrases too (else the composed query only: paraphrases stay unseen)
    hi_quantile: float = 0.25  # hi = this quantile of the module's own scores
    tau_fraction: float = 0.5  # τ = lo + tau_fraction · (hi − lo)

    def __post_init__(self) -> None:
        if self.key_heads not in KEY_HEADS:
            raise PatchlabError(
                f"key_heads must be one of {', '.join(KEY_HEADS)}, got '{self.key_heads}'", param="key_heads"
            )
        for name in ("hi_quantile", "tau_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise PatchlabError(f"{name} must be in [0, 1], got {v}")
        if not isinstance(self.n_prefixes, int) or self.n_prefixes < 0:
            raise PatchlabError(f"n_prefixes must be an int >= 0, got {self.n_prefixes}")


@dataclass
class Route:
    """One module's gate at one edited layer: x (the z of `key_heads`) → whitened cosine to `key` → gate."""

    key_heads: list[int]
    center: Float[Tensor, " s"]
    whiten: Float[Tensor, "s s"]
    key: Float[Tensor, " s"]  # unit vector in the whitened space
    lo: float  # highest reference score: the soft gate is shut at or below it
    hi: float  # a low quantile of the module's own scores: the soft gate is fully open above it
    tau: float  # the hard gate opens above it

    def scores(self, z: Float[Tensor, "... HD"], d_head: int) -> Float[Tensor, ...]:
        """The module's score at every position of z ([..., n_heads*d_head], all heads)."""
        return project(z[..., columns(self.key_heads, d_head)], self.center, self.whiten) @ self.key


@dataclass
class Module:
    """An edit as an independent mechanism: its deltas, a gate per edited layer, and its calibration."""

    edit: E.Edit
    routes: dict[int, Route]
    calibration: dict[str, Any] = field(default_factory=dict)  # per layer: own scores, reference max, shares

    @property
    def name(self) -> str:
        return ",".join(self.edit.item_ids) or "module"

    def tensors(self) -> dict[str, Tensor]:
        out = self.edit.tensors()
        for l, r in self.routes.items():
            out.update(
                {
                    f"layer.{l}.center": r.center.contiguous().float(),
                    f"layer.{l}.whiten": r.whiten.contiguous().float(),
                    f"layer.{l}.key": r.key.contiguous().float(),
                }
            )
        return out

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the edit's deltas and the gates' tensors, JSON metadata, sealed by `edit.write_signed`."""
        routes = {
            str(l): {"key_heads": r.key_heads, "lo": r.lo, "hi": r.hi, "tau": r.tau} for l, r in self.routes.items()
        }
        meta = {
            **self.edit.metadata(),
            "format": FORMAT,
            "routes": json.dumps(routes),
            "calibration": json.dumps(self.calibration),
        }
        return E.write_signed(path, self.tensors(), meta)

    @classmethod
    def load(cls, path: str | Path) -> Module:
        """Read a module file; refuses a tampered, truncated or foreign file with one line naming it."""
        meta, tensors = E.read_signed(path, FORMAT, "module")
        edit = E.Edit.from_file(meta, tensors, str(path))
        try:
            routes = {
                int(l): Route(
                    [int(h) for h in r["key_heads"]],
                    tensors[f"layer.{l}.center"],
                    tensors[f"layer.{l}.whiten"],
                    tensors[f"layer.{l}.key"],
                    float(r["lo"]),
                    float(r["hi"]),
                    float(r["tau"]),
                )
                for l, r in json.loads(meta["routes"]).items()
            }
            calibration = json.loads(meta.get("calibration", "{}"))
        except (KeyError, ValueError, TypeError) as exc:
            raise PatchlabError(f"module metadata is incomplete ({exc})", where=str(path)) from None
        if set(routes) != set(edit.heads):
            raise PatchlabError(
                f"module has gates at layers {sorted(routes)} but edits layers {sorted(edit.heads)}", where=str(path)
            )
        return cls(edit, routes, calibration)


def own_prompts(items: Sequence[TwoHopItem], n_prefixes: int, paraphrases: bool = True) -> list[str]:
    """The prompts an edit was made for, each under the editor's prefixes: per item its composed query, then
    (with `paraphrases`) each paraphrase."""
    pre = E.prefixes(n_prefixes)
    return [
        q
        for it in items
        for p in (it.composed, *(it.paraphrases if paraphrases else ()))
        for q in E.with_prefixes(p, pre)
    ]


def own_z(model, edit: E.Edit, items: Sequence[TwoHopItem], cfg: RouteConfig) -> dict[int, Tensor]:
    """z (all heads) at the last token of the edit's own prompts, per edited layer: {layer: [n, H*dh]}."""
    if not items:
        raise PatchlabError(f"no items for the edit of {edit.item_ids}: the prompt set lacks them")
    return E.last_z(model, own_prompts(items, cfg.n_prefixes, cfg.paraphrases), sorted(edit.heads))


def make_module(
    edit: E.Edit,
    own: dict[int, Tensor],
    reference: Reference,
    d_head: int,
    cfg: RouteConfig,
    earlier: Sequence[Module] = (),
) -> Module:
    """Key and calibrate the gates of `edit` from its own activations `own` and the reference set."""
    routes, calib = {}, {}
    for layer, hs in edit.heads.items():
        key_heads = list(range(own[layer].shape[1] // d_head)) if cfg.key_heads == "layer" else list(hs)
        cols = columns(key_heads, d_head)
        center, whiten = reference.whitening(layer, cols)
        mine = project(own[layer][:, cols], center, whiten)
        key, kept = unit(mine.mean(0)), 1.0
        if cfg.orthogonal:
            key, kept = _orthogonal(
                key, [m.routes[layer] for m in earlier if layer in m.routes], key_heads, center, whiten
            )
        ref = project(reference.at(layer, cols), center, whiten) @ key
        s = mine @ key
        lo, hi = float(ref.max()), float(torch.quantile(s, cfg.hi_quantile))
        separable = hi > lo
        hi = hi if separable else lo + 1e-3
        tau = lo + cfg.tau_fraction * (hi - lo)
        routes[layer] = Route(key_heads, center, whiten, key, lo, hi, tau)
        calib[str(layer)] = {
            "lo": lo,
            "hi": hi,
            "tau": tau,
            "separable": separable,
            "own_open": float((s > tau).float().mean()),
            "own_mean": float(s.mean()),
            "own_std": float(s.std()),
            "reference_positions": int(ref.numel()),
            "reference_q99": float(torch.quantile(ref, 0.99)),
            "n_own": int(s.numel()),
            "key_kept": kept,
        }
    return Module(edit, routes, {"layers": calib, "config": cfg.__dict__})


def _orthogonal(
    key: Tensor, before: Sequence[Route], key_heads: list[int], center: Tensor, whiten: Tensor
) -> tuple[Tensor, float]:
    """`key` minus its projections on the earlier keys read in the same whitened space (modified Gram–Schmidt),
    renormalised, and the norm of what was left (1: already orthogonal)."""
    for r in before:
        if r.key_heads == key_heads and torch.equal(r.center, center) and torch.equal(r.whiten, whiten):
            key = key - (key @ r.key) * r.key
    kept = float(key.norm())
    if kept < 1e-3:
        raise PatchlabError(
            f"the key lies in the span of the {len(before)} earlier keys: too many modules for "
            f"{key.numel()} dimensions (key them with orthogonal=False)"
        )
    return unit(key), kept


def route_edits(
    model,
    edits: Sequence[E.Edit],
    items: Sequence[TwoHopItem],
    reference: Reference,
    cfg: RouteConfig | None = None,
    own: Sequence[dict[int, Tensor]] | None = None,
    progress: bool = True,
) -> list[Module]:
    """Turn edits into modules, in order (with `orthogonal`, each key is orthogonal to those before it)."""
    cfg = cfg or RouteConfig()
    by_id = {it.id: it for it in items}
    modules: list[Module] = []
    for i, e in enumerate(track(list(edits), "keying modules" if progress else None)):
        z = own[i] if own is not None else own_z(model, e, [by_id[j] for j in e.item_ids if j in by_id], cfg)
        modules.append(make_module(e, z, reference, model.cfg.d_head, cfg, modules))
    return modules


# --- the router: gates and deltas as hooks ---------------------------------------------------------------


@dataclass
class _Group:
    """Modules at one layer whose gates read the same columns through the same whitening: scored together."""

    cols: Tensor
    center: Tensor
    whiten: Tensor
    keys: Tensor  # [M, s]
    lo: Tensor
    hi: Tensor
    tau: Tensor
    deltas: list[Tensor]  # per module: [d_model, |S|*d_head]
    delta_cols: list[Tensor]  # per module: its edited heads' columns of z


class Router:
    """A stack of modules applied through hooks: at each edited layer and position, each module's delta in
    proportion to its gate. `with router.attached(model): ...` routes every forward (and `generate`)."""

    def __init__(self, modules: Sequence[Module], gate: str = "hard"):
        if gate not in GATES:
            raise PatchlabError(f"gate must be one of {', '.join(GATES)}, got '{gate}'", param="gate")
        for m in modules:
            if set(m.routes) != set(m.edit.heads):
                raise PatchlabError(
                    f"module {m.name} has gates at layers {sorted(m.routes)} but edits {sorted(m.edit.heads)}"
                )
        self.modules, self.gate = list(modules), gate
        self._z: dict[int, Tensor] = {}
        self.opened: dict[int, int] = {}  # per layer: how many times a module's gate opened in a forward (diagnostics)

    def _groups(self, device, d_head: int) -> dict[int, list[_Group]]:
        out: dict[int, list[_Group]] = {}
        for m in self.modules:
            for layer, r in m.routes.items():
                groups = out.setdefault(layer, [])
                g = next(
                    (
                        g
                        for g in groups
                        if torch.equal(g.cols, columns(r.key_heads, d_head).to(device))
                        and torch.equal(g.center, r.center.to(device))
                        and torch.equal(g.whiten, r.whiten.to(device))
                    ),
                    None,
                )
                if g is None:
                    g = _Group(
                        columns(r.key_heads, d_head).to(device),
                        r.center.to(device),
                        r.whiten.to(device),
                        torch.empty(0, r.key.numel(), device=device),
                        *(torch.empty(0, device=device),) * 3,
                        [],
                        [],
                    )
                    groups.append(g)
                g.keys = torch.cat([g.keys, r.key.to(device)[None]])
                for name in ("lo", "hi", "tau"):
                    setattr(g, name, torch.cat([getattr(g, name), torch.tensor([getattr(r, name)], device=device)]))
                g.deltas.append(m.edit.deltas[layer].float().to(device))
                g.delta_cols.append(columns(m.edit.heads[layer], d_head).to(device))
        return out

    def hooks(self, model) -> list[tuple[str, Any]]:
        """TransformerLens forward hooks: keep z at `hook_z`, add the gated deltas at `attn.o.hook_out`."""
        groups = self._groups(model.cfg.device, model.cfg.d_head)
        out = []
        for layer, gs in groups.items():
            out.append((sites.z(layer), self._keeper(layer)))
            out.append((sites.o_out(layer), self._adder(layer, gs)))
        return out

    def _keeper(self, layer: int):
        def keep(act, hook):
            self._z[layer] = act.reshape(*act.shape[:2], -1)
            return act

        return keep

    def _adder(self, layer: int, groups: list[_Group]):
        def add(act, hook):
            z = self._z.pop(layer).float()
            out = act
            for g in groups:
                gates = gate_values(
                    project(z[..., g.cols], g.center, g.whiten) @ g.keys.T, g.lo, g.hi, g.tau, self.gate
                )
                for m in (gates > 0).flatten(0, -2).any(0).nonzero().flatten().tolist():
                    where = gates[..., m] > 0
                    change = gates[..., m][where][:, None] * (z[where][:, g.delta_cols[m]] @ g.deltas[m].T)
                    out = act.clone() if out is act else out
                    out[where] = out[where] + change.to(out.dtype)
                    self.opened[layer] = self.opened.get(layer, 0) + 1
            return out

        return add

    @contextlib.contextmanager
    def attached(self, model, verify_hash: bool = True) -> Iterator[Router]:
        """Route every forward inside the block; refuses modules made for other weights (or edited weights)."""
        if verify_hash:
            base = E.base_hash(model)
            wrong = [m.name for m in self.modules if m.edit.weights_sha256 != base]
            if wrong:
                raise PatchlabError(f"module {wrong[0]} was made for other weights than this model's ({base[:12]}…)")
        for m in self.modules:
            m.edit._check(model, verify_hash=False)
            for layer, r in m.routes.items():
                _check_route(r, model, f"module {m.name}, layer {layer}")
        self._z.clear()
        try:
            with attached(model, self.hooks(model)):
                yield self
        finally:
            self._z.clear()


def _check_route(r: Route, model, where: str) -> None:
    s = len(r.key_heads) * model.cfg.d_head
    if not r.key_heads or max(r.key_heads) >= model.cfg.n_heads or min(r.key_heads) < 0:
        raise PatchlabError(f"gate reads heads {r.key_heads}, the model has {model.cfg.n_heads}", where=where)
    if r.center.shape != (s,) or r.key.shape != (s,) or r.whiten.shape != (s, s):
        raise PatchlabError(f"gate tensors do not fit {len(r.key_heads)} heads of {model.cfg.d_head} dims", where=where)
    if not all(torch.isfinite(t).all() for t in (r.center, r.key, r.whiten)) or not r.lo <= r.tau <= r.hi:
        raise PatchlabError(
            f"gate is not finite or its thresholds are out of order (lo {r.lo}, tau {r.tau}, hi {r.hi})", where=where
        )


def gate_values(s: Tensor, lo: Tensor, hi: Tensor, tau: Tensor, gate: str) -> Tensor:
    """Gates in [0, 1] from scores s [..., M]: hard = 1[s > τ], soft = ramp from lo (shut) to hi (open)."""
    if gate == "hard":
        return (s > tau).to(s.dtype)
    return ((s - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)


def last_scores(model, modules: Sequence[Module], prompts: Sequence[str]) -> Float[Tensor, "n M"]:
    """Every module's score at each prompt's last token (at its first edited layer)."""
    layers = sorted({min(m.routes) for m in modules})
    z = E.last_z(model, prompts, layers)
    return torch.stack([m.routes[min(m.routes)].scores(z[min(m.routes)], model.cfg.d_head) for m in modules], 1)


# --- dependence between modules -------------------------------------------------------------------------


def hsic_matrix(S: Float[Tensor, "n M"]) -> Float[Tensor, "M M"]:
    """Normalised HSIC between every pair of columns (Gaussian kernels, median-distance bandwidth); 1 on the diagonal."""
    n, M = S.shape
    if n < 4:
        raise PatchlabError(f"dependence needs at least 4 samples, got {n}")
    Kc = torch.empty(M, n * n)
    for j in range(M):
        d2 = (S[:, j, None].double() - S[None, :, j].double()) ** 2
        K = torch.exp(-d2 / d2.median().clamp_min(1e-12))
        Kc[j] = (K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()).flatten().float()
    G = (Kc @ Kc.T).double()
    norm = G.diagonal().clamp_min(1e-24).sqrt()
    return (G / norm[:, None] / norm[None, :]).float()


def dependence(S: Float[Tensor, "n M"], gates: Float[Tensor, "n M"] | None = None, seed: int = 0) -> dict[str, Any]:
    """How dependent the modules' scores are: mean pairwise normalised HSIC (and its value with every column
    shuffled on its own, the independence floor), mean |Pearson r|, and, given gates, how often two open together."""
    M = S.shape[1]
    if M < 2:
        return {"modules": M, "hsic": None, "hsic_null": None, "hsic_excess": None, "abs_r": None, "cofire": None}
    off = ~torch.eye(M, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([S[torch.randperm(S.shape[0], generator=g), j] for j in range(M)], 1)
    r = torch.corrcoef(S.T.double()).nan_to_num(0.0)
    out = {
        "modules": M,
        "samples": int(S.shape[0]),
        "hsic": float(hsic_matrix(S)[off].mean()),
        "hsic_null": float(hsic_matrix(shuffled)[off].mean()),
        "abs_r": float(r[off].abs().mean()),
    }
    out["hsic_excess"] = out["hsic"] - out["hsic_null"]
    if gates is not None:
        opened = (gates > 0).float()
        out["open_share"] = float(opened.mean())
        out["cofire"] = float(((opened.sum(1) >= 2).float()).mean())  # share of prompts with two or more gates open
    return out


# --- sequential editing at scale -------------------------------------------------------------------------


METRICS = ("correction", "retention", "edited", "paraphrase", "irrelevance", "facts", "entity_facts")


@dataclass
class MechanismsResult(Result):
    """Metrics after each stage of sequential editing, plain (deltas summed into W_O) vs routed, with the
    modules' dependence and routing's cost per forward."""

    kind = "mechanisms"
    heading = "Routed edit mechanisms"
    intro = (
        "Many edits applied one after another, summed into W_O vs kept as gated, routed modules: retention, "
        "correction, paraphrase and irrelevance as edits accumulate."
    )
    order = 100
    model: str
    heads: list[str]
    gate: str
    stages: list[int]
    curves: dict[
        str, dict[str, list[dict[str, Any]]]
    ]  # variant -> metric -> per stage: n, before, after, C, beats_wrong
    dependence: dict[str, dict[str, Any]]  # construction -> statistics
    cost: dict[str, Any]
    modules: list[dict[str, Any]]  # per module: ids, gate calibration
    meta: dict[str, Any] = field(default_factory=dict)

    def end(self, variant: str) -> dict[str, float | None]:
        """The after-rates of every metric at the last stage."""
        return {k: v[-1]["after"] for k, v in self.curves[variant].items()}

    def table(self):
        from patchlab.results import tables

        return tables.mechanisms_table(self)

    def figure(self):
        from patchlab.results.figures import mechanisms_figure

        return mechanisms_figure(self)


def parse_stages(spec: str | Sequence[int] | None, n: int) -> list[int]:
    """Stage sizes (cumulative numbers of edits) from '1,10,50,all'; sizes above n are dropped, n always ends."""
    if n < 1:
        raise PatchlabError("no edits to stack", param="edits")
    parts = (spec or "1,10,50,all").split(",") if isinstance(spec, str) or spec is None else list(spec)
    out = set()
    for p in parts:
        p = str(p).strip()
        if p == "all":
            out.add(n)
            continue
        if not p.isdigit() or int(p) < 1:
            raise PatchlabError(f"a stage is a number of edits >= 1 or 'all', got '{p}'", param="stages")
        if int(p) <= n:
            out.add(int(p))
    out.add(n)
    return sorted(out)


PER_MODULE = ("composed", "paraphrase")
FIXED = ("irrelevance", "facts", "entity_facts")


def stack_tests(
    modules: Sequence[Module],
    pool: Sequence[TwoHopItem],
    gap,
    n_test: int = 60,
    seed: int = 0,
    exclude: set[str] = frozenset(),
) -> dict[str, list]:
    """The stack's test sets, none in `exclude`: per module its composed queries and paraphrases; irrelevance =
    composed queries answered right about other subjects; facts = hop-2 facts answered right about entities no
    edit names (neither an edited subject nor bridge); entity_facts = hop-2 facts answered right about an
    edited subject (e.g. where an edited person was born) — related, not unrelated."""
    from patchlab.methods.editeval import Query

    by_id = {it.id: it for it in pool}
    edited = [[by_id[i] for i in m.edit.item_ids if i in by_id] for m in modules]
    flat = [it for its in edited for it in its]
    ids, subjects, bridges = {it.id for it in flat}, {it.subject for it in flat}, {it.bridge for it in flat}
    right_c = {r["id"] for r in gap.items if r["composed"]}
    right_h = {r["id"] for r in gap.items if r["hop2"]}
    others = [it for it in pool if it.id not in ids and it.id not in exclude]
    rng = random.Random(seed)
    irr = [it for it in others if it.id in right_c and it.subject not in subjects]
    facts = [it for it in others if it.id in right_h and it.bridge not in subjects | bridges]
    related = [it for it in others if it.id in right_h and it.bridge in subjects]
    return {
        "composed": [[Query(it.composed, it.answers) for it in its] for its in edited],
        "paraphrase": [[Query(p, it.answers) for it in its for p in it.paraphrases] for its in edited],
        "irrelevance": [Query(it.composed, it.answers) for it in rng.sample(irr, min(n_test, len(irr)))],
        "facts": [Query(it.hop2, it.answers) for it in rng.sample(facts, min(n_test, len(facts)))],
        "entity_facts": [Query(it.hop2, it.answers) for it in related[:n_test]],
    }


def evaluate_stack(
    model,
    modules: Sequence[Module],
    pool: Sequence[TwoHopItem],
    gap,
    stages: Sequence[int],
    gate: str = "hard",
    n_test: int = 60,
    exclude: set[str] = frozenset(),
    others: dict[str, tuple[Sequence[Module], str]] | None = None,
    dependence_stats: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> MechanismsResult:
    """Stack the modules' edits stage by stage — plain (deltas summed into W_O) and routed — and measure every
    test set after each stage; `others` adds routed variants (name -> (modules in the same order, gate))."""
    from patchlab.methods.editeval import measure

    base = E.base_hash(model)
    variants = {"routed": (list(modules), gate), **(others or {})}
    for mods, _gate in variants.values():
        wrong = [m.name for m in mods if m.edit.weights_sha256 != base]
        if wrong:
            raise PatchlabError(
                f"edit {wrong[0]} was made for other weights than this model's ({base[:12]}…)", param="edits"
            )
        if len(mods) != len(modules):
            raise PatchlabError(f"every routed variant needs the same {len(modules)} modules, got {len(mods)}")
    sets = stack_tests(modules, pool, gap, n_test, exclude=exclude)
    before = _measure_sets(model, sets, len(modules), measure)
    curves = {"plain": {k: [] for k in METRICS}}
    with contextlib.ExitStack() as applied:
        done = 0
        for n in track(list(stages), "plain stack" if progress else None):
            for m in modules[done:n]:
                applied.enter_context(m.edit.applied(model, verify_hash=False))
            _stage(curves["plain"], before, _measure_sets(model, sets, n, measure), done, n)
            done = n
    for name, (mods, g) in variants.items():
        curves[name], done = {k: [] for k in METRICS}, 0
        for n in track(list(stages), f"{name} stack" if progress else None):
            with Router(mods[:n], g).attached(model):
                after = _measure_sets(model, sets, n, measure)
            _stage(curves[name], before, after, done, n)
            done = n
    return MechanismsResult(
        model=model_name(model),
        heads=sorted({h for m in modules for h in m.edit.head_list}),
        gate=gate,
        stages=list(stages),
        curves=curves,
        dependence=dependence_stats or {},
        cost={},
        modules=[{"ids": m.edit.item_ids, **m.calibration} for m in modules],
        meta=provenance(
            model,
            n_test=n_test,
            **{k: len(sets[k]) for k in FIXED},
            metric="greedy 6 tokens",
            variants={k: {"gate": g} for k, (_, g) in variants.items()},
        ),
    )


def position_scores(
    model, modules: Sequence[Module], prompts: Sequence[str]
) -> tuple[Float[Tensor, "n M"], Tensor, Tensor]:
    """Every module's score at every position of `prompts` (at its first edited layer), with each row's
    prompt index and whether it is the prompt's last position."""
    layers = sorted({min(m.routes) for m in modules})
    got = all_z(model, prompts, layers)
    z = {l: torch.cat(v) for l, v in got.items()}
    lens = [t.shape[0] for t in got[layers[0]]]
    S = torch.stack([m.routes[min(m.routes)].scores(z[min(m.routes)], model.cfg.d_head) for m in modules], 1)
    which = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    last = torch.cat([torch.arange(n) == n - 1 for n in lens])
    return S, which, last


def stack_dependence(
    model,
    modules: Sequence[Module],
    pool: Sequence[TwoHopItem],
    gap,
    n_test: int = 60,
    exclude: set[str] = frozenset(),
    gate: str = "hard",
    max_positions: int = 600,
    seed: int = 0,
) -> dict[str, Any]:
    """The modules' dependence over every position of their own prompts (no prefix) and of the stack's
    irrelevance and facts prompts (a seeded sample of `max_positions`), and how often a module's gate opens
    at the last token of another module's own prompts (same subject / other subjects)."""
    sets = stack_tests(modules, pool, gap, n_test, exclude=exclude)
    own = [[q.prompt for q in c + p] for c, p in zip(sets["composed"], sets["paraphrase"])]
    prompts = [p for o in own for p in o] + [q.prompt for k in ("irrelevance", "facts") for q in sets[k]]
    S, which, last = position_scores(model, modules, prompts)
    G = _gates_from(S, modules, gate)
    rows = torch.randperm(S.shape[0], generator=torch.Generator().manual_seed(seed))[:max_positions]
    out = dependence(S[rows], G[rows], seed)
    out.update(positions=int(S.shape[0]), **_cross_open(G, which, last, own, modules, pool))
    return out


def _cross_open(
    G: Tensor, which: Tensor, last: Tensor, own: list[list[str]], modules: Sequence[Module], pool: Sequence[TwoHopItem]
) -> dict[str, Any]:
    by_id = {it.id: it for it in pool}
    subject = [{by_id[i].subject for i in m.edit.item_ids if i in by_id} for m in modules]
    owner = (
        torch.cat([torch.full((len(o),), j) for j, o in enumerate(own)]) if own else torch.empty(0, dtype=torch.long)
    )
    g_last = G[last][: len(owner)] > 0  # last tokens of the own prompts, in prompt order
    same, other, self_open = [], [], []
    for i in range(len(modules)):
        for j in range(len(modules)):
            rate = g_last[owner == j, i].float().mean().item() if (owner == j).any() else float("nan")
            if i == j:
                self_open.append(rate)
            else:
                (same if subject[i] & subject[j] else other).append(rate)
    mean = lambda v: float(np.nanmean(v)) if v else None  # noqa: E731
    return {
        "own_open": mean(self_open),
        "cross_open_same_subject": mean(same),
        "same_subject_pairs": len(same),
        "cross_open_other": mean(other),
    }


def _gates_from(S: Tensor, modules: Sequence[Module], gate: str) -> Tensor:
    first = [next(iter(sorted(m.routes.items())))[1] for m in modules]
    t = [torch.tensor([getattr(r, k) for r in first]) for k in ("lo", "hi", "tau")]
    return gate_values(S, *t, gate)


def _measure_sets(model, sets: dict[str, list], n: int, measure) -> dict[str, list]:
    """`measure` every query of the first `n` modules' own sets and of the fixed sets in one call, regrouped."""
    groups = [(k, j) for k in PER_MODULE for j in range(n)] + [(k, None) for k in FIXED]
    queries = [sets[k][j] if j is not None else sets[k] for k, j in groups]
    got = measure(model, [q for qs in queries for q in qs])
    out: dict[str, list] = {k: [] for k in PER_MODULE}
    i = 0
    for (k, j), qs in zip(groups, queries):
        rows, i = got[i : i + len(qs)], i + len(qs)
        if j is None:
            out[k] = rows
        else:
            out[k].append(rows)
    return out


def _stage(curve: dict[str, list], before: dict[str, list], after: dict[str, list], done: int, n: int) -> None:
    from patchlab.methods.editeval import summarise

    def pick(name: str, lo: int, hi: int) -> tuple[list, list]:
        return [r for rows in before[name][lo:hi] for r in rows], [r for rows in after[name][lo:hi] for r in rows]

    curve["correction"].append(summarise(*pick("composed", done, n)))
    curve["retention"].append(summarise(*pick("composed", 0, done)))
    curve["edited"].append(summarise(*pick("composed", 0, n)))
    curve["paraphrase"].append(summarise(*pick("paraphrase", 0, n)))
    for k in FIXED:
        curve[k].append(summarise(before[k], after[k]))


# --- cost of routing -------------------------------------------------------------------------------------


def routing_cost(
    model, modules: Sequence[Module], prompts: Sequence[str], gate: str = "hard", repeats: int = 5
) -> dict[str, Any]:
    """Seconds per batched forward of `prompts`, plain model vs routed, measured side by side (median of `repeats`)."""
    tokens, _ = pad_right([encode(model, p) for p in prompts], pad_id(model))
    tokens = tokens.to(model.cfg.device)
    router = Router(modules, gate)
    plain, routed = [], []
    with torch.inference_mode():
        model(tokens)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens)
            plain.append(time.perf_counter() - start)
            with router.attached(model, verify_hash=False):
                start = time.perf_counter()
                model(tokens)
                routed.append(time.perf_counter() - start)
    p, r = float(np.median(plain)), float(np.median(routed))
    return {
        "plain_s": p,
        "routed_s": r,
        "ratio": r / p,
        "batch": len(prompts),
        "modules": len(modules),
        "repeats": repeats,
    }


# --- what the command line calls --------------------------------------------------------------------------


def stack_paths(spec: str | None, more: Sequence[str | Path] = ()) -> list[Path]:
    """Edit / module files from `--edits` (a file, a folder, or a quoted glob) plus files after it, in order.

    A folder gives its module files (*.module.safetensors) if it has any, else its .edit files, sorted by name.
    """
    paths: list[Path] = []
    for part in ([spec] if spec else []) + [str(p) for p in more]:
        p = Path(part)
        if any(ch in part for ch in "*?["):
            found = [Path(f) for f in sorted(glob.glob(part)) if Path(f).is_file()]
            if not found:
                raise PatchlabError("matches no file", param="edits", where=f"{part}")
            paths += found
        elif p.is_dir():
            found = sorted(p.glob("*.module.safetensors")) or sorted(p.glob("*.edit"))
            if not found:
                raise PatchlabError("holds no .module.safetensors or .edit file", param="edits", where=f"{part}")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise PatchlabError("no such file or folder", param="edits", where=f"{part}")
    if not paths:
        raise PatchlabError("give the edits to stack: `edits` DIR/*.module.safetensors (or .edit files)", param="edits")
    return paths


def load_any(path: str | Path) -> E.Edit | Module:
    """A routed module file, or a plain edit file (keyed later); anything else is refused with one line."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as exc:  # safetensors raises several types for damaged files
        raise PatchlabError(f"not a readable edit or module file ({type(exc).__name__})", where=str(path)) from None
    if fmt == FORMAT:
        return Module.load(path)
    if fmt == E.FORMAT:
        return E.Edit.load(path)
    raise PatchlabError(f"not a patchlab edit or module file (format {fmt!r})", where=str(path))


def modules_for(
    model,
    edits: Sequence[E.Edit | Module],
    pool: Sequence[TwoHopItem],
    gap,
    cfg: RouteConfig | None = None,
    n_reference: int = 40,
    progress: bool = True,
) -> tuple[list[Module], set[str], dict[str, Any]]:
    """Key every plain edit of `edits` as a module, in order (modules pass through), against a reference set of
    held-out prompts of items the model answers right (never the editor's KL prompts); returns the modules, the ids the tests
    must leave out, and what was built on the way (the reference, every plain edit's own activations)."""
    from patchlab.methods.editeval import kl_prompts

    cfg = cfg or RouteConfig()
    _, kl_ids = kl_prompts(pool, gap)
    questions, ref_ids = reference_prompts(pool, gap, n_reference, exclude=kl_ids)
    by_id = {it.id: it for it in pool}
    for x in edits:
        e = x.edit if isinstance(x, Module) else x
        missing = [i for i in e.item_ids if i not in by_id]
        if missing:
            raise PatchlabError(
                f"an edit was made for item '{missing[0]}', which the prompt set lacks", param="prompt_set"
            )
    built: dict[str, Any] = {"reference": None, "own": {}}
    plain = [i for i, x in enumerate(edits) if isinstance(x, E.Edit)]
    if plain:
        built["reference"] = Reference.build(model, questions, sorted({l for i in plain for l in edits[i].heads}))
        for i in track(plain, "reading own activations" if progress else None):
            built["own"][i] = own_z(model, edits[i], [by_id[j] for j in edits[i].item_ids], cfg)
    return _keyed(model, edits, built, cfg), kl_ids | ref_ids, built


def _keyed(model, edits: Sequence[E.Edit | Module], built: dict[str, Any], cfg: RouteConfig) -> list[Module]:
    modules: list[Module] = []
    for i, x in enumerate(edits):
        modules.append(
            x
            if isinstance(x, Module)
            else make_module(x, built["own"][i], built["reference"], model.cfg.d_head, cfg, modules)
        )
    return modules


def run_stack(
    model,
    edits: Sequence[E.Edit | Module],
    pool: Sequence[TwoHopItem],
    gap,
    stages: str | Sequence[int] | None = None,
    gate: str = "hard",
    cfg: RouteConfig | None = None,
    n_test: int = 60,
    progress: bool = True,
) -> MechanismsResult:
    """Key the plain edits as modules, stack them stage by stage plain vs routed, and measure the modules'
    dependence (also with the other key construction, when every module was keyed here) and routing's cost."""
    cfg = cfg or RouteConfig()
    stage_list = parse_stages(stages, len(edits))
    if gate not in GATES:
        raise PatchlabError(f"gate must be one of {', '.join(GATES)}, got '{gate}'", param="gate")
    modules, exclude, built = modules_for(model, edits, pool, gap, cfg, progress=progress)
    name = lambda c: "orthogonal keys" if c.orthogonal else "plain keys"  # noqa: E731
    dep = {
        name(cfg) if built["reference"] is not None else "as given": stack_dependence(
            model, modules, pool, gap, n_test, exclude, gate
        )
    }
    if len(built["own"]) == len(edits) and len(edits) > 1:
        other = replace(cfg, orthogonal=not cfg.orthogonal)
        dep[name(other)] = stack_dependence(model, _keyed(model, edits, built, other), pool, gap, n_test, exclude, gate)
    result = evaluate_stack(
        model, modules, pool, gap, stage_list, gate, n_test, exclude, dependence_stats=dep, progress=progress
    )
    right = [it.composed for it in gap.correct_items(pool)][:16] or [pool[0].composed]
    result.cost = routing_cost(model, modules, right, gate, repeats=3)
    return result
