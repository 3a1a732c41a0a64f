"""Render items in a prompt form (`plain`, `qa`, `chat`; the rules are in `patchlab.core.forms`).

`render_items(model, items, form)` is the one place a form is applied: the gap evaluation, locate and edit
call it on their items first, so every prompt they read — and the answer tokens, which follow the prompt
(`patchlab.runtime.scoring.answer_token_ids`) — are in the same form. A rendered item is an ordinary
`TwoHopItem` whose hop1 / hop2 / composed / paraphrases hold the rendered prompts and whose extra field
`rendered_form` names the form; rendering it again in that form returns it unchanged, in another form is an
error. `plain` returns the items themselves: results in the default form are exactly what they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from patchlab.core.errors import PatchlabError
from patchlab.core.forms import (
    DEFAULT_FORM,
    RENDERED,
    check_forms,
    item_form,
    qa_prompt,
    qa_turns,
    question,
    texts,
)
from patchlab.core.prompts import TwoHopItem
from patchlab.runtime.bridge import model_name
from patchlab.runtime.scoring import chat_prompt


def has_chat_template(model) -> bool:
    return bool(getattr(model.tokenizer, "chat_template", None))


def check_chat(model) -> None:
    """Refuse the chat form, in one line, for a model whose tokenizer has no chat template."""
    if not has_chat_template(model):
        raise PatchlabError(
            f"{model_name(model)}'s tokenizer has no chat template (a base model?): use the plain or qa form",
            param="form",
        )


def render(model, item: TwoHopItem, field: str, index: int | None, text: str, form: str) -> str:
    """One prompt of `item` (`field`, paraphrase `index`, its plain `text`) in `form`."""
    if form == "plain":
        return text
    ask = question(item, field, index)
    if form == "qa":
        return qa_prompt(text, ask)
    turns = qa_turns(text)
    return chat_prompt(model, ask, history=turns[0] if turns else ())  # type: ignore[return-value]


def render_item(model, item: TwoHopItem, form: str = DEFAULT_FORM) -> TwoHopItem:
    """`item` with every prompt in its form (its own `form` field, else `form`)."""
    use = item_form(item, form)
    done = item.extra.get(RENDERED)
    if done is not None:
        if done != use:
            raise PatchlabError(f"item {item.id!r} is already in the {done} form, not {use}", param="form")
        return item
    if use == "plain":
        return item
    if use == "chat":
        check_chat(model)
    new = {
        (field, index): render(model, item, field, index, text, use) for field, index, text in texts(item)
    }  # fmt: skip
    return replace(
        item,
        hop1=new["hop1", None],
        hop2=new["hop2", None],
        composed=new["composed", None],
        paraphrases=tuple(new["paraphrases", i] for i in range(len(item.paraphrases))),
        extra={**item.extra, RENDERED: use},
    )


def render_items(model, items: Sequence[TwoHopItem], form: str = DEFAULT_FORM) -> list[TwoHopItem]:
    """Every item rendered (see `render_item`); the forms are checked for all items before any is rendered."""
    check_forms(items, form)
    return [render_item(model, it, form) for it in items]
