"""Logit lens and the bridge-entity intervention.

The lens reads the residual stream entering every block (`blocks.L.hook_resid_pre`) and the final
`resid_post`, applies the model's own final norm and unembedding, and records the rank (1 = top) and
probability of tracked tokens — the bridge entity's and the answer's first tokens — at the last
position. At the final layer it is the model's own output distribution.

The intervention removes, at one layer and the last position, the residual direction that the lens
reads as the bridge token (the unembedding column scaled by the final norm's gain, so the lens logit
of the bridge becomes exactly zero) and measures the answer's probability; the control removes the
direction of a random token of similar frequency (a nearby id in the BPE merge order).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.progress import track
from patchlab.core.prompts import TwoHopItem
from patchlab.results.base import Result
from patchlab.runtime import sites
from patchlab.runtime.bridge import model_name
from patchlab.runtime.identity import provenance
from patchlab.runtime.scoring import DEFAULT_BATCH, answer_token_id, encode, length_batches, pad_id, pad_right
from patchlab.runtime.trace import trace

TOP10 = 10


def layer_labels(model) -> list[str]:
    """One label per lens layer: the input of each block, then the final residual stream."""
    return [f"L{l}" for l in range(model.cfg.n_layers)] + ["final"]


def resid_hook_names(model) -> list[str]:
    return sites.lens_sites(model.cfg.n_layers)


def lens_logits(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Final norm then unembedding, exactly as the model maps its last residual stream to logits."""
    return model.unembed(model.ln_final(resid))


def capture_resid(
    model, tokens: Tensor, lengths: Tensor, positions: str = "last"
) -> tuple[Tensor, Float[Tensor, "layer b pos d"]]:
    """Run a right-padded batch; return the logits and every lens layer's residual stream.

    With positions="last" only each row's last real position is kept (shape [layer, b, 1, d]).
    """
    names = resid_hook_names(model)
    t = trace(model, tokens, names, at=positions, lengths=lengths)
    resid = torch.stack([t[n][:, None] if positions == "last" else t[n] for n in names])
    return t.logits, resid


def rank_and_prob(logits: Float[Tensor, "... vocab"], token: Tensor) -> tuple[Tensor, Tensor]:
    """1-based rank (ties count against the token) and probability of `token` under `logits`."""
    target = logits.gather(-1, token[..., None])
    rank = (logits > target).sum(-1) + 1
    prob = torch.softmax(logits.float(), -1).gather(-1, token[..., None])[..., 0]
    return rank, prob


@dataclass
class LensResult(Result):
    """Per-prompt, per-layer ranks and probabilities of tracked tokens, grouped by outcome."""

    kind = "lens"
    heading = "Logit lens"
    intro = (
        "Each layer's residual stream at the last position, read through the final norm and the unembedding: "
        "the rank of the bridge entity's and the answer's first token, for composed questions the model "
        "answers right vs wrong."
    )
    order = 20
    model: str
    layers: list[str]
    items: list[dict[str, Any]]  # id, group, tokens {track: token text}, flagged (+ flag_reason)
    ranks: dict[str, list[list[int]]]  # track -> [item][layer]; None for a flagged item (NaN / inf lens logits)
    probs: dict[str, list[list[float]]]
    summary: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    first_top10: dict[str, dict[str, int | None]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self):
        from patchlab.results import tables

        return tables.lens_table(self)

    def figure(self):
        from patchlab.results.figures import lens_figure

        return lens_figure(self)


def _group_stats(ranks: np.ndarray, probs: np.ndarray) -> dict[str, list[float]]:
    """Per-layer aggregates over items: geometric-mean rank with quartiles, mean and std probability."""
    logr = np.log(ranks)
    return {
        "geo_rank": np.exp(logr.mean(0)).tolist(),
        "rank_q25": np.quantile(ranks, 0.25, axis=0).tolist(),
        "rank_q75": np.quantile(ranks, 0.75, axis=0).tolist(),
        "mean_prob": probs.mean(0).tolist(),
        "std_prob": probs.std(0).tolist(),
        "n": [int(ranks.shape[0])] * ranks.shape[1],
    }


