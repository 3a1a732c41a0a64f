"""Locate: causal mediation over attention heads (and whole MHSA / MLP layers), exact and by attribution.

A *pair* is a clean and a corrupted prompt with an answer and a contrast token; the metric is
logit(answer) − logit(contrast) at the last position. Exact patching copies a clean activation into
the corrupted run and reruns the model: one generic loop (`exact_patch`) does every variant. It is
fast because
  * many patched copies run in one batch (one per head, or per head × position);
  * the corrupted run's residual stream is reused: a patch at layer L starts at layer L, never
    recomputing layers < L (`run_from_layer`; self-checked against a full forward per model);
  * only the last position is unembedded.
Attribution patching approximates every patch at once from one forward and one backward pass:
effect ≈ (a_clean − a_corrupted) · ∂metric/∂a.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.forms import DEFAULT_FORM
from patchlab.core.progress import track
from patchlab.core.prompts import TwoHopItem
from patchlab.core.spec import Head, HeadSet
from patchlab.results.base import Result
from patchlab.runtime import sites
from patchlab.runtime.bridge import model_name
from patchlab.runtime.forms import render_items
from patchlab.runtime.identity import provenance
from patchlab.runtime.scoring import answer_token_id, encode
from patchlab.runtime.shards import shard_task
from patchlab.runtime.trace import (
    attached,
    check_prefix_cache,
    check_run_from_layer,
    frozen,
    prefix_cache,
    repeated,
    run_from_layer,
    trace,
)

SITES = sites.PATCH_SITES
POSITIONS = ("all", "each", "last")
DIVIDE_EPS = 1e-3  # |clean − corrupted| metric below this: the normalised effect is undefined


# --- pairs -------------------------------------------------------------------------------------


@dataclass
class PatchPair:
    """A clean and a corrupted prompt (token ids), the answer and contrast tokens, and what is aligned."""

    id: str
    clean: list[int]
    corrupted: list[int]
    answer: int
    contrast: int
    setup: str = "custom"

    @property
    def same_length(self) -> bool:
        return len(self.clean) == len(self.corrupted)

    def check(self) -> None:
        if self.answer == self.contrast:
            raise PatchlabError(
                "answer and contrast share their first token: the logit difference is always 0", where=f"item {self.id}"
            )


def _top_other(logits: Tensor, answer: int) -> int:
    """The highest-scoring token that is not the answer: the model's own wrong answer."""
    top2 = logits.topk(2).indices.tolist()
    return top2[0] if top2[0] != answer else top2[1]


def guide_pairs(model, items: Sequence[TwoHopItem]) -> list[PatchPair]:
    """CREME's setup: clean = the guide (hop2, bridge written in), corrupted = the failing composed query.

    The contrast is the composed query's own top token (its wrong answer). The prompts differ in
    length, so only the last positions are aligned (positions="last").
    """
    pairs = []
    for it in items:
        composed = encode(model, it.composed, where=f"{it.id}: composed")
        answer = answer_token_id(model, it.answer, where=f"{it.id}: answer", after=it.composed)
        with torch.inference_mode():
            logits = model(torch.tensor([composed], device=model.cfg.device))[0, -1].float().cpu()
        pair = PatchPair(
            it.id, encode(model, it.hop2, where=f"{it.id}: hop2"), composed, answer, _top_other(logits, answer), "guide"
        )
        pairs.append(pair)
    return pairs


def _template(it: TwoHopItem) -> str:
    return it.composed.replace(it.subject, "\x00")


def template_pairs(model, items: Sequence[TwoHopItem], pool: Sequence[TwoHopItem] | None = None) -> list[PatchPair]:
    """The classic setup: clean = an item's composed query, corrupted = the same template with another
    subject (same kind, same token length) whose answer differs; contrast = that subject's answer."""
    pool = list(pool if pool is not None else items)
    pairs = []
    for it in items:
        clean = encode(model, it.composed, where=f"{it.id}: composed")
        answer = answer_token_id(model, it.answer, where=f"{it.id}: answer", after=it.composed)
        for other in pool:
            if (
                other.id == it.id
                or other.kind != it.kind
                or _template(other) != _template(it)
                or "\x00" not in _template(it)
            ):
                continue
            corrupted = encode(model, other.composed, where=f"{other.id}: composed")
            contrast = answer_token_id(model, other.answer, where=f"{other.id}: answer", after=other.composed)
            if len(corrupted) == len(clean) and contrast != answer:
                pairs.append(PatchPair(it.id, clean, corrupted, answer, contrast, "template"))
                break
    return pairs


# --- exact patching: one generic loop -------------------------------------------------------------


@dataclass
class RunCache:
    """What one prompt's run leaves behind for patching: logits at the last position, resid_pre and site acts."""

    tokens: Tensor
    last_logits: Tensor
    resid: list[Tensor]  # per layer [pos, d_model]
    acts: dict[str, list[Tensor]]  # site -> per layer [pos, ...]


