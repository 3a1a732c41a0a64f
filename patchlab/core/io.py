"""Atomic writes: every file patchlab produces appears whole or not at all (temp file + rename), and a
command's output folder is committed as one unit (`OutFolder`: built under a temp name, renamed into place).

A writer holds an exclusive `flock` on its temp file (or temp directory) from creation to rename, so
`sweep_stale` can tell the temp files of a killed writer (no lock) from those of a live one and
remove only the former; every atomic write sweeps its folder first. A failure to write (full disk, no
permission) raises `WriteError`: an `OSError` and a one-line `PatchlabError`, with nothing changed.

A folder replaced whole (`atomic_dir`) is swapped in three steps: the old folder is renamed aside
(`.patchlab-aside-PID-NAME`, locked by its writer), the new one renamed into place, the old one removed.
A writer killed between the two renames leaves no folder at the name and a whole old one aside: `recover`
(run by every writer before it writes, by every lock taken on an output folder and by readers that miss a
file) puts it back; an aside whose new folder did get in is removed. So after a kill at any point the name
holds the whole old folder or the whole new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temp files are never claimed, and never swept by others
    fcntl = None  # type: ignore[assignment]

TMP_PREFIX = ".patchlab-tmp-"
ASIDE_PREFIX = ".patchlab-aside-"  # ASIDE_PREFIX + PID + "-" + NAME: the old NAME, moved aside by writer PID
LOCK_SUFFIX = ".patchlab-lock"  # .NAME.patchlab-lock beside an output folder NAME: held by its writer


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
    recover(folder)
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


def _unlocked(p: Path) -> int | None:
    """An fd holding `p`'s flock if no live writer holds it, else None (or when `p` is gone / a link)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _aside_target(p: Path) -> Path | None:
    pid, sep, name = p.name[len(ASIDE_PREFIX) :].partition("-")
    return p.with_name(name) if sep and pid.isdigit() and name else None


def recover(folder: str | Path) -> int:
    """Finish what killed writers left in `folder`: an old folder moved aside whose new one never got in is
    put back under its name; one whose new folder did get in is removed. Asides of live writers are left
    alone. Returns how many were put back."""
    folder = Path(folder)
    if fcntl is None or not folder.is_dir():
        return 0
    n = 0
    for p in sorted(folder.glob(f"{ASIDE_PREFIX}*")):
        fd = _unlocked(p)
        if fd is None:
            continue
        try:
            target = _aside_target(p)
            if target is not None and not os.path.lexists(target):
                os.replace(p, target)
                n += 1
            else:
                _remove(p)
        except OSError:
            pass  # not ours to fix (no permission ...): a later reader or writer tries again
        finally:
            os.close(fd)
    return n


def recover_path(path: str | Path) -> None:
    """Before reading `path`: put back the folders above it that killed writers left aside."""
    missing = []
    for p in (Path(path), *Path(path).parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):  # the top-most missing folder first
        if p.parent.is_dir():
            recover(p.parent)
        if not os.path.lexists(p):
            return


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # another file system, a file we may not link (protected_hardlinks), no hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(old: Path, new: Path) -> None:
    """Every entry of `old` that `new` lacks, linked (else copied) into `new`: what the writer did not write
    (a run folder, checkpoints, a user's notes) stays as it was; what it wrote replaces the old entry whole."""
    for entry in old.iterdir():
        if entry.name.startswith((TMP_PREFIX, ASIDE_PREFIX)) or os.path.lexists(new / entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _swap(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is moved aside (locked) first and removed after."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old = path.with_name(f"{ASIDE_PREFIX}{os.getpid()}-{path.name}")
    old_hold = os.open(path, os.O_RDONLY)
    try:
        _claim(old_hold)  # moved aside, it is this live writer's until removed: `recover` leaves it alone
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # the second rename failed: put the previous directory back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(old_hold)


@contextlib.contextmanager
def atomic_dir(path: str | Path, carry: bool = False) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place only if the block succeeds.

    An existing directory at `path` is replaced whole; on error nothing at `path` changes. With `carry`,
    every entry of the old directory that the block did not write is carried into the new one (hard
    links, else copies) before the swap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)
    hold, tmp = _claimed_dir(path.parent, f"{TMP_PREFIX}{path.name}-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the usual mode
        yield tmp
        try:
            if carry and path.is_dir():
                _carry(path, tmp)
            _swap(tmp, path)
        except OSError as exc:
            raise _write_error(exc, path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(hold)


class OutFolder:
    """A command's output folder, held for the whole command and written as one unit.

    `with OutFolder(path) as out:` takes the writer lock `.NAME.patchlab-lock` beside the folder (never
    inside it) and refuses with one line while another process holds it; the lock goes with the block (or
    the process). `out.write(fill)` calls `fill(stage)` on a fresh temp folder beside `path`; everything
    it writes lands at `path` in one rename (see `atomic_dir`, with `carry`: entries it did not write —
    a run folder, checkpoints, other files — stay). A reader sees the whole old folder or the whole new one.
    """

    def __init__(self, path: str | Path, whole: bool = True):
        self.path, self.whole = Path(path), whole  # whole=False: only the lock (a writer of single files)
        self._lock = None

    @property
    def lock_file(self) -> Path:
        return self._abs.parent / f".{self._abs.name}{LOCK_SUFFIX}"

    @property
    def _abs(self) -> Path:
        return Path(os.path.abspath(self.path))

    def __enter__(self) -> OutFolder:
        from filelock import FileLock, Timeout

        target = self._abs
        if os.path.lexists(target) and not target.is_dir():
            raise PatchlabError("exists and is not a directory", where=str(self.path), param="out")
        cwd = Path(os.path.abspath(os.getcwd()))
        if self.whole and (target.parent == target or target == cwd or target in cwd.parents):
            raise PatchlabError(
                "is the current folder or holds it: an output folder is replaced whole, give it a folder of its own",
                where=str(self.path),
                param="out",
            )
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.lock_file), timeout=0)
            lock.acquire()
        except Timeout:
            raise PatchlabError(
                f"another patchlab run is writing this folder (it holds {self.lock_file}); "
                "wait for it to finish or choose another folder",
                where=str(self.path),
                param="out",
            ) from None
        except OSError as exc:
            raise _write_error(exc, self.lock_file) from None
        self._lock = lock
        recover(target.parent)
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def write(self, fill: Callable[[Path], Mapping[str, str | Path]]) -> dict[str, Path]:
        """Commit what `fill(stage)` writes; returns its {name: path} with each path moved under the folder."""
        with atomic_dir(self._abs, carry=True) as stage:
            try:
                written = dict(fill(stage))
            except PatchlabError as exc:  # name the folder the user gave, not the staging folder
                if exc.where and str(stage) in exc.where:
                    exc.where = exc.where.replace(str(stage), str(self.path))
                    exc.args = (str(exc.args[0]).replace(str(stage), str(self.path)), *exc.args[1:])
                raise
        return {name: self.path / Path(p).relative_to(stage) for name, p in written.items()}


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
