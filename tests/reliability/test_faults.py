"""Faults: a writer SIGKILLed at several points of writing a result folder, an edit file, an edits folder
or report.html; a full disk under every writer; NaN / inf injected into activations while an edit's
target is optimised or while heads are patched.

After a kill, each file is the old complete one, the new complete one, or absent — never torn — and the
next write into the folder sweeps the dead writer's temp files (never a live writer's). A full disk is a
one-line error (exit 2 from the CLI) with nothing changed. test_atomic_io.py covers the bare writers.
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from relhelp import HalfWrite, assert_refused, cli, diff, hook_inventory, serve_models, warm, write_set

from patchlab.core import io as pio
from patchlab.core.errors import PatchlabError
from patchlab.core.io import TMP_PREFIX, WriteError, atomic_dir, sweep_stale
from patchlab.core.prompts import PromptSet
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.methods import locate as L
from patchlab.methods.gap import GapResult, evaluate_gap, summarize
from patchlab.results.report import build_report
from patchlab.runtime.identity import weights_hash


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{TMP_PREFIX}*"))


def gap_result(n: int) -> GapResult:
    rows = [
        {
            "id": f"x-{i}",
            "kind": "k",
            "hop1": True,
            "hop2": True,
            "composed": i % 2 == 0,
            "hop1_text": "a",
            "hop2_text": "b",
            "composed_text": "c",
        }
        for i in range(n)
    ]
    return GapResult(model="tiny", prompt_set="mem", items=rows, summary={"all": summarize(rows), "k": summarize(rows)})


def an_edit(seed: int) -> E.Edit:
    g = torch.Generator().manual_seed(seed)
    return E.Edit("tiny", "f" * 64, {1: [2]}, {1: torch.randn(64, 16, generator=g)}, [f"x-{seed}"])


# --- SIGKILL ---------------------------------------------------------------------------------------------


def _stop_at(point: str, nth: int, reached) -> None:
    """In the child: make the `nth` call of `point` (write / replace) stop at `reached` (it never returns)."""
    calls = {"n": 0}
    if point == "write":
        real = os.fdopen

        def fdopen(*a, **k):
            calls["n"] += 1
            fh = real(*a, **k)
            return HalfWrite(fh, reached) if calls["n"] == nth else fh

        pio.os.fdopen = fdopen  # the child's own os module: it is killed, never restored
    else:
        real_replace = os.replace

        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] == nth:
                reached()
            return real_replace(src, dst)

        pio.os.replace = replace


def killed_while(write, point: str, nth: int) -> None:
    """Fork a child that runs `write()` and stops at the `nth` `point`; SIGKILL it there."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)

            def reached():
                os.write(w, b"!")
                time.sleep(120)

            _stop_at(point, nth, reached)
            write()
        finally:
            os._exit(3)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        got = os.read(r, 1) if ready else b""
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
    assert got == b"!", f"the writer never reached {point} #{nth}"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def whole_html(data: bytes) -> bool:
    return data.rstrip().endswith(b"</html>")


# where the kill lands: (what is written, point, which call)
KILLS = {
    "result.json half written": ("result", "write", 1),
    "figure.html half written": ("result", "write", 2),
    "result folder: both written, before the renames": ("result", "replace", 1),
    "result folder: between the two renames": ("result", "replace", 2),
    "edit file half written": ("edit", "write", 1),
    "edit file written, before its rename": ("edit", "replace", 1),
    "edits folder: old one moved aside, new one not yet in": ("edits", "replace", 4),  # 1, 2: the edit files
    "edits folder: an edit file inside half written": ("edits", "write", 2),
    "report.html half written": ("report", "write", 1),
}


