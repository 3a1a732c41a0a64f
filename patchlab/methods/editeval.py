"""Edit metrics (CREME's): event rate and relative probability increase on four test sets.

For an edited item:
  correction      its composed query
  paraphrase      its paraphrases (the prompt set's own: for the shipped set, the frames settings were chosen on)
  heldout         its held-out frames (`patchlab.core.protocol`: other syntax, the chat template), never seen
                  by any edit, optimisation or setting choice
  generalization  composed queries of other items with the same subject (another second hop)
  irrelevance     composed queries of other items the model answered right before (must stay right)
  facts           single-hop facts (hop2 prompts of other items) answered right before (must stay right)
Event rate = share of queries whose greedy continuation contains the answer. C = mean of
(p_after − p_before) / p_before of the answer's first token. `beats_wrong` = share of queries whose
answer ends up more probable than the query's original top token (its wrong answer, where it was wrong).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchlab.core.errors import PatchlabError
from patchlab.core.forms import DEFAULT_FORM, answer_text, window
from patchlab.core.progress import track
from patchlab.core.prompts import TwoHopItem
from patchlab.methods.edit import ComputedEdit, Edit
from patchlab.results.base import Result
from patchlab.runtime.bridge import model_name
from patchlab.runtime.decoding import Prefixes
from patchlab.runtime.forms import render_items
from patchlab.runtime.identity import provenance
from patchlab.runtime.scoring import (
    MAX_NEW_TOKENS,
    answer_token_id,
    chat_prompt,
    greedy_continuations,
    last_logits,
    matches,
    settled,
)
from patchlab.runtime.shards import shard_task

SETS = ("correction", "paraphrase", "heldout", "generalization", "irrelevance", "facts")


@dataclass(frozen=True)
class Query:
    prompt: str
    answers: tuple[str, ...]


def test_sets(
    item: TwoHopItem,
    pool: Sequence[TwoHopItem],
    right_composed: set[str],
    right_hop2: set[str],
    n_irrelevant: int = 30,
    seed: int = 0,
    exclude: set[str] = frozenset(),
    heldout: Sequence[str] = (),
) -> dict[str, list[Query]]:
    """The test sets of one edited item (irrelevance and facts: a seeded sample of other items, never one
    in `exclude` — the prompts an edit's KL term saw; `heldout`: the item's held-out frame prompts)."""
    rng = random.Random(seed)
    others = [it for it in pool if it.id != item.id and it.id not in exclude]
    irrelevant = [it for it in others if it.id in right_composed and it.subject != item.subject]
    facts = [it for it in others if it.id in right_hop2 and it.bridge != item.bridge]
    return {
        "correction": [Query(item.composed, item.answers)],
        "paraphrase": [Query(p, item.answers) for p in item.paraphrases],
        "heldout": [Query(p, item.answers) for p in heldout],
        "generalization": [Query(it.composed, it.answers) for it in others if it.subject == item.subject],
        "irrelevance": [
            Query(it.composed, it.answers) for it in rng.sample(irrelevant, min(n_irrelevant, len(irrelevant)))
        ],
        "facts": [Query(it.hop2, it.answers) for it in rng.sample(facts, min(n_irrelevant, len(facts)))],
    }


def measure(
    model,
    queries: Sequence[Query],
    max_new_tokens: int = MAX_NEW_TOKENS,
    form: str = DEFAULT_FORM,
    fast: bool = True,
    whole: int = 0,
    prefixes: Prefixes | None = None,
    reuse: bool = False,
) -> list[dict[str, Any]]:
    """Greedy correctness (`max_new_tokens` read; in the qa and chat `form` the first line is the answer, see
    `patchlab.core.forms.answer_text`), the answer's first-token probability and the top token of every query.

    `fast`: the probabilities come from the first decoding step (no second forward) and a query stops
    decoding once its verdict is settled (`patchlab.runtime.scoring.settled`) — except the first `whole`
    queries, whose text is read in full; `prefixes` records the unedited prompts' state below the edited
    layer, which the edited pass then starts from (`reuse`; see `patchlab.runtime.decoding.Prefixes`).
    `fast=False` is the reference: full continuations and a separate last-position forward (same verdicts,
    tested; probabilities equal to float rounding)."""
    if not queries:
        return []
    prompts = [q.prompt for q in queries]
    if fast:
        firsts: list[torch.Tensor] = []
        stop = lambda i, text: i >= whole and settled(text, queries[i].answers, form)  # noqa: E731
        conts = greedy_continuations(
            model, prompts, max_new_tokens, first_logits=firsts, stop_when=stop, prefixes=prefixes, reuse=reuse
        )
        logits = torch.stack(firsts)
    else:
        conts = greedy_continuations(model, prompts, max_new_tokens)
        logits = last_logits(model, prompts)
    ok = [matches(answer_text(c, form), q.answers) for c, q in zip(conts, queries)]
    probs = torch.softmax(logits, -1)
    out = []
    for q, o, c, p in zip(queries, ok, conts, probs):
        a = answer_token_id(model, q.answers[0], after=q.prompt)
        out.append({"correct": o, "text": c, "p": p[a].item(), "top": int(p.argmax()), "p_all": p})
    return out


def measure_before(
    model,
    queries: Sequence[Query],
    cache: dict[Query, dict[str, Any]],
    max_new_tokens: int = MAX_NEW_TOKENS,
    form: str = DEFAULT_FORM,
    fast: bool = True,
    prefixes: Prefixes | None = None,
) -> list[dict[str, Any]]:
    """`measure` on the unedited model, each query measured once across all edits (test sets overlap)."""
    todo = list(dict.fromkeys(q for q in queries if q not in cache))
    got = measure(model, todo, max_new_tokens, form, fast, whole=0, prefixes=prefixes)
    cache.update((q, {k: v for k, v in m.items() if k != "p_all"}) for q, m in zip(todo, got))
    return [cache[q] for q in queries]


def summarise(before: list[dict], after: list[dict]) -> dict[str, Any]:
    if not before:
        return {"n": 0, "before": None, "after": None, "C": None, "beats_wrong": None}
    rel = [(a["p"] - b["p"]) / max(b["p"], 1e-12) for b, a in zip(before, after)]
    return {
        "n": len(before),
        "before": float(np.mean([b["correct"] for b in before])),
        "after": float(np.mean([a["correct"] for a in after])),
        "C": float(np.mean(rel)),
        "beats_wrong": float(np.mean([a["p"] >= float(a["p_all"][b["top"]]) for b, a in zip(before, after)])),
    }


@dataclass
class EditReport(Result):
    """Before/after metrics of one or more edits, per test set, and what they cost."""

    kind = "edit-report"
    heading = "Edit"
    intro = (
        "A rank-one update of the located heads' output columns (W_O) per failed item, measured before and "
        "after on the corrected query, its paraphrases, other second hops of the same subject, and items and "
        "facts the edit must leave alone."
    )
    order = 50
    model: str
    heads: list[str]
    target: str
    batch: bool
    items: list[dict[str, Any]]  # per edited item: id, per-set summaries, seconds
    summary: dict[str, dict[str, Any]]  # per set: mean before / after rate, C, beats_wrong, n
    seconds_per_edit: float
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self):
        from patchlab.results import tables

        return tables.edit_table(self)

    def figure(self):
        from patchlab.results.figures import edit_figure

        return edit_figure(self)


def _pool_summary(rows: list[dict], name: str) -> dict[str, Any]:
    vals = [r["sets"][name] for r in rows if r["sets"].get(name, {}).get("n")]
    if not vals:
        return {"n": 0, "before": None, "after": None, "C": None, "beats_wrong": None}
    w = np.array([v["n"] for v in vals], dtype=float)
    avg = lambda k: float(np.average([v[k] for v in vals], weights=w))  # noqa: E731
    return {
        "n": int(w.sum()),
        "items": len(vals),
        "before": avg("before"),
        "after": avg("after"),
        "C": avg("C"),
        "beats_wrong": avg("beats_wrong"),
    }


def evaluate_edits(
    model,
    edits: Sequence[tuple[list[TwoHopItem], Edit, float]],
    pool: Sequence[TwoHopItem],
    gap,
    n_irrelevant: int = 30,
    progress: bool = True,
    held_out: Sequence[TwoHopItem] = (),
    exclude: set[str] = frozenset(),
    frames: dict[str, dict] | None = None,
    form: str | None = None,
    fast: bool = True,
) -> EditReport:
    """Measure every `ComputedEdit` (items, edit, seconds) before and after; a batch edit may also be scored on
    held-out items. `frames` ({id: {"frames": {...}, "question": ...}}, see `patchlab.core.protocol`) adds
    the held-out-frame set, the chat template's rendering of the question included. `form`: the prompt form
    of the items' test sets (default: the form the first edit was made in, see `patchlab.core.forms`); the
    held-out frames are their own forms. `fast=False` measures by the reference path (see `measure`)."""
    edits = [c if isinstance(c, ComputedEdit) else ComputedEdit(*c) for c in edits]
    form = form or edits[0].edit.method.get("form", DEFAULT_FORM)
    pool, held_out = render_items(model, pool, form), render_items(model, held_out, form)
    edits = [ComputedEdit(render_items(model, c.items, form), c.edit, c.seconds) for c in edits]
    tokens = window(pool, form)
    right_composed = {r["id"] for r in gap.items if r["composed"]}
    right_hop2 = {r["id"] for r in gap.items if r["hop2"]}
    rows, seen = [], {}
    low = min(min(c.edit.heads) for c in edits)  # every edit leaves the blocks below `low` as they were
    prefixes = (
        Prefixes(low) if fast and 0 < low < model.cfg.n_layers else None
    )  # (an edit of other shapes: refused when applied)
    for items, edit, seconds in track(edits, "evaluating edits" if progress else None):
        rows += edit_rows(
            model, edit, items, pool, right_composed, right_hop2, n_irrelevant, exclude, seen, seconds, frames,
            tokens, form, fast, prefixes,
        )  # fmt: skip
    if held_out:
        edit = edits[0].edit
        queries = [Query(it.composed, it.answers) for it in held_out]
        before = measure(model, queries, tokens, form, fast, whole=0, prefixes=prefixes)
        with edit.applied(model, verify_hash=False):
            after = measure(model, queries, tokens, form, fast, whole=0, prefixes=prefixes, reuse=True)
        for it, b, a in zip(held_out, before, after):
            rows.append(
                {
                    "id": it.id,
                    "edited": False,
                    "seconds": 0.0,
                    "sets": {**{s: summarise([], []) for s in SETS}, "held_out": summarise([b], [a])},
                }
            )
    metric = METRIC if tokens == MAX_NEW_TOKENS else f"greedy {tokens} tokens"
    meta = provenance(model, seed=0, n_irrelevant=n_irrelevant, method=edits[0].edit.method, metric=metric)
    return report_from_rows(rows, model_name(model), edits[0].edit, float(np.mean([c.seconds for c in edits])), meta)


METRIC = "greedy 6 tokens"


def heldout_prompts(model, record: dict | None) -> list[str]:
    """An item's held-out frame prompts, plus its question in the model's chat template (where it has one)."""
    if not record:
        return []
    prompts = [p for name, p in record["frames"].items() if name != "chat"]
    chat = chat_prompt(model, record["question"]) if record.get("question") else None
    return prompts + ([chat] if chat else [])


def edit_rows(
    model,
    edit: Edit,
    items: Sequence[TwoHopItem],
    pool: Sequence[TwoHopItem],
    right_composed: set[str],
    right_hop2: set[str],
    n_irrelevant: int = 30,
    exclude: set[str] = frozenset(),
    seen: dict | None = None,
    seconds: float = 0.0,
    frames: dict[str, dict] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    form: str = DEFAULT_FORM,
    fast: bool = True,
    prefixes: Prefixes | None = None,
) -> list[dict[str, Any]]:
    """One row per item an edit was made for: each test set measured unedited (reusing `seen`) and edited
    (the edited query's own continuation read in full: it is the row's `text_after`)."""
    seen = {} if seen is None else seen
    rows = []
    for it in items:
        heldout = heldout_prompts(model, (frames or {}).get(it.id))
        sets = test_sets(it, pool, right_composed, right_hop2, n_irrelevant, exclude=exclude, heldout=heldout)
        queries = [q for name in SETS for q in sets[name]]
        before = measure_before(model, queries, seen, max_new_tokens, form, fast, prefixes)
        with edit.applied(model, verify_hash=False):
            after = measure(model, queries, max_new_tokens, form, fast, len(sets["correction"]), prefixes, reuse=True)
        i, per = 0, {}
        for name in SETS:
            n = len(sets[name])
            per[name] = summarise(before[i : i + n], after[i : i + n])
            i += n
        rows.append(
            {
                "id": it.id,
                "sets": per,
                "seconds": seconds,
                "edited": True,
                "text_after": after[0]["text"] if after else "",
            }
        )
    return rows


def report_from_rows(
    rows: list[dict[str, Any]], model: str, first: Edit, seconds_per_edit: float, meta: dict[str, Any]
) -> EditReport:
    """The report of item rows: per test set, the n-weighted means over the edited items (and held-out ones)."""
    edited = [r for r in rows if r["edited"]]
    summary = {name: _pool_summary(edited, name) for name in SETS}
    if any(not r["edited"] for r in rows):
        summary["held_out"] = _pool_summary([r for r in rows if not r["edited"]], "held_out")
    return EditReport(
        model=model,
        heads=first.head_list,
        target=first.method.get("target", "?"),
        batch=bool(first.method.get("batch")),
        items=rows,
        summary=summary,
        seconds_per_edit=seconds_per_edit,
        meta=meta,
    )


def timed(fn: Callable[[], Edit]) -> tuple[Edit, float]:
    start = time.perf_counter()
    edit = fn()
    return edit, time.perf_counter() - start


def kl_prompts(pool: Sequence[TwoHopItem], gap, n: int = 8) -> tuple[list[str], set[str]]:
    """Prompts for the optimised target's KL term — composed queries and facts of items answered right —
    and their ids, which the irrelevance sets then leave out (no test on what the edit was fit on)."""
    right = {r["id"] for r in gap.items if r["composed"] and r["hop2"]}
    chosen = [it for it in pool if it.id in right][:n]
    return [it.composed for it in chosen] + [it.hop2 for it in chosen], {it.id for it in chosen}


def preserved_prompts(
    pool: Sequence[TwoHopItem], gap, exclude: set[str] = frozenset(), n: int = 40, seed: int = 0
) -> tuple[Callable[[list[TwoHopItem]], list[str]], set[str]]:
    """What a null-space edit must leave alone, and the ids it draws on (which the irrelevance sets then leave
    out): a seeded sample of `n` composed queries answered right (not the KL prompts in `exclude`), plus — per
    edit — its subjects' hop-1 facts and the paraphrases of their other chains (never those chains' composed
    queries: they are the generalization test)."""
    right = {r["id"] for r in gap.items if r["composed"] and r["hop2"]}
    others = [it for it in pool if it.id in right and it.id not in exclude]
    sample = random.Random(seed).sample(others, min(n, len(others)))

    def keep(group: list[TwoHopItem]) -> list[str]:
        subjects, ids = {it.subject for it in group}, {it.id for it in group}
        own = [it.hop1 for it in group]
        own += [p for it in pool if it.subject in subjects and it.id not in ids for p in it.paraphrases]
        return [it.composed for it in sample] + own

    return keep, {it.id for it in sample}


@shard_task("edit-eval")
def edit_eval_shard(model, config: dict, items: list[dict], pool: list[dict]) -> list[dict]:
    """Before/after rows of one saved edit on a shard of its items (the edit file must be the one hashed)."""
    path = Path(config["edit"])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PatchlabError(
            f"cannot read the edit file ({exc.strerror}): every worker needs it", where=str(path)
        ) from None
    if hashlib.sha256(data).hexdigest() != config["edit_sha256"]:
        raise PatchlabError("edit file changed since the run started", where=str(path))
    edit = Edit.load(path)
    form = edit.method.get("form", DEFAULT_FORM)  # the form the edit was made in
    its = render_items(model, [TwoHopItem.from_dict(d, where=f"item {d.get('id')}") for d in items], form)
    return edit_rows(
        model,
        edit,
        its,
        render_items(model, [TwoHopItem.from_dict(d) for d in pool], form),
        set(config["right_composed"]),
        set(config["right_hop2"]),
        config["n_irrelevant"],
        set(config["exclude"]),
        max_new_tokens=window(its, form),
        form=form,
    )
