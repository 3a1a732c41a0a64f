"""Faults for patchlab.core.io: a writer killed mid-write, a full disk, a failing block, file modes."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from relhelp import HalfWrite, enospc

from patchlab.core import io as pio
from patchlab.core.io import (
    TMP_PREFIX,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sweep_orphans,
)

OLD = b"old complete content\n" * 1000
ROOT = Path(__file__).resolve().parents[2]


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{TMP_PREFIX}*"))


# --- (a) SIGKILL in the middle of a large write ----------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from patchlab.core.io import atomic_write_bytes
    data = b"N" * (200 * 1024 * 1024)
    print("ready", flush=True)
    while True:
        atomic_write_bytes(sys.argv[1], data)
    """
)


def test_sigkill_mid_write_leaves_old_file_and_a_sweepable_temp(tmp_path):
    target = tmp_path / "result.json"
    target.write_bytes(OLD)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        # kill as soon as the temp file holds some bytes: the 200 MB write is then surely unfinished
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tmp = temps(tmp_path)
            if tmp and tmp[0].stat().st_size > 0:
                break
            time.sleep(0.001)
        else:
            pytest.fail("the writer never started writing")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert target.read_bytes() == OLD  # still exactly the old file: never a torn one
    left = temps(tmp_path)
    assert len(left) == 1  # the killed writer's temp file
    assert sweep_orphans(tmp_path) == len(left)
    assert temps(tmp_path) == [] and target.read_bytes() == OLD
    assert sweep_orphans(tmp_path) == 0 and sweep_orphans(tmp_path / "nope") == 0


# --- (b) a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def testenospc_propagates_and_leaves_old_file_and_no_temp(tmp_path, monkeypatch, where):
    target = tmp_path / "out.json"
    target.write_bytes(OLD)
    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(pio.os, "fdopen", lambda *a, **k: HalfWrite(real_fdopen(*a, **k)))
    elif where == "fsync":
        monkeypatch.setattr(pio.os, "fsync", enospc)
    else:
        monkeypatch.setattr(pio.os, "replace", enospc)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"new" * 100_000)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert target.read_bytes() == OLD
    assert temps(tmp_path) == []


def test_unserializable_json_writes_nothing(tmp_path):
    target = tmp_path / "r.json"
    target.write_bytes(OLD)
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})
    assert target.read_bytes() == OLD and temps(tmp_path) == []


def test_keyboard_interrupt_during_write_cleans_up(tmp_path, monkeypatch):
    def interrupt(_fd):
        raise KeyboardInterrupt

    target = tmp_path / "r.txt"
    monkeypatch.setattr(pio.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "x")
    assert not target.exists() and temps(tmp_path) == []


# --- (c) atomic_dir ------------------------------------------------------------------------------


def _make_old(folder: Path) -> None:
    folder.mkdir()
    (folder / "a.txt").write_text("old a")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("old b")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_failure_keeps_previous_directory(tmp_path, exc):
    target = tmp_path / "model"
    _make_old(target)
    before = _snapshot(target)
    with pytest.raises(type(exc)):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new a")
            (tmp / "half").write_bytes(b"x" * 1000)
            raise exc
    assert _snapshot(target) == before
    assert temps(tmp_path) == []


def test_atomic_dir_failure_without_previous_directory_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError
    assert not target.exists() and temps(tmp_path) == []


def test_atomic_dir_success_replaces_whole(tmp_path):
    target = tmp_path / "model"
    _make_old(target)
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("new c")
        assert _snapshot(target)["a.txt"] == b"old a"  # the old one is untouched until the end
    assert _snapshot(target) == {"c.txt": b"new c"}  # no stale files from the old directory
    assert temps(tmp_path) == []


def test_atomic_dir_failed_swap_puts_previous_directory_back(tmp_path, monkeypatch):
    """The old dir is moved aside before the new one is moved in: if that second rename fails, the
    old one must come back (it used to be left under a temp name, with nothing at `path`)."""
    target = tmp_path / "model"
    _make_old(target)
    before = _snapshot(target)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the new dir -> target
            raise OSError(errno.EIO, "injected")
        return real_replace(src, dst)

    monkeypatch.setattr(pio.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        with atomic_dir(target) as tmp:
            (tmp / "c.txt").write_text("new c")
    monkeypatch.undo()
    assert calls[0][0] == "model" and calls[1][1] == "model"
    assert _snapshot(target) == before
    assert temps(tmp_path) == []


# --- (d) modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_new_files_and_dirs_respect_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        f = atomic_write_text(tmp_path / "new" / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            atomic_write_json(tmp / "g.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "d" / "g.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == dir_mode  # mkdtemp alone gives 0700


def test_overwrite_gives_umask_mode_not_old_mode(tmp_path):
    # documented behaviour: a rewrite is a new file, so it gets the umask mode, not the old file's
    target = tmp_path / "f.txt"
    target.write_text("old")
    target.chmod(0o600)
    old = os.umask(0o022)
    try:
        atomic_write_text(target, "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_text() == "new"