def summarize_lens(result: LensResult) -> None:
    """Fill `summary` and `first_top10` (first layer whose geometric-mean rank is <= 10) per group and track."""
    kept = [it for it in result.items if not it.get("flagged")]
    if not kept and result.items:
        first = result.items[0]
        raise PatchlabError(
            f"every item was flagged (item {first['id']}: {first.get('flag_reason')}): nothing to aggregate"
        )
    groups = sorted({it["group"] for it in kept})
    for g in groups:
        rows = [i for i, it in enumerate(result.items) if it["group"] == g and not it.get("flagged")]
        result.summary[g] = {}
        result.first_top10[g] = {}
        for t in result.ranks:
            stats = _group_stats(
                np.array([result.ranks[t][i] for i in rows], dtype=float),
                np.array([result.probs[t][i] for i in rows], dtype=float),
            )
            result.summary[g][t] = stats
            hit = [l for l, r in enumerate(stats["geo_rank"]) if r <= TOP10]
            result.first_top10[g][t] = hit[0] if hit else None


def logit_lens(
    model,
    prompts: Sequence[str],
    tracks: dict[str, Sequence[int]],
    ids: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
) -> LensResult:
    """Rank and probability of each tracked token (per prompt) at every layer, last position."""
    n = len(prompts)
    for name, toks in tracks.items():
        if len(toks) != n:
            raise PatchlabError(f"track '{name}' has {len(toks)} tokens for {n} prompts")
    seqs = [encode(model, p, where=f"item {ids[i]!r}" if ids else f"prompt[{i}]") for i, p in enumerate(prompts)]
    n_layers = model.cfg.n_layers + 1
    ranks = {t: np.zeros((n, n_layers), dtype=np.int64) for t in tracks}
    probs = {t: np.zeros((n, n_layers)) for t in tracks}
    bad = np.zeros(n, dtype=bool)
    batches = list(length_batches([len(s) for s in seqs], batch_size))
    with torch.inference_mode():
        for rows in track(batches, "logit lens" if progress else None):
            tokens, lengths = pad_right([seqs[i] for i in rows], pad_id(model))
            _, resid = capture_resid(model, tokens.to(model.cfg.device), lengths)
            logits = lens_logits(model, resid[:, :, 0]).float().cpu()  # [layer, b, vocab]
            bad[rows] = (~torch.isfinite(logits).all(-1)).any(0).numpy()  # a NaN / inf anywhere in the item's lens
            for t, toks in tracks.items():
                tok = torch.tensor([toks[i] for i in rows])[None].expand(n_layers, -1)
                r, p = rank_and_prob(logits, tok)
                ranks[t][rows] = r.T.numpy()
                probs[t][rows] = p.T.numpy()
    names = {t: [model.tokenizer.decode([x]) for x in toks] for t, toks in tracks.items()}
    items = [
        {
            "id": ids[i] if ids else str(i),
            "group": groups[i] if groups else "all",
            "prompt": prompts[i],
            "tokens": {t: names[t][i] for t in tracks},
            "flagged": bool(bad[i]),
            **({"flag_reason": "non-finite lens logits (NaN or inf in the residual stream)"} if bad[i] else {}),
        }
        for i in range(n)
    ]

    def rows_of(v: np.ndarray) -> list:  # a flagged item's row is None throughout, never a made-up rank
        return [[None] * n_layers if bad[i] else row for i, row in enumerate(v.tolist())]

    result = LensResult(
        model=model_name(model),
        layers=layer_labels(model),
        items=items,
        ranks={t: rows_of(v) for t, v in ranks.items()},
        probs={t: rows_of(v) for t, v in probs.items()},
        meta=provenance(model, position="last", tracks=list(tracks)),
    )
    summarize_lens(result)
    return result


