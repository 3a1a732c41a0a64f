import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.runtime import scoring


def test_normalize_and_match():
    assert scoring.normalize("  Bogotá, D.C.!") == "bogota d c"
    assert scoring.matches(" Paris, the city", ["Paris"])
    assert scoring.matches(" washington d.c.", ["Washington, D.C."])
    assert not scoring.matches(" Parisian food", ["Paris"])  # whole words only
    assert not scoring.matches(" the capital of France.", ["Paris"])


def test_length_batches_cover_every_index_once():
    lengths = [5, 3, 9, 3, 1, 7, 7]
    seen = [i for b in scoring.length_batches(lengths, 3) for i in b]
    assert sorted(seen) == list(range(len(lengths)))
    with pytest.raises(PatchlabError):
        next(scoring.length_batches(lengths, 0))


def test_batched_last_logits_equal_one_by_one(tiny):
    prompts = [
        "the capital of france is",
        "paris",
        "the eiffel tower is located in a country where the capital is",
        "berlin",
    ]
    batched = scoring.last_logits(tiny, prompts, batch_size=4)
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            alone = tiny(tiny.to_tokens(p))[0, -1]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)


def test_left_padded_generation_equals_unpadded(tiny):
    prompts = ["the capital of france is", "paris", "the eiffel tower is located in"]
    batched = scoring.greedy_continuations(tiny, prompts, max_new_tokens=4, batch_size=3)
    alone = [scoring.greedy_continuations(tiny, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == alone


def test_answer_logprob_matches_last_logits_for_one_token(tiny):
    prompts = ["the capital of france is", "the capital of germany is"]
    answers = ["paris", "berlin"]
    lp = scoring.answer_logprob(tiny, prompts, answers)
    logits = scoring.last_logits(tiny, prompts)
    for i, a in enumerate(answers):
        ref = torch.log_softmax(logits[i], -1)[scoring.answer_token_id(tiny, a)]
        assert abs(lp[i].item() - ref.item()) < 1e-4


def test_too_long_prompt_is_refused_not_truncated(tiny):
    long_prompt = " ".join(["paris"] * (tiny.cfg.n_ctx + 5))
    with pytest.raises(PatchlabError, match=r"prompt\[0\].*longer than the model's context"):
        scoring.last_logits(tiny, [long_prompt])


def test_empty_answer_is_refused(tiny):
    with pytest.raises(PatchlabError, match="tokenizes to nothing"):
        scoring.answer_token_id(tiny, "   ")


@pytest.mark.real
def test_real_model_answers_capital_of_france(smol):
    ok, conts = scoring.correct(smol, ["The capital of France is"], [["Paris"]])
    assert ok == [True], conts
    logits = scoring.last_logits(smol, ["The capital of France is"])
    assert logits[0].argmax().item() == scoring.answer_token_id(smol, "Paris")


@pytest.mark.real
def test_real_model_prefers_right_answer_by_logprob(smol):
    lp = scoring.answer_logprob(smol, ["The capital of France is"] * 2, ["Paris", "Berlin"])
    assert lp[0] > lp[1] + 2.0
