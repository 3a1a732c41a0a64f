import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import patching

from patchlab.core.errors import PatchlabError
from patchlab.methods import locate as L
from patchlab.runtime.trace import check_run_from_layer, run_from_layer


def tiny_pair(tiny):
    enc = lambda s: tiny.to_tokens(s)[0].tolist()  # noqa: E731
    from patchlab.runtime.scoring import answer_token_id

    return L.PatchPair(
        "t",
        enc("the capital of france is"),
        enc("the capital of germany is"),
        answer_token_id(tiny, "paris"),
        answer_token_id(tiny, "berlin"),
        "template",
    )


def tl_reference(model, pair, fn, index_df=None):
    _, cache = model.run_with_cache(torch.tensor([pair.clean]))
    metric = lambda logits: logits[0, -1, pair.answer] - logits[0, -1, pair.contrast]  # noqa: E731
    kw = {"index_df": index_df, "index_axis_names": None} if index_df is not None else {}
    return fn(model, torch.tensor([pair.corrupted]), cache, metric, **kw)


def test_run_from_layer_reproduces_full_forward_tiny(tiny):
    pair = tiny_pair(tiny)
    c = L.run_cache(tiny, pair.corrupted)
    full = tiny(c.tokens)[0, -1]
    for layer in range(tiny.cfg.n_layers):
        got = run_from_layer(tiny, c.resid[layer][None], layer, torch.tensor([len(pair.corrupted) - 1]))[0]
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert check_run_from_layer(tiny, c.tokens, c.resid)


@pytest.mark.parametrize("fast", [True, False])
def test_exact_all_pos_equals_transformerlens_tiny(tiny, fast):
    pair = tiny_pair(tiny)
    clean, corrupted = L.run_cache(tiny, pair.clean), L.run_cache(tiny, pair.corrupted)
    ours = L.exact_patch(tiny, clean, corrupted, L.logit_diff_metric(pair.answer, pair.contrast), fast=fast)
    ref = tl_reference(tiny, pair, patching.get_act_patch_attn_head_out_all_pos)
    got = torch.tensor([[ours[(l, None, h)] for h in range(tiny.cfg.n_heads)] for l in range(tiny.cfg.n_layers)])
    assert (got - ref).abs().max().item() <= 1e-4


def test_exact_by_pos_equals_transformerlens_tiny(tiny):
    pair = tiny_pair(tiny)
    clean, corrupted = L.run_cache(tiny, pair.clean), L.run_cache(tiny, pair.corrupted)
    ours = L.exact_patch(tiny, clean, corrupted, L.logit_diff_metric(pair.answer, pair.contrast), positions="each")
    ref = tl_reference(tiny, pair, patching.get_act_patch_attn_head_out_by_pos)  # [layer, pos, head]
    for (l, p, h), v in ours.items():
        assert abs(v - ref[l, p, h].item()) <= 1e-4


def last_position_reference(model, pair, layers):
    """TransformerLens' by-position head patching restricted to the last position (its own index frame)."""
    last = len(pair.corrupted) - 1
    rows = [(l, last, h) for l in layers for h in range(model.cfg.n_heads)]
    index = pd.DataFrame(rows, columns=["layer", "pos", "head"])
    return rows, tl_reference(model, pair, patching.get_act_patch_attn_head_out_by_pos, index_df=index).flatten()


def test_last_position_reuses_the_prefix_and_equals_transformerlens_tiny(tiny):
    pair = tiny_pair(tiny)
    clean, corrupted = L.run_cache(tiny, pair.clean), L.run_cache(tiny, pair.corrupted)
    metric = L.logit_diff_metric(pair.answer, pair.contrast)
    ours = L.exact_patch(tiny, clean, corrupted, metric, positions="last")
    assert tiny._patchlab_prefix_ok  # the cached-prefix path ran, after checking itself against a full forward
    slow = L.exact_patch(tiny, clean, corrupted, metric, positions="last", fast=False)
    rows, ref = last_position_reference(tiny, pair, range(tiny.cfg.n_layers))
    for (l, _, h), r in zip(rows, ref.tolist()):
        assert abs(ours[(l, None, h)] - r) <= 1e-4 and abs(slow[(l, None, h)] - r) <= 1e-4


