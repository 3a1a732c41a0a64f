"""A command's `--out` folder as one unit, and one writer at a time.

Every command writes its files (result.json, figure.html, edits/, positions/, report.html ...) into a
staging folder beside `--out` and swaps it in whole (`patchlab.core.io.OutFolder`): the old folder is
renamed aside, the new one renamed into place, the old one removed. A writer SIGKILLed at every rename,
every file write, every hard link that carries an untouched entry over and at the removal of the old
folder leaves, once a reader or the next writer has recovered, the whole old folder or the whole new one —
never a mix. A second run into a folder another process holds is refused with one line (exit 2) and writes
nothing; the lock goes with its holder.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from relhelp import HalfWrite, assert_refused, cli, serve_models, write_set

from patchlab.core import io as pio
from patchlab.core.errors import PatchlabError
from patchlab.core.io import ASIDE_PREFIX, TMP_PREFIX, OutFolder
from patchlab.methods import edit as E
from patchlab.methods.gap import GapResult, summarize
from patchlab.workflows.chain import EditRun

ROOT = Path(__file__).resolve().parents[2]


def gap_result(n: int) -> GapResult:
    rows = [
        {"id": f"x-{i}", "kind": "k", "hop1": True, "hop2": True, "composed": i % 2 == 0}
        | {"hop1_text": "a", "hop2_text": "b", "composed_text": "c"}
        for i in range(n)
    ]
    return GapResult(model="tiny", prompt_set="mem", items=rows, summary={"all": summarize(rows)})


def edit_run(seeds: list[int], n: int) -> EditRun:
    """What `patchlab edit` writes: edits/ID.edit for each seed, result.json + figure.html (a gap result here)."""
    edits = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        e = E.Edit("tiny", "f" * 64, {1: [2]}, {1: torch.randn(64, 16, generator=g)}, [f"x-{s}"])
        edits.append(SimpleNamespace(edit=e, items=[SimpleNamespace(id=f"x-{s}")]))
    return EditRun(gap_result(n), edits)


def commit(out: Path, run: EditRun) -> None:
    with OutFolder(out) as o:
        o.write(run.save)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith((TMP_PREFIX, ASIDE_PREFIX)))


# --- SIGKILL at every point of a commit ----------------------------------------------------------------


def _stop_at(point: str, nth: int, reached) -> None:
    """In the child: the `nth` call of `point` stops at `reached` (never returns; the child is killed)."""
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        if calls["n"] == nth:
            reached()
        return False

    if point == "write":  # a file's bytes half written
        real = os.fdopen

        def fdopen(*a, **k):
            calls["n"] += 1
            fh = real(*a, **k)
            return HalfWrite(fh, reached) if calls["n"] == nth else fh

        pio.os.fdopen = fdopen
    elif point == "replace":  # before a rename: a file, the edits folder, the old folder aside, the new one in
        real_replace = os.replace
        pio.os.replace = lambda src, dst: hit() or real_replace(src, dst)
    elif point == "link":  # carrying an untouched entry of the old folder into the new one
        real_link = os.link
        pio.os.link = lambda *a, **k: hit() or real_link(*a, **k)
    else:  # removing the old folder, after the new one is in
        real_rmtree = pio.shutil.rmtree

        def rmtree(path, *a, **k):
            if Path(path).name.startswith(ASIDE_PREFIX):
                first = next(iter(sorted(Path(path).rglob("*"))), None)
                if first is not None and first.is_file():
                    first.unlink()  # half removed
                hit()
            return real_rmtree(path, *a, **k)

        pio.shutil.rmtree = rmtree


def killed_at(write, point: str, nth: int) -> bool:
    """Fork a child that runs `write()`; SIGKILL it at the `nth` `point`. False: it finished before that."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            os.close(r)

            def reached():
                os.write(w, b"!")
                time.sleep(120)

            _stop_at(point, nth, reached)
            write()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        got = os.read(r, 1) if ready else b""
        if got == b"!":
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
    if got != b"!":
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the writer failed"
        return False
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return True


