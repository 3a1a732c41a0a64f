"""TransformerLens hook names, built in one place: every activation patchlab touches is one of these sites.

Shapes on a TransformerBridge (batch b, positions p):
  resid_pre(L)  blocks.L.hook_resid_pre     [b, p, d_model]   the residual stream entering block L
  resid_post(L) blocks.L.hook_resid_post    [b, p, d_model]
  z(L)          blocks.L.attn.hook_z        [b, p, n_heads, d_head]   per-head attention output before W_O
  pattern(L)    blocks.L.attn.hook_pattern  [b, n_heads, p_query, p_key]
  attn_out(L)   blocks.L.hook_attn_out      [b, p, d_model]
  o_out(L)      blocks.L.attn.o.hook_out    [b, p, d_model]   o_proj's output (= attn_out on Llama/Gemma)
  mlp_out(L)    blocks.L.hook_mlp_out       [b, p, d_model]
"""

from __future__ import annotations


def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def pattern(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def attn_out(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def o_out(layer: int) -> str:
    return f"blocks.{layer}.attn.o.hook_out"


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


# the patchable sites of `locate`, by the name users pass as --site
PATCH_SITES = {"z": z, "attn_out": attn_out, "mlp_out": mlp_out}


def lens_sites(n_layers: int) -> list[str]:
    """Every residual stream the logit lens reads: each block's input, then the last block's output."""
    return [resid_pre(l) for l in range(n_layers)] + [resid_post(n_layers - 1)]