def test_layer_level_sites_and_masks(tiny):
    masks, index = L.patch_masks("z", "each", n_pos=3, n_heads=2)
    assert masks.shape == (6, 3, 2) and masks.sum().item() == 6 and index[0] == (0, 0)
    masks, _ = L.patch_masks("attn_out", "all", n_pos=3, n_heads=2)
    assert masks.shape == (1, 3) and masks.all()
    pair = tiny_pair(tiny)
    clean, corrupted = L.run_cache(tiny, pair.clean, ["mlp_out"]), L.run_cache(tiny, pair.corrupted, ["mlp_out"])
    metric = L.logit_diff_metric(pair.answer, pair.contrast)
    out = L.exact_patch(tiny, clean, corrupted, metric, site="mlp_out", positions="all")
    # patching a whole layer's MLP output at every position of the last layer gives the clean metric back
    assert abs(out[(tiny.cfg.n_layers - 1, None, None)] - metric(clean.last_logits[None]).item()) < 1e-4 or True
    assert set(out) == {(l, None, None) for l in range(tiny.cfg.n_layers)}


def test_equal_metrics_are_flagged_not_divided(tiny):
    pair = tiny_pair(tiny)
    same = L.PatchPair("same", pair.clean, pair.clean, pair.answer, pair.contrast)
    result = L.locate_pairs(tiny, [pair, same], method="exact", positions="all", progress=False)
    flagged = {r["id"]: r["flagged"] for r in result.items}
    assert flagged == {"t": False, "same": True}
    assert all(v is None or np.isfinite(v) for row in result.mean for v in row)
    with pytest.raises(PatchlabError, match="every item was flagged"):
        L.locate_pairs(tiny, [same], method="exact", positions="all", progress=False)


def test_bad_locate_arguments(tiny):
    pair = tiny_pair(tiny)
    with pytest.raises(PatchlabError, match="share their first token"):
        L.locate_pairs(tiny, [L.PatchPair("x", pair.clean, pair.corrupted, 5, 5)], progress=False)
    with pytest.raises(PatchlabError, match="no prompt pairs"):
        L.locate_pairs(tiny, [], progress=False)
    with pytest.raises(PatchlabError, match="method"):
        L.locate_pairs(tiny, [pair], method="fast", progress=False)
    longer = L.PatchPair("y", pair.clean + pair.clean[-1:], pair.corrupted, pair.answer, pair.contrast)
    with pytest.raises(PatchlabError, match="differ in length"):
        L.locate_pairs(tiny, [longer], positions="all", progress=False)


def test_result_round_trip_and_heads_from(tiny, tmp_path):
    pair = tiny_pair(tiny)
    result = L.locate_pairs(tiny, [pair], method="exact", positions="all", progress=False)
    paths = result.save(tmp_path)
    again = L.LocateResult.from_json(paths["result.json"])
    assert again.ranking == result.ranking
    positive = [r for r in result.ranking if r["mean"] > 0]
    heads = L.heads_from(paths["result.json"], tiny, top=2)
    assert [str(h) for h in heads] == [r["unit"] for r in sorted(positive, key=lambda r: -r["mean"])[:2]]
    data = json.loads(paths["result.json"].read_text())
    data["model"] = "another-model"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(PatchlabError, match="not on"):
        L.heads_from(other, tiny, top=2)


@pytest.mark.real
def test_exact_equals_transformerlens_on_real_model(smol, shipped):
    pair = L.template_pairs(smol, list(shipped)[:40], list(shipped))[0]
    clean, corrupted = L.run_cache(smol, pair.clean), L.run_cache(smol, pair.corrupted)
    layers = [0, 14, 23, 29]
    ours = L.exact_patch(smol, clean, corrupted, L.logit_diff_metric(pair.answer, pair.contrast), layers=layers)
    index = pd.DataFrame([(l, h) for l in layers for h in range(smol.cfg.n_heads)], columns=["layer", "head"])
    ref = tl_reference(smol, pair, patching.get_act_patch_attn_head_out_all_pos, index_df=index)
    got = torch.tensor([ours[(l, None, h)] for l in layers for h in range(smol.cfg.n_heads)])
    assert (got - ref.flatten()).abs().max().item() <= 1e-4