@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_leaves_old_or_new_whole_and_the_next_write_sweeps(tmp_path, name):
    what, point, nth = KILLS[name]
    old, new = gap_result(4), gap_result(6)
    out = tmp_path / "out"
    if what == "result":
        old.save(out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        killed_while(lambda: new.save(out), point, nth)
        left = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)}
        assert set(left) == {"result.json", "figure.html"}
        for fname, data in left.items():  # each file is the old one or a whole new one
            assert data == before[fname] or (
                whole_html(data) if fname.endswith(".html") else GapResult.from_json(out / fname).items == new.items
            ), fname
        GapResult.from_json(out / "result.json")  # the next run reads a complete result
        new.save(out)
        assert GapResult.from_json(out / "result.json").items == new.items
    elif what == "edit":
        path = an_edit(1).save(out / "a.edit")
        killed_while(lambda: an_edit(2).save(path), point, nth)
        assert E.Edit.load(path).item_ids == ["x-1"]  # still the old, complete file
        an_edit(3).save(path)
        assert E.Edit.load(path).item_ids == ["x-3"]
    elif what == "edits":

        def write_folder(seeds):
            with atomic_dir(out / "edits") as tmp:
                for s in seeds:
                    an_edit(s).save(tmp / f"{s}.edit")

        write_folder([1, 2])
        killed_while(lambda: write_folder([3, 4]), point, nth)
        edits = out / "edits"
        if edits.exists():  # the old folder whole, or (killed between the renames) no folder at all
            assert sorted(p.name for p in edits.iterdir()) == ["1.edit", "2.edit"]
            assert [E.Edit.load(edits / "1.edit").item_ids] == [["x-1"]]
        write_folder([5])
        assert sorted(p.name for p in edits.iterdir()) == ["5.edit"]
    else:
        old.save(out / "evaluate")
        page = build_report(out)
        before = page.read_bytes()
        killed_while(lambda: build_report(out), point, nth)
        assert page.read_bytes() == before
        build_report(out)
        assert whole_html(page.read_bytes()) and page.read_bytes() != before
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)], sorted(out.rglob("*"))


def test_a_live_writers_temp_file_is_never_swept(tmp_path):
    """sweep_stale tells a dead writer's temp file from a live one's by its lock."""
    out = tmp_path / "out"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _stop_at("write", 1, lambda: (os.write(w, b"!"), time.sleep(120)))
            gap_result(3).save(out)
        finally:
            os._exit(3)
    os.close(w)
    try:
        assert select.select([r], [], [], 120)[0] and os.read(r, 1) == b"!"
        live = temps(out)
        assert len(live) == 1 and sweep_stale(out) == 0 and temps(out) == live  # held: left alone
        gap_result(5).save(out)  # another writer in the same folder, meanwhile
        assert temps(out) == live
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    assert sweep_stale(out) == 1 and temps(out) == []  # dead now: swept
    assert GapResult.from_json(out / "result.json").items == gap_result(5).items


# --- a full disk -------------------------------------------------------------------------------------------


def full_disk(monkeypatch, nth: int = 1) -> None:
    """The `nth` file written from now on gets half its bytes, then ENOSPC."""
    real, calls = os.fdopen, {"n": 0}

    def fdopen(*a, **k):
        calls["n"] += 1
        fh = real(*a, **k)
        return HalfWrite(fh) if calls["n"] == nth else fh

    monkeypatch.setattr(pio.os, "fdopen", fdopen)


def no_space(fn) -> WriteError:
    with pytest.raises(WriteError) as err:
        fn()
    exc = err.value
    assert isinstance(exc, PatchlabError) and isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    assert "No space left on device" in str(exc) and len(str(exc).splitlines()) == 1
    return exc


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("nth", [1, 2])
def test_full_disk_while_saving_a_result_changes_neither_file(tmp_path, monkeypatch, nth):
    out = tmp_path / "out"
    gap_result(4).save(out)
    before = snapshot(out)
    full_disk(monkeypatch, nth)  # 1: result.json, 2: figure.html (result.json already written out)
    exc = no_space(lambda: gap_result(6).save(out))
    assert str(exc).startswith(str(out / ("result.json" if nth == 1 else "figure.html")))
    monkeypatch.undo()
    assert snapshot(out) == before


def test_full_disk_while_saving_an_edit_file_or_the_report(tmp_path, monkeypatch):
    path = an_edit(1).save(tmp_path / "e" / "a.edit")
    gap_result(4).save(tmp_path / "r" / "evaluate")
    page = build_report(tmp_path / "r")
    before = snapshot(tmp_path)
    full_disk(monkeypatch)
    no_space(lambda: an_edit(2).save(path))
    full_disk(monkeypatch)
    no_space(lambda: build_report(tmp_path / "r"))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before and page.exists()


