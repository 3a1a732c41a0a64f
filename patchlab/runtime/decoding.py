"""Greedy decoding through a TransformerLens bridge, right past the first token, and the check that guards it.

Why this module exists. transformers 5.x hands the KV cache to each attention module as `cache=`
(the old `past_key_values=` is deprecated, to be removed in 5.40), while TransformerLens 4.3's
reconstructed attention (`AttentionBridge._update_kv_cache`) reads only `past_key_values` /
`layer_past`. The cache is then never filled: every cached decoding step attends to its own token
alone, so the first new token is right and everything after it is garbage (SmolLM2:
" Paris-------" where plain transformers says " Paris.\\n\\nThe answer is:"). The bridge's forward
itself is right, so uncached decoding is right but ~3x slower.

`adapt_cache_kwarg` puts the cache back under the name the bridge reads (a forward pre-hook on each
bridge attention module: no TransformerLens code is patched). `check_decoding` runs once per loaded
model: three tokens decoded with the cache against a full forward per step, refusing with one line
if they disagree, so a future transformers / TransformerLens pair cannot silently break scoring again.

Decoding hooks: with the cache, a forward hook sees the prompt once, then one new position per
step. Hooks that act on every position alike (ablations, steering vectors, edited weights, routed
modules) give exactly what a full forward per step gives; a hook that indexes absolute positions
needs `cache=False` (one full forward per step, the reference path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.progress import track
from patchlab.runtime import sites
from patchlab.runtime.bridge import hf_module
from patchlab.runtime.trace import Hooks, attached, prefill_from_layer, recording

CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 3


def _cache_as_past_key_values(_module, args, kwargs):
    cache = kwargs.get("cache")
    if cache is not None and kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = cache
    return args, kwargs


def adapt_cache_kwarg(model) -> int:
    """Make every bridge attention module see the KV cache that transformers passes as `cache=`.

    Idempotent; returns how many modules were adapted (0 where the model has none or already has it)."""
    if getattr(model, "_patchlab_cache_adapted", False):
        return 0
    n = 0
    for module in hf_module(model).modules():
        if hasattr(module, "_update_kv_cache"):  # TransformerLens' reconstructed attention
            module.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True)
            n += 1
    model._patchlab_cache_adapted = True
    return n


def eos_ids(model) -> set[int]:
    """Token ids that end a continuation (the generation config's, else the tokenizer's EOS)."""
    eos = getattr(getattr(hf_module(model), "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def pad_id(model) -> int:
    """The id used for padding (pad, else eos, else 0); padded positions are never read."""
    tok = model.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def cut_at_eos(tokens: Sequence[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence token."""
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if t in eos:
            break
    return out


def _left_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for j, s in enumerate(seqs):
        tokens[j, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[j, width - len(s) :] = 1
    return tokens, mask


@dataclass
class Prefixes:
    """Unedited prompt state below block `layer`, per token sequence: the residual stream entering `layer`
    and every lower block's keys / values. Captured on a pass of the unedited model (`reuse=False`), then
    reused by passes whose weights differ only from `layer` on (an edit of heads at layers ≥ `layer`): their
    prompt pass starts at `layer` (`reuse=True`). Where the model's cache has other layer kinds (sliding
    windows) or the start does not reproduce a full prompt pass (checked once per model), prompts run whole."""

    layer: int
    store: dict[tuple[int, ...], tuple[Tensor, list[Tensor], list[Tensor]]] = field(default_factory=dict)


Decided = Callable[[int, list[int]], bool]
"""`decided(row, new_tokens)`: whether a row's verdict can no longer change, so its decoding may stop."""


class _NonFinite:
    """A logits processor that records, per row and step, whether the next-token logits held a NaN / inf,
    and keeps the first step's logits (the prompt's last-position logits) when asked."""

    def __init__(self, keep_first: bool = False) -> None:
        self.steps: list[Tensor] = []
        self.first: Tensor | None = None
        self.keep_first = keep_first

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.keep_first and not self.steps:
            self.first = scores.float().cpu()
        self.steps.append((~torch.isfinite(scores).all(-1)).cpu())
        return scores

    def rows(self, new: Sequence[Sequence[int]]) -> list[bool]:
        """Whether a row's own steps (up to its last kept token) saw a non-finite logit."""
        if not self.steps:
            return [False] * len(new)
        bad = torch.stack(self.steps, 1)  # [row, step]
        return [bool(bad[j, : max(1, len(t))].any()) for j, t in enumerate(new)]


def _generate_cached(
    model,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    nonfinite: list[bool] | None = None,
    first: list[Tensor] | None = None,
    decided: Decided | None = None,
    prefixes: Prefixes | None = None,
    reuse: bool = False,
) -> list[list[int]]:
    """One batch through Hugging Face's `generate` on the bridge's module: left padding, mask, KV cache.
    `nonfinite` (if given) gets, per row, whether a step it kept saw NaN / inf logits; `first` the logits of
    the first step (each prompt's last position). Rows that may stop early (`decided`) and prompt state kept
    across passes (`prefixes`) go to `_generate_pruned`."""
    from transformers import GenerationConfig, LogitsProcessorList

    if decided is not None or prefixes is not None:
        return _generate_pruned(model, seqs, max_new_tokens, nonfinite, first, decided, prefixes, reuse)

    pad = pad_id(model)
    eos = eos_ids(model)
    tokens, mask = _left_padded(seqs, pad)
    device = model.cfg.device
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos) or None, pad_token_id=pad
    )
    seen = _NonFinite(keep_first=first is not None)
    gen = hf_module(model).generate(
        input_ids=tokens.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        logits_processor=LogitsProcessorList([seen]),
    )
    new = [cut_at_eos(gen[j, tokens.shape[1] :].tolist(), eos) for j in range(len(seqs))]
    if nonfinite is not None:
        nonfinite.extend(seen.rows(new))
    if first is not None:
        first.extend(seen.first)
    return new