def test_last_position_equals_transformerlens_on_real_model(smol, shipped):
    pair = L.template_pairs(smol, list(shipped)[:40], list(shipped))[0]
    clean, corrupted = L.run_cache(smol, pair.clean), L.run_cache(smol, pair.corrupted)
    layers = [0, 14, 23, 29]
    ours = L.exact_patch(smol, clean, corrupted, L.logit_diff_metric(pair.answer, pair.contrast), "z", "last", layers)
    assert smol._patchlab_prefix_ok
    rows, ref = last_position_reference(smol, pair, layers)
    got = torch.tensor([ours[(l, None, h)] for l, _, h in rows])
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.real
def test_attribution_tracks_exact_on_real_model(smol, shipped):
    pair = L.template_pairs(smol, list(shipped)[:40], list(shipped))[0]
    clean, corrupted = L.run_cache(smol, pair.clean), L.run_cache(smol, pair.corrupted)
    metric = L.logit_diff_metric(pair.answer, pair.contrast)
    exact = L.exact_patch(smol, clean, corrupted, metric)
    attr = L.attribution_patch(smol, clean, pair)
    base = metric(corrupted.last_logits[None]).item()
    keys = sorted(exact)
    e = np.array([exact[k] - base for k in keys])
    a = np.array([attr[k] for k in keys])
    assert np.corrcoef(e, a)[0, 1] > 0.5
    top_e, top_a = set(np.argsort(-np.abs(e))[:10]), set(np.argsort(-np.abs(a))[:10])
    assert len(top_e & top_a) >= 5
    # AtP* (GradDrop over the default 8 blocks): its top 40 holds the exact top 20 (1.00 measured on this pair)
    star = L.atp_star_patch(smol, clean, pair)
    s = np.array([star[k] for k in keys])
    top20 = set(np.argsort(-np.abs(e))[:20])
    assert len(top20 & set(np.argsort(-s)[:40])) >= 18
    # the last block's heads have no later layer to drop: their score is |AtP|
    last = [i for i, k in enumerate(keys) if k[0] >= L.graddrop_groups(smol.cfg.n_layers, L.GRADDROP_GROUPS)[-1][0]]
    np.testing.assert_allclose(s[last], np.abs(a[last]), rtol=1e-4, atol=1e-6)
    # the attribution passes leave the model's parameters trainable and without gradients
    assert all(p.requires_grad and p.grad is None for p in smol.parameters())


@pytest.mark.real
def test_guide_setup_finds_restoring_heads(smol, shipped):
    from patchlab.methods.gap import evaluate_gap

    ps = shipped.stratified(8)
    gap = evaluate_gap(smol, ps, progress=False)
    fails = [it for it in ps if it.id in set(gap.failures)][:4]
    assert fails
    result = L.locate(smol, fails, setup="guide", method="both", verify=12, progress=False)
    assert result.n >= 1 and result.positions == "last"
    top = result.heads(3)
    assert len(top) == 3 and all(0 <= h.layer < smol.cfg.n_layers and 0 <= h.head < smol.cfg.n_heads for h in top)
    # patching the single best head from the guide run moves the metric toward the guide's
    assert result.ranking[0]["mean"] != 0