def test_full_disk_under_the_cli_is_one_line_and_exit_2(tmp_path, tiny, tiny_dir, monkeypatch, capsys):
    prompts = write_set(tmp_path / "set.jsonl")
    serve_models(monkeypatch, {str(tiny_dir): tiny})
    monkeypatch.setenv("PATCHLAB_QUIET", "1")
    out = tmp_path / "ev"
    full_disk(monkeypatch)
    code, lines = cli(["evaluate", "--model", tiny_dir, "--prompt-set", prompts, "--out", out], capsys)
    assert_refused(code, lines, f"{out / 'result.json'}: cannot write (No space left on device); nothing was changed")
    assert snapshot(out) == {} if out.exists() else True
    # edit: the first edit file hits the full disk inside the edits folder: no folder, no result
    gap = evaluate_gap(tiny, PromptSet.load(prompts), progress=False).save(tmp_path / "gap")["result.json"]
    out = tmp_path / "ed"
    full_disk(monkeypatch)
    code, lines = cli(
        [
            "edit",
            "--model",
            tiny_dir,
            "--prompt-set",
            prompts,
            "--ids",
            "t-1",
            "--heads",
            "1.2",
            "--gap",
            gap,
            "--target",
            "guide",
            "--no-covariance",
            "--out",
            out,
        ],
        capsys,
    )
    assert_refused(code, lines, "t-1.edit: cannot write (No space left on device)")
    assert snapshot(out) == {} and not temps(out)


def test_full_disk_at_the_edit_result_leaves_no_edits_folder(tmp_path, tiny, tiny_dir, monkeypatch, capsys):
    prompts = write_set(tmp_path / "set.jsonl")
    serve_models(monkeypatch, {str(tiny_dir): tiny})
    monkeypatch.setenv("PATCHLAB_QUIET", "1")
    gap = evaluate_gap(tiny, PromptSet.load(prompts), progress=False).save(tmp_path / "gap")["result.json"]
    out = tmp_path / "ed"
    full_disk(monkeypatch, nth=2)  # the edit file goes through; result.json meets the full disk
    code, _ = cli(
        [
            "edit",
            "--model",
            tiny_dir,
            "--prompt-set",
            prompts,
            "--ids",
            "t-1",
            "--heads",
            "1.2",
            "--gap",
            gap,
            "--target",
            "guide",
            "--no-covariance",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 2 and snapshot(out) == {}


# --- NaN / inf in activations ------------------------------------------------------------------------------


class Poison:
    """A user's hook that turns an activation into `value` from its `start`-th call on — counting only calls
    made with gradients on (the optimisation steps), or only on prompts of `length` tokens."""

    def __init__(self, value: float, start: int = 0, grad_only: bool = False, length: int | None = None):
        self.value, self.start, self.grad_only, self.length, self.calls = value, start, grad_only, length, 0

    def __call__(self, act, hook):
        if self.grad_only and not torch.is_grad_enabled():
            return act
        if self.length is not None and act.shape[1] != self.length:
            return act
        self.calls += 1
        return torch.full_like(act, self.value) if self.calls > self.start else act


@pytest.fixture
def poisoned(tiny):
    """Adds a Poison hook as a user would (model.add_hook); checks that patchlab left every hook, the
    weights and requires_grad as they were, then removes it."""
    added = []

    def add(name: str, poison: Poison):
        warm(tiny)
        tiny.add_hook(name, poison)
        added.append(name)
        return hook_inventory(tiny), weights_hash(tiny)

    yield add
    for name in added:
        tiny.hook_dict[name].remove_hooks("both", including_permanent=True)
    assert not any(hp.fwd_hooks for hp in tiny.hook_dict.values())


@pytest.mark.parametrize("value, step", [(float("nan"), 0), (float("nan"), 3), (float("inf"), 2), (float("-inf"), 5)])
def test_non_finite_activation_during_target_optimisation_names_the_step(
    tiny, poisoned, tmp_path, monkeypatch, value, step
):
    from relhelp import ITEMS

    from patchlab.core.prompts import TwoHopItem

    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path))
    before, hashed = poisoned("blocks.1.hook_resid_pre", Poison(value, start=step, grad_only=True))
    cfg = E.EditConfig(target="optimize", n_prefixes=2, opt_prefixes=2, opt_steps=8, target_prob=1.0, covariance=False)
    with pytest.raises(PatchlabError, match=f"^target optimisation: non-finite loss at step {step}$"):
        E.compute_edit(tiny, [TwoHopItem.from_dict(ITEMS[0])], [Head(0, 1), Head(1, 2)], cfg)
    assert diff(before, hook_inventory(tiny)) == [] and weights_hash(tiny) == hashed


