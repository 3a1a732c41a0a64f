"""Prompt forms: how an item's hop1 / hop2 / composed prompts (and paraphrases) are put to a model.

* `plain` — the item's own text, as written (a cloze such as "The capital of France is"); the default and
  patchlab's behaviour before forms existed.
* `qa`    — a question with an answer cue, `Q: {question}\\nA:` (the held-out `qa` frame's layout, see
  `patchlab.core.protocol`).
* `chat`  — the question as the user turn of the model's own chat template, with the generation prompt, so
  the answer is read after the assistant turn opens (rendered by `patchlab.runtime.forms`: it needs the
  tokenizer).

The question of a prompt, for `qa` and `chat`, is in order of preference:

1. the item's own question for that field: an item may carry `"questions": {"hop1": "...", "hop2": "...",
   "composed": "...", "paraphrases": ["...", ...]}` (any subset; `null` entries fall through);
2. the text itself when it already is a question (ends with "?");
3. for a few-shot QA text (`Q: ...\\nA: ...\\nQ: ...\\nA:`, as in CREME's paraphrases) the text is already in
   the `qa` form and stays as is; in `chat` its demonstrations become earlier user / assistant turns;
4. otherwise the cloze as a completion request: "Complete the sentence: The capital of France is". One rule
   for every cloze: the cloze is kept verbatim (the answer slot stays where it was), nothing is paraphrased
   and no template-specific grammar is guessed. (Measured on SmolLM2 against the alternatives — an echo
   question "The capital of France is what?", "Fill in the blank: ... ___", and "What is the capital of
   France?" by copula inversion where the cloze allows it — it was the most often answered right, in both
   the qa and the chat form; docs/formats.md.)

The answer window: a chat model answers in a sentence that usually restates the question before the answer
("The capital of France is Paris."), so the chat form reads `NEW_TOKENS["chat"]` = 24 new tokens where the
plain and qa forms read 6. In the qa and chat forms the answer is the continuation's first line (`answer_text`):
a small model often goes on with more lettered options ("Spain\nB: Europe\n") or a new turn, which must not
count as its answer. The plain form reads the whole window, as it always has.

An item may also carry `"form": "qa"` (or another form): it is then rendered in that form whatever the run's
form (a set whose items are questions can say so once, per item).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import TwoHopItem

FORMS = ("plain", "qa", "chat")
DEFAULT_FORM = "plain"
FIELDS = ("hop1", "hop2", "composed")
QA = "Q: {question}\nA:"
COMPLETE = "Complete the sentence: {cloze}"
NEW_TOKENS = {"plain": 6, "qa": 6, "chat": 24}  # greedy tokens read per prompt (see the module doc)
RENDERED = "rendered_form"  # the extra field a rendered item carries (the form its prompts are in)

_QA_TURN = re.compile(r"Q: ([^\n]*)\nA:(?: ([^\n]*))?")


def check_form(form: Any, param: str = "form", where: str | None = None) -> str:
    """`form` if it is one of `FORMS`; else a one-line error naming `param`."""
    if form not in FORMS:
        raise PatchlabError(f"unknown prompt form {form!r} (forms: {', '.join(FORMS)})", param=param, where=where)
    return form


def item_form(item: TwoHopItem, form: str = DEFAULT_FORM) -> str:
    """The form `item` is put in: its own `form` field when it has one, else the run's `form`."""
    own = item.extra.get("form")
    if own is None:
        return check_form(form)
    return check_form(own, param=None, where=f"item {item.id!r} field 'form'")


def qa_turns(text: str) -> tuple[list[tuple[str, str]], str] | None:
    """A few-shot QA text split into its answered demonstrations and its last question; None if it is not one."""
    turns, pos = [], 0
    while True:
        m = _QA_TURN.match(text, pos)
        if not m:
            return None
        end = m.end()
        if m.group(2) is None:  # "A:" with nothing after: the open question, which must end the text
            return (turns, m.group(1).strip()) if text[end:].strip() == "" else None
        if end >= len(text) or text[end] != "\n":
            return None
        turns.append((m.group(1).strip(), m.group(2).strip()))
        pos = end + 1


def cloze_question(text: str) -> str:
    """A cloze as a completion request ("Complete the sentence: The capital of France is"); a question as is."""
    text = text.strip()
    return text if text.endswith("?") else COMPLETE.format(cloze=text)


def answer_text(continuation: str, form: str) -> str:
    """What counts as the answer in a continuation: all of it in the plain form, its first line otherwise."""
    if form == "plain":
        return continuation
    return continuation.lstrip().split("\n", 1)[0]


def window(items: Sequence[TwoHopItem], form: str = DEFAULT_FORM) -> int:
    """New tokens to read for `items` in `form`: the longest window of the forms they are put in."""
    return max((NEW_TOKENS[item_form(it, form)] for it in items), default=NEW_TOKENS[check_form(form)])


def questions_of(item: TwoHopItem) -> dict[str, Any]:
    """The item's own `questions` field, checked (a dict of strings, `paraphrases` a list of strings / null)."""
    q = item.extra.get("questions")
    if q is None:
        return {}
    where = f"item {item.id!r} field 'questions'"
    if not isinstance(q, dict):
        raise PatchlabError("must be an object {field: question}", where=where)
    for key, value in q.items():
        if key == "paraphrases":
            ok = isinstance(value, list) and all(v is None or (isinstance(v, str) and v.strip()) for v in value)
        else:
            ok = key in FIELDS and (value is None or (isinstance(value, str) and value.strip()))
        if not ok:
            raise PatchlabError(f"entry {key!r} must be a non-empty string (paraphrases: a list)", where=where)
    return q


def question(item: TwoHopItem, field: str, index: int | None = None) -> str:
    """The question that asks `field` of `item` (`index`: which paraphrase), by the rules in the module doc."""
    own = questions_of(item).get(field)
    if index is not None:
        own = own[index] if isinstance(own, list) and index < len(own) else None
        text = item.paraphrases[index]
    else:
        text = getattr(item, field)
    if own:
        return own.strip()
    turns = qa_turns(text)
    return turns[1] if turns else cloze_question(text)


def qa_prompt(text: str, ask: str) -> str:
    """`text` in the qa form, `ask` being its question: a few-shot QA text stays as it is."""
    return text if qa_turns(text) is not None else QA.format(question=ask)


def texts(item: TwoHopItem) -> list[tuple[str, int | None, str]]:
    """(field, paraphrase index or None, text) of every prompt of an item, in a fixed order."""
    out: list[tuple[str, int | None, str]] = [(f, None, getattr(item, f)) for f in FIELDS]
    out += [("paraphrases", i, p) for i, p in enumerate(item.paraphrases)]
    return out


def check_forms(items: Sequence[TwoHopItem], form: str) -> str:
    """Check `form` and every item's own form once, before any work."""
    check_form(form)
    for it in items:
        item_form(it, form)
    return form
