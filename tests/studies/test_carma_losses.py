"""CARMA losses on hand-made tensors: hand-computed values, padding/batch independence, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.studies.carma import (
    CarmaConfig,
    CarmaRegulariser,
    mi_loss,
    sample_negatives,
    stab_loss,
    word_ids_for_batch,
    word_spans,
)


def infonce(pos: float, negs: list[float], tau: float = 0.1) -> float:
    """-log(e^{pos/tau} / (e^{pos/tau} + sum e^{neg/tau})) with plain floats."""
    num = math.exp(pos / tau)
    return -math.log(num / (num + sum(math.exp(n / tau) for n in negs)))


# ----------------------------------------------------------------------------- stab_loss


def stab_case() -> torch.Tensor:
    """2 layers, 1 example, 2 positions, d = 2."""
    h0 = [[1.0, 0.0], [0.0, 1.0]]
    h1 = [[1.0, 1.0], [0.0, 1.0]]
    return torch.tensor([[h0], [h1]])  # [layer=2, batch=1, pos=2, d=2]


def test_stab_loss_by_hand():
    # diff = [[0, 1], [0, 0]] -> mean diff^2 = 1/4
    # mean h0^2 = (1 + 0 + 0 + 1) / 4 = 0.5 ; mean h1^2 = (1 + 1 + 0 + 1) / 4 = 0.75
    # loss = 0.25 / (0.5 + 0.75) = 0.2
    loss = stab_loss(stab_case(), torch.ones(1, 2), CarmaConfig())
    assert loss.item() == pytest.approx(0.2, abs=1e-6)


def test_stab_loss_averages_layer_pairs():
    h = torch.cat([stab_case(), stab_case()[:1]])  # layers h0, h1, h0: both pairs give 0.2
    assert stab_loss(h, None, CarmaConfig()).item() == pytest.approx(0.2, abs=1e-6)
    assert stab_loss(h, None, CarmaConfig(stab_layers=(1, 3))).item() == pytest.approx(0.2, abs=1e-6)


def test_stab_loss_ignores_padding():
    base = stab_loss(stab_case(), torch.ones(1, 2), CarmaConfig())
    padded = torch.cat([stab_case(), torch.randn(2, 1, 3, 2) * 100], dim=2)  # 3 padding columns
    mask = torch.tensor([[1, 1, 0, 0, 0]])
    assert stab_loss(padded, mask, CarmaConfig()).item() == pytest.approx(base.item(), abs=1e-6)
    padded[:, :, 2:] = float("nan")
    assert stab_loss(padded, mask, CarmaConfig()).item() == pytest.approx(base.item(), abs=1e-6)


# ----------------------------------------------------------------------------- mi_loss


def mi_case() -> tuple[torch.Tensor, torch.Tensor]:
    """1 layer, 1 example: tokens 0 and 1 form one word; 2 and 3 are single-token words."""
    vecs = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]
    return torch.tensor([[vecs]]), torch.tensor([[0, 0, -1, -1]])


def test_mi_loss_by_hand():
    hidden, words = mi_case()
    # cosines: s01 = 0.6, s02 = 0, s03 = -1, s12 = 0.8, s13 = -0.6; with n_negatives = 2 = the
    # available non-word positions, each anchor uses both of them exactly once (no randomness).
    expected = (infonce(0.6, [0.0, -1.0]) + infonce(0.6, [0.8, -0.6])) / 2
    for k in (2, 8):  # more requested than available: still all available, once each
        loss = mi_loss(hidden, words, torch.ones(1, 4), CarmaConfig(n_negatives=k))
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the same layer inside a 3-layer stack, picked by mi_layers
    stack = torch.cat([torch.randn(1, 1, 4, 2), hidden, torch.randn(1, 1, 4, 2)])
    loss = mi_loss(stack, words, None, CarmaConfig(n_negatives=2, mi_layers=(1, 2)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mi_loss_is_scale_invariant_and_zero_without_words():
    hidden, words = mi_case()
    cfg = CarmaConfig(n_negatives=2)
    assert mi_loss(hidden * 7, words, None, cfg).item() == pytest.approx(mi_loss(hidden, words, None, cfg).item())
    h = hidden.clone().requires_grad_(True)
    zero = mi_loss(h, torch.full((1, 4), -1), None, cfg)
    assert zero.item() == 0.0
    zero.backward()
    assert h.grad is not None and torch.all(h.grad == 0)


def test_sampled_negatives_stay_outside_word_and_padding():
    words = torch.tensor([[0, 0, 0, -1, 1, 1, -1, -1, -1, -1]])
    real = torch.tensor([[True] * 8 + [False] * 2])
    anchors = torch.tensor([[0, 0], [0, 1], [0, 4]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx, valid = sample_negatives(words, real, anchors, 3, gen)
        assert valid.all() and idx.shape == (3, 3)
        for row, anchor in zip(idx.tolist(), anchors[:, 1].tolist()):
            assert len(set(row)) == 3  # without replacement
            assert all(real[0, p] and words[0, p] != words[0, anchor] for p in row)


def test_mi_loss_seeded_sampling_is_reproducible():
    torch.manual_seed(1)
    hidden, words = torch.randn(2, 1, 12, 4), torch.tensor([[0, 0, 0] + [-1] * 9])
    cfg = CarmaConfig(n_negatives=3, seed=5)
    assert mi_loss(hidden, words, None, cfg).item() == mi_loss(hidden, words, None, cfg).item()


def test_mi_loss_batch_independence_and_padding():
    torch.manual_seed(0)
    # example A: one 3-token word (6 ordered pairs), 2 other positions; B: one 2-token word (2 pairs),
    # 2 other real positions and 1 padding position. n_negatives = 2 = available in both examples
    # only if padding is excluded, so each example alone is deterministic.
    ha, hb = torch.randn(2, 1, 5, 3), torch.randn(2, 1, 4, 3)
    wa, wb = torch.tensor([[0, 0, 0, -1, -1]]), torch.tensor([[-1, 0, 0, -1]])
    cfg = CarmaConfig(n_negatives=2)
    la = mi_loss(ha, wa, torch.ones(1, 5), cfg).item()
    lb = mi_loss(hb, wb, torch.ones(1, 4), cfg).item()
    hidden = torch.cat([ha, torch.cat([hb, torch.randn(2, 1, 1, 3)], dim=2)], dim=1)
    words = torch.tensor([[0, 0, 0, -1, -1], [-1, 0, 0, -1, -1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    batch = mi_loss(hidden, words, mask, cfg).item()
    assert batch == pytest.approx((6 * la + 2 * lb) / 8, rel=1e-5)
    hidden[:, 1, 4] = float("nan")  # padding values have no influence
    words[1, 4] = 0  # nor a stray word id at a padding position
    assert mi_loss(hidden, words, mask, cfg).item() == pytest.approx(batch, rel=1e-6)


def test_mi_loss_decreases_when_word_pieces_align():
    torch.manual_seed(0)
    hidden, words = torch.randn(1, 1, 6, 8), torch.tensor([[0, 0, -1, 1, 1, -1]])
    cfg = CarmaConfig(n_negatives=3)
    before = mi_loss(hidden, words, None, cfg).item()
    closer = hidden.clone()
    closer[:, :, 1] = hidden[:, :, 0] + 0.1 * hidden[:, :, 1]
    closer[:, :, 4] = hidden[:, :, 3] + 0.1 * hidden[:, :, 4]
    assert mi_loss(closer, words, None, cfg).item() < before


# ----------------------------------------------------------------------------- config and module


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lam": 1.5}, "lam"),
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"gamma": -1.0}, "gamma"),
        ({"eta": float("inf")}, "eta"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"n_negatives": 0}, "n_negatives"),
        ({"mi_layers": (2, 2)}, "mi_layers"),
        ({"stab_layers": (0, 1)}, "stab_layers"),
        ({"mi_layers": (-1, 2)}, "mi_layers"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(PatchlabError, match=f"^carma: {field} "):
        CarmaConfig(**kwargs)


def test_layer_range_beyond_stack_is_an_error():
    hidden, words = mi_case()
    with pytest.raises(PatchlabError, match="mi_layers"):
        mi_loss(hidden, words, None, CarmaConfig(mi_layers=(0, 3)))
    with pytest.raises(PatchlabError, match="stab_layers"):
        stab_loss(hidden, None, CarmaConfig())  # one layer: no consecutive pair


def test_lam_one_ignores_task_loss():
    torch.manual_seed(0)
    reg = CarmaRegulariser(CarmaConfig(lam=1.0))
    terms = reg(torch.randn(3, 2, 5, 4), torch.tensor([[0, 0, -1, -1, -1], [-1, 1, 1, 1, -1]]))
    assert torch.equal(reg.total(None, terms), terms["reg"])
    assert torch.equal(reg.total(torch.tensor(float("nan")), terms), terms["reg"])


def test_regulariser_terms_total_and_gradients():
    torch.manual_seed(0)
    cfg = CarmaConfig(lam=0.25, gamma=0.5, eta=2.0, n_negatives=2)
    reg = CarmaRegulariser(cfg)
    hidden = torch.randn(3, 2, 5, 4, requires_grad=True)
    words = torch.tensor([[0, 0, -1, -1, -1], [-1, 0, 0, 0, -1]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    terms = reg(hidden, words, mask)
    assert terms["reg"].item() == pytest.approx(0.5 * terms["mi"].item() + 2.0 * terms["stab"].item(), rel=1e-6)
    task = torch.tensor(1.5)
    total = reg.total(task, terms)
    assert total.item() == pytest.approx(0.75 * 1.5 + 0.25 * terms["reg"].item(), rel=1e-6)
    total.backward()
    grad = hidden.grad
    assert torch.isfinite(grad).all() and grad[:, 0, :3].abs().sum() > 0
    assert torch.all(grad[:, 0, 3:] == 0)  # padding gets no gradient
    with pytest.raises(PatchlabError, match="non-finite task loss"):
        reg.total(torch.tensor(float("inf")), terms)
    with pytest.raises(PatchlabError, match="task_loss is required"):
        reg.total(None, terms)


def test_non_finite_hidden_is_reported():
    hidden = torch.ones(2, 1, 3, 2)
    hidden[0, 0, 0, 0] = float("inf")
    with pytest.raises(PatchlabError, match="^carma: non-finite mi loss$"):
        CarmaRegulariser()(hidden, torch.tensor([[0, 0, -1]]))


# ----------------------------------------------------------------------------- word spans


def test_word_spans_from_offsets():
    # "[CLS] unbelievable cats ran [SEP]" split as un|believ|able cats r|an; specials are (0, 0)
    offsets = [(0, 0), (0, 2), (2, 8), (8, 12), (13, 17), (18, 19), (19, 21), (0, 0)]
    assert word_spans(offsets).tolist() == [-1, 0, 0, 0, -1, 1, 1, -1]
    # byte-level style offsets that include the leading space: only `text` can split the words
    text = "ab cd"
    assert word_spans([(0, 1), (1, 2), (2, 4), (4, 5)]).tolist() == [0, 0, 0, 0]
    assert word_spans([(0, 1), (1, 2), (2, 4), (4, 5)], text=text).tolist() == [0, 0, 1, 1]
    # a masked-out token breaks a word and gets -1
    assert word_spans([(0, 1), (1, 2), (2, 3)], words_mask=[True, False, True]).tolist() == [-1, -1, -1]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A WordPiece tokenizer trained in memory on a few sentences (small vocab, so words split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    core.train_from_iterator(
        ["the capital of france is paris", "the eiffel tower is in paris", "berlin is the capital of germany"],
        trainer,
    )
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def test_word_ids_for_batch(tiny_tokenizer):
    texts = ["the capital of france", "composition of hops is paris"]
    input_ids, mask, words = word_ids_for_batch(tiny_tokenizer, texts)
    assert input_ids.shape == mask.shape == words.shape and mask[0, -1] == 0  # right padding
    assert torch.all(words[mask == 0] == -1)
    assert words[0, 0] == -1 and words[1, -1] == -1  # [CLS] / [SEP]
    for b in range(2):
        pieces = tiny_tokenizer(texts[b]).word_ids()  # the pre-tokenizer's own word index per token
        groups: dict[int, list[int]] = {}
        for pos, w in enumerate(pieces):
            if w is not None:
                groups.setdefault(w, []).append(pos)
        multi = [g for g in groups.values() if len(g) > 1]
        assert multi, "the tiny vocab should split some word"
        for g in groups.values():
            ids = set(words[b, g].tolist())
            assert len(ids) == 1 and ((ids != {-1}) == (len(g) > 1))
        assert len({int(words[b, g[0]]) for g in multi}) == len(multi)  # distinct words, distinct ids
    # truncation keeps shapes consistent
    _, mask, words = word_ids_for_batch(tiny_tokenizer, texts, max_len=6)
    assert words.shape == (2, 6) and torch.all(words[mask == 0] == -1)


def test_word_ids_for_batch_rejects_bad_input(tiny_tokenizer):
    with pytest.raises(PatchlabError, match="non-empty"):
        word_ids_for_batch(tiny_tokenizer, [])