def whole_html(data: bytes) -> bool:
    return data.rstrip().endswith(b"</html>")


def is_new(out: Path, new: dict[str, bytes], old: dict[str, bytes]) -> bool:
    """Every file of the new folder and nothing else: JSON and text byte for byte, edit files by content
    (safetensors orders its metadata freely), figures whole and new (plotly ids differ per run)."""
    snap = snapshot(out)
    if set(snap) != set(new):
        return False
    for name, data in snap.items():
        if name.endswith(".html"):
            if not whole_html(data) or data == old.get(name):
                return False
        elif name.endswith(".edit"):
            e = E.Edit.load(out / name)
            if e.item_ids != [Path(name).stem] or data == old.get(name):
                return False
        elif data != new[name]:
            return False
    return True


def old_folder(out: Path) -> None:
    """The first run's folder, plus what a command does not write itself (a run folder, a user's notes)."""
    commit(out, edit_run([1, 2], 4))
    (out / "run").mkdir()
    (out / "run" / "shard-0.json").write_text('{"done": true}\n')
    (out / "notes.txt").write_text("mine\n")


@pytest.mark.parametrize("point", ["replace", "write", "link", "rmtree"])
def test_a_kill_at_any_point_of_a_commit_leaves_the_old_or_the_new_folder(tmp_path, point):
    ref = tmp_path / "ref" / "out"
    old_folder(ref)
    commit(ref, edit_run([3], 6))  # the new folder: edits/ holds only x-3, the run folder and notes carried over
    new = snapshot(ref)
    assert {"run/shard-0.json", "notes.txt", "edits/x-3.edit"} <= set(new) and "edits/x-1.edit" not in new
    seen, nth = {"old": 0, "new": 0}, 0
    while True:
        nth += 1
        out = tmp_path / f"{point}-{nth}" / "out"
        old_folder(out)
        old = snapshot(out)
        if not killed_at(lambda out=out: commit(out, edit_run([3], 6)), point, nth):
            break
        # a reader that finds no folder puts back the one a killed writer moved aside
        got = GapResult.from_json(out / "result.json")
        snap = snapshot(out)
        if snap == old:
            seen["old"] += 1
            assert got.items == gap_result(4).items
        else:
            assert is_new(out, new, old), (point, nth, sorted(snap))
            seen["new"] += 1
            assert got.items == gap_result(6).items
        # the next run into the folder sweeps what the dead writer left and writes whole
        commit(out, edit_run([5], 3))
        assert GapResult.from_json(out / "result.json").items == gap_result(3).items
        assert sorted(p.name for p in (out / "edits").iterdir()) == ["x-5.edit"]
        assert leftovers(out.parent) == [], leftovers(out.parent)
    assert nth > 1, f"never reached a {point}"
    if point in ("replace", "write"):
        assert seen["old"] > 0  # killed before the swap
    if point == "rmtree":
        assert seen["new"] > 0  # killed after the new folder got in (every rename before it: the old one)
    print(point, nth - 1, "kill points", seen)


def test_a_kill_between_the_renames_leaves_no_folder_until_a_reader_or_writer_recovers(tmp_path):
    """Killed after the old folder went aside and before the new one came in: the name is empty, the old
    folder sits aside whole; a reader (result JSON, edit file, report) or the next lock puts it back."""
    n = 0
    while True:  # the rename that moves the old folder aside: the first after which no folder is left
        n += 1
        out = tmp_path / f"find-{n}" / "out"
        old_folder(out)
        assert killed_at(lambda out=out: commit(out, edit_run([3], 6)), "replace", n)
        if not out.exists():
            break
    for reader in ("result", "edit", "report", "lock"):
        out = tmp_path / reader / "out"
        old_folder(out)
        old = snapshot(out)
        assert killed_at(lambda out=out: commit(out, edit_run([3], 6)), "replace", n)
        assert not out.exists()
        asides = [p for p in out.parent.iterdir() if p.name.startswith(ASIDE_PREFIX)]
        assert len(asides) == 1 and snapshot(asides[0]) == old
        if reader == "result":
            assert GapResult.from_json(out / "result.json").items == gap_result(4).items
        elif reader == "edit":
            assert E.Edit.load(out / "edits" / "x-1.edit").item_ids == ["x-1"]
        elif reader == "report":
            from patchlab.results.report import find_results

            assert [r.kind for _, r in find_results(out)] == ["gap"]
        else:
            with OutFolder(out):
                pass
        assert snapshot(out) == old
        assert not [p for p in out.parent.iterdir() if p.name.startswith(ASIDE_PREFIX)]


