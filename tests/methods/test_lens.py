import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.methods import lens
from patchlab.methods.gap import evaluate_gap
from patchlab.runtime import scoring


def test_final_lens_layer_is_the_model_output_tiny(tiny):
    prompts = ["the capital of france is", "paris is", "the eiffel tower is located in"]
    tok = [scoring.answer_token_id(tiny, "paris")] * 3
    result = lens.logit_lens(tiny, prompts, {"paris": tok}, progress=False)
    probs = torch.softmax(scoring.last_logits(tiny, prompts), -1)[:, tok[0]]
    for i in range(3):
        assert abs(result.probs["paris"][i][-1] - probs[i].item()) < 1e-4
        assert (
            result.ranks["paris"][i][-1]
            == int(
                (scoring.last_logits(tiny, [prompts[i]])[0] > scoring.last_logits(tiny, [prompts[i]])[0, tok[0]]).sum()
            )
            + 1
        )
    assert len(result.layers) == tiny.cfg.n_layers + 1


def test_rank_and_prob_on_hand_made_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0]])
    rank, prob = lens.rank_and_prob(logits, torch.tensor([2]))
    assert rank.item() == 3  # two tokens beat it
    assert abs(prob.item() - torch.softmax(logits, -1)[0, 2].item()) < 1e-7


def test_readout_direction_zeroes_the_lens_logit_contrast(tiny):
    token = scoring.answer_token_id(tiny, "paris")
    d = lens.readout_direction(tiny, token)
    h = torch.randn(5, tiny.cfg.d_model)
    h2 = h - (h @ d)[:, None] * d
    logits = lens.lens_logits(tiny, h2[None])[0]
    # the token's logit now equals the vocabulary-mean logit, whatever the residual was
    torch.testing.assert_close(logits[:, token], logits.mean(-1), atol=1e-4, rtol=1e-4)


def test_top_tokens_shapes_and_bad_k(tiny):
    r = lens.top_tokens(tiny, "the capital of france is", k=3, track_words=["paris"])
    assert len(r.top_tokens) == tiny.cfg.n_layers + 1 and len(r.top_tokens[0]) == len(r.positions)
    assert all(len(cell) == 3 for row in r.top_tokens for cell in row)
    assert len(r.tracked["paris"]["rank"]) == tiny.cfg.n_layers + 1
    with pytest.raises(PatchlabError):
        lens.top_tokens(tiny, "paris", k=0)


@pytest.mark.real
def test_lens_final_layer_equals_model_output_real(smol, shipped):
    items = list(shipped.stratified(2))
    result = lens.lens_items(smol, items, progress=False)
    probs = torch.softmax(scoring.last_logits(smol, [it.composed for it in items]), -1)
    for i, it in enumerate(items):
        expected = probs[i, scoring.answer_token_id(smol, it.answer)].item()
        assert abs(result.probs["answer"][i][-1] - expected) < 1e-4
    # the answer is far more visible at the output than in the first block's input
    assert result.summary["all"]["answer"]["geo_rank"][-1] < result.summary["all"]["answer"]["geo_rank"][0] / 10


@pytest.mark.real
def test_suppressing_bridge_lowers_answer_more_than_control(smol, shipped):
    ps = shipped.stratified(6)
    gap = evaluate_gap(smol, ps, progress=False)
    correct = [it for it in ps if it.id in set(gap.composed_correct)][:16]
    assert len(correct) >= 8
    iv = lens.bridge_intervention(smol, correct, layers=[24, 27, 29], n_controls=3, progress=False)
    bridge = sum(iv.summary["bridge_mean"]) / 3
    control = sum(iv.summary["control_mean"]) / 3
    assert bridge < 0 and bridge < control - 0.02, iv.summary
    # the intervention leaves the model's hooks as they were
    assert not any(hp.fwd_hooks for hp in smol.hook_dict.values())
