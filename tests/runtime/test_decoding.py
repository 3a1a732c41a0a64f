"""Greedy decoding checked against references: plain transformers' `generate`, and one full forward per token.

These tests fail on the code before the fix (a cached decode through the TransformerBridge with
transformers 5.x kept no cache, so everything after the first token was garbage)."""

from __future__ import annotations

import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.runtime import decoding, scoring

N_NEW = scoring.MAX_NEW_TOKENS


def _raw_bridge(folder):
    """A bridge booted as TransformerLens documents it, without anything patchlab adds at load."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    bridge = TransformerBridge.boot_transformers(
        str(folder), hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(folder)
    )
    bridge.eval()
    return bridge


def _plain_greedy(plain, tok, seqs, n_new=N_NEW):
    """Plain transformers' greedy generate, the reference: prompts of equal length batched together, so no
    row is ever padded."""
    from transformers import GenerationConfig

    eos = plain.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=n_new, eos_token_id=sorted(eos) or None, pad_token_id=pad
    )
    out: list = [None] * len(seqs)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    with torch.inference_mode():
        for rows in by_len.values():
            ids = torch.tensor([seqs[i] for i in rows])
            gen = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            for j, i in enumerate(rows):
                out[i] = decoding.cut_at_eos(gen[j, ids.shape[1] :].tolist(), eos)
    return out


def _reference_prompts(model, shipped, per_kind: int = 5):
    """≥ 100 shipped prompts: per kind, items with multi-token answers / bridges first, all three hops each."""
    from patchlab.methods.gap import HOPS

    chosen = []
    for kind in shipped.kinds:
        items = [it for it in shipped if it.kind == kind]
        multi = lambda it: max(
            len(scoring.answer_token_ids(model, it.answer)),  # noqa: E731
            len(scoring.answer_token_ids(model, it.bridge)),
        )
        chosen += sorted(items, key=lambda it: (-multi(it), it.id))[:per_kind]
    prompts = [getattr(it, hop) for it in chosen for hop in HOPS]
    assert len(prompts) >= 100
    assert sum(len(scoring.answer_token_ids(model, it.answer)) > 1 for it in chosen) >= len(shipped.kinds) // 2
    return prompts


def _compare_with_plain(model, shipped, plain):
    prompts = _reference_prompts(model, shipped)
    seqs = [scoring.encode(model, p) for p in prompts]
    ours = decoding.greedy_tokens(model, seqs, N_NEW, batch_size=32)
    ref = _plain_greedy(plain, model.tokenizer, seqs)
    wrong = [
        (prompts[i], model.tokenizer.decode(ours[i]), model.tokenizer.decode(ref[i]))
        for i in range(len(seqs))
        if ours[i] != ref[i]
    ]
    assert not wrong, f"{len(wrong)} of {len(seqs)} continuations differ from plain transformers, e.g. {wrong[:3]}"
    return prompts, ours


# --- plumbing on the tiny model -------------------------------------------------------------------------


def test_cached_decoding_equals_full_forward_per_token(tiny):
    prompts = [
        "the capital of france is",
        "paris",
        "the eiffel tower is located in a country where the capital is",
        "berlin is the capital of",
        "a",
    ]
    seqs = [scoring.encode(tiny, p) for p in prompts]
    cached = decoding.greedy_tokens(tiny, seqs, 8, batch_size=3)
    uncached = decoding.greedy_tokens(tiny, seqs, 8, batch_size=3, cache=False)
    assert cached == uncached
    assert all(len(t) == 8 or t[-1] in decoding.eos_ids(tiny) for t in cached)


def test_cached_step_logits_equal_uncached_forward(tiny):
    diff, cached, uncached = decoding._check_once(tiny)
    assert diff < 1e-4
    assert cached == uncached[: len(cached)]


@pytest.mark.xfail(
    strict=True,
    reason="TransformerLens 4.3 reads the KV cache as past_key_values/layer_past; "
    "transformers 5.x passes it as cache=, so a bridge's cached decoding keeps no cache. "
    "When this passes, upstream is fixed: patchlab.runtime.decoding.adapt_cache_kwarg can go.",
)
def test_upstream_bridge_cached_decoding_matches_uncached(tiny_dir):
    bridge = _raw_bridge(tiny_dir)
    ids = torch.tensor(
        [bridge.tokenizer("the capital of france is the capital of", add_special_tokens=False)["input_ids"]]
    )
    with torch.inference_mode():
        cached = bridge.original_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=1)
        uncached = bridge.original_model.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=1, use_cache=False
        )
    assert cached.tolist() == uncached.tolist()


def test_self_check_refuses_a_bridge_whose_cache_is_dropped(tiny_dir):
    bridge = _raw_bridge(tiny_dir)
    with pytest.raises(PatchlabError) as err:
        decoding.check_decoding(bridge)
    msg = str(err.value)
    assert "\n" not in msg and "transformer-lens" in msg and "disagrees with a full forward" in msg
    decoding.adapt_cache_kwarg(bridge)
    assert decoding.check_decoding(bridge) < 1e-4
    assert decoding.adapt_cache_kwarg(bridge) == 0  # idempotent: the pre-hook is installed once


def test_every_loaded_model_is_checked(tiny):
    assert tiny._patchlab_decoding_checked is not None and tiny._patchlab_decoding_checked < 1e-4


# --- the real models against plain transformers ---------------------------------------------------------


def _plain(name):
    from transformers import AutoModelForCausalLM

    from patchlab.runtime.models import model_cache_dir

    return AutoModelForCausalLM.from_pretrained(model_cache_dir(name), dtype=torch.float32).eval()


@pytest.mark.real
def test_smollm2_greedy_equals_plain_transformers(smol, shipped):
    prompts, ours = _compare_with_plain(smol, shipped, _plain("smollm2-135m"))
    # and the text patchlab scores is that continuation, past its first token
    texts = scoring.greedy_continuations(smol, prompts[:12])
    assert texts == [smol.tokenizer.decode(t, skip_special_tokens=True) for t in ours[:12]]
    assert sum(len(t) == N_NEW for t in ours) > len(ours) // 2


@pytest.mark.real
@pytest.mark.gemma
def test_gemma3_greedy_equals_plain_transformers(gemma, shipped):
    _compare_with_plain(gemma, shipped, _plain("gemma3-270m"))


@pytest.mark.real
def test_multi_token_answers_are_scored_right(smol, shipped):
    # shipped prompts whose answer is several SmolLM2 tokens (one only after a first word, "the United States");
    # before the fix none of them could match: the continuation was garbage after its first token
    cases = [
        ("landmark-capital-0040", "hop2", "answers"),
        ("company-capital-0006", "hop1", "bridges"),
        ("work-birthcountry-0005", "hop1", "bridges"),
        ("company-capital-0046", "hop1", "bridges"),
    ]
    items = [shipped[i] for i, _, _ in cases]
    answers = [getattr(it, a) for it, (_, _, a) in zip(items, cases)]
    assert all(len(scoring.answer_token_ids(smol, a[0])) > 1 for a in answers)
    ok, conts = scoring.correct(smol, [getattr(it, h) for it, (_, h, _) in zip(items, cases)], answers)
    assert ok == [True] * len(cases), conts
    assert conts[0].startswith(" Brasília") and conts[2].startswith(" Johann Wolfgang von Goethe")


@pytest.mark.real
def test_hooked_cached_decoding_equals_hooked_full_forward_loop(smol, shipped):
    """Interventions during decoding: an ablated head, a steering vector, an applied edit, a routed module."""
    prompts = [it.composed for it in list(shipped)[:10]] + [it.hop2 for it in list(shipped)[:6]]

    def ablate(z, hook):
        z[:, :, 4] = 0.0
        return z

    steer = torch.randn(smol.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 2.0

    def add(resid, hook):
        return resid + steer

    hooks = [("blocks.23.attn.hook_z", ablate), ("blocks.20.hook_resid_post", add)]
    plain = scoring.greedy_continuations(smol, prompts)
    cached = scoring.greedy_continuations(smol, prompts, fwd_hooks=hooks)
    uncached = scoring.greedy_continuations(smol, prompts, fwd_hooks=hooks, cache=False)
    assert cached == uncached
    assert cached != plain  # the intervention does change what is decoded


# --- reading less: first-step logits and settled rows ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "form", "expected"),
    [
        (" Paris", "plain", False),  # the word may still grow (" Parisian")
        (" Parisian is", "plain", False),
        (" Paris is", "plain", True),
        (" Paris.\n", "plain", True),
        (" the city of Paris", "plain", False),
        (" Berlin is", "plain", False),  # never settled false in the plain form: the answer may come later
        (" Berlin\nParis", "qa", True),  # qa reads the first line only: settled (false) once it is complete
        (" Paris", "qa", False),
        ("\n", "qa", False),  # nothing on the answer line yet
    ],
)
def test_settled_only_when_more_text_cannot_change_the_verdict(text, form, expected):
    assert scoring.settled(text, ["Paris"], form) is expected


def test_settled_verdict_equals_the_full_continuations(smol, shipped):
    """For every prefix of real continuations: once `settled` says so, the full text's verdict is the prefix's."""
    from patchlab.core.forms import answer_text

    items = list(shipped)[:30] * 2
    prompts = [it.composed for it in items[:30]] + [it.hop2 for it in items[30:]]  # hop-2 facts: mostly right
    seqs = [scoring.encode(smol, p) for p in prompts]
    new = decoding.greedy_tokens(smol, seqs, 6, 32)
    decided = 0
    for it, toks in zip(items, new):
        full = scoring.matches(answer_text(smol.tokenizer.decode(toks, skip_special_tokens=True), "plain"), it.answers)
        for k in range(1, len(toks) + 1):
            part = smol.tokenizer.decode(toks[:k], skip_special_tokens=True)
            if scoring.settled(part, it.answers, "plain"):
                decided += 1
                assert full, (it.id, part)
                break
    assert decided >= 10  # the rule settles most right answers before the window ends
    # the pruning loop (settled rows leave the batch) decodes what generate decodes, cut where a row settled
    assert decoding.greedy_tokens(smol, seqs, 6, 32, decided=lambda i, t: False) == new
    settle = lambda i, t: scoring.settled(smol.tokenizer.decode(t, skip_special_tokens=True), items[i].answers, "plain")  # noqa: E731
    pruned = decoding.greedy_tokens(smol, seqs, 6, 32, decided=settle)
    assert all(full[: len(p)] == p for full, p in zip(new, pruned))
    assert sum(len(p) < len(full) for full, p in zip(new, pruned)) >= 10


def test_first_step_logits_equal_a_separate_forward(smol, shipped):
    prompts = [it.composed for it in list(shipped)[:24]] + [it.hop2 for it in list(shipped)[:8]]
    firsts: list = []
    scoring.greedy_continuations(smol, prompts, 2, first_logits=firsts)
    ref = scoring.last_logits(smol, prompts)
    assert len(firsts) == len(prompts)
    assert (torch.stack(firsts) - ref).abs().max().item() < 1e-3
    assert torch.equal(torch.stack(firsts).argmax(-1), ref.argmax(-1))


def test_stopped_rows_are_cut_and_the_rest_run_on(tiny):
    prompts = ["the capital of france is", "the eiffel tower is located in", "berlin is the capital of"]
    full = scoring.greedy_continuations(tiny, prompts, 5)
    stop = lambda i, text: i == 1 and len(text) > 0  # noqa: E731
    cut = scoring.greedy_continuations(tiny, prompts, 5, stop_when=stop)
    assert cut[0] == full[0] and cut[2] == full[2]
    assert full[1].startswith(cut[1]) and len(tiny.tokenizer.encode(cut[1], add_special_tokens=False)) <= 1
    ref = scoring.greedy_continuations(tiny, prompts, 5, cache=False, stop_when=stop)
    assert ref == cut


def test_edited_pass_started_at_the_edited_layer_decodes_as_a_whole_pass(smol, shipped):
    """Prompt state captured unedited below layer 23 and reused under an edit of layer 23 gives the tokens and
    first-step logits of whole passes under that edit (and the self-check accepts the start on SmolLM2)."""
    from patchlab.core.spec import HeadSet
    from patchlab.methods.edit import EditConfig, compute_edit

    items = list(shipped)[:20]
    seqs = [scoring.encode(smol, it.composed) for it in items] + [scoring.encode(smol, it.hop2) for it in items]
    prefixes = decoding.Prefixes(23)
    decoding.greedy_tokens(smol, seqs, 1, 32, prefixes=prefixes)  # unedited: captures
    assert len(prefixes.store) == len({tuple(s) for s in seqs})
    cfg = EditConfig(n_prefixes=1, opt_steps=5, opt_prefixes=0, covariance=False)
    edit = compute_edit(smol, items[:1], HeadSet.parse("23.4,23.5"), cfg)
    with edit.applied(smol, verify_hash=False):
        whole_first: list = []
        whole = decoding.greedy_tokens(smol, seqs, 4, 32, first_logits=whole_first, decided=lambda i, t: False)
        start_first: list = []
        started = decoding.greedy_tokens(
            smol, seqs, 4, 32, first_logits=start_first, decided=lambda i, t: False, prefixes=prefixes, reuse=True
        )
    assert smol._patchlab_start_ok is True
    assert started == whole
    assert (torch.stack(start_first) - torch.stack(whole_first)).abs().max().item() < 1e-4
