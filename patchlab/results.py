"""What every result shares: JSON round-trip, provenance, and writing result.json + figure.html atomically."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from .errors import PatchlabError
from .io import atomic_write_many, json_bytes

R = TypeVar("R", bound="Result")


def _dist_version(dist: str) -> str:
    """An installed distribution's version (TransformerLens 4.x has no `__version__` attribute)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def provenance(model=None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """Versions, dtype, threads, seed and the model's identity, recorded in every result file."""
    import transformers

    from . import __version__
    from .models import model_name

    info: dict[str, Any] = {
        "patchlab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": _dist_version("transformer-lens"),
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
    """The sha256 of the model's weights (cached per model, see `edit.base_hash`), and the patchlab
    edits applied to them, if any (then the hash is of the edited weights, computed afresh)."""
    from .edit import base_hash
    from .models import weights_hash

    applied = getattr(model, "_patchlab_edits", None)
    if not applied:
        return {"weights_sha256": base_hash(model)}
    return {"weights_sha256": weights_hash(model),
            "edits_applied": [getattr(e, "head_list", type(e).__name__) for e in applied]}


@dataclasses.dataclass
class Result:
    """Base of every result dataclass: `.to_json()`, `.from_json()`, `.figure()`, `.save(out)`."""

    kind: ClassVar[str] = "result"

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls: type[R], obj: dict[str, Any] | str | Path) -> R:
        where = None
        if isinstance(obj, (str, Path)):
            path = where = Path(obj)
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise PatchlabError(f"cannot read result JSON ({exc})".splitlines()[0], where=str(path)) from None
        if not isinstance(obj, dict) or obj.get("type") != cls.kind:
            found = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
            raise PatchlabError(f"expected a '{cls.kind}' result, found '{found}'", where=where)
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in obj and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise PatchlabError(f"'{cls.kind}' result lacks the field '{missing[0]}'", where=where)
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in obj.items() if k in names})

    def figure(self):  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def save(self, out: str | Path, name: str | None = None) -> dict[str, Path]:
        """Write result.json and figure.html (or NAME.json and NAME.html) into `out`, each atomically."""
        out = Path(out)
        json_name, html_name = (f"{name}.json", f"{name}.html") if name else ("result.json", "figure.html")
        obj = self.to_json()
        try:
            data = json_bytes(obj)
        except ValueError:
            at = _nonfinite(obj)
            if not at:
                raise
            raise PatchlabError(f"result holds a non-finite number at {at}; nothing written",
                                where=str(out / json_name)) from None
        html = self.figure().to_html(include_plotlyjs=True, full_html=True)
        # both files are written out before either is renamed into place: a full disk changes neither
        atomic_write_many({out / json_name: data, out / html_name: html.encode("utf-8")})
        return {json_name: out / json_name, html_name: out / html_name}


def _nonfinite(obj: Any, at: str = "") -> str:
    """Where in a JSON-like object the first NaN / inf sits, e.g. `items[3].clean`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return at or "the top level"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _nonfinite(v, f"{at}[{k}]" if isinstance(k, int) else f"{at}.{k}" if at else str(k))
        if found:
            return found
    return ""