def run_cache(model, ids: Sequence[int], sites_: Sequence[str] = ("z",)) -> RunCache:
    """One forward that records resid_pre and the given sites at every layer."""
    n = model.cfg.n_layers
    tokens = torch.tensor([list(ids)], device=model.cfg.device)
    names = [sites.resid_pre(l) for l in range(n)] + [SITES[s](l) for s in sites_ for l in range(n)]
    with torch.inference_mode():
        t = trace(model, tokens, names)
    return RunCache(
        tokens=tokens,
        last_logits=t.logits[0, -1].float(),
        resid=[t[sites.resid_pre(l)][0] for l in range(n)],
        acts={s: [t[SITES[s](l)][0] for l in range(n)] for s in sites_},
    )


def patch_masks(
    site: str, positions: str, n_pos: int, n_heads: int, heads: Sequence[int] | None = None
) -> tuple[Tensor, list[tuple]]:
    """One boolean mask per patched copy over the site's [pos, (head)] axes, and each copy's index.

    z: per head (all positions, each position, or the last); attn_out / mlp_out: the whole layer.
    """
    heads = list(range(n_heads)) if heads is None else list(heads)
    pos_sets = {"all": [None], "last": [n_pos - 1], "each": list(range(n_pos))}[positions]
    masks, index = [], []
    for p in pos_sets:
        units = heads if site == "z" else [None]
        for h in units:
            shape = (n_pos, n_heads) if site == "z" else (n_pos,)
            m = torch.zeros(shape, dtype=torch.bool)
            sel_p = slice(None) if p is None else p
            if site == "z":
                m[sel_p, h] = True
            else:
                m[sel_p] = True
            masks.append(m)
            index.append((p, h))
    return torch.stack(masks), index


def _patch_hook(masks: Tensor, clean: Tensor):
    """Replace the masked entries of every copy's activation with the clean activation."""

    def hook(act, hook):
        m = masks.to(act.device).reshape(*masks.shape, *([1] * (act.dim() - masks.dim())))
        return torch.where(m, clean.to(act.dtype)[None], act)

    return hook


def exact_patch(
    model,
    clean: RunCache,
    corrupted: RunCache,
    metric: Callable[[Tensor], Tensor],
    site: str = "z",
    positions: str = "all",
    layers: Sequence[int] | None = None,
    heads: dict[int, list[int]] | None = None,
    max_batch: int = 64,
    span: int = 4,
    fast: bool = True,
) -> dict[tuple, float]:
    """Patch clean → corrupted at every (layer, position, head) and return {(layer, pos, head): metric}.

    positions: "all" (TransformerLens' *_all_pos), "each" (*_by_pos) or "last" (aligned last
    positions; prompts may differ in length). `heads` restricts each layer to some heads. Copies of
    up to `span` consecutive layers share one batch of at most `max_batch` rows, started at the
    lowest of those layers (a few layers recomputed, far fewer small forward passes). A patch that starts at
    position s (the last position; each position's own; for all positions, the first token the two prompts do
    not share) recomputes only positions >= s, attending to the corrupted prefix's cached keys / values. A metric
    with `reads` (`LogitDiff`) gets logits whose other vocabulary entries are 0: only its columns are unembedded.
    """
    if positions not in POSITIONS:
        raise PatchlabError(f"positions must be one of {POSITIONS}, got '{positions}'")
    n_pos = corrupted.tokens.shape[1]
    if positions != "last" and clean.tokens.shape[1] != n_pos:
        raise PatchlabError(
            f"clean and corrupted differ in length ({clean.tokens.shape[1]} vs {n_pos}); "
            "only positions='last' aligns them"
        )
    layers = sorted(range(model.cfg.n_layers) if layers is None else layers)
    fast = fast and check_run_from_layer(model, corrupted.tokens, corrupted.resid)
    # a patch from position s on leaves every earlier position alone in every layer (causal attention): their keys /
    # values come from the corrupted run's cache and only positions >= s are recomputed, from the patched layer up
    kv = fast and n_pos > 1 and check_prefix_cache(model, corrupted.tokens, corrupted.resid)
    shared = _shared_prefix(clean.tokens, corrupted.tokens) if positions == "all" else 0
    reads = getattr(metric, "reads", None)  # a metric that names its vocabulary entries: only those unembedded
    jobs = []  # (layer, mask, key, first recomputed position)
    for layer in layers:
        masks, index = patch_masks(site, positions, n_pos, model.cfg.n_heads, (heads or {}).get(layer))
        for m, (p, h) in zip(masks, index):
            start = {"all": shared, "last": n_pos - 1, "each": p}[positions] if kv else 0
            jobs.append((layer, m, (layer, p if positions == "each" else None, h), start))
    jobs.sort(key=lambda j: (j[3], j[0]))
    prefixes: dict[int, object] = {}
    out: dict[tuple, float] = {}
    for chunk in _chunks(jobs, max_batch, span):
        start = chunk[0][3]
        hooks = []
        for layer in sorted({j[0] for j in chunk}):
            masks = torch.stack([m if l == layer else torch.zeros_like(m) for l, m, *_ in chunk])
            clean_act = _aligned(clean.acts[site][layer], n_pos, positions)
            hooks.append((SITES[site](layer), _patch_hook(masks[:, start:], clean_act[start:])))
        with torch.inference_mode():
            if start == 0:
                logits = _patched_logits(model, corrupted, chunk[0][0], len(chunk), hooks, fast, reads)
            else:
                if start not in prefixes:
                    prefixes[start] = prefix_cache(model, corrupted.tokens[:, :start])
                logits = _suffix_logits(model, corrupted, chunk[0][0], start, hooks, prefixes[start], len(chunk), reads)
        for (_, _, key, _), v in zip(chunk, metric(logits.float()).tolist()):
            out[key] = v
    return out