def _plain_layers(cache) -> bool:
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)


def _prefill(model, seqs, tokens, mask, pos, cache, prefixes: Prefixes | None, reuse: bool) -> Tensor:
    """The prompts' last-position logits, filling `cache`: a whole pass (recording the prefixes when asked to
    capture), or, reusing stored prefixes, a pass from `prefixes.layer` with the lower slots filled."""
    hf = hf_module(model)
    keys = [tuple(s) for s in seqs]
    if prefixes is not None and reuse and _plain_layers(cache) and all(k in prefixes.store for k in keys):
        if _start_ok(model, seqs, tokens, mask, pos, prefixes):
            return _prefill_reused(model, keys, mask, pos, cache, prefixes)
    if prefixes is None or reuse or not _plain_layers(cache):
        return hf(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=1).logits[:, -1]  # fmt: skip
    site = sites.resid_pre(prefixes.layer)
    with recording(model, [site]) as acts:
        logits = hf(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1]  # fmt: skip
    width = tokens.shape[1]
    for r, k in enumerate(keys):
        start = width - len(k)
        prefixes.store[k] = (
            acts[site][r, start:].clone(),
            [cache.layers[l].keys[r, :, start:].clone() for l in range(prefixes.layer)],
            [cache.layers[l].values[r, :, start:].clone() for l in range(prefixes.layer)],
        )
    return logits


def _prefill_reused(model, keys, mask, pos, cache, prefixes: Prefixes) -> Tensor:
    """A prompt pass from `prefixes.layer`: the stored residual streams, left-padded, enter that block and the
    stored keys / values fill the lower blocks' cache slots (padding: zeros, masked like any padding)."""
    width = mask.shape[1]
    first = prefixes.store[keys[0]]
    resid = first[0].new_zeros(len(keys), width, first[0].shape[-1])
    low_k = [k.new_zeros(len(keys), k.shape[0], width, k.shape[-1]) for k in first[1]]
    low_v = [v.new_zeros(len(keys), v.shape[0], width, v.shape[-1]) for v in first[2]]
    for r, key in enumerate(keys):
        res, ks, vs = prefixes.store[key]
        start = width - len(key)
        resid[r, start:] = res
        for l in range(prefixes.layer):
            low_k[l][r, :, start:], low_v[l][r, :, start:] = ks[l], vs[l]
    logits = prefill_from_layer(model, resid, prefixes.layer, mask, pos, cache)
    for l in range(prefixes.layer):
        cache.layers[l].update(low_k[l], low_v[l])
    return logits


def _start_ok(model, seqs, tokens, mask, pos, prefixes: Prefixes, atol: float = 1e-4) -> bool:
    """Does a pass from the stored prefixes give the whole pass's logits and cache on this model? Checked
    once per model, on the first batch that asks (its weights may be edited: both passes see the same)."""
    from transformers import DynamicCache

    ok = getattr(model, "_patchlab_start_ok", None)
    if ok is None:
        hf = hf_module(model)
        full_cache, start_cache = DynamicCache(config=hf.config), DynamicCache(config=hf.config)
        full = hf(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=full_cache,
                  use_cache=True, logits_to_keep=1).logits[:, -1]  # fmt: skip
        got = _prefill_reused(model, [tuple(s) for s in seqs], mask, pos, start_cache, prefixes)
        real = mask.bool()[:, None, :, None]
        same_kv = all(
            (torch.where(real, a.keys - b.keys, 0).abs().max() <= atol).item()
            for a, b in zip(full_cache.layers, start_cache.layers)
        )
        ok = bool(torch.isfinite(full).all()) and (got - full).abs().max().item() <= atol and same_kv
        model._patchlab_start_ok = ok
    return ok