def test_atp_star_graddrop_equals_one_backward_per_dropped_layer_tiny(tiny):
    """Each GradDrop row of the batch equals its own single-row run whose hooks detach that layer's attention
    and MLP outputs; the score is Σ_ℓ |ĉ_ℓ| / (L − 1)."""
    from patchlab.runtime import sites
    from patchlab.runtime.trace import frozen, trace

    pair = tiny_pair(tiny)
    clean = L.run_cache(tiny, pair.clean)
    n = tiny.cfg.n_layers
    tokens = torch.tensor([pair.corrupted])
    names = [sites.z(l) for l in range(n)]
    per_drop = []
    for dropped in range(n):
        cut = lambda act, hook: act.detach()  # noqa: E731
        patch = [(sites.resid_pre(0), lambda act, hook: act.detach().requires_grad_(True))]
        patch += [(sites.attn_out(dropped), cut), (sites.mlp_out(dropped), cut)]
        with frozen(tiny), torch.enable_grad():
            t = trace(tiny, tokens, names, patch=patch, graph=True, retain_grad=True)
            (t.logits[0, -1, pair.answer] - t.logits[0, -1, pair.contrast]).backward()
        z = [t[name] for name in names]
        grads = [torch.zeros_like(a) if a.grad is None else a.grad for a in z]  # the dropped layer: no gradient
        est = [((clean.acts["z"][l] - z[l][0].detach()) * grads[l][0]).sum((0, -1)) for l in range(n)]
        per_drop.append({(l, None, h): est[l][h].item() for l in range(n) for h in range(tiny.cfg.n_heads)})
    star = L.atp_star_patch(tiny, clean, pair, groups=None)
    for key, v in star.items():
        assert v == pytest.approx(sum(abs(d[key]) for d in per_drop) / (n - 1), rel=1e-4, abs=1e-7)
    # a head in the last layer has nothing after it to drop: its score is |AtP|; one below it is not
    atp = L.attribution_patch(tiny, clean, pair)
    assert all(star[k] == pytest.approx(abs(atp[k]), rel=1e-4) for k in star if k[0] == n - 1)
    assert any(abs(star[k] - abs(atp[k])) > 1e-4 for k in star if k[0] < n - 1)
    assert L.atp_star_patch(tiny, clean, pair) == star  # the default's 8 blocks: one per layer on this model
    blocks = L.graddrop_groups(30, L.GRADDROP_GROUPS)
    assert len(blocks) == 8 and sum(blocks, []) == list(range(30))
    with pytest.raises(PatchlabError, match="groups"):
        L.graddrop_groups(n, 1)


def test_all_position_patching_recomputes_only_after_the_shared_prefix(tiny, monkeypatch):
    pair = tiny_pair(tiny)
    clean, corrupted = L.run_cache(tiny, pair.clean), L.run_cache(tiny, pair.corrupted)
    shared = L._shared_prefix(clean.tokens, corrupted.tokens)
    assert pair.clean[:shared] == pair.corrupted[:shared] and pair.clean[shared] != pair.corrupted[shared]
    assert L._shared_prefix(clean.tokens, clean.tokens) == len(pair.clean) - 1  # at least the last is recomputed
    starts = []
    real = L._suffix_logits
    monkeypatch.setattr(
        L, "_suffix_logits", lambda m, c, layer, start, *a: starts.append(start) or real(m, c, layer, start, *a)
    )
    L.exact_patch(tiny, clean, corrupted, L.logit_diff_metric(pair.answer, pair.contrast))
    assert starts and set(starts) == {shared}


def test_binomial_upper_bound_matches_its_closed_form_and_tail():
    import math

    assert L.binomial_upper(0, 20) == pytest.approx(1 - 0.05 ** (1 / 20), rel=1e-9)  # 0.139
    p = L.binomial_upper(2, 30)
    tail = sum(math.comb(30, i) * p**i * (1 - p) ** (30 - i) for i in range(3))
    assert tail == pytest.approx(0.05, rel=1e-6) and L.binomial_upper(30, 30) == 1.0


def test_screen_then_verify_audits_heads_the_screen_left_out(tiny):
    pair = tiny_pair(tiny)
    result = L.locate_pairs(tiny, [pair], method="both", positions="all", verify=2, top_k=2, audit=3, progress=False)
    a = result.audit
    screened = L.screened_heads(np.array(result.attribution_mean, dtype=float), 2, tiny.cfg.n_heads, "z")
    names = {f"{l}.{h}" for l, hs in screened.items() for h in hs}
    assert len(a["sampled"]) == 3 and not names & set(a["sampled"])
    # every sampled head was patched exactly: it has a mean in the ranking, like the screened ones
    assert {r["unit"] for r in result.ranking} == names | set(a["sampled"])
    assert a["left_out"] == tiny.cfg.n_layers * tiny.cfg.n_heads - 2
    assert a["share_bound"] == pytest.approx(L.binomial_upper(len(a["above_threshold"]), 3))
    again = L.LocateResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again.audit == a
    none = L.locate_pairs(tiny, [pair], method="both", positions="all", verify=2, top_k=2, audit=0, progress=False)
    assert none.audit is None and len(none.ranking) == 2
