"""The model cache under concurrency and crashes, with fake models (no weights are read).

Children are started with 'spawn' (a fresh interpreter, as separate `patchlab` runs would be) and
install the fakes from cachefakes.py themselves.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import cachefakes
import pytest

from patchlab.core.errors import PatchlabError
from patchlab.core.io import TMP_PREFIX
from patchlab.runtime import models

CTX = multiprocessing.get_context("spawn")


def _start(cache: Path, key: str, marker: Path, sleep: float, barrier=None, results=None):
    results = results if results is not None else CTX.Queue()
    proc = CTX.Process(target=cachefakes.child, args=(str(cache), key, str(marker), sleep, barrier, results))
    proc.start()
    return proc, results


def _wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _reap(*procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=30)


def _temps(cache: Path) -> list[Path]:
    return sorted((cache / "models").glob(f"{TMP_PREFIX}*"))


def test_two_processes_build_once_and_share_the_folder(tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "marker.txt"
    barrier, results = CTX.Barrier(2), CTX.Queue()
    procs = [_start(cache, "fake", marker, 1.0, barrier, results)[0] for _ in range(2)]
    try:
        got = [results.get(timeout=180) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
            assert proc.exitcode == 0
    finally:
        _reap(*procs)
    assert [status for _, status, _, _ in got] == ["ok", "ok"], got
    folder = cache / "models" / "fake"
    assert {path for _, _, path, _ in got} == {str(folder)}
    lines = cachefakes.read_marker(marker)
    assert [line.split()[0] for line in lines] == ["start", "done"], lines  # built exactly once
    # both waited for that one build: the builder slept 1 s, the other blocked on the lock meanwhile
    assert all(seconds > 0.8 for *_, seconds in got), got
    assert models._cache_is_complete(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "patchlab-cache.json"]
    assert _temps(cache) == []


def test_build_killed_midway_leaves_no_cache_and_next_call_rebuilds(tmp_path, monkeypatch):
    cache, marker = tmp_path / "cache", tmp_path / "marker.txt"
    proc, _ = _start(cache, "fake", marker, 120.0)
    try:
        _wait_for(lambda: cachefakes.read_marker(marker), what="the child to start building")
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        _reap(proc)
    folder = cache / "models" / "fake"
    assert not folder.exists() and not models._cache_is_complete(folder)
    orphans = _temps(cache)
    assert len(orphans) == 1 and orphans[0].is_dir()  # the half-built folder, under its temp name

    # the next run (here: this process) takes the lock the dead one held, builds, and sweeps the orphan
    monkeypatch.setenv("PATCHLAB_CACHE", str(cache))
    cachefakes.install("fake", marker, 0.0, monkeypatch)
    assert models.ensure_cached("fake") == folder
    assert models._cache_is_complete(folder)
    assert [line.split()[0] for line in cachefakes.read_marker(marker)] == ["start", "start", "done"]
    assert _temps(cache) == []
    # and a complete cache is used as is
    assert models.ensure_cached("fake") == folder
    assert len(cachefakes.read_marker(marker)) == 3


HOLDER = (
    "import sys, time\n"
    "from filelock import FileLock\n"
    "lock = FileLock(sys.argv[1]); lock.acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def test_held_lock_times_out_with_an_error_naming_the_lock_file(tmp_path, monkeypatch):
    cache, marker = tmp_path / "cache", tmp_path / "marker.txt"
    monkeypatch.setenv("PATCHLAB_CACHE", str(cache))
    monkeypatch.setattr(models, "LOCK_TIMEOUT_S", 0.5)
    cachefakes.install("fake", marker, 0.0, monkeypatch)
    folder = models.model_cache_dir("fake")
    folder.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, f"{folder}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(PatchlabError) as err:
            models.ensure_cached("fake")
        assert 0.4 < time.monotonic() - start < 30
        msg = str(err.value)
        assert f"{folder}.lock" in msg and "\n" not in msg
        assert cachefakes.read_marker(marker) == [] and not folder.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    # the holder is gone (its flock with it): the next call builds
    assert models.ensure_cached("fake") == folder and models._cache_is_complete(folder)


def test_complete_cache_is_used_even_while_the_lock_is_held(tmp_path, monkeypatch):
    cache, marker = tmp_path / "cache", tmp_path / "marker.txt"
    monkeypatch.setenv("PATCHLAB_CACHE", str(cache))
    monkeypatch.setattr(models, "LOCK_TIMEOUT_S", 0.5)
    cachefakes.install("fake", marker, 0.0, monkeypatch)
    folder = models.ensure_cached("fake")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, f"{folder}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert models.ensure_cached("fake") == folder  # no lock needed to read a finished folder
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert len(cachefakes.read_marker(marker)) == 2  # one start + done: built once


@pytest.mark.parametrize(
    "content",
    [
        '{"format": 0}',
        '{"key": "fake"}',
        "not json",
        "",
        "\xff",
        "[1]",
    ],
)
def test_wrong_format_marker_is_rebuilt(tmp_path, monkeypatch, content):
    cache, marker = tmp_path / "cache", tmp_path / "marker.txt"
    monkeypatch.setenv("PATCHLAB_CACHE", str(cache))
    cachefakes.install("fake", marker, 0.0, monkeypatch)
    folder = models.model_cache_dir("fake")
    folder.mkdir(parents=True)
    (folder / "patchlab-cache.json").write_text(content)
    (folder / "stale.bin").write_bytes(b"x")
    assert not models._cache_is_complete(folder)
    assert models.ensure_cached("fake") == folder and models._cache_is_complete(folder)
    assert not (folder / "stale.bin").exists()  # replaced whole, not patched


def test_building_one_model_does_not_sweep_another_models_build(tmp_path, monkeypatch):
    cache, marker = tmp_path / "cache", tmp_path / "marker.txt"
    proc, results = _start(cache, "fake-a", marker, 3.0)
    try:
        _wait_for(lambda: cachefakes.read_marker(marker), what="the child to start building fake-a")
        monkeypatch.setenv("PATCHLAB_CACHE", str(cache))
        cachefakes.install("fake-b", marker, 0.0, monkeypatch)
        assert models._cache_is_complete(models.ensure_cached("fake-b"))
        try:
            got = results.get(timeout=120)
        except queue.Empty:  # pragma: no cover
            got = None
        proc.join(timeout=60)
    finally:
        _reap(proc)
    assert got is not None and got[1] == "ok", got
    assert models._cache_is_complete(cache / "models" / "fake-a")