def outcome_groups(items: Sequence[TwoHopItem], gap) -> list[str]:
    """'correct' (composed right), 'failed' (both hops right, composed wrong) or 'other', from a GapResult."""
    rows = {r["id"]: r for r in gap.items}
    out = []
    for it in items:
        r = rows.get(it.id)
        if r is None:
            raise PatchlabError(f"item '{it.id}' is not in the gap result")
        out.append("correct" if r["composed"] else "failed" if r["hop1"] and r["hop2"] else "other")
    return out


def lens_items(model, items: Sequence[TwoHopItem], gap=None, extra: Sequence[str] = (), **kw) -> LensResult:
    """The logit lens on composed queries, tracking bridge and answer (and `extra` words), grouped by outcome."""
    tracks: dict[str, list[int]] = {
        "bridge": [answer_token_id(model, it.bridge, where=f"{it.id}: bridge") for it in items],
        "answer": [answer_token_id(model, it.answer, where=f"{it.id}: answer") for it in items],
    }
    for word in extra:
        tracks[word] = [answer_token_id(model, word, param="track", where=f"{word}")] * len(items)
    groups = outcome_groups(items, gap) if gap is not None else None
    return logit_lens(model, [it.composed for it in items], tracks, ids=[it.id for it in items], groups=groups, **kw)


# --- one prompt, every position -------------------------------------------------------------


@dataclass
class TopTokensResult(Result):
    """Top-k lens tokens at every layer and position of one prompt, plus tracked tokens' ranks."""

    kind = "lens-topk"
    model: str
    prompt: str
    layers: list[str]
    positions: list[str]  # the prompt's tokens
    top_tokens: list[list[list[str]]]  # [layer][pos][k]
    top_probs: list[list[list[float]]]
    tracked: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)  # word -> rank/prob [layer][pos]
    meta: dict[str, Any] = field(default_factory=dict)

    def figure(self):
        from patchlab.results.figures import topk_figure

        return topk_figure(self)


def top_tokens(model, prompt: str, k: int = 5, track_words: Sequence[str] = ()) -> TopTokensResult:
    """The lens's top-k tokens at every layer × position of one prompt (and ranks of `track_words`)."""
    if k < 1:
        raise PatchlabError(f"k must be >= 1, got {k}", param="top_k")
    ids = encode(model, prompt)
    tokens, lengths = pad_right([ids], 0)
    with torch.inference_mode():
        _, resid = capture_resid(model, tokens.to(model.cfg.device), lengths, positions="all")
        logits = lens_logits(model, resid[:, 0]).float().cpu()  # [layer, pos, vocab]
    probs = torch.softmax(logits, -1)
    top_p, top_i = probs.topk(k, dim=-1)
    decode = model.tokenizer.decode
    tracked = {}
    for word in track_words:
        tok = torch.full(logits.shape[:2], answer_token_id(model, word, param="track", where=f"{word}"))
        r, p = rank_and_prob(logits, tok)
        tracked[word] = {"rank": r.tolist(), "prob": p.tolist()}
    return TopTokensResult(
        model=model_name(model),
        prompt=prompt,
        layers=layer_labels(model),
        positions=[decode([t]) for t in ids],
        top_tokens=[[[decode([t]) for t in pos] for pos in layer] for layer in top_i.tolist()],
        top_probs=top_p.tolist(),
        tracked=tracked,
        meta=provenance(model, k=k),
    )


# --- bridge-entity intervention ---------------------------------------------------------------


