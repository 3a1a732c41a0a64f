"""Hook hygiene: whatever a scoring / lens / locate / edit call does to the model — hooks on TransformerLens
hook points, hooks on Hugging Face modules, layers swapped out to start a run mid-model, parameters frozen
for a backward pass, edits staged layer by layer — is undone when the call ends, also when a hook raises
KeyboardInterrupt in the middle of it; and a user's own hooks, added before the call, stay.

Every call runs once to warm caches, once to count how often the interrupting hook fires, then is
interrupted at the first, a middle and the last of those calls. The inventory compared before and after
is every hook of every module, every hook point's handles, the module tree (by identity), each
parameter's requires_grad and grad, the applied edits, and the weights' hash.
"""

from __future__ import annotations

import pytest
import torch
from relhelp import ITEMS, diff, hook_inventory, warm

from patchlab.core.prompts import TwoHopItem
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.methods import lens as LN
from patchlab.methods import locate as L
from patchlab.methods.editeval import evaluate_edits
from patchlab.methods.gap import evaluate_gap
from patchlab.runtime import scoring as S
from patchlab.runtime.bridge import hf_module
from patchlab.runtime.identity import weights_hash


class Interrupter:
    """A hook that raises KeyboardInterrupt on its `at`-th call (counting from 1); None: never."""

    def __init__(self) -> None:
        self.at: int | None = None
        self.calls = 0

    def __call__(self, *args, **kwargs):  # (act, hook=) for TransformerLens, (module, inputs, output) for torch
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def ctx(tiny, tmp_path_factory):
    """What the calls need, made once: items, a pair, a gap result and an edit."""
    items = [TwoHopItem.from_dict(it) for it in ITEMS]
    enc = lambda s: tiny.to_tokens(s)[0].tolist()  # noqa: E731
    a, b = S.answer_token_id(tiny, "paris"), S.answer_token_id(tiny, "berlin")
    pair = L.PatchPair("p", enc("the capital of france is"), enc("the capital of germany is"), a, b)
    gap = evaluate_gap(tiny, items, progress=False)
    edit = E.compute_edit(
        tiny, items[:1], [Head(0, 1), Head(1, 2)], E.EditConfig(target="guide", covariance=False, n_prefixes=1)
    )
    return {"items": items, "pair": pair, "gap": gap, "edit": edit}


OPS = {
    "last_logits": lambda m, c: S.last_logits(m, [it.composed for it in c["items"]], batch_size=2),
    "answer_logprob": lambda m, c: S.answer_logprob(
        m, [it.hop2 for it in c["items"]], [it.answer for it in c["items"]]
    ),
    "evaluate (generation)": lambda m, c: evaluate_gap(m, c["items"][:2], batch_size=2, progress=False),
    "logit lens": lambda m, c: LN.lens_items(m, c["items"], gap=c["gap"], progress=False),
    "lens top tokens": lambda m, c: LN.top_tokens(m, c["items"][0].composed),
    "guide pairs": lambda m, c: L.guide_pairs(m, c["items"]),
    "locate exact (from the layer of the patch)": lambda m, c: L.locate_pairs(
        m, [c["pair"]], method="exact", positions="each", progress=False
    ),
    "locate attribution (backward pass)": lambda m, c: L.locate_pairs(
        m, [c["pair"]], method="attribution", positions="all", progress=False
    ),
    "locate both": lambda m, c: L.locate_pairs(m, [c["pair"], c["pair"]], method="both", verify=3, progress=False),
    "edit: guide target, covariance, two layers staged": lambda m, c: E.compute_edit(
        m, c["items"][:1], [Head(0, 1), Head(1, 2)], E.EditConfig(target="guide", n_prefixes=2)
    ),
    "edit: optimised target with KL term": lambda m, c: E.compute_edit(
        m,
        c["items"][:1],
        [Head(0, 1), Head(1, 2)],
        E.EditConfig(target="optimize", n_prefixes=1, opt_prefixes=1, opt_steps=3, covariance=False, target_prob=1.0),
        unrelated=[c["items"][1].hop2],
    ),
    "evaluate edits (edit applied, then reverted)": lambda m, c: evaluate_edits(
        m, [(c["items"][:1], c["edit"], 0.0)], c["items"], c["gap"], progress=False
    ),
}


