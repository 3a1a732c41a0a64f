"""Edits measured on what they were not tuned on: a dev / test split by subject and held-out paraphrase frames.

Protocol (`patchlab.core.protocol`): items are split by subject (no subject in both halves); heads are
located on dev failures; the KL prompts and the preserved prompts of the null-space variants come from dev
items (and, for the null space, from the edited subject's own hop-1 fact and seen paraphrases of its other
chains); every variant is run on the dev failures (settings are compared there, on the seen frames) and on
the test failures, where the table leads with the held-out frames (question form, possessive chain,
relative clause first, passive, a distractor sentence, the chat template) that nothing in patchlab reads
before this measurement. Irrelevance and facts are other test items' composed queries and hop-2 facts
answered right before the edit; generalization is the edited subject's other chains.

Then, for the variant chosen on dev: all per-item test edits applied at once (deltas summed into W_O), and a
relation-level batch edit made from the dev failures of one kind, measured on the test failures of that kind.

Usage: python benchmarks/bench_edit_protocol.py [--model smollm2-135m] [--dev-items 12] [--test-items N]
       [--variants ...] [--top 2] [--json out.json] [--gap gap.json]
Ends with machine-readable key=value lines for the chosen variant on the test split.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from patchlab.core.prompts import PromptSet
from patchlab.core.protocol import load_frames, split_by_subject
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.methods import editeval as V
from patchlab.methods.gap import GapResult, evaluate_gap
from patchlab.methods.locate import locate
from patchlab.runtime.models import load_model

COLUMNS = ("correction", "paraphrase", "heldout", "generalization", "irrelevance", "facts")


def variants(model, heads):
    """name -> (heads, EditConfig, uses preserved prompts)."""
    creme = [Head(l, h) for l in range(20, 27) for h in range(model.cfg.n_heads)] if model.cfg.n_layers >= 27 else None
    base = dict(target="optimize")
    out = {
        "head edit (optimize, C, KL): patchlab 0.1": (heads, E.EditConfig(**base), False),
        "+ whole answer": (heads, E.EditConfig(**base, whole_answer=True), False),
        "+ keys on 3 seen phrasings": (heads, E.EditConfig(**base, whole_answer=True, phrasings=3), False),
        "+ null space (1e-2)": (heads, E.EditConfig(**base, whole_answer=True, null_space=1e-2), True),
        "+ phrasings + null space (1e-2)": (
            heads,
            E.EditConfig(**base, whole_answer=True, phrasings=3, null_space=1e-2),
            True,
        ),
        "+ phrasings + null space (1e-3)": (
            heads,
            E.EditConfig(**base, whole_answer=True, phrasings=3, null_space=1e-3),
            True,
        ),
    }
    for mu in (1.0, 10.0, 100.0):
        out[f"+ preserved keys in C (μ = {mu:g})"] = (heads, E.EditConfig(**base, whole_answer=True, preserve=mu), True)
    out["+ phrasings + preserved keys in C (μ = 10)"] = (
        heads,
        E.EditConfig(**base, whole_answer=True, phrasings=3, preserve=10.0),
        True,
    )
    if creme is not None:
        out["layer-level CREME (layers 20-26, guide, C = I)"] = (
            creme,
            E.EditConfig(target="guide", covariance=False),
            False,
        )
    return out


def summed(model, made) -> E.ComputedEdit:
    """Every per-item edit at once: their deltas summed into one edit (same heads)."""
    first = made[0].edit
    deltas = {l: sum(c.edit.deltas[l] for c in made) for l in first.heads}
    edit = E.Edit(first.model, first.weights_sha256, first.heads, deltas, [i for c in made for i in c.edit.item_ids],
                  {**first.method, "summed": len(made)})  # fmt: skip
    return E.ComputedEdit([it for c in made for it in c.items], edit, sum(c.seconds for c in made))


def cell(s: dict, key: str, arrow: bool = False) -> str:
    v = s.get(key, {})
    if not v.get("n"):
        return "-"
    return f"{v['before']:.2f}→{v['after']:.2f}" if arrow else f"{v['after']:.3f}"


def table(title: str, rows: dict) -> None:
    print(f"\n{title}\n")
    print("| method | correction | held-out frames | seen frames | generalization | irrelevance kept | facts kept "
          "| s/edit | n |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (s, sec, n) in rows.items():
        print(
            f"| {name} | {cell(s, 'correction', True)} | {cell(s, 'heldout', True)} | {cell(s, 'paraphrase', True)} | "
            f"{cell(s, 'generalization', True)} | {cell(s, 'irrelevance')} | {cell(s, 'facts')} | {sec:.1f} | {n} |",
            flush=True,
        )


def score(s: dict) -> float:
    """The dev choice: correction + seen-frame paraphrase, with irrelevance and facts kept weighted x2."""
    get = lambda k: s[k]["after"] if s.get(k, {}).get("n") else 0.0  # noqa: E731
    return get("correction") + get("paraphrase") + 2 * get("irrelevance") + 2 * get("facts")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dev-items", type=int, default=12)
    ap.add_argument("--test-items", type=int, default=None)
    ap.add_argument("--variants", default=None,
                    help="which variants to run: exact names separated by '|', or comma-separated substrings")  # fmt: skip
    ap.add_argument("--splits", default="dev,test", help="which splits to run: dev (choice), test (report), or both")
    ap.add_argument("--chosen", default=None, help="the dev winner's name (substring), when dev ran separately")
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--gap", type=Path, default=None, help="a saved gap result.json of this model (else evaluated)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    model = load_model(args.model)
    ps = PromptSet.shipped()
    pool = list(ps)
    frames = load_frames()
    gap = GapResult.from_json(args.gap) if args.gap else evaluate_gap(model, ps, progress=False)
    failed = set(gap.failures)
    dev, test = split_by_subject(pool)
    dev_f = [it for it in dev if it.id in failed]
    test_f = [it for it in test if it.id in failed][: args.test_items]
    unrelated, exclude = V.kl_prompts(dev, gap)
    keep, _ = V.preserved_prompts(dev, gap, exclude)  # dev items: disjoint from the test irrelevance sets
    print(f"{args.model}: {len(dev)} dev / {len(test)} test items (by subject), failures {len(dev_f)} / "
          f"{len(test_f)}; gap in {time.perf_counter() - started:.0f} s")  # fmt: skip
    loc = locate(model, dev_f[:10], setup="guide", method="both", progress=False)
    heads = loc.heads(args.top)
    print(f"heads located on dev failures: {heads}")
    chosen = variants(model, heads)
    if args.variants:
        exact = "|" in args.variants
        wanted = args.variants.split("|" if exact else ",")
        hit = (lambda k: k in wanted) if exact else (lambda k: any(w in k for w in wanted))
        chosen = {k: v for k, v in chosen.items() if hit(k) or (args.chosen or "\0") in k}
    results: dict = {"model": args.model, "heads": str(heads), "dev": {}, "test": {}}
    made_test = {}
    for split, items, its_pool in (("dev", dev_f[: args.dev_items], dev), ("test", test_f, test)):
        if split not in args.splits.split(","):
            continue
        rows = {}
        for name, (hs, cfg, uses_keep) in chosen.items():
            if split == "dev" and "CREME" in name:
                continue
            made = E.edit_each(model, items, hs, cfg, unrelated=unrelated, progress=False,
                               preserved=keep if uses_keep else ())  # fmt: skip
            if split == "test":
                made_test[name] = made
            report = V.evaluate_edits(model, made, its_pool, gap, exclude=exclude, frames=frames, progress=False)
            rows[name] = (report.summary, report.seconds_per_edit, len(made))
            results[split][name] = {"summary": report.summary, "s_per_edit": report.seconds_per_edit}
            print(f"[{split}] {name}: " + ", ".join(f"{k} {cell(report.summary, k, True)}" for k in COLUMNS)
                  + f", {report.seconds_per_edit:.1f} s/edit", flush=True)  # fmt: skip
            if args.json:  # what is measured so far survives an interrupted run
                args.json.write_text(json.dumps(results, indent=1, default=float))
        table(f"{args.model}, {split} split ({len(items)} failures)" + (" — settings are chosen here" if split == "dev"
              else " — held-out frames lead"), rows)  # fmt: skip
    if results["dev"]:
        best = max((k for k in results["dev"]), key=lambda k: score(results["dev"][k]["summary"]))
        print(f"\nchosen on dev (correction + seen paraphrase + 2 x kept): {best}")
    if args.chosen:
        best = next(k for k in chosen if args.chosen in k)
        print(f"chosen on dev in an earlier run: {best}")
    if "test" not in args.splits:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=float))
        return
    results["chosen"] = best
    # all test edits of the chosen variant at once
    together = V.evaluate_edits(model, [summed(model, made_test[best])], test, gap, exclude=exclude, frames=frames,
                                progress=False)  # fmt: skip
    table("all test edits of the chosen variant applied at once (deltas summed)",
          {best: (together.summary, together.seconds_per_edit, len(made_test[best]))})  # fmt: skip
    results["together"] = together.summary
    # a relation-level edit: one batch edit from the dev failures of a kind with failures on both sides
    dev_n, test_n = Counter(it.kind for it in dev_f), Counter(it.kind for it in test_f)
    kind = max(dev_n, key=lambda k: (min(dev_n[k], test_n[k]), dev_n[k]))  # enough failures on both sides
    dk = [it for it in dev_f if it.kind == kind]
    tk = [it for it in test_f if it.kind == kind]
    hs, cfg, uses_keep = chosen[best]
    batch = E.edit_each(model, dk, hs, cfg, batch=True, unrelated=unrelated, progress=False,
                        preserved=keep if uses_keep else ())  # fmt: skip
    rel = V.evaluate_edits(model, batch, test, gap, held_out=tk, exclude=exclude, frames=frames, progress=False)
    h = rel.summary.get("held_out", {})
    print(f"\nrelation-level batch edit of {len(dk)} dev failures of {kind}: unseen test failures of that kind "
          f"{h.get('before', 0):.2f} → {h.get('after', 0):.2f} (n={h.get('n', 0)}); irrelevance kept "
          f"{rel.summary['irrelevance']['after']:.3f}, facts kept {rel.summary['facts']['after']:.3f}")  # fmt: skip
    results["relation"] = {"kind": kind, "dev_failures": len(dk), "summary": rel.summary}
    keys = batch[0].edit  # how alike the failures' keys are (why a relation-level edit does or does not carry)
    layer = min(keys.heads)
    cols = E.head_columns(model, keys.heads[layer])
    z = E.last_z(model, [it.composed for it in dk + tk], [layer])[layer][:, cols]
    zc = torch.nn.functional.normalize(z - z.mean(0), dim=-1)
    sims = (zc @ zc.T)[: len(dk), len(dk) :]
    print(f"centred cosine of dev vs test failures' keys (layer {layer}): mean {sims.mean():.3f}, max {sims.max():.3f}")
    results["relation"]["key_cosine_mean"] = float(sims.mean())
    s = results["test"][best]["summary"]
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min")
    for k in COLUMNS:
        if s.get(k, {}).get("n"):
            print(f"test_{k}={s[k]['after']:.3f}")
    print(f"test_generalization_before={s['generalization']['before']:.3f}")
    print(f"s_per_edit={results['test'][best]['s_per_edit']:.2f}")
    print(f"relation_unseen_fixed={h.get('after', 0):.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
