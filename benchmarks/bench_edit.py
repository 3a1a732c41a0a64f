"""Editing the default model's failures: layer-level CREME vs head-level patchlab vs fine-tuning the same
W_O columns, with all test sets and the seconds per edit; then a batch edit with held-out failures.

Then the cost of measuring edits: `evaluate_edits` on the same head edits by the reference path
(`fast=False`: every continuation decoded to its full window, probabilities from a second forward) and by
the default one (probabilities from the first decoding step, a query stops once its verdict is settled and
leaves the batch, edited prompts start at the edited layer), alternated, best of two each; every item's
rates must agree to the last query (`eval_same_rates=1`).

Usage: python benchmarks/bench_edit.py [--items N] [--eval-only] [--eval-items 8]
(default: every failure of the shipped set). Ends with key=value lines.
"""

from __future__ import annotations

import argparse
import time

import torch

from patchlab.core.prompts import PromptSet
from patchlab.core.spec import Head, HeadSet
from patchlab.methods import edit as E
from patchlab.methods import editeval as V
from patchlab.methods.gap import evaluate_gap
from patchlab.methods.locate import locate
from patchlab.runtime import sites
from patchlab.runtime.bridge import model_name
from patchlab.runtime.identity import base_hash
from patchlab.runtime.models import load_model
from patchlab.runtime.scoring import answer_token_id, encode, pad_id, pad_right
from patchlab.runtime.trace import frozen, recording


def finetune_columns(model, item, heads, steps: int = 25, lr: float = 1e-3) -> E.Edit:
    """Plain gradient descent on −log p(answer) over the prefixed composed queries, only on the heads' W_O columns."""
    layer_heads = HeadSet(heads).by_layer()
    prompts = E.with_prefixes(item.composed, E.prefixes(6))
    tokens, lengths = pad_right([encode(model, p) for p in prompts], pad_id(model))
    answer = answer_token_id(model, item.answer)
    deltas = {
        l: torch.zeros(model.cfg.d_model, len(hs) * model.cfg.d_head, requires_grad=True)
        for l, hs in layer_heads.items()
    }
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)

    def hook(layer):
        cols = E.head_columns(model, layer_heads[layer])

        def add(act, hook):  # o_proj output += ΔW_S z_S, i.e. the weight change, as a hook
            z = acts[sites.z(layer)]
            return act + z.reshape(*z.shape[:2], -1)[..., cols] @ deltas[layer].T

        return add

    with frozen(model):
        for _ in range(steps):
            with (
                torch.enable_grad(),
                recording(
                    model,
                    [sites.z(l) for l in layer_heads],
                    graph=True,
                    patch=[(sites.o_out(l), hook(l)) for l in layer_heads],
                ) as acts,
            ):
                logits = model(tokens)[torch.arange(len(prompts)), lengths - 1]
                loss = -torch.log_softmax(logits.float(), -1)[:, answer].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return E.Edit(
        model_name(model),
        base_hash(model),
        layer_heads,
        {l: d.detach() for l, d in deltas.items()},
        [item.id],
        {"target": "finetune"},
    )


