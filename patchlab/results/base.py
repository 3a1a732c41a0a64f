"""What every result shares: JSON round-trip, provenance, and writing result.json + figure.html atomically."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from patchlab.core.errors import PatchlabError
from patchlab.core.io import atomic_write_many, json_bytes, recover_path

R = TypeVar("R", bound="Result")


@dataclasses.dataclass
class Result:
    """Base of every result dataclass: `.to_json()`, `.from_json()`, `.figure()`, `.table()`, `.save(out)`.

    A result type declares in its class everything the rest of patchlab shows of it: `kind` (the JSON
    "type"), `heading` and `intro` (its report section; a type without a heading has none), `order`
    (where the section stands: the value chain first), `figure()` and `table()`. Defining the class
    registers it (`Result.registry`), so the report and the command line need no list of types.
    """

    kind: ClassVar[str] = "result"
    heading: ClassVar[str] = ""
    intro: ClassVar[str] = ""
    order: ClassVar[int] = 1000
    registry: ClassVar[dict[str, type[Result]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Result.registry[cls.kind] = cls

    @classmethod
    def sections(cls) -> dict[str, type[Result]]:
        """The registered types that have a report section, in report order."""
        with_heading = [c for c in cls.registry.values() if c.heading]
        return {c.kind: c for c in sorted(with_heading, key=lambda c: (c.order, c.kind))}

    def table(self):
        """The result's summary table (`patchlab.results.tables.TableData`), or None."""
        return None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls: type[R], obj: dict[str, Any] | str | Path) -> R:
        where = None
        if isinstance(obj, (str, Path)):
            path = where = Path(obj)
            recover_path(path)  # a folder a killed writer left aside is put back first
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise PatchlabError(f"cannot read result JSON ({exc})".splitlines()[0], where=str(path)) from None
        if not isinstance(obj, dict) or obj.get("type") != cls.kind:
            found = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
            raise PatchlabError(f"expected a '{cls.kind}' result, found '{found}'", where=where)
        fields = dataclasses.fields(cls)
        missing = [
            f.name
            for f in fields
            if f.name not in obj and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
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
            raise PatchlabError(
                f"result holds a non-finite number at {at}; nothing written", where=str(out / json_name)
            ) from None
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
