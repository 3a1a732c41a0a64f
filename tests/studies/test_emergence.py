"""Information emergence: definitions checked on hand-made states with known MI, hook capture and the
hidden-state cache on the tiny model, the experiments' plumbing, the CLI, and a real check on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.runtime.identity import weights_hash
from patchlab.studies import emergence as E

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


WORDS = "the capital of the country where the eiffel tower is located is paris and the city of berlin".split()


def tiny_texts(n: int = 24, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (6 + k % 3,), generator=g)) for k in range(n)]


def noisy_mi(rho: float, d: int, ridge: float) -> float:
    """MI in bits of unit-variance pairs with correlation rho per dimension, after noise of variance `ridge`."""
    return -d / 2 * math.log2(1 - rho**2 / (1 + ridge) ** 2)


def made_states(n: int, rho_macro: float, rho_micro: float, d: int = 4, T: int = 2, seed: int = 0) -> E.HiddenStates:
    """Two streams (one block) whose macro and micro pairs are Gaussian with known correlation; every
    (sequence, position) holds its own token so micro rows never repeat."""
    g = torch.Generator().manual_seed(seed)

    def pair(rho: float, m: int) -> torch.Tensor:
        x = torch.randn(m, d, generator=g)
        return torch.stack([x, rho * x + math.sqrt(1 - rho**2) * torch.randn(m, d, generator=g)], 1)

    tokens = torch.arange(n * T).reshape(n, T)
    return E.HiddenStates(tokens, pair(rho_macro, n), torch.arange(n * T), pair(rho_micro, n * T), {"model": "made"})


def test_ie_is_macro_minus_mean_micro_on_known_gaussians():
    hs = made_states(3000, rho_macro=0.9, rho_micro=0.5)
    r = E.emergence_from_states(hs, n_boot=0, dim=4, ridge=0.1, progress=False)
    macro, micro = noisy_mi(0.9, 4, 0.1), noisy_mi(0.5, 4, 0.1)
    assert r.layers == [0] and r.n == 3000 and r.T == 2 and r.distinct_t == [3000, 3000]
    assert abs(r.macro[0] - macro) < 0.12 and abs(r.micro[0] - micro) < 0.12, (r.macro, r.micro, macro, micro)
    assert r.ie[0] == pytest.approx(r.macro[0] - r.micro[0]) and abs(r.ie[0] - (macro - micro)) < 0.2
    assert r.micro[0] == pytest.approx(sum(r.micro_t[0]) / 2)
    assert r.estimator_params["ceiling_bits"] == pytest.approx(noisy_mi(1.0 - 1e-15, 4, 0.1), abs=1e-6)
    # swapping which side is dependent flips the sign of IE
    flipped = E.emergence_from_states(made_states(3000, 0.5, 0.9), n_boot=0, dim=4, ridge=0.1, progress=False)
    assert flipped.ie[0] < -2


def test_bootstrap_spread_and_pre_projection_are_exact_for_the_point_estimate():
    hs = made_states(400, 0.8, 0.3, d=12, seed=1)
    full = E.emergence_from_states(hs, n_boot=0, dim=4, pre_dim=None, progress=False)
    reduced = E.emergence_from_states(hs, n_boot=0, dim=4, pre_dim=6, progress=False)
    assert abs(full.ie[0] - reduced.ie[0]) < 1e-9 and abs(full.macro[0] - reduced.macro[0]) < 1e-9
    boot = E.emergence_from_states(hs, n_boot=8, dim=4, progress=False)
    assert boot.ie == full.ie and boot.spread_kind == "bootstrap"
    assert 0.02 < boot.ie_std[0] < 1.0 and boot.estimator_params["n_boot"] == 8


def test_repeated_tokens_reduce_the_micro_rank_instead_of_inflating_it():
    """Micro rows repeat when sequences share a token: the estimator sees their true (lower) rank."""
    hs = made_states(200, 0.8, 0.8, d=6)
    hs.tokens[:, 1] = hs.tokens[:, 1] % 3 + hs.tokens[0, 1]  # only 3 distinct tokens at position 1
    r = E.emergence_from_states(hs, n_boot=0, dim=6, progress=False)
    assert r.distinct_t[1] == 3
    assert r.micro_t[0][1] <= E.ceiling_bits(2, 0.1) + 0.05  # rank 2 (3 points) at most: not 6 dims of ceiling


@pytest.mark.parametrize(
    "kw, arg",
    [
        (dict(n_boot=1), "n_boot"),
        (dict(estimator="knn"), "estimator"),
        (dict(layers=[5]), "layers"),
        (dict(seeds=[]), "seeds"),
        (dict(pre_dim=0), "pre_dim"),
        (dict(rows=[0, 1]), "rows"),
    ],
)
def test_bad_arguments_name_themselves(kw, arg):
    with pytest.raises(PatchlabError, match=f"^{arg}: "):
        E.emergence_from_states(made_states(50, 0.5, 0.5), progress=False, **kw)


def test_equal_length_cuts_and_drops(tiny):
    texts = ["the capital of france is paris", "paris", "the city of berlin is located in germany", "a b"] * 5
    a = E.equal_length(tiny, texts, length=5)
    assert a.tokens.shape == (10, 5) and a.kept == [i for i in range(20) if i % 4 in (0, 2)]
    assert a.note.endswith("10 shorter texts dropped, 10 cut")
    auto = E.equal_length(tiny, texts * 2)  # T = the largest length that 75% of texts reach
    lens = sorted((len(tiny.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts * 2), reverse=True)
    assert auto.tokens.shape[1] == lens[29]
    with pytest.raises(PatchlabError, match="^texts: only 0 of"):
        E.equal_length(tiny, texts, length=50)
    with pytest.raises(PatchlabError, match="^length: "):
        E.equal_length(tiny, texts, length=0)


def test_shuffle_keeps_each_rows_tokens():
    tokens = torch.arange(40).reshape(5, 8)
    s = E.shuffle_tokens(tokens, seed=3)
    assert not torch.equal(s, tokens)
    assert torch.equal(s.sort(1).values, tokens)
    assert torch.equal(s, E.shuffle_tokens(tokens, seed=3))


def test_hidden_states_match_hooks_and_the_cache(tiny, tmp_path):
    a = E.equal_length(tiny, tiny_texts())
    hs = E.hidden_states(tiny, a.tokens, cache_dir=tmp_path, progress=False)
    n, T = a.tokens.shape
    assert hs.macro.shape == (n, tiny.cfg.n_layers + 1, tiny.cfg.d_model)
    assert torch.equal(hs.vocab, torch.unique(a.tokens)) and hs.micro.shape[0] == len(hs.vocab)
    bos = E.bos_prefix(tiny)
    row = torch.tensor([bos + a.tokens[3].tolist()])
    _, cache = tiny.run_with_cache(row)
    torch.testing.assert_close(hs.macro[3, 1], cache["blocks.1.hook_resid_pre"][0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs.macro[3, 1], cache["blocks.0.hook_resid_post"][0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs.macro[3, -1], cache["blocks.1.hook_resid_post"][0, -1], atol=1e-5, rtol=1e-5)
    tok = int(a.tokens[3, 2])
    _, alone = tiny.run_with_cache(torch.tensor([bos + [tok]]))
    torch.testing.assert_close(
        hs.micro[hs.micro_rows(2)[3], 0], alone["blocks.0.hook_resid_pre"][0, -1], atol=1e-5, rtol=1e-5
    )
    path = E.states_path(tmp_path, weights_hash(tiny), E.tokens_hash(a.tokens, bos))
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]
    again = E.hidden_states(tiny, a.tokens, cache_dir=tmp_path, progress=False)
    assert torch.equal(again.macro, hs.macro) and torch.equal(again.micro, hs.micro)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(PatchlabError, match="not a patchlab hidden-state file"):
        E.HiddenStates.load(path)


def test_information_emergence_result_round_trip(tiny, tmp_path):
    r = E.information_emergence(
        tiny, tiny_texts(40), n_boot=3, dim=3, cache_dir=tmp_path, condition="x", progress=False
    )
    assert r.layers == [0, 1] and len(r.ie) == len(r.macro) == len(r.micro) == len(r.ie_std) == 2
    assert r.estimator == "gaussian" and r.estimator_params["dim"] == 3 and r.n == 40 and r.meta["dtype"] == "float32"
    assert all(len(m) == r.T for m in r.micro_t) and r.data_note.startswith("first ")
    back = E.EmergenceResult.from_json(r.to_json())
    assert back == r
    paths = r.save(tmp_path / "out")
    assert paths["result.json"].is_file() and "Information emergence" in paths["figure.html"].read_text()


def test_random_init_control_has_the_shape_not_the_weights(tiny):
    before = weights_hash(tiny)
    rnd = E.random_init_like(tiny, seed=1)
    assert weights_hash(tiny) == before and weights_hash(rnd) != before
    assert rnd.cfg.n_layers == tiny.cfg.n_layers and rnd.cfg.d_model == tiny.cfg.d_model
    assert rnd.cfg.default_prepend_bos == tiny.cfg.default_prepend_bos
    assert weights_hash(E.random_init_like(tiny, seed=1)) == weights_hash(rnd)  # seeded


def test_experiments_plumbing(tiny, shipped, tmp_path):
    nat = E.natural_vs_shuffled(tiny, tiny_texts(30), n_boot=0, dim=3, cache_dir=tmp_path, progress=False)
    assert list(nat.conditions) == ["natural", "shuffled", "random-init"]
    assert nat.summary["natural"]["n"] == 30 and nat.result("shuffled").T == nat.result("natural").T
    pairs = [
        ("paris", "berlin"),
        ("france", "germany"),
        ("city", "country"),
        ("capital", "city"),
        ("spain", "madrid"),
        ("tower", "city"),
        ("euro", "currency"),
        ("language", "spoken"),
        ("born", "located"),
        ("the", "a"),
    ]
    icl = E.icl_emergence(tiny, demos=[0, 2], n=12, pairs=pairs, n_boot=0, dim=2, cache_dir=tmp_path, progress=False)
    assert [s["k"] for s in icl.summary.values()] == [0, 2] and all(
        0 <= s["accuracy"] <= 1 for s in icl.summary.values()
    )
    assert icl.result("k=2").T > icl.result("k=0").T
    assert "layer-mean IE vs k" in icl.figure().to_html()
    with pytest.raises(PatchlabError, match="^experiment: "):
        E.run_experiment(tiny, "nope")


def test_twohop_groups_and_pooling(tiny, shipped):
    from patchlab.methods.gap import GapResult

    ps = shipped.stratified(6)
    rows = [
        {"id": it.id, "kind": it.kind, "hop1": True, "hop2": i % 3 > 0, "composed": i % 2 == 0}
        for i, it in enumerate(ps)
    ]
    gap = GapResult(model="tiny", prompt_set="x", items=rows, summary={"all": {"gap_share": 0.5}})
    wrong, only_gap = E.twohop_groups(tiny, ps, gap, "wrong"), E.twohop_groups(tiny, ps, gap, "gap")
    assert sum(len(g["failed"]) for g in wrong.values()) == sum(not r["composed"] for r in rows)
    assert sum(len(g["failed"]) for g in only_gap.values()) == sum(not r["composed"] and r["hop2"] for r in rows)
    a = E.emergence_from_states(made_states(300, 0.9, 0.5), n_boot=2, progress=False)
    b = E.emergence_from_states(made_states(100, 0.5, 0.9, seed=2), n_boot=2, progress=False)
    pooled = E.pool_results([a, b], "p")
    assert pooled.n == 400 and pooled.ie[0] == pytest.approx(0.75 * a.ie[0] + 0.25 * b.ie[0])
    with pytest.raises(PatchlabError, match="^failed: "):
        E.twohop_groups(tiny, ps, gap, "both")


def test_cli_emergence_writes_result_and_rejects_bad_options(tiny_dir, tmp_path, capsys):
    from test_cli import run_cli

    from patchlab.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(tiny_texts(30)) + "\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "emergence",
        "--model",
        str(tiny_dir),
        "--texts",
        str(texts),
        "--no-random-init",
        "--n-boot",
        "0",
        "--dim",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    )
    assert code == 0, err
    assert (
        "natural" in stdout
        and "shuffled" in stdout
        and (out / "result.json").is_file()
        and (out / "figure.html").is_file()
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    for args, needle in (
        ([str(texts), "--experiment", "icl"], "--texts: --texts is for"),
        ([str(empty)], "holds no texts"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["emergence", "--model", str(tiny_dir), "--texts", *args, "--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and needle in err


@pytest.mark.real
def test_smollm2_trained_blocks_differ_from_random_init_and_shuffling_lowers_the_last_blocks_macro_mi(smol, tmp_path):
    """Measured on the first 80 shipped sentences (65 reach T=15; gaussian, dim 8, noise floor 0.1, 10
    bootstraps): IE of blocks 0+1 is -0.3 bits trained vs -7.6 random-init; the last block's macro MI is
    6.75 +- 0.47 natural vs 4.27 +- 0.36 shuffled (IE -0.6 vs -3.0). On all 165 sentences (T=14) the same
    block gives 5.8 +- 0.4 vs 4.8 +- 0.3 and blocks 0+1 -0.2 vs -8.7."""
    texts = E.shipped_texts()[:80]
    kw = dict(layers=[0, 1, 29], n_boot=10, cache_dir=tmp_path, progress=False)
    exp = E.natural_vs_shuffled(smol, texts, **kw)
    nat, shuf, rnd = (exp.result(k) for k in ("natural", "shuffled", "random-init"))
    assert (
        (nat.n, nat.T) == (65, 15) and nat.estimator == "gaussian" and nat.estimator_params["ridge"] == E.DEFAULT_RIDGE
    )
    ceiling = nat.estimator_params["ceiling_bits"]
    for r in (nat, shuf, rnd):
        assert all(-ceiling <= v <= ceiling for v in r.ie) and all(0 <= v <= ceiling + 0.3 for v in r.macro + r.micro)
    assert sum(nat.ie[:2]) - sum(rnd.ie[:2]) > 4
    assert nat.macro[2] - shuf.macro[2] > 2 * math.hypot(nat.macro_std[2], shuf.macro_std[2])
    assert nat.ie[2] > shuf.ie[2] + 1
    assert nat.micro[2] == pytest.approx(shuf.micro[2], abs=0.5)  # the same tokens: micro barely moves
