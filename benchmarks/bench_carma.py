"""Plain fine-tuning vs CARMA on inverse dictionary modelling (IDM), several seeds, on the default model;
and whether either keeps a CREME-style head edit's correction while re-tuning around it.

Every run starts from the same edited model: a batch edit (heads 23.4 + 23.5, optimised target) of two
composed failures of the shipped two-hop set, so one set of runs answers both questions (method
plain-noedit starts from the unedited model: a control for what re-tuning alone does to them). Each run
fine-tunes all weights on the IDM training definitions (fixed split, seed 0) with the run's seed
for the data order (and CARMA's negative sampler), then measures the held-out accuracy (first
greedy token), synonym-substitution retention at 25% / 40% (3 draws per item) and the edit's
correction (greedy answer right on the edited composed queries and their paraphrases).

Usage: python benchmarks/bench_carma.py [--steps 24] [--seeds 0,1,2] [--threads 1] [--out bench-out/carma]
       [--methods plain,carma] [--lam 0.3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from patchlab.core.io import atomic_write_json
from patchlab.core.prompts import PromptSet
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.methods import editeval as V
from patchlab.methods.gap import evaluate_gap
from patchlab.runtime.models import load_model
from patchlab.studies import tasks as T
from patchlab.studies.carma import CarmaConfig
from patchlab.studies.retune import restoring, retune

HEADS = [Head(23, 4), Head(23, 5)]  # the heads `patchlab locate` finds for the shipped failures (README)


def correction(model, queries: dict[str, list[V.Query]]) -> dict[str, dict[str, float]]:
    """Event rate and mean p(answer) on each query set of the edit."""
    out = {}
    for name, qs in queries.items():
        rows = V.measure(model, qs)
        out[name] = {"rate": sum(r["correct"] for r in rows) / len(rows), "p": statistics.mean(r["p"] for r in rows)}
    return out


def idm_metrics(model, task: T.Task) -> dict[str, float | None]:
    ev = T.evaluate_task(model, task, train=False)
    syn = ev["synonyms"]["held-out"]
    return {
        "held_out": ev["accuracy"]["held-out"],
        "syn25": syn["0.25"]["retention"],
        "syn40": syn["0.40"]["retention"],
        "syn_n25": syn["0.25"]["n"],
        "syn_n40": syn["0.40"]["n"],
    }


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=6e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--params", default="all")
    ap.add_argument("--lam", type=float, default=0.3, help="CARMA's lambda (gamma, eta: CarmaConfig defaults)")
    ap.add_argument("--methods", default="plain,carma", help="plain, carma, plain-noedit (control without the edit)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is far faster on a shared machine)")
    ap.add_argument("--out", default="bench-out/carma")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    began = time.perf_counter()
    model = load_model("smollm2-135m")
    task = T.idm_task(seed=0)
    ps = PromptSet.shipped().stratified(8)
    gap = evaluate_gap(model, ps, progress=False)
    fails = [it for it in ps if it.id in set(gap.failures)][:2]
    unrelated, _ = V.kl_prompts(list(ps), gap)
    edit = E.compute_edit(model, fails, HEADS, E.EditConfig(target="optimize"), unrelated=unrelated)
    queries = {
        "composed": [V.Query(it.composed, it.answers) for it in fails],
        "paraphrase": [V.Query(p, it.answers) for it in fails for p in it.paraphrases],
    }
    print(
        f"edit of {[it.id for it in fails]} on heads {edit.head_list}; IDM train {len(task.train)}, "
        f"held-out {len(task.test['held-out'])}; {args.steps} steps x {args.batch_size}, lr {args.lr}, "
        f"params {args.params}, threads {torch.get_num_threads()}",
        flush=True,
    )
    start = {"unedited": {**idm_metrics(model, task), "correction": correction(model, queries)}}
    with edit.applied(model):
        start["edited"] = {**idm_metrics(model, task), "correction": correction(model, queries)}
    print("start:", start, flush=True)
    runs = []
    for method in methods:
        for seed in seeds:
            cfg = CarmaConfig(lam=args.lam, seed=seed) if method == "carma" else None
            with restoring(model):
                t0 = time.perf_counter()
                fresh = E.Edit(edit.model, edit.weights_sha256, edit.heads, edit.deltas, edit.item_ids, edit.method)
                fresh = None if method == "plain-noedit" else fresh  # control: does re-tuning alone fix them?
                res = retune(
                    model,
                    task.train,
                    carma=cfg,
                    params=args.params,
                    edit=fresh,
                    steps=args.steps,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    seed=seed,
                    task="idm",
                    progress=False,
                )
                row = {
                    "method": method,
                    "seed": seed,
                    "train_seconds": res.seconds,
                    **idm_metrics(model, task),
                    "correction": correction(model, queries),
                    "final_task_loss": res.history[-1]["task"],
                    "mean_task_loss_last5": statistics.mean(h["task"] for h in res.history[-5:]),
                    "history": res.history,
                    "seconds": time.perf_counter() - t0,
                }
            runs.append(row)
            print(
                f"{method} seed {seed}: held-out {row['held_out']:.3f}, syn25 {row['syn25']:.3f}, "
                f"syn40 {row['syn40']:.3f}, correction {row['correction']['composed']['rate']:.2f} / "
                f"{row['correction']['paraphrase']['rate']:.2f}, {row['seconds']:.0f} s",
                flush=True,
            )
    e = start["edited"]
    print(
        f"\nstart (edited model): held-out {e['held_out']:.3f}, synonym retention {e['syn25']:.3f} / {e['syn40']:.3f}, "
        f"correction {e['correction']['composed']['rate']:.2f} / {e['correction']['paraphrase']['rate']:.2f}"
    )
    print(
        "\n| method | held-out accuracy | synonym retention 25% | synonym retention 40% | edit kept: composed | "
        "edit kept: paraphrases | p(answer) composed | s/run |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        cells = [spread([r[k] for r in rs]) for k in ("held_out", "syn25", "syn40")]
        cells += [spread([r["correction"][k]["rate"] for r in rs]) for k in ("composed", "paraphrase")]
        cells += [spread([r["correction"]["composed"]["p"] for r in rs])]
        print(f"| {method} | {' | '.join(cells)} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    total = time.perf_counter() - began
    print(f"\ntotal {total / 60:.1f} min")
    atomic_write_json(
        f"{args.out}/bench_carma.json",
        {
            "args": vars(args),
            "edit_items": [it.id for it in fails],
            "heads": edit.head_list,
            "start": start,
            "runs": runs,
            "total_seconds": total,
        },
    )


if __name__ == "__main__":
    main()
