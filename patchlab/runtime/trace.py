"""The one trace primitive: every activation patchlab reads or changes passes through here.

Like ROME's `nethook.TraceDict`, but on TransformerLens hook names (`patchlab.runtime.sites`):

    with recording(model, [sites.z(14)], at="last", lengths=lengths) as acts:   # capture while anything runs
        model(tokens)
    acts[sites.z(14)]                                                              # [b, n_heads, d_head]

    t = trace(model, tokens, [sites.resid_pre(3)], patch=[(sites.z(2), hook)])    # run, capture and patch at once
    t.logits, t[sites.resid_pre(3)]

`attached` is the only place in patchlab that installs forward hooks; patch hooks (`(site, fn)` pairs,
TransformerLens' `fn(act, hook) -> act`) run before the capture of the same site, so a capture sees
the patched activation. `frozen` stops parameters from requiring gradients (gradients then reach
activations only); `run_from_layer` runs the decoder from a block's input (layers below are skipped,
self-checked against a full forward per model).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.runtime.bridge import hf_module

Hook = tuple[str, Callable]
Hooks = Sequence[Hook]
AT = ("all", "last")


@contextlib.contextmanager
def attached(model, hooks: Hooks = ()) -> Iterator[None]:
    """Attach TransformerLens forward hooks for the block; exactly those hooks are removed afterwards."""
    if not hooks:
        yield
        return
    with model.hooks(fwd_hooks=list(hooks)):
        yield


def _select(act: Tensor, at, lengths: Tensor | None) -> Tensor:
    """The part of an activation to keep: everything, each row's last real position, or one position index."""
    if at == "all":
        return act
    if at == "last":
        last = lengths - 1 if lengths is not None else torch.full((act.shape[0],), act.shape[1] - 1)
        return act[torch.arange(act.shape[0], device=act.device), last.to(act.device)]
    if isinstance(at, int):
        return act[:, at]
    raise PatchlabError(f"at must be one of {AT} or a position index, got {at!r}", param="at")


