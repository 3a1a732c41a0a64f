import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.core.spec import Head, HeadSet
from patchlab.methods import edit as E
from patchlab.runtime.identity import weights_hash


def test_solve_delta_hits_targets_and_matches_rome_formula():
    torch.manual_seed(0)
    d_model, s = 12, 8
    A = torch.randn(s, s)
    C = A @ A.T + torch.eye(s)
    k = torch.randn(s, 1)
    r = torch.randn(d_model, 1)
    delta = E.solve_delta(r, k, C)
    torch.testing.assert_close(delta @ k, r, atol=1e-5, rtol=1e-5)
    u = torch.linalg.solve(C, k)
    torch.testing.assert_close(delta, (r @ u.T / (k.T @ u)).float(), atol=1e-5, rtol=1e-5)
    K, R = torch.randn(s, 3), torch.randn(d_model, 3)  # batch: every key maps to its residual
    torch.testing.assert_close(E.solve_delta(R, K, None) @ K, R, atol=1e-4, rtol=1e-4)


def tiny_edit(tiny, heads=((1, 2),), scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = HeadSet([Head(*h) for h in heads]).by_layer()
    deltas = {l: scale * torch.randn(tiny.cfg.d_model, len(v) * tiny.cfg.d_head, generator=g) for l, v in hs.items()}
    return E.Edit("tiny", E.base_hash(tiny), hs, deltas, ["x"], {"target": "test"})


def test_apply_changes_only_chosen_columns_and_revert_is_bit_exact(tiny):
    before = weights_hash(tiny)
    w_before = E.o_proj(tiny, 1).weight.detach().clone()
    ed = tiny_edit(tiny, heads=((1, 2),))
    with ed.applied(tiny):
        w = E.o_proj(tiny, 1).weight.detach()
        changed = (w != w_before).any(0).nonzero().flatten()
        cols = E.head_columns(tiny, [2])
        assert set(changed.tolist()) <= set(cols.tolist()) and len(changed) > 0
        assert weights_hash(tiny) != before
        with pytest.raises(PatchlabError, match="already applied"):
            ed.apply(tiny)
    assert weights_hash(tiny) == before
    with pytest.raises(PatchlabError, match="not applied"):
        ed.revert(tiny)


def test_revert_even_when_the_block_raises(tiny):
    before = weights_hash(tiny)
    with pytest.raises(KeyboardInterrupt):
        with tiny_edit(tiny).applied(tiny):
            raise KeyboardInterrupt
    assert weights_hash(tiny) == before and not tiny._patchlab_edits


def test_save_load_round_trip_and_tamper_detection(tiny, tmp_path):
    ed = tiny_edit(tiny, heads=((0, 1), (1, 3)))
    path = ed.save(tmp_path / "a.edit")
    again = E.Edit.load(path)
    assert again.heads == ed.heads and again.weights_sha256 == ed.weights_sha256
    for l in ed.deltas:
        assert torch.equal(again.deltas[l], ed.deltas[l])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # flip one bit of tensor data: safetensors itself would not notice
    (tmp_path / "b.edit").write_bytes(bytes(data))
    with pytest.raises(PatchlabError, match="do not match their recorded sha256"):
        E.Edit.load(tmp_path / "b.edit")
    (tmp_path / "c.edit").write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(PatchlabError, match="not a readable edit file"):
        E.Edit.load(tmp_path / "c.edit")


def test_edit_for_other_weights_shapes_or_nan_is_refused(tiny):
    ed = tiny_edit(tiny)
    other = E.Edit("tiny", "0" * 64, ed.heads, ed.deltas, [])
    with pytest.raises(PatchlabError, match="made for weights"):
        other.apply(tiny)
    bad_shape = E.Edit("tiny", ed.weights_sha256, ed.heads, {1: torch.zeros(3, 3)}, [])
    with pytest.raises(PatchlabError, match="does not fit"):
        bad_shape.apply(tiny)
    nan = E.Edit("tiny", ed.weights_sha256, ed.heads, {1: ed.deltas[1] * float("nan")}, [])
    with pytest.raises(PatchlabError, match="non-finite"):
        nan.apply(tiny)


def test_bad_config_is_refused():
    with pytest.raises(PatchlabError, match="target"):
        E.EditConfig(target="magic")
    with pytest.raises(PatchlabError, match="kl_weight"):
        E.EditConfig(kl_weight=float("nan"))


@pytest.mark.real
def test_real_edit_fixes_failure_locally_and_reverts(smol, shipped):
    from patchlab.methods.gap import evaluate_gap
    from patchlab.runtime import scoring

    ps = shipped.stratified(10)
    gap = evaluate_gap(smol, ps, progress=False)
    fail = next(it for it in ps if it.id in set(gap.failures))
    # other kinds of chain: a different template, so the edit's key should not fire there
    others = [it for it in ps if it.id in set(gap.composed_correct) and it.kind != fail.kind]
    before_hash = weights_hash(smol)
    prompts = [fail.composed] + [o.composed for o in others]
    base = torch.softmax(scoring.last_logits(smol, prompts), -1)
    ed = E.compute_edit(
        smol, [fail], [Head(23, 4), Head(23, 5)], E.EditConfig(target="optimize"), unrelated=[others[0].hop2]
    )
    assert weights_hash(smol) == before_hash  # computing an edit leaves the model as it was
    with ed.applied(smol):
        after = torch.softmax(scoring.last_logits(smol, prompts), -1)
        ok, _ = scoring.correct(smol, [fail.composed], [fail.answers])
    a = scoring.answer_token_id(smol, fail.answer)
    assert after[0, a] > 2 * base[0, a] and ok == [True]
    kl = (base[1:] * (base[1:].log() - after[1:].log())).sum(-1)
    assert kl.mean().item() < 0.05 and kl.median().item() < 0.02, kl
    assert weights_hash(smol) == before_hash


@pytest.mark.real
def test_guide_target_makes_layer_output_equal_target(smol, shipped):
    item = shipped[0]
    heads = [Head(23, 4)]
    cfg = E.EditConfig(target="guide", covariance=False, n_prefixes=0)
    ed = E.compute_edit(smol, [item], heads, cfg)
    W = E.o_proj(smol, 23).weight.detach().float()
    k = E.last_z(smol, [item.composed], [23])[23][0]
    v = W @ E.last_z(smol, [item.hop2], [23])[23][0]
    with ed.applied(smol):
        W2 = E.o_proj(smol, 23).weight.detach().float()
        torch.testing.assert_close(W2 @ k, v, atol=1e-3, rtol=1e-3)


@pytest.mark.real
@pytest.mark.parametrize("form", ["plain", "qa"])
def test_edit_measurement_equals_the_reference_path(smol, shipped, form):
    """The default measurement (first-step probabilities, settled queries stop) gives every item's rates of the
    reference (full windows, a second forward), the edited query's full continuation, and C to float rounding."""
    from patchlab.core.spec import HeadSet
    from patchlab.methods.editeval import evaluate_edits
    from patchlab.methods.gap import GapResult

    pool = list(shipped.stratified(6))
    rows = [{"id": it.id, "kind": it.kind, "hop1": True, "hop2": True, "composed": i > 0} for i, it in enumerate(pool)]
    gap = GapResult("m", "p", rows, {})
    cfg = E.EditConfig(n_prefixes=1, opt_steps=5, opt_prefixes=0, covariance=False)
    edits = E.edit_each(smol, pool[:2], HeadSet.parse("23.4,23.5"), cfg, progress=False, form=form)
    ref = evaluate_edits(smol, edits, pool, gap, n_irrelevant=12, progress=False, fast=False)
    fast = evaluate_edits(smol, edits, pool, gap, n_irrelevant=12, progress=False)
    for a, b in zip(ref.items, fast.items):
        assert a["text_after"] == b["text_after"]
        for name, s in a["sets"].items():
            t = b["sets"][name]
            assert (s["n"], s["before"], s["after"], s["beats_wrong"]) == (
                t["n"],
                t["before"],
                t["after"],
                t["beats_wrong"],
            )
            if s["n"]:
                assert abs(s["C"] - t["C"]) <= 1e-3 * max(1.0, abs(s["C"]))
