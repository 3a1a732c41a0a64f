"""Edits that carry past the exact query: the whole answer as target, keys on several phrasings, the
null-space projection of the update, and the held-out-frame test set — on real items of SmolLM2."""

from __future__ import annotations

import pytest
import torch

from patchlab.core.protocol import load_frames
from patchlab.core.spec import HeadSet
from patchlab.methods import edit as E
from patchlab.methods import editeval as V
from patchlab.runtime.identity import weights_hash
from patchlab.runtime.scoring import answer_token_ids, greedy_continuations, matches

HEADS = HeadSet.parse("23.4,23.5")


def test_null_projector_is_a_projector_off_the_preserved_keys(tiny):
    prompts = ["the capital of france is", "paris is the capital of", "the eiffel tower is located in"]
    cols = E.head_columns(tiny, [1, 2])
    P = E.null_projector(E.preserved_moment(tiny, 1, cols, prompts), 0.05)
    torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(P, P.T)
    assert 0 < torch.linalg.matrix_rank(P) < len(cols)


@pytest.mark.real
def test_null_space_edit_moves_preserved_keys_far_less_and_still_fixes_its_key(smol, shipped):
    item = shipped["landmark-capital-0002"]
    keep = [it.composed for it in shipped if it.kind == item.kind and it.id != item.id][:40]
    cfg = E.EditConfig(target="guide", n_prefixes=4)
    plain = E.compute_edit(smol, [item], HEADS, cfg)
    projected = E.compute_edit(smol, [item], HEADS, E.EditConfig(target="guide", n_prefixes=4, null_space=1e-2),
                               preserved=keep)  # fmt: skip
    layer = 23
    cols = E.head_columns(smol, [4, 5])
    z = E.last_z(smol, keep, [layer])[layer][:, cols]  # the preserved prompts' keys
    moved = lambda e: (z @ e.deltas[layer].T).norm(dim=-1)  # noqa: E731 - ‖ΔW z‖ per preserved prompt
    # the stated bound: on the prompts it preserves, the projected update moves the output by < 1/3 as much
    assert moved(projected).mean() < moved(plain).mean() / 3, (moved(projected).mean(), moved(plain).mean())
    k = E.last_z(smol, E.with_prefixes(item.composed, E.prefixes(4)), [layer])[layer].mean(0)[cols]
    torch.testing.assert_close(projected.deltas[layer] @ k, plain.deltas[layer] @ k, atol=1e-2, rtol=1e-3)
    before = weights_hash(smol)
    with projected.applied(smol):
        assert weights_hash(smol) != before
    assert weights_hash(smol) == before  # revert is bit-exact


@pytest.mark.real
def test_whole_answer_target_gives_the_whole_multi_token_answer(smol, shipped):
    item = shipped["landmark-currency-0021"]  # answer "US dollar": several tokens
    assert len(answer_token_ids(smol, item.answer)) > 1
    cfg = E.EditConfig(target="optimize", whole_answer=True, phrasings=2)
    edit = E.compute_edit(smol, [item], HEADS, cfg)
    with edit.applied(smol):
        text = greedy_continuations(smol, [item.composed])[0]
    assert matches(text, item.answers), text


@pytest.mark.real
def test_held_out_frames_are_scored_and_an_edit_on_phrasings_raises_them(smol, shipped):
    from patchlab.methods.gap import evaluate_gap

    item = shipped["landmark-capital-0002"]
    pool = [it for it in shipped if it.kind == item.kind][:12]
    gap = evaluate_gap(smol, pool, progress=False)
    frames = load_frames()
    cfg = E.EditConfig(target="optimize", whole_answer=True, phrasings=3)
    made = E.edit_each(smol, [item], HEADS, cfg, progress=False)
    report = V.evaluate_edits(smol, made, pool, gap, frames=frames, progress=False)
    held = report.summary["heldout"]
    assert held["n"] == 6  # five frames and the chat template
    assert held["after"] > held["before"], held
    assert report.summary["correction"]["after"] == 1.0
