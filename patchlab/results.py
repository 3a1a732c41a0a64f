"""What every result shares: JSON round-trip, provenance, and writing result.json + figure.html atomically."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from .errors import PatchlabError
from .io import atomic_write_json, atomic_write_text

R = TypeVar("R", bound="Result")


def provenance(model=None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """Versions, dtype, threads, seed and the model's identity, recorded in every result file."""
    import transformer_lens
    import transformers

    from . import __version__
    from .models import model_name

    info: dict[str, Any] = {
        "patchlab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
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
        )
    info.update(extra)
    return info


@dataclasses.dataclass
class Result:
    """Base of every result dataclass: `.to_json()`, `.from_json()`, `.figure()`, `.save(out)`."""

    kind: ClassVar[str] = "result"

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls: type[R], obj: dict[str, Any] | str | Path) -> R:
        if isinstance(obj, (str, Path)):
            path = Path(obj)
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise PatchlabError(f"cannot read result JSON ({exc})".splitlines()[0], where=str(path)) from None
        if not isinstance(obj, dict) or obj.get("type") != cls.kind:
            found = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
            raise PatchlabError(f"expected a '{cls.kind}' result, found '{found}'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})

    def figure(self):  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def save(self, out: str | Path, name: str | None = None) -> dict[str, Path]:
        """Write result.json and figure.html (or NAME.json and NAME.html) into `out`, each atomically."""
        out = Path(out)
        html = self.figure().to_html(include_plotlyjs=True, full_html=True)
        json_name, html_name = (f"{name}.json", f"{name}.html") if name else ("result.json", "figure.html")
        paths = {json_name: atomic_write_json(out / json_name, self.to_json())}
        paths[html_name] = atomic_write_text(out / html_name, html)
        return paths