@pytest.mark.parametrize(
    "covariance, needle",
    [
        (True, "at layer 1 while computing their covariance"),
        (False, "non-finite head outputs or targets (NaN or inf) at layer 1"),
    ],
)
def test_non_finite_head_output_for_a_guide_target_is_refused(
    tiny, poisoned, tmp_path, monkeypatch, covariance, needle
):
    from relhelp import ITEMS

    from patchlab.core.prompts import TwoHopItem

    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path))
    before, hashed = poisoned("blocks.1.attn.hook_z", Poison(float("nan")))
    cfg = E.EditConfig(target="guide", n_prefixes=0, covariance=covariance)
    with pytest.raises(PatchlabError, match=re.escape(needle)):
        E.compute_edit(tiny, [TwoHopItem.from_dict(ITEMS[0])], [Head(1, 2)], cfg)
    assert diff(before, hook_inventory(tiny)) == [] and weights_hash(tiny) == hashed
    assert not list(tmp_path.rglob("*.pt"))  # no poisoned covariance cached


@pytest.mark.parametrize(
    "method, value",
    [("exact", float("nan")), ("attribution", float("nan")), ("both", float("nan")), ("both", float("inf"))],
)
def test_patching_flags_an_item_with_non_finite_activations_and_stays_finite(tiny, poisoned, tmp_path, method, value):
    enc = lambda s: tiny.to_tokens(s)[0].tolist()  # noqa: E731
    from patchlab.runtime.scoring import answer_token_id

    a, b = answer_token_id(tiny, "paris"), answer_token_id(tiny, "berlin")
    good = [
        L.PatchPair("good-1", enc("the capital of france is"), enc("the capital of germany is"), a, b),
        L.PatchPair("good-2", enc("the language of france is"), enc("the language of germany is"), a, b),
    ]
    bad = L.PatchPair(
        "poisoned", enc("the capital of the city of france is"), enc("the capital of the city of spain is"), a, b
    )
    before, hashed = poisoned("blocks.0.hook_resid_post", Poison(value, length=len(bad.clean)))
    result = L.locate_pairs(tiny, [good[0], bad, good[1]], method=method, positions="all", verify=4, progress=False)
    rows = {r["id"]: r for r in result.items}
    assert rows["poisoned"]["flagged"] and "non-finite metric" in rows["poisoned"]["flag_reason"]
    assert not rows["good-1"]["flagged"] and not rows["good-2"]["flagged"] and result.n == 2
    grids = [result.mean, result.std] + ([result.attribution_mean] if result.attribution_mean else [])
    assert all(v is None or np.isfinite(v) for g in grids for row in g for v in row)
    assert any(v is not None for row in result.mean for v in row)
    result.save(tmp_path / "loc")  # strict JSON: writes
    assert diff(before, hook_inventory(tiny)) == [] and weights_hash(tiny) == hashed


# --- NaN / inf in one item of evaluate and lens: flagged, the rest saved ---------------------------------


class OneItem:
    """Poisons whole rows of a batch: those whose token ids (seen at `embed.hook_in`, right or left padded)
    hold `tokens`. Batch rows never mix, so only that item meets the NaN / inf, in batches of any size; in
    cached decoding only the first step (the whole prompt) is poisoned."""

    def __init__(self, value: float, tokens: list[int]):
        self.value, self.tokens, self.rows = value, tokens, None

    def ids(self, act, hook):
        n = len(self.tokens)
        self.rows = torch.tensor(
            [act.shape[1] >= n and self.tokens in (act[j, :n].tolist(), act[j, -n:].tolist()) for j in range(len(act))]
        )
        return act

    def __call__(self, act, hook):
        if self.rows is None or not self.rows.any() or len(self.rows) != len(act):
            return act
        act = act.clone()
        act[self.rows] = self.value
        return act


def _poison_one_item(tiny, poisoned, value: float):
    """Poison item t-1's composed query, wherever it sits in a batch; the other prompts stay clean."""
    from relhelp import ITEMS

    from patchlab.runtime.scoring import encode

    evaluate_gap(tiny, PromptSet.load(write_set_tmp()), progress=False)  # decoding checked, unpoisoned
    poison = OneItem(value, encode(tiny, ITEMS[0]["composed"]))
    poisoned("embed.hook_in", poison.ids)
    return poisoned("blocks.0.hook_resid_post", poison)