def readout_direction(model, token: int) -> Float[Tensor, " d_model"]:
    """Unit residual direction whose removal zeroes the lens logit of `token` against the vocabulary's mean.

    The direction is the final norm's gain times the token's unembedding column minus the mean column.

    The final norm's per-feature gain g is read off the norm itself: for a zero-mean ±1 vector x,
    (norm(x) − norm(−x)) / 2x = g, for RMSNorm, Gemma's (1 + w) RMSNorm and LayerNorm alike.
    """
    d = model.cfg.d_model
    x = torch.ones(d, device=model.cfg.device, dtype=model.cfg.dtype)
    x[1::2] = -1
    with torch.inference_mode():
        gain = ((model.ln_final(x[None, None]) - model.ln_final(-x[None, None]))[0, 0] / (2 * x)).float()
        w_u = model.W_U.float()
        # subtract the unembedding's mean column: every token shares it, so removing it is not token-specific
        direction = gain * (w_u[:, token] - w_u.mean(1))
        direction = direction - direction.mean() if "LayerNorm" in type(model.ln_final).__name__ else direction
    return direction / direction.norm()


def control_tokens(
    model, token: int, n: int, rng: random.Random, avoid: Sequence[int] = (), window: int = 200
) -> list[int]:
    """`n` random word-start tokens with ids near `token` (similar BPE frequency rank), none in `avoid`."""
    vocab = model.cfg.d_vocab
    lo, hi = max(0, token - window), min(vocab, token + window)
    pool = [t for t in range(lo, hi) if t != token and t not in avoid and _is_word_token(model, t)]
    if len(pool) < n:
        raise PatchlabError(f"not enough control tokens near token {token}")
    return rng.sample(pool, n)


def _is_word_token(model, t: int) -> bool:
    text = model.tokenizer.decode([t])
    return len(text) > 2 and text[0] == " " and text[1:].isalpha()


@dataclass
class InterventionResult(Result):
    """Per layer: change of the answer's probability when the bridge (or a control) direction is removed."""

    kind = "bridge-intervention"
    heading = "Bridge-entity intervention"
    intro = (
        "Removing the bridge entity's unembedding direction from the residual stream at one layer: how much "
        "the answer's probability drops, beside control tokens."
    )
    order = 30
    model: str
    layers: list[int]
    ids: list[str]
    base_prob: list[float]  # per item, no intervention
    bridge_delta: list[list[float]]  # [layer][item] p(answer | bridge removed) - p(answer)
    control_delta: list[list[float]]  # [layer][item] mean over the item's control tokens
    summary: dict[str, list[float]] = field(default_factory=dict)  # over the unflagged items
    meta: dict[str, Any] = field(default_factory=dict)
    flagged: list[dict[str, str]] = field(default_factory=list)  # {id, reason}: NaN / inf met; None in its rows

    def table(self):
        from patchlab.results import tables

        return tables.intervention_table(self)

    def figure(self):
        from patchlab.results.figures import intervention_figure

        return intervention_figure(self)


def _orthogonal_to(direction: Tensor, other: Tensor) -> Tensor:
    """The unit part of `direction` orthogonal to unit `other`: removing it leaves the answer's readout alone."""
    d = direction - (direction @ other) * other
    return d / d.norm()


def _project_out_hook(directions: Tensor, last: Tensor):
    """A hook that removes row i's unit direction from the residual at row i's last position."""
    rows = torch.arange(directions.shape[0])

    def hook(act: Tensor, hook) -> Tensor:
        h = act[rows, last]
        d = directions.to(act.dtype)
        act[rows, last] = h - (h * d).sum(-1, keepdim=True) * d
        return act

    return hook


