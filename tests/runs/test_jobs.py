"""Sharded runs (patchlab.runs.jobs): keys and shards, the run directory's guards, and — on the real default
model — the same result from the plain path, one in-process worker, two local processes and two Ray actors,
and after a driver killed mid-run and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchlab.core.errors import PatchlabError
from patchlab.runs import jobs
from patchlab.runs.backends import Load

pytestmark = pytest.mark.usefixtures("one_thread")


def records(n: int) -> list[dict]:
    return [{"id": f"i{k}", "kind": "k", "composed": f"prompt {k}"} for k in range(n)]


# --- keys, shards, run directory (no model) ------------------------------------------------------------


def test_item_key_is_the_hash_of_the_normalised_record():
    a = {"id": "x", "composed": "Caf\u00e9", "kind": "k"}
    b = {"kind": "k", "composed": "Cafe\u0301", "id": "x"}  # other key order, decomposed é
    assert jobs.item_key(a) == jobs.item_key(b)
    assert jobs.item_key(a) != jobs.item_key({**a, "composed": "Cafe"})


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 9), seed=st.randoms(use_true_random=False))
def test_shards_depend_only_on_content_and_size(n, k, seed):
    items = records(n)
    shuffled = list(items)
    seed.shuffle(shuffled)
    one, two = jobs.Stage("gap", {}, items, shard_size=k), jobs.Stage("gap", {}, shuffled, shard_size=k)
    assert [[d["id"] for d in s] for s in one.shards()] == [[d["id"] for d in s] for s in two.shards()]
    assert one.id == two.id
    flat = [d["id"] for s in one.shards() for d in s]
    assert sorted(flat) == sorted(d["id"] for d in items) and all(len(s) <= k for s in one.shards())
    assert jobs.Stage("gap", {}, items, shard_size=k + 1).id != one.id


def test_a_run_directory_holds_one_run(tmp_path):
    job = {"run_id": "aaaa", "command": "evaluate"}
    jobs.RunDir(tmp_path / "r", job)
    jobs.RunDir(tmp_path / "r", job, resume=True)  # the same run: fine
    with pytest.raises(PatchlabError, match="belongs to run aaaa, not to this run \\(bbbb\\)"):
        jobs.RunDir(tmp_path / "r", {**job, "run_id": "bbbb"})
    with pytest.raises(PatchlabError, match="no run to resume"):
        jobs.RunDir(tmp_path / "none", job, resume=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PatchlabError, match="not an empty patchlab run directory"):
        jobs.RunDir(tmp_path / "busy", job)


def test_a_shard_counts_only_when_its_done_record_matches(tmp_path):
    run = jobs.RunDir(tmp_path / "r", {"run_id": "x"})
    stage = jobs.Stage("gap", {}, records(3), shard_size=3)
    folder = run.stage_dir(stage)
    keys = [stage.keys[d["id"]] for d in stage.shards()[0]]
    lines = [{"key": key, "row": {"id": f"i{i}"}} for i, key in enumerate(keys)]
    assert run.verified(folder, 0, keys) is None  # nothing written yet
    run.write_shard(folder, 0, keys, lines, [], 1.0)
    assert run.verified(folder, 0, keys)["rows"] == lines
    assert run.verified(folder, 0, keys[::-1]) is None  # another plan
    path = folder / "shard-00000.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"i1"', b'"i9"'))  # tampered rows
    assert run.verified(folder, 0, keys) is None
    path.write_bytes(b"\xff not json\n")  # garbage rows
    assert run.verified(folder, 0, keys) is None
    (folder / "shard-00000.done").write_text("{")  # torn done record
    assert run.verified(folder, 0, keys) is None
    (folder / "shard-00000.done").write_text("[1]")  # not a record
    assert run.verified(folder, 0, keys) is None


# --- the same numbers from every backend (real model) --------------------------------------------------


def _run(tmp_path, name, items, backend, model=None):
    """Gap of `items`, then locate ('both': screen + exact verify of 3 heads) on 3 failures, in one run."""
    load = Load("smollm2-135m")
    with jobs.Run("locate", {"test": True, "shard_size": 2}, items, tmp_path / name, load, backend, model=model) as run:
        gap = jobs.evaluate(run, items, "shipped")
        fails = gap.failed_items(items)[:3]
        found = jobs.locate(run, fails, items, method="both", verify=3, top_k=2)
    return gap, found


def _numbers(gap, found) -> dict:
    return {
        "gap": gap.items,
        "summary": gap.summary,
        "rows": found.items,
        "mean": found.mean,
        "std": found.std,
        "ranking": found.ranking,
        "screen": found.attribution_mean,
    }


@pytest.fixture(scope="module")
def slice_items(shipped):
    return list(shipped.stratified(2))


@pytest.fixture(scope="module")
def serial(smol, slice_items, tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(tmp_path_factory.mktemp("serial"), "run", slice_items, jobs.Backend("local", 1, 1), model=smol)
    finally:
        torch.set_num_threads(before)


def test_sharded_serial_equals_the_plain_api(serial, smol, slice_items):
    from patchlab.methods.gap import evaluate_gap
    from patchlab.methods.locate import locate

    gap, found = serial
    assert gap.items == evaluate_gap(smol, slice_items, progress=False).items
    plain = locate(smol, gap.failed_items(slice_items)[:3], method="both", verify=3, top_k=2, progress=False)
    assert found.mean == plain.mean and found.ranking == plain.ranking
    assert found.n >= 2 and found.ranking[0]["mean"] != 0  # real effects, not an empty table
    assert found.meta["run"]["shards_run"] > 0 and found.meta["weights_sha256"] == gap.meta["weights_sha256"]


def test_two_local_processes_give_bit_identical_results(serial, slice_items, tmp_path):
    gap, found = _run(tmp_path, "run", slice_items, jobs.Backend("local", 2, 1))
    assert _numbers(gap, found) == _numbers(*serial)
    assert found.meta["run"]["workers"] == 2 and found.meta["run"]["threads_per_worker"] == 1


def test_two_ray_actors_give_bit_identical_results(serial, slice_items, tmp_path, ray_alone):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'patchlab[ray]')")
    try:
        gap, found = _run(tmp_path, "run", slice_items, jobs.Backend("ray", 2, 1))
    finally:
        ray.shutdown()
    assert _numbers(gap, found) == _numbers(*serial)
    assert found.meta["run"]["backend"] == "ray"


def test_a_killed_driver_resumes_to_the_same_result(serial, slice_items, tmp_path):
    """SIGKILL `patchlab evaluate` after its first shard, then --resume: verified shards are kept, the rest
    run, and the rows equal an uninterrupted run's."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "patchlab.cli",
        "evaluate",
        "--per-kind",
        "2",
        "--run-dir",
        str(run_dir),
        "--shard-size",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PATCHLAB_QUIET": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(run_dir.glob("gap-*/shard-*.done")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    kept = len(list(run_dir.glob("gap-*/shard-*.done")))
    assert 1 <= kept < 8
    resume = [a if a != "--run-dir" else "--resume" for a in argv]
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["meta"]["run"]["shards_reused"] == kept
    assert result["meta"]["run"]["shards_run"] == 8 - kept
    assert result["items"] == serial[0].items
    assert not list(run_dir.rglob(".patchlab-tmp-*"))