def _greedy_step(logits: Tensor, live: list[int], new: list[list[int]], bad: list[bool], eos: set[int],
                 decided: Decided | None) -> list[int]:  # fmt: skip
    """One greedy step for the `live` rows (their last-position `logits`): append each row's token to `new`,
    note non-finite logits in `bad`; the indices into `live` of the rows still open (no EOS, not decided)."""
    finite = torch.isfinite(logits).all(-1).tolist()
    keep = []
    for j, (i, t) in enumerate(zip(live, logits.argmax(-1).tolist())):
        new[i].append(int(t))
        bad[i] = bad[i] or not finite[j]
        if t not in eos and not (decided and decided(i, new[i])):
            keep.append(j)
    return keep


def _generate_pruned(
    model,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    nonfinite: list[bool] | None = None,
    first: list[Tensor] | None = None,
    decided: Decided | None = None,
    prefixes: Prefixes | None = None,
    reuse: bool = False,
) -> list[list[int]]:
    """`_generate_cached`'s greedy decoding, written out so that finished rows leave the batch: a row that
    ends (EOS) or is `decided` is dropped from the KV cache, mask and positions, and later steps compute only
    the rows still open. Same inputs as Hugging Face's `generate` gives the model (left padding, mask,
    positions from the mask's cumulative sum, the prompt's logits read at its last position only).
    `prefixes`: capture the prompts' unedited state below a layer, or (`reuse`) start the prompt pass there."""
    from transformers import DynamicCache

    hf = hf_module(model)
    pad, eos = pad_id(model), eos_ids(model)
    tokens, mask = (t.to(model.cfg.device) for t in _left_padded(seqs, pad))
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=hf.config)
    step_logits = _prefill(model, seqs, tokens, mask, pos, cache, prefixes, reuse)
    live = list(range(len(seqs)))
    last = pos[:, -1]
    new: list[list[int]] = [[] for _ in seqs]
    bad = [False] * len(seqs)
    for step in range(max_new_tokens):
        logits = step_logits.float()
        if step == 0 and first is not None:
            first.extend(logits.cpu())
        keep = _greedy_step(logits, live, new, bad, eos, decided)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=tokens.device)
            cache.batch_select_indices(index)
            mask, last = mask[index], last[index]
            live = [live[j] for j in keep]
        nxt = torch.tensor([new[i][-1] for i in live], device=tokens.device)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], -1)
        last = last + 1
        step_logits = hf(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                         past_key_values=cache, use_cache=True).logits[:, -1]  # fmt: skip
    if nonfinite is not None:
        nonfinite.extend(bad)
    return new


