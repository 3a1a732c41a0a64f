"""Sequential editing at scale on the default model: the shipped set's failures stacked 1, 10, 50, all —
plain (deltas summed into W_O) vs routed modules (hard and soft gates; keys with and without the
Gram–Schmidt independence construction; keyed without the paraphrases, which then test the router on
prompts it never saw) — with the modules' dependence and routing's cost per forward.

Usage: python benchmarks/bench_mechanisms.py [--items N] [--stages 1,10,50,all] [--edits DIR] [--out DIR]
  --edits DIR reuses .edit files (sorted by name) computed earlier with the same heads and config.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from patchlab.core.prompts import PromptSet
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.methods import editeval as V
from patchlab.methods.gap import evaluate_gap
from patchlab.runtime.models import load_model
from patchlab.studies import mechanisms as M

HEADS = [Head(23, 4), Head(23, 5)]  # located by `locate` (guide, both) on the failures: see the README's edit section


def fmt(s: dict) -> str:
    return "-" if not s["n"] else f"{s['after']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=None)
    ap.add_argument("--stages", default="1,10,50,all")
    ap.add_argument("--edits", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = load_model("smollm2-135m")
    ps = PromptSet.shipped()
    pool = list(ps)
    gap = evaluate_gap(model, ps, progress=False)
    fails = [it for it in pool if it.id in set(gap.failures)][: args.items]
    unrelated, kl_ids = V.kl_prompts(pool, gap)
    print(f"{len(fails)} failures; gap in {time.perf_counter() - t0:.0f} s", flush=True)
    t = time.perf_counter()
    if args.edits:
        edits = [E.Edit.load(p) for p in sorted(args.edits.glob("*.edit"))][: len(fails)]
        if [e.item_ids[0] for e in edits] != [it.id for it in fails[: len(edits)]] or len(edits) != len(fails):
            raise SystemExit(f"{args.edits} does not hold one edit per failure, in order")
    else:
        made = E.edit_each(model, fails, HEADS, E.EditConfig(target="optimize"), unrelated=unrelated, progress=False)
        edits = [c.edit for c in made]
    print(
        f"{len(edits)} edits ({'loaded' if args.edits else 'computed'}) in {time.perf_counter() - t:.0f} s", flush=True
    )
    t = time.perf_counter()
    questions, ref_ids = M.reference_prompts(pool, gap, exclude=kl_ids)
    exclude = kl_ids | ref_ids
    reference = M.Reference.build(model, questions, sorted({l for e in edits for l in e.heads}))
    own = [M.own_z(model, e, fails[i : i + 1], M.RouteConfig()) for i, e in enumerate(edits)]
    print(
        f"reference ({reference.n_prompts} prompts) and own activations in {time.perf_counter() - t:.0f} s", flush=True
    )
    n_pre = len(E.prefixes(M.RouteConfig().n_prefixes))
    own_composed = [{l: z[:n_pre] for l, z in o.items()} for o in own]  # own_prompts order: the composed query first
    variants = (
        ("orthogonal", True, "layer", True),
        ("plain keys", False, "layer", True),
        ("orthogonal, edited heads only", True, "edited", True),
        ("orthogonal, keyed on composed only", True, "layer", False),
    )
    stacks = {
        name: M.route_edits(
            model,
            edits,
            pool,
            reference,
            M.RouteConfig(orthogonal=orth, key_heads=kh, paraphrases=par),
            own=own if par else own_composed,
            progress=False,
        )
        for name, orth, kh, par in variants
    }
    dep = {name: M.stack_dependence(model, mods, pool, gap, exclude=exclude) for name, mods in stacks.items()}
    print(
        f"\ndependence over {dep['orthogonal']['samples']} of {dep['orthogonal']['positions']} positions "
        f"({len(edits)} modules):"
    )
    print(
        "| keys | HSIC | HSIC, shuffled | mean abs r | positions with >= 2 gates open | own prompts open | "
        "open on another module's prompts: same subject / other |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, d in dep.items():
        print(
            f"| {name} | {d['hsic']:.4f} | {d['hsic_null']:.4f} | {d['abs_r']:.3f} | {d['cofire']:.4f} | {d['own_open']:.3f} | "
            f"{d['cross_open_same_subject'] or 0:.3f} ({d['same_subject_pairs']} pairs) / {d['cross_open_other']:.4f} |"
        )
    for name, mods in stacks.items():
        opened = [m.calibration["layers"][str(l)]["own_open"] for m in mods for l in m.routes]
        sep = sum(m.calibration["layers"][str(l)]["separable"] for m in mods for l in m.routes)
        print(
            f"{name}: own prompts (prefixed) past τ {sum(opened) / len(opened):.3f}; separable gates {sep}/{len(opened)}"
        )
    stages = M.parse_stages(args.stages, len(edits))
    t = time.perf_counter()
    result = M.evaluate_stack(
        model,
        stacks["orthogonal"],
        pool,
        gap,
        stages,
        exclude=exclude,
        dependence_stats=dep,
        others={
            "routed soft": (stacks["orthogonal"], "soft"),
            "routed, plain keys": (stacks["plain keys"], "hard"),
            "routed, keyed on composed only": (stacks["orthogonal, keyed on composed only"], "hard"),
        },
        progress=False,
    )
    print(
        f"\nsequential evaluation ({stages}) in {time.perf_counter() - t:.0f} s; irrelevance n={result.meta['irrelevance']}, "
        f"facts n={result.meta['facts']}, facts about edited subjects n={result.meta['entity_facts']}"
    )
    print(
        "| variant | edits | correction (new) | retention (earlier) | all edited | paraphrase | irrelevance kept | facts kept "
        "| facts about edited subjects kept |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, curve in result.curves.items():
        for i, n in enumerate(stages):
            print(
                f"| {name} | {n} | "
                + " | ".join(
                    fmt(curve[k][i])
                    for k in ("correction", "retention", "edited", "paraphrase", "irrelevance", "facts", "entity_facts")
                )
                + " |"
            )
    batch = [it.composed for it in pool if it.id in set(gap.composed_correct)][:32]
    result.cost = M.routing_cost(model, stacks["orthogonal"], batch)
    c = result.cost
    print(
        f"\nforward of {c['batch']} prompts: plain {c['plain_s'] * 1000:.0f} ms, routed ({c['modules']} modules) "
        f"{c['routed_s'] * 1000:.0f} ms: ratio {c['ratio']:.3f} (median of {c['repeats']})"
    )
    if args.out:
        result.save(args.out)
        print(f"wrote {args.out}/result.json, figure.html")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
