"""The compositionality gap: hop1 / hop2 / composed accuracy, and the composed failures whose hops are right."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from patchlab.core.forms import DEFAULT_FORM, answer_text, item_form, window
from patchlab.core.prompts import PromptSet, TwoHopItem
from patchlab.results.base import Result
from patchlab.runtime.forms import render_items
from patchlab.runtime.identity import provenance
from patchlab.runtime.scoring import DEFAULT_BATCH, Hooks, greedy_continuations, matches
from patchlab.runtime.shards import shard_task

HOPS = ("hop1", "hop2", "composed")


@dataclass
class GapResult(Result):
    """Per-item outcomes and per-kind summaries of a gap evaluation."""

    kind = "gap"
    heading = "Compositionality gap"
    intro = (
        "Greedy answers to hop 1 (subject → bridge), hop 2 (bridge → answer) and the composed question. The "
        "gap is the share of items with both hops right whose composed question is wrong."
    )
    order = 10
    model: str
    prompt_set: str
    # id, kind, hop1/hop2/composed (bool; None when flagged) and their continuations; a row whose decoding met
    # NaN / inf logits is flagged (flagged, flag_reason) and left out of the summary, failures and correct items
    items: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]  # "all" and every kind -> counts and accuracies
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        """Ids of items with both hops right and the composed query wrong: what locate/edit work on."""
        return [r["id"] for r in self.items if r["hop1"] and r["hop2"] and not r["composed"]]

    @property
    def composed_correct(self) -> list[str]:
        return [r["id"] for r in self.items if r["composed"]]

    def failed_items(self, items: Iterable[TwoHopItem]) -> list[TwoHopItem]:
        """The `items` (in their order) that are failures of this evaluation."""
        wanted = set(self.failures)
        return [it for it in items if it.id in wanted]

    def correct_items(self, items: Iterable[TwoHopItem]) -> list[TwoHopItem]:
        """The `items` (in their order) whose composed query this evaluation found right."""
        wanted = set(self.composed_correct)
        return [it for it in items if it.id in wanted]

    def table(self):
        from patchlab.results import tables

        return tables.gap_table(self)

    def figure(self):
        from patchlab.results.figures import gap_figure

        return gap_figure(self)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and accuracies of one group of item rows; gap share is over items with both hops right.
    Flagged rows (NaN / inf logits) are counted apart and left out of everything else."""
    flagged = sum(1 for r in rows if r.get("flagged"))
    rows = [r for r in rows if not r.get("flagged")]
    n = len(rows)
    both = [r for r in rows if r["hop1"] and r["hop2"]]
    gap = sum(not r["composed"] for r in both)
    out: dict[str, Any] = {"n": n, "both_hops": len(both), "gap_count": gap}
    for hop in HOPS:
        out[f"{hop}_correct"] = sum(r[hop] for r in rows)
        out[f"{hop}_acc"] = out[f"{hop}_correct"] / n if n else 0.0
    out["gap_share"] = gap / len(both) if both else 0.0
    if flagged:
        out["flagged"] = flagged
    return out


def evaluate_gap(
    model,
    prompt_set: PromptSet | Sequence[TwoHopItem],
    batch_size: int = DEFAULT_BATCH,
    max_new_tokens: int | None = None,
    fwd_hooks: Hooks = (),
    progress: bool = True,
    form: str = DEFAULT_FORM,
) -> GapResult:
    """Answer every item's hop1, hop2 and composed prompt greedily and measure the compositionality gap.
    `form`: plain (the items' own text), qa or chat (see `patchlab.core.forms`); `max_new_tokens` defaults
    to the form's window (6 tokens; 24 in the chat form)."""
    from patchlab.runtime.bridge import model_name

    source = getattr(prompt_set, "source", "<items>")
    max_new_tokens = max_new_tokens or window(list(prompt_set), form)
    rows = gap_rows(model, list(prompt_set), source, batch_size, max_new_tokens, fwd_hooks, progress, form)
    meta = provenance(model, max_new_tokens=max_new_tokens, criterion=CRITERION, form=form)
    return gap_from_rows(rows, model_name(model), source, meta)


CRITERION = "answer in greedy continuation"


def gap_rows(
    model,
    items: Sequence[TwoHopItem],
    source: str = "<items>",
    batch_size: int = DEFAULT_BATCH,
    max_new_tokens: int | None = None,
    fwd_hooks: Hooks = (),
    progress: bool = True,
    form: str = DEFAULT_FORM,
) -> list[dict[str, Any]]:
    """One row per item: whether hop1, hop2 and the composed query are answered right, and the continuations
    (each prompt rendered in `form` first)."""
    max_new_tokens = max_new_tokens or window(items, form)
    items = render_items(model, items, form)
    prompts = [getattr(it, hop) for it in items for hop in HOPS]
    answers = [it.bridges if hop == "hop1" else it.answers for it in items for hop in HOPS]
    names = [f"{source}: item {it.id!r} field '{hop}'" for it in items for hop in HOPS]
    bad: list[bool] = []
    conts = greedy_continuations(
        model,
        prompts,
        max_new_tokens,
        batch_size,
        fwd_hooks,
        "evaluating gap" if progress else None,
        names,
        nonfinite=bad,
    )
    forms = [item_form(it, form) for it in items for _ in HOPS]
    ok = [matches(answer_text(c, f), a) for c, f, a in zip(conts, forms, answers)]
    rows = []
    for i, it in enumerate(items):
        row: dict[str, Any] = {"id": it.id, "kind": it.kind}
        for j, hop in enumerate(HOPS):
            row[hop] = ok[3 * i + j]
            row[f"{hop}_text"] = conts[3 * i + j]
        met = [hop for j, hop in enumerate(HOPS) if bad[3 * i + j]]
        if met:  # an answer decoded from NaN / inf logits means nothing: the item is flagged, not counted
            row.update({hop: None for hop in HOPS})
            row["flagged"] = True
            row["flag_reason"] = f"non-finite logits (NaN or inf) while answering {', '.join(met)}"
        rows.append(row)
    return rows


def gap_from_rows(rows: Sequence[dict[str, Any]], model: str, source: str, meta: dict[str, Any]) -> GapResult:
    """The gap result of item rows (in the order given): per-kind and overall summaries."""
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    summary = {"all": summarize(rows), **{k: summarize(v) for k, v in sorted(by_kind.items())}}
    return GapResult(model=model, prompt_set=source, items=list(rows), summary=summary, meta=meta)


@shard_task("gap")
def gap_shard(model, config: dict, items: list[dict], pool: list[dict]) -> list[dict]:
    """One shard of a sharded gap evaluation: the rows of `gap_rows`."""
    its = [TwoHopItem.from_dict(d, where=f"item {d.get('id')}") for d in items]
    form = config.get("form", DEFAULT_FORM)  # absent in runs made before forms: plain
    return gap_rows(
        model, its, config["source"], config["batch_size"], config["max_new_tokens"], progress=False, form=form
    )
