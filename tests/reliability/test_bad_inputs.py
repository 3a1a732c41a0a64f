"""The bad-input battery: heads, layers, options, result files, edit files and prompt sets a model cannot
read. Every case ends in one line naming the file / line / field or argument at fault — exit code 2 from
the CLI (no traceback) or a `PatchlabError` from the API — and nothing is written under --out; the model
is left as it was.

The CLI runs in-process (`patchlab.cli.main`, its real exit code); `load_model` hands out the session's
tiny model, or a stand-in with SmolLM2's name and shape (30 layers x 9 heads) where only argument checks
run before the error. test_bad_prompt_sets.py and test_properties.py cover the JSONL reader and the
spec parsers on their own; tests/test_cli.py runs a few of the head cases on the real model.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from relhelp import ITEMS, Shape, assert_refused, cli, serve_models, write_set

from patchlab.core.errors import PatchlabError
from patchlab.core.io import json_bytes
from patchlab.core.prompts import PromptSet, TwoHopItem
from patchlab.core.spec import Head, HeadSet
from patchlab.methods import edit as E
from patchlab.methods import locate as L
from patchlab.methods.gap import evaluate_gap
from patchlab.runtime.identity import weights_hash

ROOT = Path(__file__).resolve().parents[2]


def tiny_pair(tiny, pid="t", clean="the capital of france is", corrupted="the capital of germany is"):
    from patchlab.runtime.scoring import answer_token_id

    enc = lambda s: tiny.to_tokens(s)[0].tolist()  # noqa: E731
    return L.PatchPair(pid, enc(clean), enc(corrupted), answer_token_id(tiny, "paris"), answer_token_id(tiny, "berlin"))


def tiny_edit(tiny, heads=((1, 2),), seed=0, base=None) -> E.Edit:
    g = torch.Generator().manual_seed(seed)
    hs = HeadSet([Head(*h) for h in heads]).by_layer()
    deltas = {l: 0.1 * torch.randn(tiny.cfg.d_model, len(v) * tiny.cfg.d_head, generator=g) for l, v in hs.items()}
    return E.Edit("tiny", base or E.base_hash(tiny), hs, deltas, ["t-1"], {"target": "test"})


def flip(path: Path, at: int, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny, tiny_dir):
    """Files the cases point at: prompt sets, saved results (good and bad), edit files (good and bad)."""
    from safetensors.torch import save_file
    from tiny import build_tiny_model

    from patchlab.runtime.models import load_model

    d = tmp_path_factory.mktemp("battery")
    e = SimpleNamespace(tiny=str(tiny_dir), missing=str(d / "missing.json"))
    e.set = str(write_set(d / "set.jsonl"))
    e.long = str(write_set(d / "long.jsonl", composed="the " * 70 + "is"))  # 71 tokens; the context is 64
    e.mega = str(write_set(d / "mega.jsonl", composed="the " * (1 << 18)))  # a 1 MB line of 262,144 tokens
    (d / "blank.jsonl").write_bytes(b"\n \n\t\r\n\n")
    e.blank = str(d / "blank.jsonl")
    e.typed = str(write_set(d / "typed.jsonl", id=7))
    (d / "afile").write_text("keep me")
    e.afile = str(d / "afile")
    (d / "emptydir").mkdir()
    e.emptydir = str(d / "emptydir")
    (d / "notjson.json").write_text("{not json")
    e.notjson = str(d / "notjson.json")

    gap = evaluate_gap(tiny, PromptSet.load(e.set), progress=False)
    assert not {r["id"]: r for r in gap.items}["t-1"]["composed"]  # t-1 is a failure to edit
    e.gap = str(gap.save(d / "gap")["result.json"])
    obj = json.loads(Path(e.gap).read_text())
    e.gap_noitems = _json(d / "gap-noitems.json", {k: v for k, v in obj.items() if k != "items"})
    e.gap_other = _json(d / "gap-other.json", {**obj, "model": "gemma3-270m"})
    for name, text in (
        ("r-trunc", Path(e.gap).read_text()[:100]),
        ("r-nofield", json.dumps({"type": "gap", "model": "x"})),
    ):
        (d / name / "evaluate").mkdir(parents=True)
        (d / name / "evaluate" / "result.json").write_text(text)
        setattr(e, name.replace("-", "_"), str(d / name))

    loc = L.locate_pairs(tiny, [tiny_pair(tiny)], method="exact", positions="all", progress=False)
    e.loc = str(loc.save(d / "loc")["result.json"])
    obj = json.loads(Path(e.loc).read_text())
    smol_like = {**obj, "model": "smollm2-135m", "n_layers": 30, "n_heads": 9}
    e.loc_noranking = _json(d / "loc-noranking.json", {k: v for k, v in smol_like.items() if k != "ranking"})
    e.loc_attn = _json(d / "loc-attn.json", {**smol_like, "site": "attn_out"})
    e.loc_31 = _json(
        d / "loc-31.json", {**smol_like, "ranking": [{"unit": "31.2", "mean": 1.0, "std": 0.0, "share_top_k": 1.0}]}
    )

    good = tiny_edit(tiny).save(d / "good.edit")
    e.e_good = str(good)
    other = load_model(str(build_tiny_model(d / "other-model", seed=1)))  # the same shape, other weights
    e.e_other = str(tiny_edit(other, base=E.base_hash(other)).save(d / "other.edit"))
    size = len(good.read_bytes())
    header = 8 + int.from_bytes(good.read_bytes()[:8], "little")
    e.e_data = str(flip(good, size - 5, d / "data.edit"))  # one byte of tensor data
    text = good.read_bytes()[:header]
    e.e_meta = str(flip(good, text.index(b"[2]") + 1, d / "meta.edit"))  # heads {"1": [2]} -> {"1": [3]}
    (d / "trunc.edit").write_bytes(good.read_bytes()[: size // 2])
    e.e_trunc = str(d / "trunc.edit")
    (d / "empty.edit").write_bytes(b"")
    e.e_empty = str(d / "empty.edit")
    nan = tiny_edit(tiny)
    nan.deltas[1][0, 0] = float("nan")
    e.e_nan = str(nan.save(d / "nan.edit"))
    e.e_layer = str(
        E.Edit("tiny", E.base_hash(tiny), {5: [0]}, {5: torch.zeros(64, 16)}, ["t-1"]).save(d / "layer.edit")
    )
    e.e_item = str(
        E.Edit("tiny", E.base_hash(tiny), {1: [2]}, {1: torch.zeros(64, 16)}, ["nosuch"]).save(d / "item.edit")
    )
    save_file({"layer.1.delta": torch.zeros(64, 16)}, str(d / "foreign.edit"))
    e.e_foreign = str(d / "foreign.edit")
    return e


def _json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


# --- the CLI: (arguments, what the one line must say) -----------------------------------------------
# {name} is filled from `env`; "--out" is added to every case. Cases without --model run on the stand-in
# with SmolLM2's name and shape (30 x 9); TINY runs on the tiny random Llama (2 layers x 4 heads).

TINY = ["--model", "{tiny}", "--prompt-set", "{set}"]
EDIT = ["edit", "--failures", "--heads"]
FROM = ["edit", "--failures", "--heads-from"]
LAYERS = ["lens", "--intervene-layers"]
EDIT_TINY = ["edit", *TINY, "--ids", "t-1", "--heads", "1.2", "--gap"]

CLI_CASES = {
    # heads: 30 layers x 9 heads
    "heads 17.9": ([*EDIT, "17.9"], "--heads: head 17.9: head 9 does not exist"),
    "heads 30.0": ([*EDIT, "30.0"], "--heads: head 30.0: layer 30 does not exist"),
    "heads -1.3 (no wrap-around)": ([*EDIT, "-1.3"], "--heads: '-1.3' is not a head"),
    "heads 14.03": ([*EDIT, "14.03"], "--heads: '14.03' is not a head"),
    "heads a.b": ([*EDIT, "a.b"], "--heads: 'a.b' is not a head"),
    "heads 14.3,14.3": ([*EDIT, "14.3,14.3"], "--heads: head 14.3 is listed twice"),
    "heads empty list": ([*EDIT, ""], "--heads: no heads given"),
    "heads trailing comma": ([*EDIT, "14.3,"], "--heads: '' is not a head"),
    "heads a layer only": ([*EDIT, "14"], "--heads: '14' is not a head"),
    "heads non-ASCII digits": ([*EDIT, "١٤.٣"], "is not a head"),
    "heads and heads-from": ([*EDIT, "14.3", "--heads-from", "{loc}"], "--heads: give exactly one of"),
    "heads-from another model": ([*FROM, "{loc}"], "was made on '{tiny}' (2x4), not on 'smollm2-135m'"),
    "heads-from a gap result": ([*FROM, "{gap}"], "{gap}: expected a 'locate' result, found 'gap'"),
    "heads-from a missing file": ([*FROM, "{missing}"], "{missing}: cannot read result JSON"),
    "heads-from without ranking": (
        [*FROM, "{loc_noranking}"],
        "{loc_noranking}: 'locate' result lacks the field 'ranking'",
    ),
    "heads-from a layer ranking": ([*FROM, "{loc_attn}"], "ranks whole layers (attn_out), not heads"),
    "heads-from a head the model lacks": ([*FROM, "{loc_31}"], "--heads-from: head 31.2: layer 31 does not exist"),
    "heads-from --top 0": ([*FROM, "{loc_31}", "--top", "0"], "--top: must be >= 1, got 0"),
    # layers: 30
    "layers 30": ([*LAYERS, "30"], "--intervene-layers: layer 30 does not exist"),
    "layers -1": ([*LAYERS, "-1"], "--intervene-layers: '-1' is not a layer number"),
    "layers 0-30": ([*LAYERS, "0-30"], "--intervene-layers: layer 30 does not exist"),
    "layers 5,5": ([*LAYERS, "5,5"], "--intervene-layers: a layer is listed twice"),
    "layers 3-1": ([*LAYERS, "3-1"], "--intervene-layers: bad range '3-1'"),
    "layers 0-29:0": ([*LAYERS, "0-29:0"], "--intervene-layers: bad range '0-29:0'"),
    # options
    "locate --top 0": (["locate", "--top", "0"], "--top: must be >= 1, got 0"),
    "locate --top -3": (["locate", "--top", "-3"], "--top: must be >= 1, got -3"),
    "locate --verify 0": (["locate", "--verify", "0"], "--verify: must be >= 1"),
    "locate --max-items 0": (["locate", "--max-items", "0"], "--max-items: must be >= 1"),
    "locate --method": (["locate", *TINY, "--ids", "t-1", "--method", "fast"], "--method: method must be"),
    "locate --site": (["locate", *TINY, "--ids", "t-1", "--site", "mlp"], "--site: site must be one of"),
    "locate --setup": (["locate", *TINY, "--ids", "t-1", "--setup", "magic"], "--setup: setup must be"),
    "locate guide --positions each": (
        ["locate", *TINY, "--ids", "t-1", "--positions", "each"],
        "item t-1: clean and corrupted differ in length",
    ),
    "edit --held-out nan": ([*EDIT, "14.3", "--batch", "--held-out", "nan"], "--held-out: must be in [0, 1)"),
    "edit --held-out inf": ([*EDIT, "14.3", "--batch", "--held-out", "inf"], "--held-out: must be in [0, 1)"),
    "edit --held-out -0.5": ([*EDIT, "14.3", "--batch", "--held-out", "-0.5"], "--held-out: must be in [0, 1)"),
    "edit --held-out 1": ([*EDIT, "14.3", "--batch", "--held-out", "1"], "--held-out: must be in [0, 1)"),
    "edit --held-out without --batch": ([*EDIT, "14.3", "--held-out", "0.5"], "needs --batch"),
    "edit --target": ([*EDIT, "14.3", "--target", "magic"], "--target: target must be 'guide' or 'optimize'"),
    "edit neither --ids nor --failures": (["edit", "--heads", "14.3"], "--ids: give exactly one of --ids"),
    "edit unknown id": (
        ["edit", *TINY, "--ids", "nosuch", "--heads", "1.2", "--gap", "{gap}"],
        "no item with id 'nosuch'",
    ),
    "lens --positions": (["lens", "--positions", "middle"], "--positions: must be 'last' or 'all'"),
    "lens unknown id": (["lens", *TINY, "--ids", "nosuch"], "{set}: no item with id 'nosuch'"),
    "evaluate --per-kind 0": (["evaluate", "--per-kind", "0"], "--per-kind: must be >= 1"),
    "evaluate --limit 0": (["evaluate", "--limit", "0"], "limit must be >= 1, got 0"),
    "evaluate --kinds unknown": (["evaluate", "--kinds", "nosuch"], "unknown kind 'nosuch'"),
    "evaluate --dtype": (["evaluate", *TINY, "--dtype", "float8"], "--dtype: unknown dtype 'float8'"),
    "evaluate --batch-size 0": (["evaluate", *TINY, "--batch-size", "0"], "batch size must be >= 1, got 0"),
    "evaluate --out is a file": (["evaluate", "--out", "{afile}"], "--out {afile}: exists and is not a directory"),
    "unknown model name": (
        ["evaluate", "--model", "no-such-model-xyz", "--prompt-set", "{set}"],
        "model 'no-such-model-xyz' is not an offline model",
    ),
    "model folder missing": (
        ["evaluate", "--model", "{missing}", "--prompt-set", "{set}"],
        "{missing}: no such model folder",
    ),
    "model folder without config": (
        ["evaluate", "--model", "{emptydir}", "--prompt-set", "{set}"],
        "{emptydir}: not a Hugging Face model folder (no config.json)",
    ),
    # result files given with --gap
    "gap missing": ([*EDIT_TINY, "{missing}"], "{missing}: cannot read result JSON"),
    "gap not JSON": ([*EDIT_TINY, "{notjson}"], "{notjson}: cannot read result JSON"),
    "gap is a locate result": ([*EDIT_TINY, "{loc}"], "{loc}: expected a 'gap' result, found 'locate'"),
    "gap without items": ([*EDIT_TINY, "{gap_noitems}"], "{gap_noitems}: 'gap' result lacks the field 'items'"),
    "gap of another model": ([*EDIT_TINY, "{gap_other}"], "gap result was made on 'gemma3-270m', not this model"),
    # prompt sets the model cannot read: refused, never truncated, naming the item and field
    "prompt longer than the context: evaluate": (
        ["evaluate", "--model", "{tiny}", "--prompt-set", "{long}"],
        "{long}: item 't-1' field 'composed': prompt is 71 tokens, longer than the model's context (64)",
    ),
    "1 MB line: evaluate": (
        ["evaluate", "--model", "{tiny}", "--prompt-set", "{mega}"],
        "{mega}: item 't-1' field 'composed': prompt is 262144 tokens",
    ),
    "prompt longer than the context: lens": (
        ["lens", "--model", "{tiny}", "--prompt-set", "{long}", "--gap", "{gap}"],
        "item 't-1': prompt is 71 tokens, longer than the model's context",
    ),
    "prompt longer than the context: locate": (
        ["locate", "--model", "{tiny}", "--prompt-set", "{long}", "--ids", "t-1"],
        "t-1: composed: prompt is 71 tokens",
    ),
    "prompt longer than the context: edit": (
        ["edit", "--model", "{tiny}", "--prompt-set", "{long}", "--ids", "t-1", "--heads", "1.2", "--gap", "{gap}"],
        "t-1: composed: prompt is 71 tokens",
    ),
    # folders given to `report`
    "report of a truncated result": (
        ["report", "{r_trunc}"],
        "{r_trunc}/evaluate/result.json: cannot read result JSON",
    ),
    "report of a result lacking a field": (
        ["report", "{r_nofield}"],
        "{r_nofield}/evaluate/result.json: 'gap' result lacks the field 'prompt_set'",
    ),
    "report of a missing folder": (["report", "{missing}"], "{missing}: not a folder of results"),
    # edit files given to `apply`
    "apply another model's edit": (["apply", "{e_other}", *TINY], "edit was made for 'tiny' weights"),
    "apply a flipped data byte": (
        ["apply", "{e_data}", *TINY],
        "{e_data}: edit tensors do not match their recorded sha256",
    ),
    "apply a flipped metadata byte": (
        ["apply", "{e_meta}", *TINY],
        "{e_meta}: edit metadata does not match its recorded sha256",
    ),
    "apply a truncated file": (["apply", "{e_trunc}", *TINY], "{e_trunc}: not a readable edit file"),
    "apply an empty file": (["apply", "{e_empty}", *TINY], "{e_empty}: not a readable edit file"),
    "apply a missing file": (["apply", "{missing}", *TINY], "{missing}: not a readable edit file"),
    "apply a NaN delta": (
        ["apply", "{e_nan}", *TINY],
        "{e_nan}: edit has a non-finite (or non-float) delta at layer 1",
    ),
    "apply mismatched shapes": (["apply", "{e_layer}", *TINY], "edit does not fit this model (layer 5"),
    "apply a foreign safetensors file": (["apply", "{e_foreign}", *TINY], "{e_foreign}: not a patchlab edit file"),
    "apply an edit of an unknown item": (["apply", "{e_item}", *TINY], "no item with id 'nosuch'"),
}
# every command meets the same broken prompt set with the same line, before any model is loaded
for _cmd, _extra in (("evaluate", []), ("lens", []), ("locate", []), ("edit", ["--failures", "--heads", "1.2"])):
    CLI_CASES[f"only blank lines: {_cmd}"] = (
        [_cmd, "--prompt-set", "{blank}", *_extra],
        "{blank}:1: prompt set is empty",
    )
    CLI_CASES[f"wrongly typed field: {_cmd}"] = (
        [_cmd, "--prompt-set", "{typed}", *_extra],
        "{typed}:1: field 'id' must be a string, got int",
    )


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_refuses(name, env, tiny, tiny_dir, tmp_path, monkeypatch, capsys):
    args, needle = CLI_CASES[name]
    monkeypatch.setenv("PATCHLAB_QUIET", "1")
    serve_models(monkeypatch, {str(tiny_dir): tiny, "smollm2-135m": Shape()})
    from patchlab.runtime import models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)  # an offline machine, at once
    fill = vars(env)
    out = tmp_path / "out"
    before = weights_hash(tiny)
    code, lines = cli([a.format(**fill) for a in args] + ["--out", str(out)] * ("--out" not in args), capsys)
    assert_refused(code, lines, needle.format(**fill), None if "--out" in args else out)
    assert weights_hash(tiny) == before and not getattr(tiny, "_patchlab_edits", [])
    assert Path(env.afile).read_text() == "keep me"


def test_offline_hub_request_exits_2_in_a_real_process(tmp_path, env):
    """A TransformerLens name with the hub switched off and an empty Hugging Face cache (a subprocess:
    huggingface_hub reads HF_HUB_OFFLINE at import)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchlab.cli",
            "evaluate",
            "--model",
            "gpt2",
            "--prompt-set",
            env.set,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATCHLAB_QUIET": "1"},
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert_refused(proc.returncode, lines, "cannot load model 'gpt2'", out)