def _generate_uncached(
    model,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    nonfinite: list[bool] | None = None,
    first: list[Tensor] | None = None,
    decided: Decided | None = None,
) -> list[list[int]]:
    """The reference: one full bridge forward per new token (right padding, each row read at its own end)."""
    eos = eos_ids(model)
    pad = pad_id(model)
    new: list[list[int]] = [[] for _ in seqs]
    live = list(range(len(seqs)))
    bad = [False] * len(seqs)
    for step in range(max_new_tokens):
        if not live:
            break
        rows = [[*seqs[i], *new[i]] for i in live]
        tokens = torch.full((len(live), max(map(len, rows))), pad, dtype=torch.long)
        for j, row in enumerate(rows):
            tokens[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        logits = model(tokens.to(model.cfg.device))
        ends = torch.tensor([len(row) - 1 for row in rows], device=logits.device)
        last = logits[torch.arange(len(live), device=logits.device), ends]
        if first is not None and step == 0:
            first.extend(last.float().cpu())
        live = [live[j] for j in _greedy_step(last, live, new, bad, eos, decided)]
    if nonfinite is not None:
        nonfinite.extend(bad)
    return new


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (stable for equal lengths)."""
    if batch_size < 1:
        raise PatchlabError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def greedy_tokens(
    model,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    fwd_hooks: Hooks = (),
    progress: str | None = None,
    cache: bool = True,
    nonfinite: list[bool] | None = None,
    first_logits: list[Tensor] | None = None,
    decided: Decided | None = None,
    prefixes: Prefixes | None = None,
    reuse: bool = False,
) -> list[list[int]]:
    """The greedy new tokens of each token sequence (cut after an end-of-sequence token), in the caller's order.
    `nonfinite` (if given) is filled with, per sequence, whether NaN / inf logits met its decoding;
    `first_logits` (if given) with each sequence's last-position logits (the first step's: no second forward
    needed for them); `decided(i, new_tokens)` (sequence i in the caller's order) lets a sequence stop as soon
    as its verdict is settled — its tokens are then cut there, which the caller must not read past; with the
    cache, rows that stop leave the batch (`_generate_pruned`). `prefixes` (cache only): record each prompt's
    unedited state below a layer, or with `reuse` start each prompt pass there (see `Prefixes`).

    Sequences are batched by length. `cache=True` decodes with the KV cache (Hugging Face's `generate`
    on the bridge's module); `cache=False` runs one full forward per new token, for hooks that index
    absolute positions. Both give the same tokens for position-wise interventions (tested).
    """
    ensure_decoding(model)
    out: list[list[int]] = [[] for _ in seqs]
    bad = [False] * len(seqs)
    firsts: list[Tensor | None] = [None] * len(seqs)
    batches = list(length_batches([len(s) for s in seqs], batch_size))
    with torch.inference_mode(), attached(model, fwd_hooks):
        for rows in track(batches, progress):
            seen: list[bool] = []
            first: list[Tensor] | None = [] if first_logits is not None else None
            here = (lambda j, toks, rows=rows: decided(rows[j], toks)) if decided else None
            batch = [seqs[i] for i in rows]
            if cache:
                new = _generate_cached(model, batch, max_new_tokens, seen, first, here, prefixes, reuse)
            else:
                new = _generate_uncached(model, batch, max_new_tokens, seen, first, here)
            for j, (i, toks, b) in enumerate(zip(rows, new, seen)):
                out[i], bad[i] = toks, b
                if first is not None:
                    firsts[i] = first[j]
    if nonfinite is not None:
        nonfinite[:] = bad
    if first_logits is not None:
        first_logits[:] = firsts
    return out


def _check_once(model) -> tuple[float, list[int], list[int]]:
    """Cached vs uncached decoding of CHECK_TOKENS tokens: (max |Δ logits| at the last step, both token lists)."""
    from transformers import GenerationConfig

    ids = model.to_tokens(CHECK_PROMPT, truncate=False)[0].tolist()
    eos = eos_ids(model)
    with torch.inference_mode():
        uncached = _generate_uncached(model, [ids], CHECK_TOKENS)[0]
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=CHECK_TOKENS,
            eos_token_id=None,
            pad_token_id=pad_id(model),
            output_logits=True,
            return_dict_in_generate=True,
        )
        gen = hf_module(model).generate(
            input_ids=torch.tensor([ids], device=model.cfg.device), generation_config=config
        )
        cached = gen.sequences[0, len(ids) :].tolist()
        step = len(cached) - 1
        ref = model(torch.tensor([ids + cached[:step]], device=model.cfg.device))[0, -1].float()
        diff = (gen.logits[step][0].float() - ref).abs().max().item()
    return diff, cut_at_eos(cached, eos), uncached


def decoding_tolerance(model) -> float:
    """How far a cached step's logits may sit from a full forward's: float32 1e-3, 16-bit 0.25."""
    dtype = getattr(model.cfg, "dtype", torch.float32)
    return 1e-3 if dtype in (torch.float32, torch.float64) else 0.25


def check_decoding(model) -> float:
    """Refuse (one line) when cached decoding through the bridge disagrees with a full forward per step.

    Cheap: CHECK_TOKENS tokens of CHECK_PROMPT, both ways. Returns the largest logit difference seen."""
    diff, cached, uncached = _check_once(model)
    tol = decoding_tolerance(model)
    if diff > tol or cached != uncached[: len(cached)]:
        from importlib.metadata import version

        raise PatchlabError(
            f"cached decoding through the TransformerBridge disagrees with a full forward per token "
            f"(last-step logits differ by {diff:.3g} > {tol:g}; tokens {cached} vs {uncached}) with "
            f"transformers {version('transformers')} and transformer-lens {version('transformer-lens')}: "
            "every greedy answer would be wrong past its first token, so patchlab refuses to score with "
            "this pair of versions; install the versions in patchlab's pyproject.toml or report it"
        )
    return diff


def ensure_decoding(model) -> None:
    """Adapt the cache keyword and check decoding once per model object (a model booted outside patchlab too)."""
    if getattr(model, "_patchlab_decoding_checked", None) is not None:
        return
    adapt_cache_kwarg(model)
    model._patchlab_decoding_checked = check_decoding(model)