def _shared_prefix(clean: Tensor, corrupted: Tensor) -> int:
    """How many leading tokens the two prompts share, at most all but the last: patching a position there
    writes the clean activation over an equal corrupted one (same tokens before it, causal attention)."""
    n = min(clean.shape[1], corrupted.shape[1]) - 1
    differ = (clean[0, :n] != corrupted[0, :n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


def _chunks(jobs: list, max_batch: int, span: int) -> Iterator[list]:
    """Consecutive jobs (sorted by first position, then layer) in chunks of <= max_batch rows that share their
    first recomputed position and span < span layers."""
    chunk: list = []
    for job in jobs:
        if chunk and (len(chunk) >= max_batch or job[0] - chunk[0][0] >= span or job[3] != chunk[0][3]):
            yield chunk
            chunk = []
        chunk.append(job)
    if chunk:
        yield chunk


def _aligned(act: Tensor, n_pos: int, positions: str) -> Tensor:
    """The clean activation placed on the corrupted prompt's positions (last aligned with last)."""
    if act.shape[0] == n_pos:
        return act
    placed = torch.zeros((n_pos, *act.shape[1:]), dtype=act.dtype, device=act.device)
    placed[-1] = act[-1]
    return placed


def _suffix_logits(
    model, corrupted: RunCache, layer: int, start: int, hooks: list, prefix, copies: int, reads=None
) -> Tensor:
    """Last-position logits of `copies` corrupted runs patched at positions >= `start` only: those positions enter
    `layer` with the corrupted residual and attend to the cached prefix before them (exact: causal attention)."""
    resid = corrupted.resid[layer][start:][None].expand(copies, -1, -1).clone()
    last = torch.full((copies,), corrupted.tokens.shape[1] - 1 - start, device=resid.device)
    return run_from_layer(model, resid, layer, last, hooks, past=repeated(prefix, copies), columns=reads)


def _patched_logits(
    model, corrupted: RunCache, layer: int, copies: int, hooks: list, fast: bool, reads: Sequence[int] | None = None
) -> Tensor:
    """Last-position logits of `copies` corrupted runs with `hooks` active, starting at `layer` if fast."""
    n_pos = corrupted.tokens.shape[1]
    last = torch.full((copies,), n_pos - 1, device=corrupted.tokens.device)
    if fast:
        resid = corrupted.resid[layer][None].expand(copies, -1, -1).clone()
        return run_from_layer(model, resid, layer, last, hooks, columns=reads)
    with attached(model, hooks):
        return model(corrupted.tokens.expand(copies, -1))[:, -1]


@dataclass(frozen=True)
class LogitDiff:
    """logit(answer) − logit(contrast) for a batch of last-position logits [b, vocab]; `reads` tells
    `exact_patch` the only vocabulary entries it needs to compute."""

    answer: int
    contrast: int

    @property
    def reads(self) -> tuple[int, int]:
        return (self.answer, self.contrast)

    def __call__(self, logits: Tensor) -> Tensor:
        return logits[:, self.answer] - logits[:, self.contrast]


def logit_diff_metric(answer: int, contrast: int) -> LogitDiff:
    """logit(answer) − logit(contrast) for a batch of last-position logits [b, vocab]."""
    return LogitDiff(answer, contrast)


# --- attribution patching ------------------------------------------------------------------------


def attribution_patch(
    model, clean: RunCache, pair: PatchPair, site: str = "z", positions: str = "all"
) -> dict[tuple, float]:
    """(a_clean − a_corrupted) · ∂metric/∂a at the corrupted run, for every layer × (position) × head."""
    per = _attribution_rows(model, clean, pair, site, positions, [])
    return _keyed({l: v[0] for l, v in per.items()}, positions)


# GradDrop blocks of AtP*'s default: chosen on 12 SmolLM2 template pairs (dev: pairs 3-14 of bench_locate's list)
# as the most blocks within 3x AtP's cost; recall of the exact top 20 in the top 40 there: AtP 0.96, 5 blocks
# 0.94, 8 blocks 0.98 (2.7x), every layer 0.99 (6.6x). Reported on bench_locate's own 3 pairs, never tuned on.
GRADDROP_GROUPS = 8


def graddrop_groups(n_layers: int, groups: int | None) -> list[list[int]]:
    """The layers whose contributions one GradDrop pass drops: every layer alone (`groups` None, the paper's
    L passes) or `groups` contiguous blocks (a cheaper version: `groups` + 1 rows in one batch; a model with
    fewer layers gets one block per layer)."""
    g = n_layers if groups is None else min(groups, n_layers)
    if g < 2:
        raise PatchlabError(f"must be at least 2 (and the model needs 2 layers), got {groups}", param="groups")
    return [list(map(int, block)) for block in np.array_split(np.arange(n_layers), g)]


def atp_star_patch(
    model,
    clean: RunCache,
    pair: PatchPair,
    site: str = "z",
    positions: str = "all",
    groups: int | None = GRADDROP_GROUPS,
) -> dict[tuple, float]:
    """AtP* (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
    components") on head outputs: attribution patching with GradDrop.

    Plain AtP, ĉ(n) = (n_clean − n_corrupted) · ∂m/∂n, misses nodes whose direct and indirect effects cancel
    in the gradient. GradDrop repeats the estimate with the gradient through one layer ℓ's contribution to the
    residual stream (its attention and MLP outputs) set to zero, ĉ_ℓ(n), and scores

        ĉ_GD(n) = 1 / (G − 1) · Σ_ℓ |ĉ_ℓ(n)|

    over the G dropped layers (`groups` None, the paper's) or G contiguous blocks of layers (`groups`,
    default `GRADDROP_GROUPS`: about 2.7x AtP's cost on SmolLM2 against 6.6x for every layer): equal to
    |ĉ(n)| when nothing cancels, and non-zero when a path that cancels another is cut. The node's own layer
    gives 0 (its output's gradient is dropped), hence G − 1. All G passes run as rows of one batch (the forward
    values are untouched: a dropped contribution is detached, not removed). The paper's other fix, recomputing
    the attention softmax for patched queries and keys, has nothing to correct at this site: a head-output patch
    sets the head's output itself, softmax included, so the estimate is linear only downstream of it.
    Returns magnitudes (≥ 0), for ranking what to verify exactly."""
    blocks = graddrop_groups(model.cfg.n_layers, groups)
    rows = len(blocks) + 1  # row 0: plain AtP, row g + 1: block g dropped
    drop = []
    for g, block in enumerate(blocks):
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[g + 1] = True
        for layer in block:
            drop += [(sites.attn_out(layer), _detach_rows(mask)), (sites.mlp_out(layer), _detach_rows(mask))]
    per = _attribution_rows(model, clean, pair, site, positions, drop, rows)
    return _keyed({l: v[1:].abs().sum(0) / (len(blocks) - 1) for l, v in per.items()}, positions)


def _detach_rows(rows: Tensor):
    """A hook that cuts the gradient through the activation in the chosen batch rows (values unchanged)."""

    def hook(act, hook):
        m = rows.to(act.device).reshape(-1, *([1] * (act.dim() - 1)))
        return torch.where(m, act.detach(), act)

    return hook


def _attribution_rows(
    model, clean: RunCache, pair: PatchPair, site: str, positions: str, patch: list, rows: int = 1
) -> dict[int, Tensor]:
    """Per layer, [rows, P, (heads)] estimates (a_clean − a_corrupted) · ∂metric/∂a of each node (P: every
    position for `positions` each, else one: the last, or the sum over positions), each row of the corrupted
    prompt's batch with its own `patch` hooks (the metric is summed over rows: rows do not mix)."""
    n, n_pos = model.cfg.n_layers, len(pair.corrupted)
    tokens = torch.tensor([pair.corrupted] * rows, device=model.cfg.device)

    def start_graph(act, hook):
        return act.detach().requires_grad_(True)

    names = [SITES[site](l) for l in range(n)]
    with frozen(model), torch.enable_grad():
        t = trace(model, tokens, names, patch=[(sites.resid_pre(0), start_graph), *patch], graph=True, retain_grad=True)
        logits = t.logits[:, -1]
        (logits[:, pair.answer] - logits[:, pair.contrast]).sum().backward()
    out = {}
    for layer in range(n):
        a = t[names[layer]]
        diff = _aligned(clean.acts[site][layer], n_pos, positions) - a.detach()[0]
        v = (diff[None] * a.grad).float().sum(-1)  # [rows, pos, heads] or [rows, pos]
        out[layer] = v if positions == "each" else v[:, -1:] if positions == "last" else v.sum(1, keepdim=True)
    return out


def _keyed(per: dict[int, Tensor], positions: str) -> dict[tuple, float]:
    """{(layer, pos, head): estimate} from per-layer [P, (heads)] node estimates (see `_attribution_rows`)."""
    out: dict[tuple, float] = {}
    for layer, v in per.items():
        for p in range(v.shape[0]):
            _put(out, layer, p if positions == "each" else None, v[p])
    return out


def _put(out: dict, layer: int, pos, values: Tensor) -> None:
    if values.dim() == 0:
        out[(layer, pos, None)] = values.item()
    else:
        for h, v in enumerate(values.tolist()):
            out[(layer, pos, h)] = v


# --- over a prompt set ---------------------------------------------------------------------------


@dataclass
class LocateResult(Result):
    """Normalised patching effects per item and their aggregate per head (or per layer for attn_out/mlp_out)."""

    kind = "locate"
    heading = "Located heads"
    intro = (
        "Activation patching of each head's output (hook_z) from the guide prompt (bridge written in) into "
        "the failing composed question: the normalised effect on logit(answer) − logit(wrong answer)."
    )
    order = 40
    model: str
    setup: str
    method: str
    site: str
    positions: str
    n_layers: int
    n_heads: int
    items: list[dict[str, Any]]  # id, clean, corrupted, flagged, effect [layer][unit] (+ by_pos [layer][pos][unit])
    mean: list[list[float]]  # [layer][unit] over unflagged items
    std: list[list[float]]
    n: int
    ranking: list[dict[str, Any]]  # unit, mean, std, share_top_k; best first (by |mean|)
    top_k: int
    attribution_mean: list[list[float]] | None = None
    audit: dict[str, Any] | None = None  # method both: the false-negative bound of the screen (`audit_bound`)
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def heads(self, top: int) -> HeadSet:
        """The `top` heads whose patch restores the answer most (largest positive mean), best first."""
        if self.site != "z":
            raise PatchlabError(f"this result ranks whole layers ({self.site}), not heads")
        if top < 1:
            raise PatchlabError(f"must be >= 1, got {top}", param="top")
        restoring = sorted((r for r in self.ranking if r["mean"] > 0), key=lambda r: -r["mean"])
        return HeadSet(Head(*map(int, r["unit"].split("."))) for r in restoring[:top])

    def table(self, top: int = 10):
        from patchlab.results import tables

        return tables.locate_table(self, top)

    def figure(self):
        from patchlab.results.figures import locate_figure

        return locate_figure(self)


def site_units(site: str, n_heads: int) -> list:
    return list(range(n_heads)) if site == "z" else [None]


def _grid(values: dict[tuple, float], n_layers: int, units: list, pos=None) -> np.ndarray:
    return np.array([[values.get((l, pos, u), np.nan) for u in units] for l in range(n_layers)])


def _unit_name(layer: int, unit) -> str:
    return f"{layer}.{unit}" if unit is not None else str(layer)


def locate_pairs(
    model,
    pairs: Sequence[PatchPair],
    method: str = "both",
    site: str = "z",
    positions: str = "last",
    top_k: int = 10,
    verify: int = 20,
    progress: bool = True,
    screen: str = "atp",
    audit: int = 20,
) -> LocateResult:
    """Patch every pair and aggregate normalised effects per head (or layer).

    A pair whose effect is undefined — answer and contrast share a token, a non-finite metric, or clean ≈
    corrupted — is flagged, left out of the means (and of the attribution screen) and never divided by.
    Each pair's runs are cached, patched and dropped in turn: memory does not grow with the number of
    pairs (method 'both' runs each pair twice: once for the screen, once to verify). `screen`: the estimate
    that ranks heads for method attribution and picks the `verify` heads of method both (see `screen_rows`).
    `audit`: with method both, this many heads the screen left out, drawn at random, are patched exactly too;
    `result.audit` holds the false-negative bound they give (`audit_bound`).
    """
    import time

    check_options(method, site, top_k, screen)
    check_pairs(pairs, positions)
    start = time.perf_counter()
    screened = screen_rows(model, pairs, site, positions, progress, screen) if method != "exact" else []
    att_mean = attribution_mean(screened)
    audited: dict[int, list] = {}
    if method == "attribution":
        rows = screened
    else:
        heads = screened_heads(att_mean, max(verify, top_k), model.cfg.n_heads, site) if method == "both" else None
        if heads:
            audited = audit_sample(att_mean, heads, audit, model.cfg.n_heads, site)
            heads = merged_heads(heads, audited)
        rows = verify_rows(model, pairs, site, positions, heads, progress)
    result = aggregate(
        rows,
        model_name(model),
        model.cfg.n_layers,
        site_units(site, model.cfg.n_heads),
        pairs[0].setup,
        method,
        site,
        positions,
        top_k,
        att_mean,
        time.perf_counter() - start,
        provenance(model, metric=METRIC),
    )
    if audited:
        result.audit = audit_bound(result, audited)
    return result


METRIC = "logit(answer) - logit(contrast), last position, normalised"


def check_options(method: str, site: str, top_k: int, screen: str = "atp") -> None:
    """Refuse an unknown method, site or screen and a non-positive top-k, naming the option."""
    if screen not in SCREENS:
        raise PatchlabError(f"must be one of {', '.join(SCREENS)}, got '{screen}'", param="screen")
    if method not in ("exact", "attribution", "both"):
        raise PatchlabError(f"method must be exact, attribution or both, got '{method}'", param="method")
    if site not in SITES:
        raise PatchlabError(f"site must be one of {', '.join(SITES)}, got '{site}'", param="site")
    if top_k < 1:
        raise PatchlabError(f"must be >= 1, got {top_k}", param="top")


def check_pairs(pairs: Sequence[PatchPair], positions: str, allow_empty: bool = False) -> None:
    """Refuse an empty pair list, and position-wise patching of pairs that differ in length."""
    if not pairs and not allow_empty:
        raise PatchlabError(
            "no prompt pairs to patch (see `setup`: guide needs failures, template needs "
            "correct items with a same-template partner)",
            param="prompt_set",
        )
    for p in pairs:
        if positions != "last" and not p.same_length:
            raise PatchlabError("clean and corrupted differ in length; use `positions` last", where=f"item {p.id}")


SCREENS = ("atp", "atp*")


def screen_rows(
    model, pairs: Sequence[PatchPair], site: str, positions: str, progress: bool = True, screen: str = "atp"
) -> list[dict]:
    """Attribution rows, one per pair: the normalised estimate as `effect`, the raw one as `attribution`
    (the screen's input; None when the pair is flagged). Each pair is cached, estimated and dropped in turn.
    `screen`: atp (attribution patching, signed) or atp* (`atp_star_patch`: magnitudes, about 2.7x the cost)."""
    if screen not in SCREENS:
        raise PatchlabError(f"must be one of {', '.join(SCREENS)}, got '{screen}'", param="screen")
    estimate = attribution_patch if screen == "atp" else atp_star_patch
    n_layers, units = model.cfg.n_layers, site_units(site, model.cfg.n_heads)
    rows = []
    for p, clean, _, c, k, reason in _pair_runs(model, pairs, site, "attribution" if progress else None):
        if reason:
            rows.append({**_flagged_row(p, c, k, reason, n_layers, units), "attribution": None})
            continue
        att = _reduce_positions(
            estimate(model, clean, p, site, positions), n_layers, units, positions, len(p.corrupted)
        )
        rows.append(
            {
                **_item_row(p, c, k, None, n_layers, units, positions, delta_grid=att),
                "attribution": np.where(np.isfinite(att), att, None).tolist(),
            }
        )
    return rows


def _pair_runs(model, pairs: Sequence[PatchPair], site: str, description: str | None):
    """Per pair, in turn: its clean and corrupted runs cached at `site`, their metrics and the flag reason."""
    for p in track(pairs, description):
        clean, corrupted = run_cache(model, p.clean, [site]), run_cache(model, p.corrupted, [site])
        c, k = _pair_metrics(p, clean, corrupted)
        yield p, clean, corrupted, c, k, flag_reason(p, c, k)


def attribution_mean(rows: Sequence[dict]) -> np.ndarray | None:
    """Mean raw attribution estimate per unit over the unflagged screen rows (NaN where never defined)."""
    defined = [np.array(r["attribution"], dtype=float) for r in rows if r.get("attribution") is not None]
    if not defined:
        return None
    with warnings.catch_warnings():  # a unit whose every estimate is NaN stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(defined, axis=0)


def screened_heads(att_mean: np.ndarray | None, n: int, n_heads: int, site: str) -> dict[int, list]:
    """The `n` units with the largest |mean attribution|, as {layer: [unit, ...]} (empty: nothing screened)."""
    if att_mean is None:
        return {}
    units = site_units(site, n_heads)
    heads: dict[int, list] = {}
    for flat in np.argsort(-np.abs(np.nan_to_num(att_mean)).ravel())[:n]:
        l, u = divmod(int(flat), len(units))
        heads.setdefault(l, []).append(units[u])
    return heads


def audit_sample(
    att_mean: np.ndarray | None, screened: dict[int, list], n: int, n_heads: int, site: str, seed: int = 0
) -> dict[int, list]:
    """`n` units the screen did not pick, drawn uniformly at random (seeded: the same run draws the same), to be
    patched exactly beside the screened ones: the sample `audit_bound` turns into a false-negative bound."""
    if att_mean is None or n < 1:
        return {}
    units = site_units(site, n_heads)
    picked = {(l, u) for l, us in screened.items() for u in us}
    rest = [(l, u) for l in range(att_mean.shape[0]) for u in units if (l, u) not in picked]
    heads: dict[int, list] = {}
    for i in sorted(np.random.default_rng(seed).choice(len(rest), size=min(n, len(rest)), replace=False)):
        l, u = rest[int(i)]
        heads.setdefault(l, []).append(u)
    return heads


def merged_heads(a: dict[int, list], b: dict[int, list]) -> dict[int, list]:
    return {l: sorted({*a.get(l, []), *b.get(l, [])}, key=lambda u: -1 if u is None else u) for l in sorted({*a, *b})}


def binomial_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound on a proportion after k successes in n draws: the p at which
    P(X <= k | n, p) = 1 − confidence (bisection; k = 0 gives 1 − (1 − confidence)^(1/n))."""
    if k >= n:
        return 1.0
    cdf = lambda p: sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))  # noqa: E731
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - confidence else (lo, mid)
    return hi


def audit_bound(result: LocateResult, audited: dict[int, list], confidence: float = 0.95) -> dict[str, Any]:
    """The false-negative bound of a screen → verify run (the diagnostic of Kramár et al. 2024, sec. 5, in its
    simplest form): of the units the screen left out, a uniform random sample was patched exactly. With
    threshold t = the smallest |mean effect| in the reported top k, and m of the s sampled units at or above t,
    the share of left-out units that would enter the top k is at most `binomial_upper(m, s)` at `confidence`
    (times the number left out: a bound on the heads missed)."""
    names = {_unit_name(l, u) for l, us in audited.items() for u in us}
    ranked = [r for r in result.ranking if r["unit"] not in names]
    sampled = [r for r in result.ranking if r["unit"] in names]
    threshold = abs(ranked[min(result.top_k, len(ranked)) - 1]["mean"]) if ranked else float("inf")
    above = sorted(r["unit"] for r in sampled if abs(r["mean"]) >= threshold)
    left_out = result.n_layers * result.n_heads - len(ranked)
    share = binomial_upper(len(above), len(sampled), confidence) if sampled else 1.0
    return {
        "sampled": sorted(names),
        "left_out": left_out,
        "threshold": threshold,
        "above_threshold": above,
        "max_abs_effect": max((abs(r["mean"]) for r in sampled), default=None),
        "confidence": confidence,
        "share_bound": share,
        "heads_bound": share * left_out,
    }


def verify_rows(
    model, pairs: Sequence[PatchPair], site: str, positions: str, heads: dict[int, list] | None, progress: bool = True
) -> list[dict]:
    """Exact patching rows, one per pair, of every unit or only of `heads` ({layer: [unit]})."""
    n_layers, units = model.cfg.n_layers, site_units(site, model.cfg.n_heads)
    rows = []
    for p, clean, corrupted, c, k, reason in _pair_runs(model, pairs, site, "patching" if progress else None):
        if reason or heads == {}:
            rows.append(_flagged_row(p, c, k, reason or "no pair could be screened", n_layers, units))
            continue
        raw = exact_patch(
            model,
            clean,
            corrupted,
            logit_diff_metric(p.answer, p.contrast),
            site,
            positions,
            layers=sorted(heads) if heads is not None else None,
            heads=heads,
        )
        rows.append(_item_row(p, c, k, {key: v - k for key, v in raw.items()}, n_layers, units, positions))
    return rows


def _pair_metrics(p: PatchPair, clean: RunCache, corrupted: RunCache) -> tuple[float, float]:
    metric = logit_diff_metric(p.answer, p.contrast)
    return metric(clean.last_logits[None]).item(), metric(corrupted.last_logits[None]).item()


def flag_reason(p: PatchPair, clean: float, corrupted: float) -> str | None:
    """Why a pair's normalised effect is undefined (it is then flagged), or None."""
    if p.answer == p.contrast:
        return "answer and contrast share their first token: the logit difference is always 0"
    if not (math.isfinite(clean) and math.isfinite(corrupted)):
        return "non-finite metric (NaN or inf in the model's output)"
    if abs(clean - corrupted) < DIVIDE_EPS:
        return f"clean and corrupted metrics differ by less than {DIVIDE_EPS}: the normalised effect is undefined"
    return None


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _flagged_row(p: PatchPair, clean: float, corrupted: float, reason: str, n_layers: int, units: list) -> dict:
    return {
        "id": p.id,
        "clean": _finite(clean),
        "corrupted": _finite(corrupted),
        "flagged": True,
        "flag_reason": reason,
        "effect": [[None] * len(units) for _ in range(n_layers)],
    }


def _reduce_positions(values: dict[tuple, float], n_layers: int, units: list, positions: str, n_pos: int) -> np.ndarray:
    """[layer][unit] grid; for positions='each' the position with the largest |value| speaks for the unit."""
    if positions != "each":
        return _grid(values, n_layers, units)
    stack = np.stack([_grid(values, n_layers, units, p) for p in range(n_pos)])  # [pos, layer, unit]
    idx = np.nanargmax(np.abs(np.nan_to_num(stack, nan=0.0)), axis=0)
    return np.take_along_axis(stack, idx[None], 0)[0]


def _item_row(
    p: PatchPair, clean: float, corrupted: float, deltas, n_layers, units, positions, delta_grid=None
) -> dict:
    """One item's normalised effects; flagged (and left out of the mean) when the effect is undefined."""
    reason = flag_reason(p, clean, corrupted)
    if reason:
        return _flagged_row(p, clean, corrupted, reason, n_layers, units)
    denom = clean - corrupted
    if delta_grid is None:
        delta_grid = _reduce_positions(deltas, n_layers, units, positions, len(p.corrupted))
    with np.errstate(invalid="ignore", over="ignore"):
        effect = delta_grid / denom
    row = {
        "id": p.id,
        "clean": clean,
        "corrupted": corrupted,
        "flagged": False,
        "effect": np.where(np.isfinite(effect), effect, None).tolist(),
    }  # a NaN / inf patch is left out
    if positions == "each" and deltas is not None:
        row["by_pos"] = [
            [[_finite(deltas.get((l, q, u), 0.0) / denom) for u in units] for q in range(len(p.corrupted))]
            for l in range(n_layers)
        ]
    return row


def aggregate(
    rows: Sequence[dict],
    model: str,
    n_layers: int,
    units: list,
    setup: str,
    method: str,
    site: str,
    positions: str,
    top_k: int,
    att_mean: np.ndarray | None,
    seconds: float,
    meta: dict,
) -> LocateResult:
    """Means, spreads and the ranking over the unflagged rows, reduced in float64 in the rows' order."""
    rows = [{k: v for k, v in r.items() if k != "attribution"} for r in rows]
    good = [np.array(r["effect"], dtype=float) for r in rows if not r["flagged"]]
    if not good:
        first = rows[0]
        raise PatchlabError(
            f"every item was flagged (item {first['id']}: {first.get('flag_reason')}): nothing to aggregate"
        )
    stack = np.stack(good).astype(np.float64)
    with warnings.catch_warnings():  # heads that were never patched (method='both') stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = np.nanmean(stack, 0), np.nanstd(stack, 0)
    # how often each unit is among an item's top-k (by |effect|)
    top_counts = np.zeros_like(mean)
    for e in good:
        flat = np.argsort(-np.abs(np.nan_to_num(e)).ravel())[:top_k]
        top_counts.ravel()[flat] += 1
    order = [i for i in np.argsort(-np.abs(np.nan_to_num(mean)).ravel()) if not np.isnan(mean.ravel()[i])]
    ranking = []
    for flat in order:
        l, u = divmod(int(flat), len(units))
        ranking.append(
            {
                "unit": _unit_name(l, units[u]),
                "mean": float(mean[l, u]),
                "std": float(std[l, u]),
                "share_top_k": float(top_counts[l, u] / len(good)),
            }
        )
    clean_nan = lambda a: np.where(np.isfinite(a), a, None).tolist()  # noqa: E731
    return LocateResult(
        model=model,
        setup=setup,
        method=method,
        site=site,
        positions=positions,
        n_layers=n_layers,
        n_heads=len(units),
        items=rows,
        mean=clean_nan(mean),
        std=clean_nan(std),
        n=len(good),
        ranking=ranking,
        top_k=top_k,
        attribution_mean=clean_nan(att_mean) if att_mean is not None else None,
        seconds=seconds,
        meta=meta,
    )


def locate(
    model,
    items: Sequence[TwoHopItem],
    setup: str = "guide",
    pool: Sequence[TwoHopItem] | None = None,
    form: str = DEFAULT_FORM,
    **kw,
) -> LocateResult:
    """Build the pairs of a setup ('guide': failing composed ← guide; 'template': correct ← other subject) and patch.
    `form`: the prompt form of every prompt (see `patchlab.core.forms`)."""
    items = render_items(model, items, form)
    pool = render_items(model, pool, form) if pool is not None else None
    if setup == "guide":
        pairs = guide_pairs(model, items)
        kw.setdefault("positions", "last")
    elif setup == "template":
        pairs = template_pairs(model, items, pool)
    else:
        raise PatchlabError(f"setup must be 'guide' or 'template', got '{setup}'", param="setup")
    result = locate_pairs(model, pairs, **kw)
    result.meta["form"] = form
    return result


def heads_from(path, model, top: int) -> HeadSet:
    """The best `top` heads of a saved locate result, refusing a result made on another model."""
    result = LocateResult.from_json(path)
    if result.model != model_name(model) or (result.n_layers, result.n_heads) != (
        model.cfg.n_layers,
        model.cfg.n_heads,
    ):
        raise PatchlabError(
            f"result was made on '{result.model}' ({result.n_layers}x{result.n_heads}), not on '{model_name(model)}'",
            param="heads_from",
            where=str(path),
        )
    return HeadSet(result.heads(top), model.cfg.n_layers, model.cfg.n_heads, arg="heads_from")


def _shard_pairs(model, config: dict, items: list[dict], pool: list[dict]) -> list[PatchPair]:
    form = config.get("form", DEFAULT_FORM)  # absent in runs made before forms: plain
    its = render_items(model, [TwoHopItem.from_dict(d, where=f"item {d.get('id')}") for d in items], form)
    if config["setup"] == "guide":
        pairs = guide_pairs(model, its)
    else:
        pairs = template_pairs(model, its, render_items(model, [TwoHopItem.from_dict(d) for d in pool], form))
    check_pairs(pairs, config["positions"], allow_empty=True)  # a shard may hold no pair (no template partner)
    return pairs


@shard_task("screen")
def screen_shard(model, config: dict, items: list[dict], pool: list[dict]) -> list[dict]:
    """One shard of a sharded locate's attribution screen."""
    return screen_rows(
        model,
        _shard_pairs(model, config, items, pool),
        config["site"],
        config["positions"],
        progress=False,
        screen=config.get("screen", "atp"),
    )


@shard_task("verify")
def verify_shard(model, config: dict, items: list[dict], pool: list[dict]) -> list[dict]:
    """One shard of a sharded locate's exact patching (of every head, or of the screened ones)."""
    heads = None if config["heads"] is None else {int(l): units for l, units in config["heads"]}
    return verify_rows(
        model, _shard_pairs(model, config, items, pool), config["site"], config["positions"], heads, progress=False
    )
