"""Prompt forms on the real SmolLM2: rendering, answer tokens after the assistant turn, and the gap, locate and
edit taking `form=` (the default leaving results unchanged)."""

import pytest

from patchlab.core.errors import PatchlabError
from patchlab.core.formats import load_creme
from patchlab.core.forms import RENDERED
from patchlab.core.prompts import TwoHopItem
from patchlab.runtime.forms import render_item, render_items
from patchlab.runtime.scoring import answer_token_id, greedy_continuations, matches

pytestmark = pytest.mark.real

ITEM = {
    "id": "fr",
    "subject": "Eiffel Tower",
    "bridge": "France",
    "answer": "Paris",
    "hop1": "The Eiffel Tower is located in the country of",
    "hop2": "The capital of France is",
    "composed": "The capital of the country where the Eiffel Tower is located is",
    "paraphrases": ["Q: Who wrote Hamlet?\nA: Shakespeare\nQ: What is the capital of France?\nA:"],
}


def test_plain_form_is_the_items_themselves(smol, shipped):
    items = list(shipped)[:3]
    assert all(a is b for a, b in zip(render_items(smol, items, "plain"), items))


def test_qa_and_chat_renderings(smol):
    it = TwoHopItem.from_dict(ITEM)
    qa = render_item(smol, it, "qa")
    assert qa.hop2 == "Q: Complete the sentence: The capital of France is\nA:"
    assert qa.paraphrases[0] == ITEM["paraphrases"][0]  # a few-shot QA prompt already is in the qa form
    chat = render_item(smol, it, "chat")
    assert chat.extra[RENDERED] == "chat" and chat.id == it.id and chat.subject in chat.composed
    assert chat.hop2.endswith("<|im_start|>assistant\n")  # SmolLM2's assistant marker, generation prompt added
    assert "<|im_start|>user\nComplete the sentence: The capital of France is<|im_end|>" in chat.hop2
    # the demonstration becomes an earlier user / assistant exchange
    assert (
        "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\nShakespeare<|im_end|>"
        in (chat.paraphrases[0])
    )
    assert render_item(smol, chat, "chat") is chat  # idempotent
    with pytest.raises(PatchlabError, match="already in the chat form, not qa"):
        render_item(smol, chat, "qa")


def test_answer_token_after_the_assistant_turn_has_no_space(smol):
    chat = render_item(smol, TwoHopItem.from_dict(ITEM), "chat")
    spaced = answer_token_id(smol, "Paris")
    bare = answer_token_id(smol, "Paris", after=chat.hop2)
    assert smol.tokenizer.decode([spaced]).startswith(" ") and not smol.tokenizer.decode([bare]).startswith(" ")
    assert answer_token_id(smol, "Paris", after="The capital of France is") == spaced


def test_each_form_answers_the_capital_of_france(smol):
    it = TwoHopItem.from_dict(ITEM)
    for form, tokens in (("plain", 6), ("qa", 6), ("chat", 24)):
        prompt = render_item(smol, it, form).hop2
        text = greedy_continuations(smol, [prompt], max_new_tokens=tokens)[0]
        assert matches(text, ["Paris"]), (form, text)


def test_gap_in_each_form_and_plain_unchanged(smol, shipped):
    from patchlab.methods.gap import evaluate_gap

    ps = shipped.filter(ids=[it.id for it in shipped.stratified(1)][:4])
    plain = evaluate_gap(smol, ps, progress=False)
    assert evaluate_gap(smol, ps, progress=False, form="plain").items == plain.items
    assert plain.meta["form"] == "plain" and plain.meta["max_new_tokens"] == 6
    qa = evaluate_gap(smol, ps, progress=False, form="qa")
    chat = evaluate_gap(smol, ps, progress=False, form="chat")
    assert chat.meta["form"] == "chat" and chat.meta["max_new_tokens"] == 24
    assert [r["id"] for r in qa.items] == [r["id"] for r in plain.items] == [r["id"] for r in chat.items]
    # sane continuations: qa answers after the cue, chat in a sentence; the hop-2 facts are mostly known
    assert sum(r["hop2"] for r in qa.items) >= 2 and sum(r["hop2"] for r in chat.items) >= 2
    assert all(r["hop2_text"].strip() for r in qa.items + chat.items)


def test_locate_and_edit_take_the_form(smol, shipped):
    from patchlab.core.spec import HeadSet
    from patchlab.methods.edit import EditConfig, compute_edit
    from patchlab.methods.locate import locate

    items = [shipped[0]]
    result = locate(smol, items, method="attribution", form="chat", progress=False)
    assert result.meta["form"] == "chat" and result.n == 1
    cfg = EditConfig(n_prefixes=1, opt_steps=3, opt_prefixes=0, covariance=False)
    edit = compute_edit(smol, items, HeadSet.parse("23.4"), cfg, form="qa")
    assert edit.method["form"] == "qa"
    plain = compute_edit(smol, items, HeadSet.parse("23.4"), cfg)
    assert "form" not in plain.method  # edit files in the default form are as before


def test_creme_items_render_in_every_form(smol):
    items = list(load_creme(__import__("pathlib").Path(__file__).parent.parent / "data" / "creme_sample.json"))
    for form in ("qa", "chat"):
        for it in render_items(smol, items, form):
            assert it.subject in it.composed


def test_chat_form_refused_without_a_template(tiny):
    if getattr(tiny.tokenizer, "chat_template", None):
        pytest.skip("the tiny model has a chat template")
    with pytest.raises(PatchlabError, match=r"^form: .* tokenizer has no chat template .*use the plain or qa form$"):
        render_items(tiny, [TwoHopItem.from_dict(ITEM)], "chat")


def test_edit_evaluation_reads_the_edits_form(smol, shipped):
    from patchlab.core.spec import HeadSet
    from patchlab.methods.edit import EditConfig, edit_each
    from patchlab.methods.editeval import evaluate_edits
    from patchlab.methods.gap import GapResult

    pool = list(shipped)[:3]
    rows = [{"id": it.id, "kind": it.kind, "hop1": True, "hop2": True, "composed": i > 0} for i, it in enumerate(pool)]
    cfg = EditConfig(n_prefixes=1, opt_steps=3, opt_prefixes=0, covariance=False)
    edits = edit_each(smol, pool[:1], HeadSet.parse("23.4"), cfg, progress=False, form="qa")
    assert edits[0].items[0].composed.startswith("Q: Complete the sentence: ")  # the items come back rendered
    report = evaluate_edits(smol, edits, pool, GapResult("m", "p", rows, {}), n_irrelevant=2, progress=False)
    assert report.meta["method"]["form"] == "qa" and report.summary["correction"]["n"] == 1
