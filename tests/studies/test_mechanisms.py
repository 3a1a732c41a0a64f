import dataclasses

import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.studies import mechanisms as M

# --- plumbing on the tiny random model ----------------------------------------------------------------


def tiny_module(tiny, layer=1, heads=(2,), threshold=0.0, seed=0):
    """A module with a random delta and a random key whose gates all open (threshold -2) or shut (+2)."""
    g = torch.Generator().manual_seed(seed)
    d, hd = tiny.cfg.d_model, tiny.cfg.n_heads * tiny.cfg.d_head
    edit = E.Edit(
        "tiny",
        E.base_hash(tiny),
        {layer: list(heads)},
        {layer: 0.2 * torch.randn(d, len(heads) * tiny.cfg.d_head, generator=g)},
        ["x"],
        {"target": "test"},
    )
    route = M.Route(
        list(range(tiny.cfg.n_heads)),
        torch.randn(hd, generator=g),
        torch.eye(hd),
        M.unit(torch.randn(hd, generator=g)),
        threshold,
        threshold + 0.5,
        threshold,
    )
    return M.Module(edit, {layer: route}, {"note": "test"})


PROMPTS = ["the capital of france is", "paris is a city in france", "the eiffel tower is located in"]


def test_open_gates_equal_the_weight_edit_and_shut_gates_the_original_model(tiny):
    from patchlab.runtime.scoring import last_logits

    base = last_logits(tiny, PROMPTS)
    shut = tiny_module(tiny, threshold=2.0)  # cosine never exceeds 1: no gate can open
    with M.Router([shut]).attached(tiny):
        assert torch.equal(last_logits(tiny, PROMPTS), base)
    for gate in M.GATES:
        opened = tiny_module(tiny, threshold=-2.0)  # every gate fully open: exactly the W_O column edit
        with M.Router([opened], gate).attached(tiny):
            routed = last_logits(tiny, PROMPTS)
        with opened.edit.applied(tiny):
            plain = last_logits(tiny, PROMPTS)
        assert (plain - base).abs().max() > 1e-3  # the edit does change the output ...
        torch.testing.assert_close(routed, plain, atol=1e-5, rtol=1e-5)  # ... and routing reproduces it