# --- one writer at a time ------------------------------------------------------------------------------

HOLD = """
import sys, time
from patchlab.core.io import OutFolder
with OutFolder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATCHLAB_QUIET": "1"}


def test_a_second_run_into_a_held_folder_is_refused_with_one_line(tmp_path, tiny, tiny_dir, monkeypatch, capsys):
    prompts = write_set(tmp_path / "set.jsonl")
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = tmp_path / f".out{pio.LOCK_SUFFIX}"
        assert lock.is_file()
        # a second real process: the command line, refused before it loads anything
        second = subprocess.run(
            [sys.executable, "-m", "patchlab.cli", "evaluate", "--model", str(tiny_dir)]
            + ["--prompt-set", str(prompts), "--out", str(out)],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=tmp_path,
            timeout=300,
        )
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2, second.stderr
        assert len(lines) == 1 and "Traceback" not in second.stderr, lines
        assert lines[0] == (
            f"error: --out {out}: another patchlab run is writing this folder (it holds {lock}); "
            "wait for it to finish or choose another folder"
        ), lines[0]
        assert not out.exists()
        # in this process too (another lock on the same file), for every command that writes a folder
        serve_models(monkeypatch, {str(tiny_dir): tiny})
        monkeypatch.setenv("PATCHLAB_QUIET", "1")
        for argv in (
            ["evaluate", "--model", tiny_dir, "--prompt-set", prompts],
            ["lens", "--model", tiny_dir, "--prompt", "the capital of france is"],
            ["locate", "--model", tiny_dir, "--prompt-set", prompts],
            ["edit", "--model", tiny_dir, "--prompt-set", prompts, "--ids", "t-1", "--heads", "1.2"],
            ["demo", "--model", tiny_dir, "--quick"],
            ["mechanisms", "--model", tiny_dir, "--edits", tmp_path],
        ):
            code, lines = cli([*argv, "--out", out], capsys)
            assert_refused(code, lines, "another patchlab run is writing this folder", out)
    finally:
        holder.kill()  # SIGKILL: the lock goes with the process
        holder.wait()
    assert not out.exists()
    serve_models(monkeypatch, {str(tiny_dir): tiny})
    code, lines = cli(["evaluate", "--model", tiny_dir, "--prompt-set", prompts, "--out", out], capsys)
    assert code == 0, lines
    assert GapResult.from_json(out / "result.json").items


def test_the_lock_is_released_after_each_run_and_on_an_error(tmp_path, tiny, tiny_dir, monkeypatch, capsys):
    prompts = write_set(tmp_path / "set.jsonl")
    serve_models(monkeypatch, {str(tiny_dir): tiny})
    monkeypatch.setenv("PATCHLAB_QUIET", "1")
    out = tmp_path / "out"
    code, _ = cli(["evaluate", "--model", tiny_dir, "--prompt-set", prompts, "--batch-size", "0", "--out", out], capsys)
    assert code == 2 and not out.exists()
    for _ in range(2):
        code, lines = cli(["evaluate", "--model", tiny_dir, "--prompt-set", prompts, "--out", out], capsys)
        assert code == 0, lines
    with OutFolder(out):  # free again
        with pytest.raises(PatchlabError, match="another patchlab run is writing this folder"):
            OutFolder(out).__enter__()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [f".out{pio.LOCK_SUFFIX}"]


def test_an_out_folder_that_holds_the_working_directory_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (".", str(tmp_path / "here"), str(tmp_path)):
        code, lines = cli(["evaluate", "--out", out], capsys)
        assert_refused(code, lines, "is the current folder or holds it")
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == []
