"""Peak memory (RSS) of `evaluate` and `locate` on the default model for 50, 200 and 1,000 prompt-set items.

Each run is a fresh Python process that loads SmolLM2-135M, builds N items (the shipped set repeated,
each copy with its own id), runs the workload and reports its own peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and the peak right after loading the model:

  evaluate  evaluate_gap on N items (3N greedy generations of 6 tokens, batches of 32)
  locate    locate --setup guide --method attribution on the same N items (per item: one forward for the
            contrast, the clean and corrupted runs cached, one forward + backward for attribution)

Target: the 1,000-item peak within 10% of the 50-item peak, and at most 3 GB.
Usage: python benchmarks/bench_memory.py [--sizes 50,200,1000] [--workloads evaluate,locate] [--threads 1]
       [--json out.json]
Ends with machine-readable key=value lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import dataclasses, json, resource, sys, time
import torch
from patchlab.runtime.models import load_model
from patchlab.core.prompts import PromptSet

workload, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
model = load_model("smollm2-135m")
shipped = list(PromptSet.shipped())
items = [dataclasses.replace(shipped[i % len(shipped)], id=f"{shipped[i % len(shipped)].id}#{i // len(shipped)}")
         for i in range(n)]
loaded = peak()
start = time.perf_counter()
if workload == "evaluate":
    from patchlab.methods.gap import evaluate_gap
    result = evaluate_gap(model, items, progress=False)
    extra = {"gap_count": result.summary["all"]["gap_count"]}
else:
    from patchlab.methods.locate import locate
    result = locate(model, items, setup="guide", method="attribution", progress=False)
    extra = {"patched": result.n, "flagged": sum(r["flagged"] for r in result.items)}
seconds = time.perf_counter() - start
print(json.dumps({"workload": workload, "n": n, "peak": peak(), "after_load": loaded, "seconds": seconds,
                  "threads": torch.get_num_threads(), **extra}))
"""


def run(workload: str, n: int, threads: int = 0) -> dict:
    """One fresh process; its own peak RSS."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, workload, str(n), str(threads)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PATCHLAB_QUIET": "1"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{workload} n={n} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="50,200,1000")
    ap.add_argument("--workloads", default="evaluate,locate")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in each run (0: torch's default); on a "
        "machine shared with other work 1 is far faster (2 threads wait on each other's core)",
    )
    ap.add_argument("--json", type=Path, default=None, help="Also write every run's numbers here.")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    for workload in args.workloads.split(","):
        for n in sizes:
            start = time.perf_counter()
            r = run(workload, n, args.threads)
            r["wall"] = time.perf_counter() - start
            runs.append(r)
            print(
                f"{workload:9s} n={n:5d}  peak {r['peak'] / 2**20:7.0f} MiB  (after loading the model "
                f"{r['after_load'] / 2**20:6.0f} MiB)  {r['seconds']:7.1f} s",
                flush=True,
            )
    print()
    ok = True
    for workload in args.workloads.split(","):
        rs = {r["n"]: r for r in runs if r["workload"] == workload}
        small, big = rs[min(rs)], rs[max(rs)]
        growth = big["peak"] / small["peak"] - 1
        within = growth <= 0.10 and big["peak"] <= 3 * 2**30
        ok &= within
        print(
            f"{workload}: peak at n={max(rs)} is {growth:+.1%} vs n={min(rs)}, {big['peak'] / 2**30:.2f} GiB: "
            f"{'meets' if within else 'MISSES'} the target (<= +10%, <= 3 GB)"
        )
        print(f"key={workload}_peak_mib " + " ".join(f"n{n}={rs[n]['peak'] / 2**20:.0f}" for n in sorted(rs)))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    print(f"key=memory_target {'met' if ok else 'missed'}")


if __name__ == "__main__":
    main()