def test_edit_evaluation_sharded_equals_across_workers_and_the_plain_report(serial, smol, slice_items, tmp_path):
    """A saved batch edit of two failures, evaluated by item shards: one worker and two local processes give
    identical rows; both agree with the plain `evaluate_edits` (which shares unedited measurements across
    items, so batches — and the last float bits — may differ)."""
    from patchlab.core.spec import parse_heads
    from patchlab.methods.edit import EditConfig, edit_each
    from patchlab.methods.editeval import evaluate_edits

    gap = serial[0]
    fails = gap.failed_items(slice_items)[:2]
    heads = parse_heads("23.4,23.5", smol.cfg.n_layers, smol.cfg.n_heads)
    [(group, edit, _)] = edit_each(smol, fails, heads, EditConfig(target="guide", covariance=False), batch=True)
    path = edit.save(tmp_path / "batch.edit")
    reports = []
    for name, backend in (("one", jobs.Backend("local", 1, 1)), ("two", jobs.Backend("local", 2, 1))):
        with jobs.Run(
            "apply",
            {"shard_size": 1},
            slice_items,
            tmp_path / name,
            Load("smollm2-135m"),
            backend,
            model=smol if backend.workers == 1 else None,
        ) as run:
            reports.append(jobs.evaluate_edit(run, path, group, slice_items, gap))
    one, two = reports
    assert one.items == two.items and one.summary == two.summary
    assert one.summary["correction"]["after"] > one.summary["correction"]["before"]  # the edit fixes its items
    plain = evaluate_edits(smol, [(group, edit, 0.0)], slice_items, gap, progress=False)
    for name, row in plain.summary.items():
        for key in ("n", "before", "after"):
            assert one.summary[name][key] == pytest.approx(row[key], abs=1e-6), (name, key)


def test_hidden_states_captured_in_shards_match_across_workers_and_resume(smol, tmp_path):
    """emergence's hidden-state capture as a sharded job: one worker and two local processes give identical
    streams, close to the in-process capture (other batches); a resumed run reuses every shard (tensors kept
    in verified safetensors beside the rows)."""
    import torch

    from patchlab.studies import emergence as E

    tokens = E.equal_length(smol, E.shipped_texts()[:40], 6).tokens
    plain = E.hidden_states(smol, tokens, cache_dir=False, progress=False)
    got = []
    for name, backend in (("one", jobs.Backend("local", 1, 1)), ("two", jobs.Backend("local", 2, 1)), ("one", None)):
        resume = backend is None
        with jobs.Run(
            "emergence",
            {"test": True, "shard_size": 16},
            [],
            tmp_path / name,
            Load("smollm2-135m"),
            backend or jobs.Backend("local", 1, 1),
            model=smol,
            resume=resume,
        ) as run:
            got.append(E.hidden_states(smol, tokens, cache_dir=False, progress=False, capture=jobs.ShardedCapture(run)))
    one, two, again = got
    for hs in (two, again):
        assert (
            torch.equal(hs.macro, one.macro) and torch.equal(hs.micro, one.micro) and torch.equal(hs.vocab, one.vocab)
        )
    assert torch.equal(one.vocab, plain.vocab) and one.meta["streams"] == plain.meta["streams"]
    assert torch.allclose(one.macro, plain.macro, atol=1e-4) and torch.allclose(one.micro, plain.micro, atol=1e-4)
    assert one.meta["run"]["shards_run"] > 0
    assert again.meta["run"]["shards_run"] == 0 and again.meta["run"]["shards_reused"] == one.meta["run"]["shards_run"]