def write_set_tmp() -> Path:
    import tempfile

    return write_set(Path(tempfile.mkdtemp()) / "set.jsonl")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_evaluate_flags_an_item_with_non_finite_logits_and_saves_the_rest(
    tiny, tiny_dir, poisoned, tmp_path, monkeypatch, capsys, value
):
    before, hashed = _poison_one_item(tiny, poisoned, value)
    prompts = write_set(tmp_path / "set.jsonl")
    g = evaluate_gap(tiny, PromptSet.load(prompts), progress=False)
    rows = {r["id"]: r for r in g.items}
    assert rows["t-1"]["flagged"] and rows["t-1"]["flag_reason"] == (
        "non-finite logits (NaN or inf) while answering composed"
    )
    assert rows["t-1"]["composed"] is None and rows["t-1"]["hop1"] is None
    assert not rows["t-2"].get("flagged") and isinstance(rows["t-2"]["composed"], bool)
    assert g.summary["all"]["n"] == 2 and g.summary["all"]["flagged"] == 1 and "flagged" not in g.summary["city"]
    assert g.summary["landmark"]["n"] == 0 and "t-1" not in g.failures + g.composed_correct
    g.save(tmp_path / "api")  # strict JSON: writes
    # the command line: exit 0, the flagged item in result.json, the table says so
    serve_models(monkeypatch, {str(tiny_dir): tiny})
    monkeypatch.setenv("PATCHLAB_QUIET", "1")
    out = tmp_path / "ev"
    code, lines = cli(["evaluate", "--model", tiny_dir, "--prompt-set", prompts, "--out", out], capsys)
    assert code == 0, lines
    saved = GapResult.from_json(out / "result.json")
    assert [r["id"] for r in saved.items if r.get("flagged")] == ["t-1"] and saved.summary == g.summary
    assert diff(before, hook_inventory(tiny)) == [] and weights_hash(tiny) == hashed


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_lens_and_the_intervention_flag_an_item_with_non_finite_activations(
    tiny, tiny_dir, poisoned, tmp_path, monkeypatch, capsys, value
):
    from relhelp import ITEMS

    from patchlab.core.prompts import TwoHopItem
    from patchlab.methods import lens as LN

    items = [TwoHopItem.from_dict(d) for d in ITEMS]
    gap = gap_result_of(items, tiny.patchlab_name)
    before, hashed = _poison_one_item(tiny, poisoned, value)
    res = LN.lens_items(tiny, items, gap=gap, progress=False)
    flags = {it["id"]: it["flagged"] for it in res.items}
    assert flags == {"t-1": True, "t-2": False, "t-3": False}
    assert res.items[0]["flag_reason"].startswith("non-finite lens logits")
    assert all(v is None for t in res.ranks for v in res.ranks[t][0] + res.probs[t][0])
    assert all(isinstance(v, int) for t in res.ranks for row in res.ranks[t][1:] for v in row)
    assert set(res.summary) == {"failed"} and res.summary["failed"]["bridge"]["n"][0] == 2  # t-1 (correct) left out
    res.save(tmp_path / "lens")
    # the tiny vocabulary has no word-start tokens to draw controls from: any other token will do here
    pick = lambda model, token, n, rng, avoid=(): [t for t in range(30) if t != token and t not in avoid][:n]  # noqa: E731
    monkeypatch.setattr(LN, "control_tokens", pick)
    iv = LN.bridge_intervention(tiny, items, layers=[0, 1], n_controls=1, progress=False)
    assert [f["id"] for f in iv.flagged] == ["t-1"] and iv.base_prob[0] is None and iv.base_prob[1] is not None
    assert all(row[0] is None and row[1] is not None for row in iv.bridge_delta + iv.control_delta)
    assert all(np.isfinite(v) for s in iv.summary.values() for v in s)
    iv.save(tmp_path / "iv", name="intervention")
    # the command line: the lens saves with the item flagged and says so
    serve_models(monkeypatch, {str(tiny_dir): tiny})
    monkeypatch.setenv("PATCHLAB_QUIET", "1")
    gap_file = gap.save(tmp_path / "gap")["result.json"]
    out = tmp_path / "ln"
    argv = ["lens", "--model", tiny_dir, "--prompt-set", write_set(tmp_path / "set.jsonl"), "--gap", gap_file]
    code, lines = cli([*argv, "--no-intervene", "--out", out], capsys)
    assert code == 0, lines
    saved = LN.LensResult.from_json(out / "result.json")
    assert [it["id"] for it in saved.items if it["flagged"]] == ["t-1"]
    assert diff(before, hook_inventory(tiny)) == [] and weights_hash(tiny) == hashed


def gap_result_of(items, model: str) -> GapResult:
    """t-1 answered right (composed), t-2 and t-3 composed failures with both hops right."""
    rows = [
        {"id": it.id, "kind": it.kind, "hop1": True, "hop2": True, "composed": it.id == "t-1"}
        | {"hop1_text": "", "hop2_text": "", "composed_text": ""}
        for it in items
    ]
    return GapResult(model=model, prompt_set="mem", items=rows, summary={"all": summarize(rows)})