def row(name, report) -> str:
    s = report.summary
    cell = lambda k: f"{s[k]['before']:.2f}→{s[k]['after']:.2f}" if s[k].get("n") else "-"  # noqa: E731
    return (
        f"| {name} | {cell('correction')} | {cell('paraphrase')} | {cell('generalization')} | "
        f"{s['irrelevance']['after']:.3f} | {s['facts']['after']:.3f} | {report.seconds_per_edit:.1f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=None)
    ap.add_argument("--eval-only", action="store_true", help="only the edit-measurement speed comparison")
    ap.add_argument("--eval-items", type=int, default=8)
    args = ap.parse_args()
    model = load_model("smollm2-135m")
    ps = PromptSet.shipped()
    pool = list(ps)
    gap = evaluate_gap(model, ps, progress=False)
    fails = [it for it in pool if it.id in set(gap.failures)][: args.items]
    unrelated, exclude = V.kl_prompts(pool, gap)
    print(f"{len(fails)} failures (both hops right, composed wrong) of {len(pool)} items")
    start = time.perf_counter()
    loc = locate(model, fails[:10], setup="guide", method="both", progress=False)
    heads = loc.heads(2)
    print(f"located heads {[str(h) for h in heads]} in {time.perf_counter() - start:.0f} s")
    if not args.eval_only:
        compare(model, fails, heads, pool, gap, unrelated, exclude)
    eval_speed(model, fails[: args.eval_items], heads, pool, gap, unrelated, exclude)


def eval_speed(model, fails, heads, pool, gap, unrelated, exclude) -> None:
    """Reference vs default edit measurement on the same edits: seconds and item-by-item agreement."""
    edits = E.edit_each(model, fails, heads, E.EditConfig(target="optimize"), unrelated=unrelated, progress=False)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    reports = {}
    for fast in (False, True, False, True):
        start = time.perf_counter()
        reports[fast] = V.evaluate_edits(model, edits, pool, gap, exclude=exclude, progress=False, fast=fast)
        seconds[fast].append(time.perf_counter() - start)
    keys = ("n", "before", "after", "beats_wrong")
    rates = lambda r: [[(s, [v[s][k] for k in keys]) for s in sorted(v)] for v in (i["sets"] for i in r.items)]  # noqa: E731
    same = rates(reports[False]) == rates(reports[True])
    texts = [i["text_after"] for i in reports[False].items] == [i["text_after"] for i in reports[True].items]
    c_diff = max(
        abs((a["sets"][s]["C"] or 0) - (b["sets"][s]["C"] or 0)) / max(1.0, abs(a["sets"][s]["C"] or 0))
        for a, b in zip(reports[False].items, reports[True].items)
        for s in a["sets"]
    )
    ref, fast = min(seconds[False]), min(seconds[True])
    print(f"\nmeasuring {len(edits)} edits: reference {ref:.1f} s, default {fast:.1f} s; every item's rates equal: "
          f"{same}; edited continuations equal: {texts}; max relative C difference {c_diff:.1e}")  # fmt: skip
    print(f"eval_speedup={ref / fast:.2f}")
    print(f"eval_same_rates={int(same)}")
    print(f"eval_max_rel_c_diff={c_diff:.2e}")


def compare(model, fails, heads, pool, gap, unrelated, exclude) -> None:
    print("\n| method | correction | paraphrase | generalization | irrelevance kept | facts kept | s/edit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    variants = {
        "layer-level CREME (layers 20-26, guide, C=I)": lambda: E.edit_each(
            model,
            fails,
            [Head(l, h) for l in range(20, 27) for h in range(model.cfg.n_heads)],
            E.EditConfig(target="guide", covariance=False),
            progress=False,
        ),
        f"patchlab heads {'+'.join(map(str, heads))} (optimize, C)": lambda: E.edit_each(
            model, fails, heads, E.EditConfig(target="optimize"), unrelated=unrelated, progress=False
        ),
        f"fine-tune W_O columns of {'+'.join(map(str, heads))} (25 Adam steps)": lambda: [
            _timed_ft(model, it, heads) for it in fails
        ],
    }
    for name, run in variants.items():
        report = V.evaluate_edits(model, run(), pool, gap, exclude=exclude, progress=False)
        print(row(name, report), flush=True)
    half = len(fails) // 2
    edits = E.edit_each(
        model, fails[:half], heads, E.EditConfig(target="optimize"), batch=True, unrelated=unrelated, progress=False
    )
    report = V.evaluate_edits(model, edits, pool, gap, held_out=fails[half:], exclude=exclude, progress=False)
    print(row(f"batch edit of {half} failures (heads {'+'.join(map(str, heads))})", report))
    h = report.summary["held_out"]
    print(f"held-out failures of the batch edit (not edited): {h['before']:.2f} → {h['after']:.2f} (n={h['n']})")


def _timed_ft(model, it, heads):
    start = time.perf_counter()
    edit = finetune_columns(model, it, heads)
    return [it], edit, time.perf_counter() - start


if __name__ == "__main__":
    main()
