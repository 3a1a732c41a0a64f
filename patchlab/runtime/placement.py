"""Where a model's weights go: parse --device-map / --max-memory, and refuse placements patchlab cannot use.

`--device-map` is a strategy accelerate understands (auto, balanced, balanced_low_0, sequential) or a JSON
file mapping module names to devices; `--max-memory` is `0=70GiB,1=70GiB,cpu=200GiB`, parsed into the dict
Hugging Face wants (int keys for GPUs, "cpu", sizes in bytes). Offloading to disk or the meta device is
refused: patchlab reads and writes activations through hooks and edits weights in place, and an offloaded
module's weights are placeholders that exist only while accelerate runs its own forward.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from patchlab.core.errors import PatchlabError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD = ("disk", "meta")
DeviceMap = Union[str, dict[str, Union[int, str]]]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_WHY_OFFLOAD = (
    "patchlab's hooks and edits need every weight resident on a device (an offloaded module holds "
    "placeholders): give more `max_memory` or more GPUs, or use a smaller `dtype`"
)


@dataclass(frozen=True)
class Placement:
    """A parsed --device / --device-map / --max-memory triple (the load keywords are only those given)."""

    device: str | None = None
    device_map: DeviceMap | None = None
    max_memory: dict[Union[int, str], int] | None = None

    def load_kwargs(self) -> dict[str, Any]:
        """The keywords `load_model` takes beside device and dtype (empty when no placement was asked for)."""
        kw: dict[str, Any] = {}
        if self.device_map is not None:
            kw["device_map"] = self.device_map
        if self.max_memory is not None:
            kw["max_memory"] = self.max_memory
        return kw


def parse(device: str | None, device_map: str | None, max_memory: str | None) -> Placement:
    """The CLI's three placement options, checked: one line naming the option at fault otherwise."""
    if device is not None and device_map is not None:
        raise PatchlabError("give `device` (one device) or `device_map` (several), not both", param="device_map")
    dm = parse_device_map(device_map) if device_map is not None else None
    mm = parse_max_memory(max_memory) if max_memory is not None else None
    return Placement(device, dm, mm)


def parse_size(text: str, param: str = "max_memory") -> int:
    """'70GiB', '500MiB', '2GB', '1.5GiB' or a byte count -> bytes (GiB/MiB are powers of 2, GB/MB of 10)."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise PatchlabError(f"size {text!r} is not a number with a unit (e.g. 70GiB, 500MiB, 2GB)", param=param)
    value = float(m.group(1)) * _UNITS[unit]
    if value < 0:
        raise PatchlabError(f"size {text!r} is negative", param=param)
    return int(value)


def _memory_key(text: str) -> Union[int, str]:
    """'0' / 'cuda:0' -> 0, 'cpu' -> 'cpu'; 'disk' is refused (offload); anything else is an error."""
    key = text.strip().lower()
    if key.startswith("cuda:"):
        key = key[5:]
    if key.isdigit():
        return int(key)
    if key == "cpu":
        return "cpu"
    if key in OFFLOAD:
        raise PatchlabError(f"'{key}' would offload weights to {key}: {_WHY_OFFLOAD}", param="max_memory")
    raise PatchlabError(f"unknown device {text!r} (use GPU indices 0, 1, ... and cpu)", param="max_memory")


def parse_max_memory(text: str) -> dict[Union[int, str], int]:
    """'0=70GiB,1=70GiB,cpu=200GiB' -> {0: bytes, 1: bytes, 'cpu': bytes}, as Hugging Face's max_memory."""
    out: dict[Union[int, str], int] = {}
    for part in (p for p in text.split(",") if p.strip()):
        if "=" not in part:
            raise PatchlabError(f"{part.strip()!r} is not DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB)", param="max_memory")
        name, size = part.split("=", 1)
        key = _memory_key(name)
        if key in out:
            raise PatchlabError(f"device {name.strip()!r} is given twice", param="max_memory")
        out[key] = parse_size(size)
    if not out:
        raise PatchlabError("give at least one DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB)", param="max_memory")
    return out