def test_gate_values_hard_and_soft():
    s = torch.tensor([[-0.5, 0.1, 0.3, 0.5, 0.9]]).T
    lo, hi, tau = torch.tensor([0.1]), torch.tensor([0.5]), torch.tensor([0.3])
    assert M.gate_values(s, lo, hi, tau, "hard")[:, 0].tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(M.gate_values(s, lo, hi, tau, "soft")[:, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_module_save_load_round_trip_and_tampering(tiny, tmp_path):
    mod = tiny_module(tiny, layer=0, heads=(1, 3))
    path = mod.save(tmp_path / "a.module.safetensors")
    again = M.Module.load(path)
    assert again.edit.heads == mod.edit.heads and again.edit.item_ids == ["x"] and again.calibration == {"note": "test"}
    assert torch.equal(again.edit.deltas[0], mod.edit.deltas[0])
    r, q = mod.routes[0], again.routes[0]
    assert (q.key_heads, q.lo, q.hi, q.tau) == (r.key_heads, r.lo, r.hi, r.tau)
    assert torch.equal(q.key, r.key) and torch.equal(q.whiten, r.whiten) and torch.equal(q.center, r.center)
    assert isinstance(M.load_any(path), M.Module)
    assert isinstance(M.load_any(mod.edit.save(tmp_path / "a.edit")), E.Edit)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    (tmp_path / "b.module.safetensors").write_bytes(bytes(data))
    with pytest.raises(PatchlabError, match="do not match their recorded sha256"):
        M.Module.load(tmp_path / "b.module.safetensors")
    with pytest.raises(PatchlabError, match="not a patchlab module file"):
        M.Module.load(tmp_path / "a.edit")
    (tmp_path / "c.module.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(PatchlabError, match="not a readable"):
        M.load_any(tmp_path / "c.module.safetensors")


def test_hsic_sees_nonlinear_dependence_and_is_near_its_floor_for_independent_columns():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 400)[:, None]  # symmetric: x and |x| are exactly uncorrelated
    S = torch.cat([x, x.abs(), torch.rand(400, 1, generator=g) * 2 - 1], 1)
    H = M.hsic_matrix(S)
    torch.testing.assert_close(H.diagonal(), torch.ones(3))
    r = torch.corrcoef(S.T)
    assert abs(r[0, 1]) < 1e-5 and H[0, 1] > 0.3  # |x| depends on x: Pearson misses it, HSIC does not
    assert H[0, 2] < 0.03 and H[1, 2] < 0.03
    dep = M.dependence(S)
    assert dep["hsic_null"] < dep["hsic"] and dep["modules"] == 3


def test_bad_inputs_are_refused(tiny, tmp_path):
    with pytest.raises(PatchlabError, match="key_heads"):
        M.RouteConfig(key_heads="all")
    with pytest.raises(PatchlabError, match="hi_quantile"):
        M.RouteConfig(hi_quantile=1.5)
    with pytest.raises(PatchlabError, match="gate"):
        M.Router([], gate="fuzzy")
    with pytest.raises(PatchlabError, match="stages"):
        M.parse_stages("1,0", 5)
    with pytest.raises(PatchlabError, match="stages"):
        M.parse_stages("1,ten", 5)
    assert M.parse_stages("1,10,50,all", 12) == [1, 10, 12] and M.parse_stages(None, 61) == [1, 10, 50, 61]
    with pytest.raises(PatchlabError, match="no such file"):
        M.stack_paths(str(tmp_path / "nope"))
    with pytest.raises(PatchlabError, match="holds no"):
        M.stack_paths(str(tmp_path))
    with pytest.raises(PatchlabError, match="matches no file"):
        M.stack_paths(str(tmp_path / "*.safetensors"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(PatchlabError, match="not a readable"):
        M.load_any(tmp_path / "x.txt")
    with pytest.raises(PatchlabError, match="held-out question"):
        M.Reference.build(tiny, [], [1])
    with pytest.raises(PatchlabError, match="at least 4 samples"):
        M.hsic_matrix(torch.zeros(3, 2))
    broken = tiny_module(tiny)
    broken.routes[1] = dataclasses.replace(broken.routes[1], key=broken.routes[1].key[:-1])
    with pytest.raises(PatchlabError, match="do not fit"):
        with M.Router([broken]).attached(tiny):
            pass
    foreign = tiny_module(tiny)
    foreign.edit.weights_sha256 = "0" * 64
    with pytest.raises(PatchlabError, match="other weights"):
        with M.Router([foreign]).attached(tiny):
            pass


def test_cli_bad_edits_exit_2_with_one_line_before_loading_a_model(tmp_path, capsys):
    from patchlab.cli import main

    for args, needle in (
        (["--edits", str(tmp_path / "none.module.safetensors")], "no such file"),
        (["--edits", str(tmp_path), "--gate", "fuzzy"], "--gate"),
        (["--edits", str(tmp_path)], "holds no"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["mechanisms", *args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


# --- the real model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(smol, shipped):
    """Two real edits (different kinds) as routed modules, keyed against a reference of held-out correct queries."""
    from patchlab.methods.gap import evaluate_gap

    ps = shipped.stratified(2)
    gap = evaluate_gap(smol, ps, progress=False)
    pool = list(ps)
    fails = [it for it in pool if it.id in set(gap.failures)]
    right = [it for it in pool if it.id in set(gap.composed_correct)]
    chosen = [fails[0], next(it for it in fails if it.kind != fails[0].kind)]
    heads = [Head(23, 4), Head(23, 5)]
    edits = [
        E.compute_edit(smol, [it], heads, E.EditConfig(target="optimize"), unrelated=[right[0].hop2]) for it in chosen
    ]
    reference = M.Reference.build(smol, [it.composed for it in right[::2]], [23], sentences=M.corpus_sentences()[:60])
    cfg = M.RouteConfig(n_prefixes=3)
    modules = M.route_edits(smol, edits, pool, reference, cfg, progress=False)
    held_out = [it for it in right[1::2] if it.subject not in {c.subject for c in chosen}]
    return {
        "ps": ps,
        "gap": gap,
        "pool": pool,
        "fails": fails,
        "chosen": chosen,
        "edits": edits,
        "modules": modules,
        "reference": reference,
        "cfg": cfg,
        "held_out": held_out,
        "others": [it for it in shipped.stratified(3) if it.id not in {p.id for p in pool}],
    }


def _kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.real
def test_real_shut_gates_give_the_original_logits_and_open_gates_the_plain_edit(smol, real):
    from patchlab.runtime.identity import weights_hash
    from patchlab.runtime.scoring import greedy_continuations, last_logits

    before = weights_hash(smol)
    prompts = [real["chosen"][0].composed, *[it.composed for it in real["held_out"][:3]], *M.corpus_sentences()[:2]]
    base = last_logits(smol, prompts)
    force = lambda t: [
        M.Module(m.edit, {l: dataclasses.replace(r, lo=t, hi=t + 1, tau=t) for l, r in m.routes.items()})  # noqa: E731
        for m in real["modules"]
    ]
    with M.Router(force(2.0)).attached(smol):
        torch.testing.assert_close(last_logits(smol, prompts), base, atol=1e-5, rtol=0)
    with M.Router(force(-2.0)[:1]).attached(smol):
        routed, routed_text = last_logits(smol, prompts), greedy_continuations(smol, prompts[:2])
    with real["edits"][0].applied(smol):
        plain, plain_text = last_logits(smol, prompts), greedy_continuations(smol, prompts[:2])
    torch.testing.assert_close(routed, plain, atol=1e-4, rtol=1e-4)
    assert routed_text == plain_text  # the gated hooks also act inside generate (token by token, KV cache)
    assert weights_hash(smol) == before


@pytest.mark.real
def test_real_routed_edit_fixes_its_item_and_leaves_unrelated_items_alone(smol, real):
    from patchlab.runtime.scoring import answer_token_id, correct, last_logits

    item, edit, module = real["chosen"][0], real["edits"][0], real["modules"][0]
    unrelated = [it.composed for it in real["held_out"] if it.kind != item.kind][:4] + M.corpus_sentences()[100:102]
    prompts = [item.composed, *item.paraphrases, *unrelated]
    base = last_logits(smol, prompts)
    with M.Router([module]).attached(smol):
        routed = last_logits(smol, prompts)
        ok, _ = correct(smol, [item.composed], [item.answers])
    with edit.applied(smol):
        plain = last_logits(smol, prompts)
    a = answer_token_id(smol, item.answer)
    p_base, p_routed = torch.softmax(base[0], -1)[a], torch.softmax(routed[0], -1)[a]
    assert ok == [True] and p_routed > 2 * p_base, (p_base, p_routed)
    k = len(item.paraphrases) + 1
    kl_routed, kl_plain = _kl(base[k:], routed[k:]), _kl(base[k:], plain[k:])
    assert kl_routed.max() < 1e-6, kl_routed  # gates shut on unrelated inputs: their distributions do not move
    assert kl_plain.max() > 1e-4, kl_plain  # while the same edit in the weights does move them
    cal = module.calibration["layers"]["23"]
    assert cal["separable"] and cal["own_open"] > 0.8 and cal["lo"] < cal["tau"] < cal["hi"]


@pytest.mark.real
def test_real_orthogonal_keys_lower_the_dependence_between_modules(smol, real):
    """Eight modules (keys only: the deltas do not enter the gates) over every position of held-out prompts
    (correct composed queries, their paraphrases and facts, neutral sentences; none in the reference)."""
    items = real["others"][:8]  # items outside the slice: none of their prompts is among the held-out ones
    cfg = dataclasses.replace(real["cfg"], n_prefixes=1)
    base = E.base_hash(smol)
    edits = [
        E.Edit("smollm2-135m", base, {23: [4, 5]}, {23: torch.zeros(smol.cfg.d_model, 128)}, [it.id]) for it in items
    ]
    own = [M.own_z(smol, e, [it], cfg) for e, it in zip(edits, items)]
    held = [p for it in real["held_out"] for p in (it.composed, *it.paraphrases, it.hop2)] + M.corpus_sentences()[
        100:130
    ]
    got = {}
    for orth in (False, True):
        mods = M.route_edits(
            smol,
            edits,
            real["pool"],
            real["reference"],
            dataclasses.replace(cfg, orthogonal=orth),
            own=own,
            progress=False,
        )
        S, _, _ = M.position_scores(smol, mods, held)
        got[orth] = M.dependence(S)
        keys = torch.stack([m.routes[23].key for m in mods])
        assert ((keys @ keys.T - torch.eye(len(mods))).abs().max() < 1e-5) == orth  # Gram–Schmidt: orthonormal keys
    assert got[True]["hsic"] < got[False]["hsic"] and got[True]["abs_r"] < got[False]["abs_r"], got
    assert got[True]["hsic_excess"] < 0.8 * got[False]["hsic_excess"], got


@pytest.mark.real
def test_real_cli_stacks_saved_modules_plain_vs_routed(smol, real, tmp_path):
    """`patchlab mechanisms` on two saved modules (a shell glob's expansion): curves, dependence, cost, figure."""
    import subprocess
    import sys

    files = [m.save(tmp_path / "edits" / f"{i}.module.safetensors") for i, m in enumerate(real["modules"])]
    real["ps"].save(tmp_path / "slice.jsonl")
    real["gap"].save(tmp_path / "gap")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchlab.cli",
            "mechanisms",
            "--edits",
            str(files[0]),
            str(files[1]),
            "--prompt-set",
            str(tmp_path / "slice.jsonl"),
            "--gap",
            str(tmp_path / "gap" / "result.json"),
            "--stages",
            "1,all",
            "--n-test",
            "4",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PATCHLAB_QUIET": "1", "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    res = M.MechanismsResult.from_json(tmp_path / "out" / "result.json")
    routed, plain = res.curves["routed"], res.curves["plain"]
    assert res.stages == [1, 2] and routed["retention"][0]["n"] == 0 and routed["retention"][1]["n"] == 1
    assert routed["edited"][-1]["after"] == 1.0 and routed["paraphrase"][-1]["after"] >= 0.5
    assert routed["irrelevance"][-1]["after"] == 1.0 and routed["facts"][-1]["after"] == 1.0
    assert plain["irrelevance"][-1]["n"] == routed["irrelevance"][-1]["n"] > 0
    assert "as given" in res.dependence and 0 < res.cost["ratio"] < 3
    shown = [k for k in M.METRICS if any(s["n"] for s in routed[k])]
    assert len(res.figure().data) == 2 * len(shown) and (tmp_path / "out" / "figure.html").stat().st_size > 1000