@contextlib.contextmanager
def recording(
    model,
    sites: Sequence[str],
    at: str | int = "all",
    lengths: Int[Tensor, " b"] | None = None,
    patch: Hooks = (),
    graph: bool = False,
    to_cpu: bool = False,
    retain_grad: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Record each site's activation whenever it passes inside the block (the last pass wins).

    at: "all" (the whole activation), "last" (each row's last real token, from `lengths`; default the
    last position) or an int position. graph=False keeps a detached copy; graph=True keeps the tensor
    in the autograd graph (training losses), with retain_grad its gradient too (attribution). to_cpu:
    float32 on the CPU.
    """
    acts: dict[str, Tensor] = {}

    def keeper(site: str):
        def keep(act: Tensor, hook) -> Tensor:
            got = _select(act, at, lengths)
            if graph:
                if retain_grad and got.requires_grad:
                    got.retain_grad()
                acts[site] = got
            else:
                got = got.detach().clone()
                acts[site] = got.float().cpu() if to_cpu else got
            return act

        return keep

    with attached(model, [*patch, *((s, keeper(s)) for s in sites)]):
        yield acts


@dataclass
class Trace:
    """What one traced forward left: the output (logits, or the residual stream with stop_at_layer) and the
    recorded activations by site."""

    output: Tensor
    acts: dict[str, Tensor]

    @property
    def logits(self) -> Tensor:
        return self.output

    def __getitem__(self, site: str) -> Tensor:
        return self.acts[site]


def trace(
    model,
    tokens: Int[Tensor, "b pos"],
    sites: Sequence[str] = (),
    *,
    at: str | int = "all",
    lengths: Int[Tensor, " b"] | None = None,
    patch: Hooks = (),
    stop_at_layer: int | None = None,
    graph: bool = False,
    to_cpu: bool = False,
    retain_grad: bool = False,
) -> Trace:
    """Run the bridge on `tokens` with `patch` hooks, recording `sites` (see `recording`); stop_at_layer L
    runs blocks < L only. Runs under the caller's grad mode (wrap in torch.inference_mode() to read only)."""
    kw = {} if stop_at_layer is None else {"stop_at_layer": stop_at_layer}
    with recording(model, sites, at, lengths, patch, graph, to_cpu, retain_grad) as acts:
        out = model(tokens.to(model.cfg.device), **kw)
    return Trace(out, acts)


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """Parameters stop requiring grad for the block (gradients flow to activations only), then are restored."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --- running from a layer ------------------------------------------------------------------------


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer below the start: passes the residual stream through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _decoder(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The HF base model (accepts inputs_embeds) and its list of decoder layers (the bridge's blocks)."""
    hf = hf_module(model)
    first = model.blocks[0]
    for module in hf.modules():
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == model.cfg.n_layers and child[0] is first:
                return module, child
    raise PatchlabError("cannot find the decoder layers of this model")


@contextlib.contextmanager
def _skipping(layers: torch.nn.ModuleList, start: int) -> Iterator[None]:
    saved = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _Skip()
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def run_from_layer(
    model,
    resid: Float[Tensor, "b pos d"],
    start: int,
    last: Int[Tensor, " b"],
    patch: Hooks = (),
    past=None,
    columns: Sequence[int] | None = None,
) -> Float[Tensor, "b vocab"]:
    """Logits at positions `last` ([b], or [b, k] for k positions per row) when `resid` enters block `start`
    (blocks < start are not run). With `past` (a `prefix_cache` of b rows), `resid` holds only the positions
    after that prefix: they attend to the prefix's cached keys / values instead of recomputing them. With
    `columns`, only those vocabulary entries are computed (the rest of the logits are 0)."""
    base, layers = _decoder(model)
    with _skipping(layers, start), attached(model, patch):
        hidden = base(inputs_embeds=resid, past_key_values=past, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return _unembed(model, hidden[rows if last.dim() == 1 else rows[:, None], last], columns)


def _unembed(model, hidden: Tensor, columns: Sequence[int] | None = None) -> Tensor:
    """Logits of final hidden states (after the final norm), with the model's logit soft-capping if any; with
    `columns`, only those entries are computed and the others left 0 (the unembedding is then a sliver)."""
    hf = hf_module(model)
    head = hf.get_output_embeddings()
    if columns is None:
        logits = head(hidden)
    else:
        cols = torch.tensor(sorted(set(columns)), device=hidden.device)
        bias = head.bias[cols] if getattr(head, "bias", None) is not None else None
        part = torch.nn.functional.linear(hidden, head.weight[cols], bias)
        logits = hidden.new_zeros(*hidden.shape[:-1], head.weight.shape[0])
        logits[..., cols] = part
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def prefill_from_layer(
    model, resid: Float[Tensor, "b pos d"], start: int, mask: Tensor, positions: Tensor, cache
) -> Float[Tensor, "b vocab"]:
    """Last-position logits of a left-padded batch whose residual stream `resid` enters block `start` (blocks
    below are not run); blocks from `start` on fill their slots of `cache` (a fresh Hugging Face
    DynamicCache), the caller fills the slots below with their keys / values of the same prompts."""
    base, layers = _decoder(model)
    with _skipping(layers, start):
        out = base(inputs_embeds=resid, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True)  # fmt: skip
    return _unembed(model, out.last_hidden_state[:, -1])


def _reproduces(model, tokens: Tensor, flag: str, from_layer: Callable[[int], Tensor], atol: float) -> bool:
    """Does `from_layer(l)` (last-position logits when the run starts at block l) equal the full forward at
    the first, middle and last block? Cached on the model under `flag` once a finite prompt has decided it."""
    cached = getattr(model, flag, None)
    if cached is not None:
        return cached
    full = model(tokens)[0, -1]
    if not torch.isfinite(full).all():
        return False  # this prompt says nothing about the model: check again on the next one
    layers = sorted({0, model.cfg.n_layers // 2, model.cfg.n_layers - 1})
    ok = all((from_layer(l)[0] - full).abs().max().item() <= atol for l in layers)
    setattr(model, flag, ok)
    return ok


def check_run_from_layer(model, tokens: Tensor, resid: Sequence[Tensor], atol: float = 1e-4) -> bool:
    """Does starting at a layer reproduce the full forward on this model? (cached per model)"""
    last = torch.tensor([tokens.shape[1] - 1], device=tokens.device)
    return _reproduces(
        model, tokens, "_patchlab_skip_ok", lambda l: run_from_layer(model, resid[l][None], l, last), atol
    )


def prefix_cache(model, tokens: Int[Tensor, "1 pos"]):
    """The keys / values every layer computes for `tokens` (one row): Hugging Face's cache of the prefix."""
    with torch.inference_mode():
        return hf_module(model)(input_ids=tokens, use_cache=True).past_key_values


def repeated(cache, rows: int):
    """A copy of a one-row prefix cache with `rows` rows (the original stays as it was)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


def check_prefix_cache(model, tokens: Tensor, resid: Sequence[Tensor], atol: float = 1e-4) -> bool:
    """Does the last token entering a layer with the prefix's cached keys / values reproduce the full forward
    on this model? (cached per model; where it does not, callers recompute every position)"""
    cached = getattr(model, "_patchlab_prefix_ok", None)
    if cached is not None or tokens.shape[1] < 2:
        return bool(cached)
    prefix = prefix_cache(model, tokens[:, :-1])
    first = torch.zeros(1, dtype=torch.long, device=tokens.device)

    def from_layer(l: int) -> Tensor:
        return run_from_layer(model, resid[l][None, -1:], l, first, past=repeated(prefix, 1))

    return _reproduces(model, tokens, "_patchlab_prefix_ok", from_layer, atol)
