"""What identifies a model and a result: weights and tokenizer hashes, the edits applied, versions, provenance.

The weights hash (sha256 over every parameter's name, dtype, shape and bytes) is computed once per
loaded model and cached on it (`base_hash`); while patchlab edits are applied (`applied_edits`), a
result records the hash of the edited weights, computed afresh, and which edits they carry.
"""

from __future__ import annotations

import hashlib
import json
import platform
from typing import Any

import torch

from patchlab.core.errors import PatchlabError
from patchlab.core.version import __version__
from patchlab.runtime.bridge import hf_module, model_name


def weights_hash(model) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes: identifies the exact weights."""
    h = hashlib.sha256()
    params = {n.replace("._original_component", ""): p for n, p in hf_module(model).named_parameters()}
    for name, tensor in sorted(params.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def applied_edits(model) -> list:
    """The patchlab edits applied to this model, oldest first (kept on the model object)."""
    if not hasattr(model, "_patchlab_edits"):
        model._patchlab_edits = []
    return model._patchlab_edits


def base_hash(model) -> str:
    """The weights hash of the model with no patchlab edit applied (cached on the model)."""
    if applied_edits(model):
        raise PatchlabError("another edit is applied: revert it first (edits are made against the base weights)")
    cached = getattr(model, "_patchlab_hash", None)
    if cached is None:
        cached = model._patchlab_hash = weights_hash(model)
    return cached


def _dist_version(dist: str, module: str | None = None) -> str:
    """An installed distribution's version, found however it was installed (TransformerLens 4.x has no
    `__version__` attribute; its distribution is `transformer-lens`, older ones `transformer_lens` or
    `TransformerLens`, and a checkout on the path has its metadata beside the package, not on sys.path).

    Tried in turn: the distribution's names, the distribution that provides `module` (importlib's
    packages_distributions), metadata in the folder the imported module lives in, the module's
    `__version__`; "unknown" only when none says."""
    import importlib.metadata as md
    import sys

    module = module or dist.replace("-", "_")
    names = [dist, dist.replace("-", "_"), dist.replace("_", "-")]
    try:
        names += md.packages_distributions().get(module, [])
    except Exception:  # a broken metadata folder elsewhere must not hide this one
        pass
    for name in dict.fromkeys(names):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    loaded = sys.modules.get(module)
    folder = getattr(loaded, "__path__", None)
    if folder:
        import os

        here = os.path.dirname(list(folder)[0])
        for d in md.distributions(path=[here]):
            top = (d.read_text("top_level.txt") or "").split()
            if module in top or (d.metadata["Name"] or "").lower().replace("-", "_") == module.lower():
                return d.version
    return str(getattr(loaded, "__version__", None) or "unknown")


def provenance(model=None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """Versions, dtype, threads, seed and the model's identity, recorded in every result file."""
    import transformers

    info: dict[str, Any] = {
        "patchlab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": _dist_version("transformer-lens", "transformer_lens"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "seed": seed,
    }
    if model is not None:
        info.update(
            model=model_name(model),
            dtype=str(model.cfg.dtype).replace("torch.", ""),
            n_layers=int(model.cfg.n_layers),
            n_heads=int(model.cfg.n_heads),
            **weights_id(model),
        )
    info.update(extra)
    return info


def weights_id(model) -> dict[str, Any]:
    """The sha256 of the model's weights (cached per model, see `base_hash`), and the patchlab
    edits applied to them, if any (then the hash is of the edited weights, computed afresh)."""
    applied = getattr(model, "_patchlab_edits", None)
    if not applied:
        return {"weights_sha256": base_hash(model)}
    return {
        "weights_sha256": weights_hash(model),
        "edits_applied": [getattr(e, "head_list", type(e).__name__) for e in applied],
    }


def identity(model) -> dict[str, Any]:
    """What identifies a loaded model for a run: name, weights and tokenizer hashes, dtype, shape, provenance."""
    meta = provenance(model)
    return {
        "model": model_name(model),
        "weights_sha256": meta["weights_sha256"],
        "dtype": meta["dtype"],
        "tokenizer_sha256": tokenizer_hash(model.tokenizer),
        "n_layers": meta["n_layers"],
        "n_heads": meta["n_heads"],
        "meta": meta,
    }


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers) or of its sorted vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions() -> dict[str, str]:
    import transformers

    return {"patchlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