def _map_value(value: Any, where: str, param: str | None = None) -> Union[int, str]:
    """One device map target: a GPU index, 'cpu', 'cuda', 'cuda:N' or 'mps'; disk / meta are refused."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in OFFLOAD:
        raise PatchlabError(f"maps modules to '{text}': {_WHY_OFFLOAD}", param=param, where=where)
    if text is not None and (text in ("cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", text)):
        return text
    raise PatchlabError(f"device {value!r} is not a GPU index, 'cpu' or 'cuda:N'", param=param, where=where)


def parse_device_map(text: str) -> DeviceMap:
    """A strategy name, or a JSON file {module name: device} (names as Hugging Face's hf_device_map)."""
    if text in STRATEGIES:
        return text
    if text in OFFLOAD:
        raise PatchlabError(f"'{text}' would offload every weight: {_WHY_OFFLOAD}", param="device_map")
    path = Path(text).expanduser()
    if not path.suffix.lower() == ".json" and not path.is_file():
        raise PatchlabError(
            f"unknown strategy '{text}' (use {', '.join(STRATEGIES)} or a JSON file)", param="device_map"
        )
    where = text
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PatchlabError(
            f"cannot read the file ({exc.strerror or type(exc).__name__})", param="device_map", where=where
        ) from None
    except ValueError as exc:
        raise PatchlabError(
            f"not valid JSON ({str(exc).splitlines()[0][:120]})", param="device_map", where=where
        ) from None
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) for k in data):
        raise PatchlabError(
            "must be a JSON object mapping module names to devices, e.g. "
            '{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}',
            param="device_map",
            where=where,
        )
    return {k: _map_value(v, f"{where}: module '{k}'", "device_map") for k, v in data.items()}


def check(device: str | None, device_map: DeviceMap | None, max_memory: dict | None) -> None:
    """The API's own check of a placement (the CLI parses first): exclusive options, no disk / meta offload."""
    if device is not None and device_map is not None:
        raise PatchlabError("give `device` (one device) or `device_map` (several), not both", param="device_map")
    if isinstance(device_map, str):
        if device_map in OFFLOAD:
            raise PatchlabError(f"'{device_map}' would offload every weight: {_WHY_OFFLOAD}", param="device_map")
    elif isinstance(device_map, dict):
        for k, v in device_map.items():
            _map_value(v, f"module '{k}'", "device_map")
    for key in max_memory or {}:
        if str(key).lower() in OFFLOAD:
            raise PatchlabError(f"'{key}' would offload weights to {key}: {_WHY_OFFLOAD}", param="max_memory")


def refuse_dtype(model_type: str | None, dtype: torch.dtype) -> None:
    """float16 on Gemma-3: its activations exceed float16's range (65504) and turn into inf / NaN."""
    if dtype == torch.float16 and (model_type or "").lower().startswith("gemma3"):
        raise PatchlabError(
            "float16 is refused for Gemma-3: its activations overflow float16 (inf / NaN); "
            "use `dtype` bfloat16 or float32",
            param="dtype",
        )


def offloaded(hf_model) -> list[str]:
    """Names of what accelerate left off-device: modules mapped to disk / meta, then meta parameters."""
    dmap = getattr(hf_model, "hf_device_map", None) or {}
    names = [f"{k or '<model>'} -> {v}" for k, v in dmap.items() if str(v).lower() in OFFLOAD]
    return names or [n for n, p in hf_model.named_parameters() if p.device.type == "meta"]


def refuse_offloaded(hf_model, where: str) -> None:
    """Refuse a loaded model whose weights are (partly) on disk or the meta device."""
    names = offloaded(hf_model)
    if names:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise PatchlabError(f"weights were offloaded ({names[0]}{more}): {_WHY_OFFLOAD}", where=where)
