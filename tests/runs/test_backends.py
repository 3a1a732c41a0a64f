"""Worker faults (patchlab.runs.backends): a worker that dies is replaced and its shard re-run; an item that kills
two workers is quarantined; a Ray node removed mid-run changes nothing; options and a missing Ray are
refused in one line. Faults are real process deaths (`os._exit` in the worker, or a removed Ray node)."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from reliability.relhelp import ITEMS, cli, write_set

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import TwoHopItem
from patchlab.runs import jobs
from patchlab.runs.backends import Load, check_threads

pytestmark = pytest.mark.usefixtures("one_thread")


def gap_run(tmp_path, name, model_dir, backend, items=None, shard_size=3, **env):
    """A sharded gap evaluation of the tiny model; returns the result and the run's metadata."""
    items = items or [TwoHopItem.from_dict(d) for d in ITEMS]
    with jobs.Run("evaluate", {"shard_size": shard_size}, items, tmp_path / name, Load(str(model_dir)), backend) as run:
        result = jobs.evaluate(run, items, "set")
    return result, result.meta["run"]


@pytest.fixture(scope="module")
def clean(tiny_dir, tmp_path_factory):
    return gap_run(tmp_path_factory.mktemp("clean"), "run", tiny_dir, jobs.Backend("local", 1, 1))[0]


def test_a_dead_worker_is_replaced_and_its_shard_rerun(clean, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHLAB_FAULT_ITEM", "t-2")
    monkeypatch.setenv("PATCHLAB_FAULT_ONCE", str(tmp_path / "crashed-once"))
    result, meta = gap_run(tmp_path, "run", tiny_dir, jobs.Backend("local", 2, 1), shard_size=1)
    assert (tmp_path / "crashed-once").exists() and meta["workers_died"] == 1  # a worker really died
    assert result.items == clean.items and meta["quarantined"] == []
    assert meta["shards_run"] == 3  # each shard written once: no duplicate rows


def test_an_item_that_kills_two_workers_is_quarantined(clean, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHLAB_FAULT_ITEM", "t-2")
    result, meta = gap_run(tmp_path, "run", tiny_dir, jobs.Backend("local", 2, 1), shard_size=3)
    assert meta["quarantined"] == ["t-2"] and meta["workers_died"] == 4  # twice with its shard, twice alone
    assert [r["id"] for r in result.items] == ["t-1", "t-3"]
    assert result.items == [r for r in clean.items if r["id"] != "t-2"]
    assert result.summary["all"]["n"] == 2


def test_thread_and_worker_counts_are_checked():
    with pytest.raises(PatchlabError, match="cores on this machine"):
        check_threads("local", 64, 1, None)
    with pytest.raises(PatchlabError, match="must be >= 1"):
        check_threads("local", 0, 1, None)
    check_threads("ray", 64, 1, "10.0.0.1:6379")  # a cluster's cores are not this machine's


def test_cli_refuses_bad_scale_options_in_one_line(tiny_dir, tmp_path, capsys):
    prompts = write_set(tmp_path / "set.jsonl")
    base = ["evaluate", "--model", tiny_dir, "--prompt-set", prompts]
    cases = {
        "--workers 64": (["--workers", "64", "--threads", "1"], "cores on this machine"),
        "--shard-size 0": (["--run-dir", tmp_path / "r0", "--shard-size", "0"], "--shard-size: must be >= 1"),
        "--resume nothing": (["--resume", tmp_path / "none"], "no run to resume here"),
        "--run-dir + --resume": (["--run-dir", tmp_path / "a", "--resume", tmp_path / "b"], "not both"),
        "--backend slurm": (["--backend", "slurm"], "unknown backend 'slurm'"),
    }
    for name, (extra, message) in cases.items():
        out = tmp_path / f"out-{len(name)}"
        code, lines = cli([*base, *extra, "--out", out], capsys)
        assert code == 2 and len(lines) == 1 and message in lines[0], (name, lines)
        assert not out.exists(), name


def test_a_run_directory_of_another_run_is_refused(tiny_dir, tmp_path, capsys):
    prompts = write_set(tmp_path / "set.jsonl")
    base = [
        "evaluate",
        "--model",
        tiny_dir,
        "--prompt-set",
        prompts,
        "--run-dir",
        tmp_path / "r",
        "--out",
        tmp_path / "o",
    ]
    assert cli(base, capsys)[0] == 0
    code, lines = cli([*base, "--batch-size", "2"], capsys)  # another config: another run id
    assert code == 2 and len(lines) == 1 and "belongs to run" in lines[0]


def test_ray_missing_says_what_to_install(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    prompts = write_set(tmp_path / "set.jsonl")
    code, lines = cli(
        ["evaluate", "--model", tiny_dir, "--prompt-set", prompts, "--backend", "ray", "--out", tmp_path / "o"], capsys
    )
    assert code == 2 and lines == ["error: --backend ray: Ray is not installed: pip install 'patchlab[ray]'"]


def test_a_ray_node_removed_mid_run_changes_nothing(smol, shipped, tmp_path, ray_alone):
    """A two-node Ray cluster on loopback (Ray's own Cluster utility), one actor per node; the second node is
    removed after the first shard is written. Its shard is re-run on the surviving node: same rows, none twice."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'patchlab[ray]')")
    from ray.cluster_utils import Cluster

    items = list(shipped.stratified(1))
    with jobs.Run(
        "evaluate",
        {"shard_size": 1},
        items,
        tmp_path / "ref",
        Load("smollm2-135m"),
        jobs.Backend("local", 1, 1),
        model=smol,
    ) as run:
        reference = jobs.evaluate(run, items, "shipped")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        box: dict = {}

        def remove_after_first_shard():
            deadline = time.time() + 600
            while not list((tmp_path / "ray").glob("gap-*/shard-*.done")) and time.time() < deadline:
                time.sleep(0.1)
            cluster.remove_node(node)
            box["removed"] = time.time()

        remover = threading.Thread(target=remove_after_first_shard, daemon=True)
        remover.start()
        with jobs.Run(
            "evaluate",
            {"shard_size": 1},
            items,
            tmp_path / "ray",
            Load("smollm2-135m"),
            jobs.Backend("ray", 2, 1, cluster.address),
        ) as run:
            result = jobs.evaluate(run, items, "shipped")
        remover.join(5)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "removed" in box and result.meta["run"]["workers_died"] >= 1  # the removed node's actor died
    assert result.items == reference.items and result.summary == reference.summary
    assert result.meta["run"]["shards_run"] == len(items)  # every shard written exactly once
    assert len({r["id"] for r in result.items}) == len(items)