# --- the API -------------------------------------------------------------------------------------------


def refused(fn, needle: str) -> str:
    with pytest.raises(PatchlabError) as err:
        fn()
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and needle in msg, msg
    return msg


CONFIG_CASES = {
    "kl_weight -1": ({"kl_weight": -1.0}, "kl_weight must be a finite number >= 0"),
    "kl_weight nan": ({"kl_weight": float("nan")}, "kl_weight must be a finite number >= 0"),
    "kl_weight inf": ({"kl_weight": float("inf")}, "kl_weight must be a finite number >= 0"),
    "norm_weight -0.1": ({"norm_weight": -0.1}, "norm_weight must be"),
    "norm_weight -inf": ({"norm_weight": float("-inf")}, "norm_weight must be"),
    "opt_lr inf": ({"opt_lr": float("inf")}, "opt_lr must be"),
    "opt_lr nan": ({"opt_lr": float("nan")}, "opt_lr must be"),
    "cov_ridge nan": ({"cov_ridge": float("nan")}, "cov_ridge must be"),
    "cov_ridge -1": ({"cov_ridge": -1.0}, "cov_ridge must be"),
    "batch_ridge -1": ({"batch_ridge": -1.0}, "batch_ridge must be"),
    "kl_weight a string": ({"kl_weight": "1"}, "kl_weight must be"),
    "target_prob 0": ({"target_prob": 0.0}, "target_prob must be in (0, 1]"),
    "target_prob 1.5": ({"target_prob": 1.5}, "target_prob must be in (0, 1]"),
    "target_prob nan": ({"target_prob": float("nan")}, "target_prob must be in (0, 1]"),
    "opt_steps 0": ({"opt_steps": 0}, "opt_steps must be an integer >= 1"),
    "opt_steps 2.5": ({"opt_steps": 2.5}, "opt_steps must be an integer >= 1"),
    "n_prefixes -1": ({"n_prefixes": -1}, "n_prefixes must be an integer >= 0"),
    "opt_prefixes -1": ({"opt_prefixes": -1}, "opt_prefixes must be an integer >= 0"),
    "target magic": ({"target": "magic"}, "target: target must be"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_edit_config_refuses(name):
    kw, needle = CONFIG_CASES[name]
    refused(lambda: E.EditConfig(**kw), needle)


def _edit_case(tiny, name):
    """An edit (and what to do with it) per case; deltas are small random tensors."""
    d, z = tiny.cfg.d_model, lambda n: torch.zeros(tiny.cfg.d_model, n * tiny.cfg.d_head)  # noqa: E731
    base = E.base_hash(tiny)
    make = lambda heads, deltas: E.Edit("tiny", base, heads, deltas, ["t-1"])  # noqa: E731
    cases = {
        "layer 5 of 2": (make({5: [0]}, {5: z(1)}), "layer 5, heads [0]"),
        "layer -1 (no wrap-around)": (make({-1: [0]}, {-1: z(1)}), "layer -1, heads [0]"),
        "head 4 of 4": (make({1: [4]}, {1: z(1)}), "layer 1, heads [4]"),
        "head -1 (no wrap-around)": (make({1: [-1]}, {1: z(1)}), "layer 1, heads [-1]"),
        "no heads in a layer": (make({1: []}, {1: z(0)}), "layer 1, heads []"),
        "a head twice": (make({1: [2, 2]}, {1: z(2)}), "layer 1, heads [2, 2]"),
        "no heads at all": (make({}, {}), "do not match its heads"),
        "a delta missing": (make({0: [1], 1: [2]}, {1: z(1)}), "do not match its heads"),
        "mismatched shape": (make({1: [2]}, {1: torch.zeros(d, 3)}), "delta (64, 3)"),
        "transposed shape": (make({1: [2]}, {1: torch.zeros(tiny.cfg.d_head, d)}), "delta (16, 64)"),
        "integer delta": (make({1: [2]}, {1: torch.zeros(d, 16, dtype=torch.int64)}), "torch.int64"),
        "NaN in a delta": (
            make({1: [2]}, {1: z(1).index_fill(0, torch.tensor([3]), float("nan"))}),
            "non-finite delta",
        ),
        "inf in a delta": (
            make({1: [2]}, {1: z(1).index_fill(0, torch.tensor([3]), float("inf"))}),
            "non-finite delta",
        ),
        "another model's weights": (
            E.Edit("tiny", "0" * 64, {1: [2]}, {1: z(1)}, []),
            "edit was made for weights 000000000000",
        ),
    }
    return cases[name]


EDIT_CASES = [
    "layer 5 of 2",
    "layer -1 (no wrap-around)",
    "head 4 of 4",
    "head -1 (no wrap-around)",
    "no heads in a layer",
    "a head twice",
    "no heads at all",
    "a delta missing",
    "mismatched shape",
    "transposed shape",
    "integer delta",
    "NaN in a delta",
    "inf in a delta",
    "another model's weights",
]


@pytest.mark.parametrize("name", EDIT_CASES)
def test_edit_that_does_not_fit_is_refused_and_changes_nothing(tiny, name):
    edit, needle = _edit_case(tiny, name)
    before = weights_hash(tiny)
    refused(lambda: edit.apply(tiny), needle)
    assert weights_hash(tiny) == before and not tiny._patchlab_edits and not edit._saved


def test_apply_twice_revert_unapplied_and_out_of_order(tiny):
    before = weights_hash(tiny)
    a, b = tiny_edit(tiny, ((1, 2),), seed=1), tiny_edit(tiny, ((0, 1),), seed=2)
    refused(lambda: a.revert(tiny), "edit is not applied")
    a.apply(tiny)
    try:
        refused(lambda: a.apply(tiny), "edit is already applied")
        refused(lambda: b.apply(tiny), "another edit is applied: revert it first")  # made for the base weights
        b.apply(tiny, verify_hash=False)
        refused(lambda: a.revert(tiny), "revert edits in the reverse order")
        b.revert(tiny)
        refused(lambda: b.revert(tiny), "edit is not applied")
    finally:
        while tiny._patchlab_edits:
            tiny._patchlab_edits[-1].revert(tiny)
    assert weights_hash(tiny) == before


def test_edit_file_round_trip_and_a_file_from_before_the_metadata_hash(tiny, env, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = E.Edit.load(env.e_good)
    assert good.heads == {1: [2]} and good.item_ids == ["t-1"]
    with safe_open(env.e_good, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    legacy = tmp_path / "legacy.edit"  # written before meta_sha256 existed: still read
    save_file(tensors, str(legacy), metadata={k: v for k, v in meta.items() if k != "meta_sha256"})
    assert E.Edit.load(legacy).heads == {1: [2]}
    forged = tmp_path / "forged.edit"  # heads changed, meta hash kept: refused
    save_file(tensors, str(forged), metadata={**meta, "heads": json.dumps({"1": [3]})})
    refused(lambda: E.Edit.load(forged), "edit metadata does not match its recorded sha256")


def test_locate_result_top_must_be_positive(tiny, env):
    result = L.LocateResult.from_json(env.loc)
    for top in (0, -1):
        refused(lambda: result.heads(top), "top: must be >= 1")


@contextlib.contextmanager
def vanishing(model, char: str = "\u200b"):
    """The model's tokenizer drops `char` (as tokenizers with a cleaning normalizer drop control / format
    characters), so an answer made of it tokenizes to nothing. Restored on exit."""
    from tokenizers import normalizers

    backend = model.tokenizer.backend_tokenizer
    old = backend.normalizer
    backend.normalizer = normalizers.Replace(char, "")
    try:
        yield
    finally:
        backend.normalizer = old


def _vanishing_item() -> TwoHopItem:
    return TwoHopItem.from_dict({**ITEMS[0], "answer": "\u200b"})


VANISH = {
    "lens": lambda m, it: __import__("patchlab.methods.lens", fromlist=["lens_items"]).lens_items(
        m, [it], progress=False
    ),
    "locate guide": lambda m, it: L.locate(m, [it], setup="guide", progress=False),
    "locate template": lambda m, it: L.template_pairs(m, [it, TwoHopItem.from_dict({**ITEMS[0], "id": "t-9"})]),
    "edit optimize": lambda m, it: E.compute_edit(
        m, [it], [Head(1, 2)], E.EditConfig(target="optimize", n_prefixes=0, covariance=False, opt_steps=1)
    ),
}


@pytest.mark.parametrize("name", list(VANISH))
def test_answer_that_tokenizes_to_nothing_is_refused_by_name(tiny, name):
    item = _vanishing_item()
    before = weights_hash(tiny)
    with vanishing(tiny):
        refused(lambda: VANISH[name](tiny, item), "t-1: answer: answer '\\u200b' tokenizes to nothing")
    assert weights_hash(tiny) == before


def test_answer_sharing_the_contrast_token_is_flagged_never_divided(tiny, tmp_path):
    good = tiny_pair(tiny)
    same = L.PatchPair("same-token", good.clean, good.corrupted, good.answer, good.answer)
    for method in ("exact", "attribution", "both"):
        result = L.locate_pairs(tiny, [good, same], method=method, positions="all", verify=4, progress=False)
        rows = {r["id"]: r for r in result.items}
        assert rows["same-token"]["flagged"] and "share their first token" in rows["same-token"]["flag_reason"]
        assert not rows["t"]["flagged"] and result.n == 1
        assert all(v is None or np.isfinite(v) for grid in (result.mean, result.std) for row in grid for v in row)
        json_bytes(result.to_json())  # strict JSON: no NaN / inf anywhere (what save writes)
        refused(
            lambda: L.locate_pairs(tiny, [same], method=method, progress=False),
            "every item was flagged (item same-token: answer and contrast share their first token",
        )


def test_clean_close_to_corrupted_is_flagged_for_every_method(tiny, tmp_path):
    good = tiny_pair(tiny)
    for clean, corrupted in ((2.0, 2.0 + 1e-5), (2.0, float("nan")), (float("inf"), 1.0)):
        assert L.flag_reason(good, clean, corrupted)  # never a division by ~0 or by NaN / inf
    close = L.PatchPair("close", good.clean, good.clean, good.answer, good.contrast)
    for method in ("exact", "attribution", "both"):
        result = L.locate_pairs(tiny, [good, close], method=method, positions="all", verify=4, progress=False)
        row = {r["id"]: r for r in result.items}["close"]
        assert row["flagged"] and "differ by less than" in row["flag_reason"]
        assert all(v is None for r in row["effect"] for v in r)
        assert all(v is None or np.isfinite(v) for r in result.mean for v in r)
        assert result.attribution_mean is None or all(
            v is None or np.isfinite(v) for r in result.attribution_mean for v in r
        )
        json_bytes(result.to_json())  # strict JSON, as save writes it


def test_template_setup_without_pairs_is_a_clear_error(tiny):
    items = [TwoHopItem.from_dict(ITEMS[0])]  # no other item of its template
    refused(lambda: L.locate(tiny, items, setup="template", progress=False), "prompt_set: no prompt pairs to patch")


def test_unknown_model_names_fail_at_once(monkeypatch, tmp_path):
    from patchlab.runtime import models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    for name in ("no-such-model-xyz", "smollm3-135m", "org/no..such--id", "bad name with spaces"):
        refused(lambda: models.load_model(name), f"model '{name}' is not an offline model")
    for name in (str(tmp_path / "not-there"), "./not-there", "~/not-there-either", "a/b/c"):
        refused(lambda: models.load_model(name), f"{name}: no such model folder")
    refused(lambda: models.load_model(str(tmp_path)), "not a Hugging Face model folder (no config.json)")


def test_the_battery_is_the_size_the_docs_say():
    """The README's Reliability section quotes these counts."""
    counts = {"cli": len(CLI_CASES), "config": len(CONFIG_CASES), "edits": len(EDIT_CASES), "vanish": len(VANISH)}
    assert counts == {"cli": 82, "config": 19, "edits": 14, "vanish": 4}, counts
