"""Activations of many prompts, batched by length through the trace primitive, handed back per prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from patchlab.runtime.scoring import encode, length_batches, pad_id, pad_right
from patchlab.runtime.trace import trace


def per_prompt(
    model,
    prompts: Sequence[str],
    sites: Sequence[str],
    at: str = "last",
    batch_size: int = 64,
    stop_at_layer: int | None = None,
    where: str = "prompt",
) -> dict[str, list[Tensor]]:
    """{site: [one tensor per prompt]}: the activation at each prompt's last token (at="last") or at every
    real position ([len_i, ...], at="real"), float32 on the CPU. Prompts run in right-padded batches of
    similar length; padding is never returned."""
    seqs = [encode(model, p, where=f"{where}[{i}]") for i, p in enumerate(prompts)]
    out: dict[str, list[Tensor]] = {s: [torch.empty(0)] * len(seqs) for s in sites}
    for rows in length_batches([len(s) for s in seqs], batch_size):
        tokens, lengths = pad_right([seqs[i] for i in rows], pad_id(model))
        with torch.inference_mode():
            t = trace(model, tokens, list(sites), at="last" if at == "last" else "all", lengths=lengths, to_cpu=True,
                      stop_at_layer=stop_at_layer)  # fmt: skip
        for s in sites:
            for j, i in enumerate(rows):
                out[s][i] = t[s][j] if at == "last" else t[s][j, : lengths[j]].clone()
    return out
