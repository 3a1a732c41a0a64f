"""Edit creation as a sharded job (`jobs.compute_edits`, `patchlab edit --workers N`): each item's edit is
computed by whichever worker holds its shard, and the deltas — and the saved .edit files, byte for byte —
equal the serial `edit_each`'s when the workers use as many torch threads as the serial run (here: one).
A batch edit (one least-squares computation) is refused with a sharded scale, in one line."""

from __future__ import annotations

import time

import pytest
import torch
from reliability.relhelp import ITEMS, assert_refused, cli, write_set

from patchlab.core.prompts import TwoHopItem
from patchlab.core.spec import Head, HeadSet
from patchlab.methods import edit as E
from patchlab.runs import jobs
from patchlab.runs.backends import Load

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_same(serial: list[E.ComputedEdit], sharded: list[E.ComputedEdit], tmp_path) -> None:
    """Same items, heads, identity and method; deltas equal bit for bit; the saved files equal byte for byte."""
    assert [[it.id for it in c.items] for c in sharded] == [[it.id for it in c.items] for c in serial]
    for i, (a, b) in enumerate(zip(serial, sharded)):
        ea, eb = a.edit, b.edit
        assert (ea.model, ea.weights_sha256, ea.heads, ea.item_ids) == (
            eb.model,
            eb.weights_sha256,
            eb.heads,
            eb.item_ids,
        )
        assert ea.method == eb.method
        assert set(ea.deltas) == set(eb.deltas)
        for layer in ea.deltas:
            assert ea.deltas[layer].dtype == eb.deltas[layer].dtype == torch.float32
            assert torch.equal(ea.deltas[layer].view(torch.int32), eb.deltas[layer].view(torch.int32)), layer
        fa, fb = ea.save(tmp_path / f"serial-{i}.edit"), eb.save(tmp_path / f"sharded-{i}.edit")
        assert fa.read_bytes() == fb.read_bytes()


def test_sharded_edits_equal_the_serial_ones_bit_for_bit(tiny, tiny_dir, tmp_path, monkeypatch):
    """Three items, two layers, the optimised target with a KL term and a null-space projection whose
    preserved prompts depend on the item: serial `edit_each` vs two local one-thread workers (each computing
    the covariance itself, in a cache of its own), then a resumed run reading every shard back."""
    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path / "cache-serial"))
    items = [TwoHopItem.from_dict(d) for d in ITEMS]
    heads = HeadSet([Head(0, 1), Head(1, 2)])
    cfg = E.EditConfig(n_prefixes=3, opt_prefixes=2, opt_steps=5, target_prob=1.0, null_space=0.05)
    unrelated = [items[2].hop2]
    keep = lambda group: [it.hop1 for it in group] + [items[2].composed]  # noqa: E731
    serial = E.edit_each(tiny, items, heads, cfg, unrelated=unrelated, preserved=keep, progress=False)

    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path / "cache-sharded"))
    got = []
    for backend, resume in ((jobs.Backend("local", 2, 1), False), (jobs.Backend("local", 1, 1), True)):
        with jobs.Run(
            "edit", {"shard_size": 1}, items, tmp_path / "run", Load(str(tiny_dir)), backend, resume=resume
        ) as run:
            got.append((jobs.compute_edits(run, items, heads, cfg, unrelated, keep), run.meta()))
    (sharded, meta), (again, meta_again) = got
    assert meta["workers"] == 2 and meta["threads_per_worker"] == 1 and meta["shards_run"] == 3
    assert list((tmp_path / "cache-sharded" / "covariance").rglob("layer*.pt"))  # the workers computed C
    _assert_same(serial, sharded, tmp_path)
    assert meta_again["shards_run"] == 0 and meta_again["shards_reused"] == 3
    _assert_same(serial, again, tmp_path)  # rows read back from JSON + safetensors give the same files
    assert all(c.seconds > 0 for c in sharded)