@pytest.fixture
def user_hooks(tiny, tmp_path, monkeypatch):
    """A user's own hooks, added before any patchlab call: a passive permanent TransformerLens hook, a
    passive torch hook on a Hugging Face module, and the interrupter on both blocks' resid_pre."""
    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path))  # covariance cache of this test only
    warm(tiny)
    clean = hook_inventory(tiny)
    interrupter = Interrupter()
    tiny.add_hook("blocks.1.hook_attn_out", lambda act, hook: None, is_permanent=True)
    handle = hf_module(tiny).lm_head.register_forward_hook(lambda mod, inp, out: None)
    for name in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"):
        tiny.add_hook(name, interrupter)
    yield interrupter
    handle.remove()
    for name in ("blocks.1.hook_attn_out", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"):
        tiny.hook_dict[name].remove_hooks("both", including_permanent=True)
    assert diff(clean, hook_inventory(tiny)) == []


@pytest.mark.parametrize("op", list(OPS))
def test_an_interrupt_inside_a_hook_leaves_the_model_as_it_was(tiny, ctx, user_hooks, op):
    fn, interrupter = OPS[op], user_hooks
    before, hashed = hook_inventory(tiny), weights_hash(tiny)
    assert any(k[0] == "hookpoint" for k in before) and any(k[0] == "_forward_hooks" for k in before)
    fn(tiny, ctx)  # warm caches (covariance), so that the count below is what every later run sees
    interrupter.calls = 0
    fn(tiny, ctx)
    total = interrupter.calls
    assert total > 0 and diff(before, hook_inventory(tiny)) == []
    for at in sorted({1, (total + 1) // 2, total}):
        interrupter.at, interrupter.calls = at, 0
        with pytest.raises(KeyboardInterrupt):
            fn(tiny, ctx)
        assert interrupter.calls == at
        assert diff(before, hook_inventory(tiny)) == [], f"interrupted at call {at} of {total}"
        assert weights_hash(tiny) == hashed
    interrupter.at = None


@pytest.mark.parametrize("op", ["locate exact (from the layer of the patch)", "edit: optimised target with KL term"])
def test_an_interrupt_from_a_torch_hook_on_a_hugging_face_module(tiny, ctx, user_hooks, op):
    """The same from a plain torch forward hook on the final norm, which also runs when patchlab starts
    a run in the middle of the model (its decoder layers below the patch swapped for pass-throughs)."""
    fn, norm = OPS[op], hf_module(tiny).model.norm
    raiser = Interrupter()
    handle = norm.register_forward_hook(raiser)
    try:
        before, hashed = hook_inventory(tiny), weights_hash(tiny)
        fn(tiny, ctx)
        total = raiser.calls
        for at in sorted({1, total}):
            raiser.at, raiser.calls = at, 0
            with pytest.raises(KeyboardInterrupt):
                fn(tiny, ctx)
            assert diff(before, hook_inventory(tiny)) == [] and weights_hash(tiny) == hashed
    finally:
        handle.remove()


def test_a_hook_added_inside_a_hooks_block_by_the_user_is_not_patchlabs_to_remove(tiny, ctx, user_hooks):
    """patchlab's temporary hooks come and go with TransformerLens' `model.hooks()` (it removes only what
    it added); a user's `with model.hooks(...)` around a patchlab call keeps its hook to the end."""
    seen = []
    with tiny.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda act, hook: seen.append(1))]):
        OPS["locate exact (from the layer of the patch)"](tiny, ctx)
        n = len(seen)
        S.last_logits(tiny, ["the capital"])
        assert n > 0 and len(seen) == n + 1
    assert not tiny.hook_dict["blocks.0.hook_attn_out"].fwd_hooks
    with torch.inference_mode():
        tiny(tiny.to_tokens("the capital"))
    assert len(seen) == n + 1


def test_the_inventory_sees_what_a_careless_call_would_leave(tiny):
    """The comparison above is not vacuous: a stray hook, a swapped layer, a frozen parameter all show."""
    warm(tiny)
    before = hook_inventory(tiny)
    tiny.add_hook("blocks.0.hook_resid_pre", lambda act, hook: None)
    assert "('hookpoint', 'blocks.0.hook_in')" in [k for k, *_ in diff(before, hook_inventory(tiny))]  # resid_pre
    tiny.hook_dict["blocks.0.hook_resid_pre"].remove_hooks("both")
    from patchlab.runtime import trace

    layers = trace._decoder(tiny)[1]
    with trace._skipping(layers, 1):
        assert any("('module', 'blocks.0" in k for k, *_ in diff(before, hook_inventory(tiny)))
    p = next(tiny.parameters())
    p.requires_grad_(False)
    try:
        assert any(k.startswith("('param'") for k, *_ in diff(before, hook_inventory(tiny)))
    finally:
        p.requires_grad_(True)
    assert diff(before, hook_inventory(tiny)) == []
