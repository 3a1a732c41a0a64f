"""CARMA regularisers (Aljaafari, Carvalho, Freitas 2025): word-level InfoNCE (L_MI) and layer stability (L_stab).

    L = (1 - lam) * L_task + lam * (gamma * L_MI + eta * L_stab)

Unlike the released reference code, word spans are per example (they never leak across a batch),
padding positions never enter the negatives nor the stability term, and lam = 1 is allowed (the
task loss is then ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from patchlab.core.errors import PatchlabError

EPS = 1e-8  # keeps the stability denominator (and cosine norms) away from zero
_NOT_CANDIDATE = 2.0  # sort key for non-candidate negatives: above every uniform [0, 1) key


def _fail(message: str) -> PatchlabError:
    """A one-line carma error."""
    return PatchlabError(f"carma: {message}")


def _check_weight(name: str, value: object) -> None:
    """Weights must be finite real numbers >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _fail(f"{name} must be a finite number >= 0, got {value!r}")


def _check_range(name: str, value: object, min_width: int) -> tuple[int, int] | None:
    """A layer range is None or (lo, hi) with 0 <= lo and hi - lo >= min_width."""
    if value is None:
        return None
    try:
        lo, hi = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise _fail(f"{name} must be None or a (start, stop) pair, got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi)) or lo < 0 or hi - lo < min_width:
        raise _fail(f"{name} must be (start, stop) ints with 0 <= start and stop - start >= {min_width}, got {value!r}")
    return (lo, hi)


@dataclass(frozen=True)
class CarmaConfig:
    """Weights and knobs of the CARMA regulariser; validated on construction."""

    lam: float = 0.3  # mix between task loss (1 - lam) and regulariser (lam)
    gamma: float = 0.3  # weight of L_MI inside the regulariser
    eta: float = 0.2  # weight of L_stab inside the regulariser
    temperature: float = 0.1  # InfoNCE temperature tau
    n_negatives: int = 8  # negatives per anchor (all available ones when fewer exist)
    mi_layers: tuple[int, int] | None = None  # [start, stop) into the stacked hidden states; None = all
    stab_layers: tuple[int, int] | None = None  # likewise; needs >= 2 layers
    seed: int = 0  # seed of the negative sampler

    def __post_init__(self) -> None:
        for name in ("lam", "gamma", "eta"):
            _check_weight(name, getattr(self, name))
        if self.lam > 1:
            raise _fail(f"lam must be in [0, 1], got {self.lam!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise _fail(f"temperature must be a finite number > 0, got {t!r}")
        k = self.n_negatives
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise _fail(f"n_negatives must be an int >= 1, got {k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail(f"seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "mi_layers", _check_range("mi_layers", self.mi_layers, 1))
        object.__setattr__(self, "stab_layers", _check_range("stab_layers", self.stab_layers, 2))


# ----------------------------------------------------------------------------- word spans


def word_spans(
    offsets: Sequence[Sequence[int]] | Int[Tensor, "pos 2"],
    words_mask: Sequence[bool] | Bool[Tensor, " pos"] | None = None,
    text: str | None = None,
) -> Int[Tensor, " pos"]:
    """Per-token word id from char offsets: -1 for special/masked tokens and single-token words, else 0..k-1.

    A token starts a new word when it is the first eligible token, follows an excluded token, starts
    after the previous token's end (a gap), or (given `text`) its text begins with whitespace.
    Zero-width tokens (specials are (0, 0)) and tokens with `words_mask` False are excluded and
    break words. Adjacent punctuation ("Paris,") joins the word it touches.
    """
    pairs = offsets.tolist() if isinstance(offsets, Tensor) else [tuple(o) for o in offsets]
    keep = (
        [True] * len(pairs)
        if words_mask is None
        else [bool(m) for m in (words_mask.tolist() if isinstance(words_mask, Tensor) else words_mask)]
    )
    if len(keep) != len(pairs):
        raise _fail(f"words_mask has {len(keep)} entries for {len(pairs)} offsets")
    group, gid, prev_end = [-1] * len(pairs), -1, None
    for t, ((start, end), ok) in enumerate(zip(pairs, keep)):
        if end < start or start < 0:
            raise _fail(f"bad offset ({start}, {end}) at token {t}")
        if not ok or end == start:
            prev_end = None
            continue
        if prev_end is None or prev_end < start or (text is not None and text[start:end][:1].isspace()):
            gid += 1
        group[t], prev_end = gid, end
    return _multi_token_only(torch.tensor(group, dtype=torch.long))


def _multi_token_only(group: Int[Tensor, " pos"]) -> Int[Tensor, " pos"]:
    """Renumber groups of >= 2 tokens to 0..k-1 and set the rest to -1 (only multi-token words matter)."""
    if group.numel() == 0 or int(group.max()) < 0:
        return torch.full_like(group, -1)
    multi = torch.bincount(group[group >= 0]) >= 2
    new_id = torch.where(multi, multi.long().cumsum(0) - 1, -1)
    return torch.where(group >= 0, new_id[group.clamp_min(0)], -1)


def word_ids_for_batch(
    tokenizer, texts: Sequence[str], max_len: int | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokenize with right padding and return (input_ids, attention_mask, word_ids); word ids are per example."""
    if isinstance(texts, str) or not texts:
        raise _fail("texts must be a non-empty list of strings")
    if not getattr(tokenizer, "is_fast", False):
        raise _fail("word_ids_for_batch needs a fast tokenizer (offset mappings)")
    if tokenizer.pad_token is None:
        raise _fail("tokenizer has no pad_token; set one before batching")
    enc = tokenizer(
        list(texts),
        padding=True,
        truncation=max_len is not None,
        max_length=max_len,
        padding_side="right",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    real = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
    word_ids = torch.stack([word_spans(enc["offset_mapping"][b], real[b], text) for b, text in enumerate(texts)])
    return enc["input_ids"].long(), enc["attention_mask"].long(), word_ids


# ----------------------------------------------------------------------------- losses


def _check_shapes(hidden: Tensor, attention_mask: Tensor | None, word_ids: Tensor | None = None) -> Tensor:
    """Validate [layer batch pos d] / [batch pos] shapes and return the boolean real-token mask."""
    if hidden.ndim != 4:
        raise _fail(f"hidden must be [layer, batch, pos, d], got shape {tuple(hidden.shape)}")
    bp = tuple(hidden.shape[1:3])
    for name, t in (("attention_mask", attention_mask), ("word_ids", word_ids)):
        if t is not None and tuple(t.shape) != bp:
            raise _fail(f"{name} must be [batch, pos] = {bp}, got {tuple(t.shape)}")
    if attention_mask is None:
        return torch.ones(bp, dtype=torch.bool, device=hidden.device)
    return attention_mask.to(hidden.device).bool()


def _layer_slice(name: str, rng: tuple[int, int] | None, n_layers: int, min_width: int) -> slice:
    """Resolve a config layer range against the number of stacked layers."""
    lo, hi = rng if rng is not None else (0, n_layers)
    if hi > n_layers or hi - lo < min_width:
        raise _fail(f"{name} {rng} needs >= {min_width} of the {n_layers} stacked layers")
    return slice(lo, hi)


def _zero_padding(hidden: Float[Tensor, "layer batch pos d"], real: Bool[Tensor, "batch pos"]) -> Tensor:
    """Replace padding positions by 0 (torch.where, so even NaN/inf there has no value or grad influence)."""
    return torch.where(real[None, :, :, None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def same_word_pairs(word_ids: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch pos"]) -> Int[Tensor, "n 3"]:
    """All ordered (batch, anchor, positive) triples of distinct real tokens sharing a word id in one example."""
    w = torch.where(real, word_ids.to(real.device).long(), torch.full_like(word_ids, -1, device=real.device))
    same = (w[:, :, None] == w[:, None, :]) & (w[:, :, None] >= 0)
    same &= ~torch.eye(w.shape[1], dtype=torch.bool, device=w.device)
    return same.nonzero()


def sample_negatives(
    word_ids: Int[Tensor, "batch pos"],
    real: Bool[Tensor, "batch pos"],
    anchors: Int[Tensor, "a 2"],
    k: int,
    generator: torch.Generator,
) -> tuple[Int[Tensor, "a k"], Bool[Tensor, "a k"]]:
    """Up to k distinct negatives per (batch, pos) anchor, uniform over real positions outside its word.

    Each candidate gets a uniform random key and the k smallest keys win (sampling without
    replacement). When an anchor has <= k candidates, all of them are used exactly once
    (deterministic) and the remaining slots are marked invalid.
    """
    b, i = anchors[:, 0], anchors[:, 1]
    w = word_ids.to(real.device).long()
    cand = real[b] & (w[b] != w[b, i][:, None])  # [a, pos]
    keys = torch.rand(cand.shape, generator=generator, device=generator.device).to(cand.device)
    keys = torch.where(cand, keys, torch.full_like(keys, _NOT_CANDIDATE))
    top, idx = keys.topk(min(k, cand.shape[1]), dim=1, largest=False)
    return idx, top < _NOT_CANDIDATE


def mi_loss(
    hidden: Float[Tensor, "layer batch pos d"],
    word_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    cfg: CarmaConfig,
    generator: torch.Generator | None = None,
) -> Float[Tensor, ""]:
    """L_MI: InfoNCE over same-word token pairs, so a multi-token word's pieces share information.

    Reduction: for every ordered pair (b, i, j), i != j, of real tokens of the same multi-token word
    of example b, and every layer l in cfg.mi_layers,
        loss(l, b, i, j) = -log( e^{s_ij/tau} / (e^{s_ij/tau} + sum_{n in N(b, i)} e^{s_in/tau}) ),
    with s the cosine similarity of layer-l hidden states and N(b, i) the negatives of anchor (b, i):
    min(n_negatives, #candidates) distinct real positions of example b outside i's word, drawn
    uniformly without replacement (all candidates when there are <= n_negatives), shared by the
    anchor's positives and by all layers. The result is the plain mean over all (layer, pair)
    entries, i.e. pairs are pooled over the batch (an example weighs by its pair count) and layers
    weigh equally. Returns a zero that keeps a grad path to `hidden` when there is no pair.
    Memory: one [layer, batch, pos, pos] similarity tensor.
    """
    real = _check_shapes(hidden, attention_mask, word_ids)
    h = _zero_padding(hidden[_layer_slice("mi_layers", cfg.mi_layers, hidden.shape[0], 1)], real)
    pairs = same_word_pairs(word_ids, real)
    if pairs.shape[0] == 0:
        return h.sum() * 0.0
    if generator is None:
        generator = torch.Generator().manual_seed(cfg.seed)
    anchors, pair_anchor = torch.unique(pairs[:, :2], dim=0, return_inverse=True)
    neg, valid = sample_negatives(word_ids, real, anchors, cfg.n_negatives, generator)
    z = F.normalize(h, dim=-1, eps=EPS)
    sims = z @ z.transpose(-1, -2) / cfg.temperature  # [layer, batch, pos, pos]
    b, i, j = pairs.unbind(1)
    pos_logit = sims[:, b, i, j]  # [layer, n]
    neg_logit = sims[:, b[:, None], i[:, None], neg[pair_anchor]]  # [layer, n, k]
    neg_logit = neg_logit.masked_fill(~valid[pair_anchor], float("-inf"))
    logits = torch.cat([pos_logit[..., None], neg_logit], dim=-1)
    return (torch.logsumexp(logits, dim=-1) - pos_logit).mean()


def stab_loss(
    hidden: Float[Tensor, "layer batch pos d"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    cfg: CarmaConfig,
) -> Float[Tensor, ""]:
    """L_stab: normalised squared change between consecutive layers, so representations drift smoothly.

    For each consecutive pair (l, l+1) in cfg.stab_layers, with means over the real (non-padding)
    positions of the whole batch and over features:
        mean((h_{l+1} - h_l)^2) / (mean(h_l^2) + mean(h_{l+1}^2) + EPS),
    then the plain mean over layer pairs. Padding positions have no value or grad influence.
    """
    real = _check_shapes(hidden, attention_mask)
    h = _zero_padding(hidden[_layer_slice("stab_layers", cfg.stab_layers, hidden.shape[0], 2)], real)
    count = real.sum().clamp_min(1) * h.shape[-1]
    power = h.pow(2).sum(dim=(1, 2, 3)) / count  # [layer]
    change = (h[1:] - h[:-1]).pow(2).sum(dim=(1, 2, 3)) / count  # [layer - 1]
    return (change / (power[:-1] + power[1:] + EPS)).mean()


# ----------------------------------------------------------------------------- module


def _finite(name: str, value: Tensor) -> Tensor:
    """Raise when a loss term is NaN or infinite (fail fast instead of corrupting a training run)."""
    if not bool(torch.isfinite(value).all()):
        raise _fail(f"non-finite {name} loss")
    return value


class CarmaRegulariser(torch.nn.Module):
    """The CARMA regulariser: L_MI and L_stab from stacked hidden states, and the lam-mixed total."""

    def __init__(self, cfg: CarmaConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else CarmaConfig()
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The negative sampler, seeded once from cfg.seed and advancing across calls (fresh negatives per step)."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.cfg.seed)
        return self._generator

    def forward(
        self,
        hidden: Float[Tensor, "layer batch pos d"],
        word_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> dict[str, Tensor]:
        """Return {"mi", "stab", "reg" = gamma * mi + eta * stab}, each checked finite."""
        mi = _finite("mi", mi_loss(hidden, word_ids, attention_mask, self.cfg, self.generator(hidden.device)))
        stab = _finite("stab", stab_loss(hidden, attention_mask, self.cfg))
        reg = _finite("reg", self.cfg.gamma * mi + self.cfg.eta * stab)
        return {"mi": mi, "stab": stab, "reg": reg}

    def total(self, task_loss: Tensor | None, terms: dict[str, Tensor]) -> Tensor:
        """(1 - lam) * task_loss + lam * reg; lam = 1 ignores task_loss (may be None), lam = 0 ignores reg."""
        lam = self.cfg.lam
        if lam == 1:
            return _finite("total", terms["reg"])
        if task_loss is None:
            raise _fail(f"task_loss is required when lam < 1 (lam = {lam})")
        _finite("task", task_loss)
        if lam == 0:
            return task_loss
        return _finite("total", (1 - lam) * task_loss + lam * terms["reg"])
