"""Accessors of a TransformerLens `TransformerBridge` that every runtime module needs (nothing here loads)."""

from __future__ import annotations

import torch


def model_name(model) -> str:
    """The name a model was loaded under (or its TransformerLens model name)."""
    return getattr(model, "patchlab_name", None) or str(getattr(model.cfg, "model_name", "unknown"))


def hf_module(model) -> torch.nn.Module:
    """The Hugging Face module under a bridge (its parameters are the model's real weights)."""
    return model.original_model