def bridge_intervention(
    model,
    items: Sequence[TwoHopItem],
    layers: Sequence[int] | None = None,
    n_controls: int = 3,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    orthogonal: bool = False,
) -> InterventionResult:
    """Remove the bridge's readout direction at each layer (last position of the composed query).

    The bridge and answer unembeddings overlap, so removing the bridge also removes part of the
    answer's readout; `orthogonal=True` removes only the part of each direction orthogonal to the
    answer's, which isolates the bridge's own contribution.
    """
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    for l in layers:
        if not 0 <= l < n_layers:
            raise PatchlabError(f"layer {l} out of range 0..{n_layers - 1}", param="layers")
    if n_controls < 1:
        raise PatchlabError(f"need at least one control token, got {n_controls}", param="controls")
    rng = random.Random(seed)
    answer = [answer_token_id(model, it.answer, where=f"{it.id}: answer") for it in items]
    bridge = [answer_token_id(model, it.bridge, where=f"{it.id}: bridge") for it in items]
    variants = [[b, *control_tokens(model, b, n_controls, rng, avoid=(a,))] for a, b in zip(answer, bridge)]
    seqs = [encode(model, it.composed, where=it.id) for it in items]
    # rows = (item, variant) pairs, variant 0 = the bridge
    row_item = [i for i in range(len(items)) for _ in range(n_controls + 1)]

    def direction(t: int, i: int) -> Tensor:
        d = readout_direction(model, t)
        return _orthogonal_to(d, readout_direction(model, answer[i])) if orthogonal else d

    row_dir = torch.stack([direction(t, i) for i, v in enumerate(variants) for t in v])
    base = torch.zeros(len(items))
    deltas = torch.zeros(len(layers), len(row_item))
    batches = list(length_batches([len(seqs[i]) for i in row_item], batch_size))
    pad = pad_id(model)
    device = model.cfg.device
    with torch.inference_mode():
        for rows in batches:
            tokens, lengths = pad_right([seqs[row_item[r]] for r in rows], pad)
            probs = torch.softmax(model(tokens.to(device))[torch.arange(len(rows)), lengths - 1].float(), -1)
            for j, r in enumerate(rows):
                base[row_item[r]] = probs[j, answer[row_item[r]]]
        for li, l in enumerate(track(layers, "bridge intervention" if progress else None)):
            for rows in batches:
                tokens, lengths = pad_right([seqs[row_item[r]] for r in rows], pad)
                hook = _project_out_hook(row_dir[rows].to(device), (lengths - 1).to(device))
                logits = trace(model, tokens, patch=[(sites.resid_pre(l), hook)]).logits
                probs = torch.softmax(logits[torch.arange(len(rows)), lengths - 1].float(), -1)
                for j, r in enumerate(rows):
                    deltas[li, r] = probs[j, answer[row_item[r]]] - base[row_item[r]]
    per = deltas.view(len(layers), len(items), n_controls + 1)
    bridge_d, control_d = per[:, :, 0], per[:, :, 1:].mean(-1)
    ok = torch.isfinite(base) & torch.isfinite(per).all(-1).all(0)  # [item]: no NaN / inf met
    reason = "non-finite probabilities (NaN or inf in the model's output)"
    if items and not ok.any():
        raise PatchlabError(f"every item was flagged (item {items[0].id}: {reason}): nothing to aggregate")
    b_ok, c_ok, n = bridge_d[:, ok], control_d[:, ok], int(ok.sum())
    summary = {
        "bridge_mean": b_ok.mean(1).tolist(),
        "bridge_sem": (b_ok.std(1) / math.sqrt(n)).tolist() if n > 1 else [0.0] * len(layers),
        "control_mean": c_ok.mean(1).tolist(),
        "control_sem": (c_ok.std(1) / math.sqrt(n)).tolist() if n > 1 else [0.0] * len(layers),
    }
    keep = ok.tolist()

    def masked(rows: list) -> list:
        return [[v if keep[i] else None for i, v in enumerate(row)] for row in rows]

    return InterventionResult(
        model=model_name(model),
        layers=layers,
        ids=[it.id for it in items],
        base_prob=[v if keep[i] else None for i, v in enumerate(base.tolist())],
        bridge_delta=masked(bridge_d.tolist()),
        control_delta=masked(control_d.tolist()),
        summary=summary,
        flagged=[{"id": it.id, "reason": reason} for it, k in zip(items, keep) if not k],
        meta=provenance(
            model,
            seed=seed,
            n_controls=n_controls,
            position="last",
            site="hook_resid_pre",
            orthogonal=orthogonal,
            controls=[v[1:] for v in variants],
        ),
    )