@pytest.fixture
def tiny_set(tiny, tmp_path):
    from patchlab.core.prompts import PromptSet
    from patchlab.methods.gap import evaluate_gap

    path = write_set(tmp_path / "set.jsonl")
    gap = evaluate_gap(tiny, PromptSet.load(path), progress=False)
    assert not any(r["composed"] for r in gap.items)  # every item is a failure to edit
    return path, gap.save(tmp_path / "gap")["result.json"]


def test_cli_edit_with_two_workers_writes_the_serial_files(tiny_dir, tiny_set, tmp_path, capsys, monkeypatch):
    """`patchlab edit --workers 2 --threads 1` writes the same .edit files, byte for byte, as the in-process run
    with one torch thread (this test process), and the same report numbers."""
    import json

    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path / "cache"))
    path, gap = tiny_set
    argv = ["edit", "--model", tiny_dir, "--prompt-set", path, "--ids", "t-1,t-2,t-3", "--heads", "0.1,1.2"]
    argv += ["--gap", gap, "--quiet"]
    seconds = {}
    for name, extra in (("serial", []), ("sharded", ["--workers", "2", "--threads", "1", "--shard-size", "1"])):
        start = time.perf_counter()
        code, lines = cli([*argv, *extra, "--out", tmp_path / name], capsys)
        seconds[name] = time.perf_counter() - start
        assert code == 0, lines
    files = {n: sorted((tmp_path / n / "edits").glob("*.edit")) for n in ("serial", "sharded")}
    assert [f.name for f in files["serial"]] == ["t-1.edit", "t-2.edit", "t-3.edit"]
    assert [f.name for f in files["sharded"]] == [f.name for f in files["serial"]]
    for a, b in zip(files["serial"], files["sharded"]):
        assert a.read_bytes() == b.read_bytes(), a.name
    serial, sharded = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("serial", "sharded"))
    assert sharded["summary"] == serial["summary"]
    assert sharded["meta"]["run"]["workers"] == 2 and sharded["meta"]["run"]["shards_run"] == 3
    assert (tmp_path / "sharded" / "run" / "job.json").is_file() and "run" not in serial["meta"]
    print(f"tiny edit, 3 items: serial {seconds['serial']:.1f} s, 2 workers {seconds['sharded']:.1f} s")


def test_a_sharded_batch_edit_is_refused_in_one_line(tiny_dir, tiny_set, tmp_path, capsys):
    path, gap = tiny_set
    out = tmp_path / "out"
    code, lines = cli(
        ["edit", "--model", tiny_dir, "--prompt-set", path, "--ids", "t-1,t-2", "--heads", "1.2", "--gap", gap,
         "--batch", "--workers", "2", "--out", out],
        capsys,
    )  # fmt: skip
    assert_refused(code, lines, "--workers: a batch edit is one least-squares computation and cannot be sharded")
    assert not (out / "run").exists()


@pytest.mark.real
def test_sharded_edits_of_smollm2_equal_the_serial_ones(smol, shipped, tmp_path):
    """The real model: two items, one head, the optimised target (10 Adam steps) with its KL prompts: two
    spawned one-thread workers give the serial (one-thread) deltas and files."""
    items = list(shipped)[:2]
    heads = HeadSet([Head(23, 4)])
    cfg = E.EditConfig(opt_steps=10)
    unrelated = [it.composed for it in list(shipped)[2:6]]
    start = time.perf_counter()
    serial = E.edit_each(smol, items, heads, cfg, unrelated=unrelated, progress=False)
    serial_s = time.perf_counter() - start
    start = time.perf_counter()
    with jobs.Run(
        "edit", {"shard_size": 1}, items, tmp_path / "run", Load("smollm2-135m"), jobs.Backend("local", 2, 1)
    ) as run:
        sharded = jobs.compute_edits(run, items, heads, cfg, unrelated)
    sharded_s = time.perf_counter() - start
    _assert_same(serial, sharded, tmp_path)
    print(f"smollm2 edit, 2 items: serial {serial_s:.1f} s, 2 workers {sharded_s:.1f} s (with their loads)")
