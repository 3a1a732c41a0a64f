"""Attention views of located heads: where does each head look from the last position?

For a head (L, H) the attention pattern A = softmax(q kᵀ / √d_head + causal mask) is read at
`blocks.L.attn.hook_pattern` ([b, head, query, key]) through the trace primitive; its last row
a = A[H, n−1, :] (Σ_k a_k = 1) is where the head reads from when the model predicts the answer.
It is read on two prompts of each item: the failing composed query (`composed`, the subject written
in) and its guide prompt (`hop2`, the bridge written in). Over items, per outcome group (correct /
failed):

    share(span) = mean over items of Σ_{k ∈ span} a_k,    share(rest) = mean of Σ_{k ∉ span} a_k,

with span = the subject's tokens in the composed query and the bridge's tokens in the guide prompt;
the two shares of one prompt sum to 1. Spans are found on characters: the first whole-word
occurrence of the entity in the prompt, mapped to every token whose character range overlaps it (the
tokenizer's offset mapping; else offsets rebuilt by decoding growing prefixes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import TwoHopItem
from patchlab.core.spec import HeadSet
from patchlab.results.base import Result
from patchlab.runtime import sites
from patchlab.runtime.bridge import model_name
from patchlab.runtime.identity import provenance
from patchlab.runtime.scoring import encode, length_batches, pad_id, pad_right
from patchlab.runtime.trace import trace

# prompt field -> (what it is called, the entity whose tokens are the span, the item field holding it)
PROMPTS = {"composed": ("composed query", "subject"), "guide": ("guide prompt", "bridge")}
FIELD = {"composed": "composed", "guide": "hop2"}
GROUPS = ("correct", "failed", "other")
BATCH = 16


@dataclass
class HeadAttentionResult(Result):
    """Per head and item: the last position's attention over the composed query's and the guide prompt's tokens,
    and its share on the subject / bridge tokens vs the rest, averaged per outcome group."""

    kind = "head-attention"
    heading = "Attention of the located heads"
    intro = (
        "Where each head looks from the last position: its attention pattern (hook_pattern, last row) over the "
        "tokens of the composed question and of the guide prompt (bridge written in), and the share of that "
        "attention on the subject's tokens (composed) and the bridge's tokens (guide), for composed questions "
        "the model answers right vs wrong."
    )
    order = 45
    model: str
    heads: list[str]
    # id, kind, group, subject, bridge, and per prompt ("composed" / "guide"): tokens, span [start, stop) or
    # None, pattern [head][key position] (the last row), share {"subject"/"bridge": [head], "rest": [head]}
    items: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> n, per prompt {span: [head]}
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self):
        from patchlab.results import tables

        return tables.head_attention_table(self)

    def figure(self):
        from patchlab.results.figures import head_attention_figure

        return head_attention_figure(self)


# --- tokens and character spans --------------------------------------------------------------------


def char_span(text: str, part: str) -> tuple[int, int] | None:
    """[start, stop) of the first whole-word occurrence of `part` in `text` (else any occurrence, else one
    ignoring case); None when `part` is not in `text`."""
    bounded = re.compile(r"(?<!\w)" + re.escape(part) + r"(?!\w)")
    for pattern in (bounded, re.compile(re.escape(part)), re.compile(re.escape(part), re.IGNORECASE)):
        m = pattern.search(text)
        if m:
            return m.start(), m.end()
    return None


def token_offsets(model, prompt: str, ids: Sequence[int], where: str = "prompt") -> list[tuple[int, int]]:
    """The character range [start, stop) of each of `ids` (the prompt's tokens as the model reads them) in
    `prompt`; special tokens the model adds (BOS) get (0, 0)."""
    tok = model.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        plain = list(enc["input_ids"])
        extra = len(ids) - len(plain)
        if extra >= 0 and list(ids[extra:]) == plain:
            return [(0, 0)] * extra + [tuple(o) for o in enc["offset_mapping"]]
    # no offset mapping (or another tokenization): each token ends where the decoded prefix ending in it ends
    ends = [len(tok.decode(list(ids[: k + 1]), skip_special_tokens=True)) for k in range(len(ids))]
    if tok.decode(list(ids), skip_special_tokens=True) != prompt:
        raise PatchlabError(
            "cannot map the prompt's tokens to its characters (decoding does not give it back)", where=where
        )
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends))


def token_span(offsets: Sequence[tuple[int, int]], chars: tuple[int, int] | None) -> tuple[int, int] | None:
    """[first, last + 1) of the tokens whose (non-empty) character range overlaps `chars`."""
    if chars is None:
        return None
    hit = [i for i, (s, e) in enumerate(offsets) if e > s and s < chars[1] and e > chars[0]]
    return (hit[0], hit[-1] + 1) if hit else None


# --- patterns ---------------------------------------------------------------------------------------


def last_rows(model, seqs: Sequence[Sequence[int]], heads: HeadSet, batch_size: int = BATCH) -> list[np.ndarray]:
    """Per prompt: [n heads, n tokens], the attention of each head from the prompt's last token (the last
    row of `hook_pattern`), read through the trace primitive on right-padded batches."""
    names = [sites.pattern(l) for l in heads.layers]
    out: list[np.ndarray | None] = [None] * len(seqs)
    with torch.inference_mode():
        for rows in length_batches([len(s) for s in seqs], batch_size):
            tokens, lengths = pad_right([seqs[i] for i in rows], pad_id(model))
            t = trace(model, tokens, names, to_cpu=True)
            for j, i in enumerate(rows):
                n = int(lengths[j])
                out[i] = np.stack([t[sites.pattern(h.layer)][j, h.head, n - 1, :n].double().numpy() for h in heads])
    return out  # type: ignore[return-value]


def _shares(rows: np.ndarray, span: tuple[int, int] | None, name: str) -> dict[str, list[float] | None]:
    """Σ of each head's row over the span and over the rest (None for both when the entity was not found)."""
    if span is None:
        return {name: None, "rest": None}
    inside = rows[:, span[0] : span[1]].sum(1)
    rest = rows.sum(1) - inside
    return {name: inside.tolist(), "rest": rest.tolist()}


def summarize_heads(result: HeadAttentionResult) -> None:
    """Fill `summary`: per outcome group, the number of items and the mean shares per prompt and head
    (over the items whose span was found; `n_found` says how many)."""
    result.summary = {}
    for group in [g for g in GROUPS if any(it["group"] == g for it in result.items)]:
        members = [it for it in result.items if it["group"] == group]
        entry: dict[str, Any] = {"n": len(members)}
        for prompt, (_, entity) in PROMPTS.items():
            found = [it[prompt]["share"] for it in members if it[prompt]["share"][entity] is not None]
            entry[prompt] = {
                "n_found": len(found),
                **{
                    key: np.mean([s[key] for s in found], axis=0).tolist() if found else None
                    for key in (entity, "rest")
                },
            }
        result.summary[group] = entry


def outcome_of(items: Sequence[TwoHopItem], gap) -> list[str]:
    """'correct' / 'failed' / 'other' per item, from a GapResult (see `patchlab.methods.lens.outcome_groups`)."""
    from patchlab.methods.lens import outcome_groups

    return outcome_groups(items, gap)


def attention_view(
    model,
    items: Sequence[TwoHopItem],
    heads: str | HeadSet,
    gap=None,
    batch_size: int = BATCH,
    progress: bool = True,
) -> HeadAttentionResult:
    """The attention of `heads` (e.g. "23.4,23.5" or a `HeadSet`) from the last position of each item's
    composed query and guide prompt, with the subject / bridge shares per outcome group.

    Outcomes come from `gap` (a `GapResult` holding every item); without one the items are scored now
    (`evaluate_gap`)."""
    items = list(items)
    if not items:
        raise PatchlabError("no items to look at", param="items")
    if batch_size < 1:
        raise PatchlabError(f"must be >= 1, got {batch_size}", param="batch_size")
    parsed = heads if isinstance(heads, HeadSet) else HeadSet.parse(str(heads))
    heads = HeadSet(parsed, model.cfg.n_layers, model.cfg.n_heads)
    if not heads:
        raise PatchlabError("no heads given (expected e.g. 14.3,17.9)", param="heads")
    if gap is None:
        from patchlab.methods.gap import evaluate_gap

        gap = evaluate_gap(model, items, progress=progress)
    groups = outcome_of(items, gap)
    decode = model.tokenizer.decode
    rows = []
    for prompt, (_, entity) in PROMPTS.items():
        texts = [getattr(it, FIELD[prompt]) for it in items]
        seqs = [encode(model, t, where=f"{it.id}: {FIELD[prompt]}") for it, t in zip(items, texts)]
        patterns = last_rows(model, seqs, heads, batch_size)
        for i, (it, text, ids, rows_i) in enumerate(zip(items, texts, seqs, patterns)):
            if prompt == "composed":
                rows.append(
                    {"id": it.id, "kind": it.kind, "group": groups[i], "subject": it.subject, "bridge": it.bridge}
                )
            offsets = token_offsets(model, text, ids, where=f"{it.id}: {FIELD[prompt]}")
            span = token_span(offsets, char_span(text, getattr(it, entity)))
            rows[i][prompt] = {
                "tokens": [decode([t]) for t in ids],
                "span": list(span) if span else None,
                "pattern": rows_i.tolist(),
                "share": _shares(rows_i, span, entity),
            }
    result = HeadAttentionResult(
        model=model_name(model),
        heads=[str(h) for h in heads],
        items=rows,
        meta=provenance(model, site="hook_pattern", position="last", prompts=dict(FIELD)),
    )
    summarize_heads(result)
    return result
