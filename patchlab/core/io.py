"""Atomic writes: every file patchlab produces appears whole or not at all (temp file + rename).

A writer holds an exclusive `flock` on its temp file (or temp directory) from creation to rename, so
`sweep_stale` can tell the temp files of a killed writer (no lock) from those of a live one and
remove only the former; every atomic write sweeps its folder first. A failure to write (full disk, no
permission) raises `WriteError`: an `OSError` and a one-line `PatchlabError`, with nothing changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temp files are never claimed, and never swept by others
    fcntl = None  # type: ignore[assignment]

TMP_PREFIX = ".patchlab-tmp-"


class WriteError(PatchlabError, OSError):
    """A file could not be written (full disk, no permission ...); what was there before is unchanged."""

    def __str__(self) -> str:  # OSError's own __str__ would print "[Errno 28] ..." without the path
        return str(self.args[0]) if self.args else ""


def _write_error(exc: OSError, path: Path) -> WriteError:
    err = WriteError(f"cannot write ({exc.strerror or exc}); nothing was changed".replace("\n", " "), where=str(path))
    err.errno = exc.errno
    return err


def _claim(fd: int) -> bool:
    """Lock a fresh temp file / dir for this writer; False if a sweeper removed it before the lock."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return os.fstat(fd).st_nlink > 0


def _claimed_file(folder: Path) -> tuple[int, str]:
    while True:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        if _claim(fd):
            return fd, tmp
        os.close(fd)  # swept between its creation and our lock: take another name


def _claimed_dir(folder: Path, prefix: str) -> tuple[int, Path]:
    while True:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
        fd = os.open(tmp, os.O_RDONLY)
        if _claim(fd):
            return fd, tmp
        os.close(fd)


def _remove(p: Path) -> None:
    """Delete a temp file or folder; one already gone is fine."""
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sweep_stale(folder: str | Path) -> int:
    """Remove temp files / dirs in `folder` that no live writer holds (left by a killed one); returns how many."""
    folder = Path(folder)
    if fcntl is None or not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(f"{TMP_PREFIX}*"):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone already, a link, or unreadable: not ours to judge
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            _remove(p)
            n += 1
        finally:
            os.close(fd)
    return n


def _stage(path: Path, data: bytes) -> tuple[str, int]:
    """Write `data` to a claimed temp file beside `path` and fsync it; return (temp name, claim fd)."""
    fd, tmp = _claimed_file(path.parent)
    try:
        hold = os.dup(fd)  # keeps the claim after the file object below is closed, until the rename
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    owned = False  # once fdopen has it, the file object closes fd
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        fh = os.fdopen(fd, "wb")
        owned = True
        with fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if not owned:
            os.close(fd)
        os.close(hold)
        _unlink(tmp)
        raise
    return tmp, hold


def _unlink(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def atomic_write_many(files: Mapping[str | Path, bytes]) -> list[Path]:
    """Write several files so that a failure while writing changes none of them: every temp file is
    written and fsynced before the first rename (a kill between two renames can still mix old and new)."""
    staged: list[tuple[Path, str, int]] = []
    current = Path()
    try:
        for path, data in files.items():
            current = Path(path)
            current.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(current.parent)
            staged.append((current, *_stage(current, data)))
        while staged:
            current, tmp, hold = staged[0]
            os.replace(tmp, current)
            staged.pop(0)
            os.close(hold)
    except OSError as exc:
        raise _write_error(exc, current) from None
    finally:
        for _, tmp, hold in staged:  # not renamed: a failure, so nothing of this call stays behind
            os.close(hold)
            _unlink(tmp)
    return [Path(p) for p in files]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a process-unique temp file beside `path`, fsync it, then rename over `path`."""
    return atomic_write_many({path: data})[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """`obj` as patchlab writes JSON (indented, UTF-8, strict: NaN / inf are refused)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, json_bytes(obj))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place only if the block succeeds.

    An existing directory at `path` is replaced whole; on error nothing at `path` changes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)
    hold, tmp = _claimed_dir(path.parent, f"{TMP_PREFIX}{path.name}-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the usual mode
        yield tmp
        if path.exists():
            old = path.with_name(f"{TMP_PREFIX}old-{path.name}-{os.getpid()}")
            old_hold = os.open(path, os.O_RDONLY)
            try:
                _claim(old_hold)  # moved aside, it is a temp dir of this live writer until removed
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)  # the second rename failed: put the previous directory back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            finally:
                os.close(old_hold)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(hold)


def sweep_orphans(folder: str | Path, name: str = "") -> int:
    """Remove every temp file/dir named `TMP_PREFIX + name*` in `folder`, live or not (call it only under
    a lock that excludes other writers there); returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(f"{TMP_PREFIX}{name}*"):
        _remove(p)
        n += 1
    return n
