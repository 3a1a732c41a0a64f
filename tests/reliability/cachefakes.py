"""Fake offline models for test_cache_lock.py, in a module of their own so that child processes
started with 'spawn' can import them (a test module's functions would re-import pytest fixtures).

The fake build stands in for `patchlab.runtime.models._dequantize_into`: it appends to a marker file,
sleeps, then writes a small folder with a `patchlab-cache.json` of the right format.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def install(key: str, marker: str | Path, sleep: float, monkeypatch=None) -> None:
    """Register offline model `key` and replace the de-quantizer with a slow fake (in this process)."""
    from patchlab.core.io import atomic_write_json
    from patchlab.runtime import models

    def find_gguf(_scratch: Path) -> Path:  # pragma: no cover - the fake build never looks
        raise AssertionError("the fake build does not read a GGUF file")

    def fake_dequantize(spec, out: Path) -> None:
        with open(marker, "a") as fh:
            fh.write(f"start {spec.key} {os.getpid()}\n")
        time.sleep(sleep)
        (out / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (out / "model.safetensors").write_bytes(b"\0" * 4096)
        atomic_write_json(out / "patchlab-cache.json", {"format": models.CACHE_FORMAT, "key": spec.key})
        with open(marker, "a") as fh:
            fh.write(f"done {spec.key} {os.getpid()}\n")

    spec = models.OfflineModel(key, "org/fake", "pip install fake-weights==1.0", find_gguf, "LlamaForCausalLM")
    if monkeypatch is not None:
        monkeypatch.setitem(models.OFFLINE_MODELS, key, spec)
        monkeypatch.setattr(models, "_dequantize_into", fake_dequantize)
    else:
        models.OFFLINE_MODELS[key] = spec
        models._dequantize_into = fake_dequantize


def child(cache: str, key: str, marker: str, sleep: float, barrier, results) -> None:
    """Process body: install the fakes, wait for the others at `barrier`, then ensure_cached(key)."""
    os.environ["PATCHLAB_CACHE"] = cache
    install(key, marker, sleep)
    from patchlab.runtime import models

    if barrier is not None:
        barrier.wait(timeout=120)
    start = time.monotonic()
    try:
        folder = models.ensure_cached(key)
    except BaseException as exc:  # report, so the parent can show what went wrong
        results.put((os.getpid(), "error", f"{type(exc).__name__}: {exc}", time.monotonic() - start))
        raise
    results.put((os.getpid(), "ok", str(folder), time.monotonic() - start))


def read_marker(marker: str | Path) -> list[str]:
    path = Path(marker)
    return path.read_text().splitlines() if path.exists() else []
