"""Determinism and provenance: the same inputs give the same locate result and bit-identical edit deltas
twice in a row (the second edit reading the covariance the first one cached), and every result file
records the seed, versions, dtype, thread count and the sha256 of the weights, hashed once per model."""

from __future__ import annotations

import json

import pytest
import torch
from relhelp import ITEMS

from patchlab.core.prompts import TwoHopItem
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.methods import lens as LN
from patchlab.methods import locate as L
from patchlab.methods.editeval import evaluate_edits
from patchlab.methods.gap import evaluate_gap
from patchlab.runtime.identity import provenance, weights_hash

PROVENANCE = {
    "seed",
    "patchlab",
    "torch",
    "transformers",
    "transformer_lens",
    "python",
    "threads",
    "model",
    "dtype",
    "n_layers",
    "n_heads",
    "weights_sha256",
}


def without_timing(obj):
    """A result's JSON without wall-clock seconds (the only field allowed to differ between two runs)."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def tiny_pairs(tiny):
    enc = lambda s: tiny.to_tokens(s)[0].tolist()  # noqa: E731
    from patchlab.runtime.scoring import answer_token_id

    a, b = answer_token_id(tiny, "paris"), answer_token_id(tiny, "berlin")
    return [
        L.PatchPair("p1", enc("the capital of france is"), enc("the capital of germany is"), a, b),
        L.PatchPair("p2", enc("the language of france is"), enc("the language of germany is"), a, b),
    ]


@pytest.mark.parametrize("method, positions", [("both", "each"), ("exact", "all"), ("attribution", "all")])
def test_locate_twice_gives_the_same_result(tiny, method, positions):
    runs = [
        L.locate_pairs(tiny, tiny_pairs(tiny), method=method, positions=positions, verify=5, progress=False)
        for _ in range(2)
    ]
    a, b = (json.dumps(without_timing(r.to_json()), sort_keys=True) for r in runs)
    assert a == b


def _edits_twice(model, items, heads, cfg, unrelated=()):
    return [E.compute_edit(model, items, heads, cfg, unrelated) for _ in range(2)]


def _assert_bit_identical(first: E.Edit, second: E.Edit, tmp_path) -> None:
    assert first.heads == second.heads and set(first.deltas) == set(second.deltas)
    for layer in first.deltas:
        assert torch.equal(first.deltas[layer].view(torch.int32), second.deltas[layer].view(torch.int32))
    assert E.tensors_hash(first.tensors()) == E.tensors_hash(second.tensors())
    a, b = E.Edit.load(first.save(tmp_path / "a.edit")), E.Edit.load(second.save(tmp_path / "b.edit"))
    assert (a.heads, a.weights_sha256, a.method) == (b.heads, b.weights_sha256, b.method)
    assert E.tensors_hash(a.tensors()) == E.tensors_hash(first.tensors())  # (the header's key order may vary)


@pytest.mark.parametrize("target", ["optimize", "guide"])
def test_edit_twice_gives_bit_identical_deltas(tiny, tmp_path, monkeypatch, target):
    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path / "cache"))
    items = [TwoHopItem.from_dict(it) for it in ITEMS]
    cfg = E.EditConfig(target=target, n_prefixes=3, opt_prefixes=2, opt_steps=5, target_prob=1.0)
    first, second = _edits_twice(tiny, items[:1], [Head(0, 1), Head(1, 2)], cfg, unrelated=[items[1].hop2])
    assert len(list((tmp_path / "cache" / "covariance").rglob("layer*.pt"))) == 2  # the second run read these
    _assert_bit_identical(first, second, tmp_path)
    batch = _edits_twice(tiny, items, [Head(1, 2)], cfg)  # one least-squares update for three items
    _assert_bit_identical(*batch, tmp_path)


@pytest.fixture(scope="module")
def tiny_results(tiny, tmp_path_factory):
    """One result of every kind the tiny model can make, saved as the CLI saves them."""
    out = tmp_path_factory.mktemp("results")
    items = [TwoHopItem.from_dict(it) for it in ITEMS]
    gap = evaluate_gap(tiny, items, progress=False)
    edit = E.compute_edit(tiny, items[:1], [Head(1, 2)], E.EditConfig(target="guide", covariance=False, n_prefixes=0))
    made = {
        "evaluate": gap,
        "lens": LN.lens_items(tiny, items, gap=gap, progress=False),
        "lens-topk": LN.top_tokens(tiny, items[0].composed),
        "locate": L.locate_pairs(tiny, tiny_pairs(tiny), method="both", verify=4, progress=False),
        "edit": evaluate_edits(tiny, [(items[:1], edit, 0.0)], items, gap, progress=False),
    }
    return {name: json.loads(r.save(out / name)["result.json"].read_text()) for name, r in made.items()}


@pytest.mark.parametrize("name", ["evaluate", "lens", "lens-topk", "locate", "edit"])
def test_every_result_file_records_its_provenance(tiny, tiny_results, name):
    meta = tiny_results[name]["meta"]
    assert PROVENANCE <= set(meta), PROVENANCE - set(meta)
    assert meta["weights_sha256"] == weights_hash(tiny) and meta["dtype"] == "float32"
    assert meta["threads"] == torch.get_num_threads() and meta["torch"] == torch.__version__
    assert meta["n_layers"] == tiny.cfg.n_layers and "edits_applied" not in meta


def test_the_weights_hash_is_computed_once_per_model(tiny, monkeypatch):
    calls = []
    from patchlab.runtime import identity

    real = identity.weights_hash
    monkeypatch.setattr(identity, "weights_hash", lambda m: calls.append(1) or real(m))
    saved = getattr(tiny, "_patchlab_hash", None)
    tiny._patchlab_hash = None
    try:
        metas = [provenance(tiny) for _ in range(3)]
        assert len(calls) == 1 and {m["weights_sha256"] for m in metas} == {real(tiny)}
        edit = E.Edit("tiny", metas[0]["weights_sha256"], {1: [2]}, {1: torch.full((64, 16), 0.01)}, ["x"])
        with edit.applied(tiny):  # while an edit is applied: the edited weights' hash (computed afresh), and which edit
            meta = provenance(tiny)
        assert meta["weights_sha256"] != metas[0]["weights_sha256"] and meta["edits_applied"] == [["1.2"]]
        assert len(calls) == 2
        assert provenance(tiny)["weights_sha256"] == metas[0]["weights_sha256"] and len(calls) == 2  # still cached
    finally:
        tiny._patchlab_hash = saved


@pytest.mark.real
def test_real_model_locate_and_edit_twice_and_provenance(smol, shipped, tmp_path):
    items = list(shipped)[:2]
    runs = [L.locate(smol, items[:1], setup="guide", method="attribution", progress=False) for _ in range(2)]
    assert json.dumps(without_timing(runs[0].to_json())) == json.dumps(without_timing(runs[1].to_json()))
    cfg = E.EditConfig(target="optimize", n_prefixes=1, opt_prefixes=1, opt_steps=3)
    _assert_bit_identical(*_edits_twice(smol, items[:1], [Head(23, 4), Head(23, 5)], cfg, [items[1].hop2]), tmp_path)
    iv = LN.bridge_intervention(smol, items[:1], layers=[29], n_controls=1, progress=False)
    for result in (runs[0], iv):
        meta = json.loads(result.save(tmp_path / result.kind)["result.json"].read_text())["meta"]
        assert PROVENANCE <= set(meta) and meta["weights_sha256"] == E.base_hash(smol)
        assert meta["model"] == "smollm2-135m" and meta["dtype"] == "float32"
