"""Scale-out on one machine: `evaluate` + `locate --method attribution` on the default model, three ways.

  plain   1 process x 2 threads: the default single-process path (no shards)
  plain1  1 process x 1 thread: the same, on one core (what 2 one-thread workers should double)
  local   2 spawned worker processes x 1 thread (`--workers 2 --threads 1`), sharded
  ray     2 Ray actors x 1 thread (`--backend ray --workers 2 --threads 1`), a local Ray started here

Each configuration runs in a fresh Python process, one after another. Reported per configuration: wall
seconds, items/s (evaluate items + located items over the compute time), CPU-seconds per item, fixed
overhead (start-up and model loads; merge), and peak memory per worker. The machine's load average is
recorded before each run (cores busy with other processes over 3 s, and the 1-min load average); when
other processes used more than 0.3 cores before a run, no speed-up is printed.
Then a projection for N machines from the measured per-worker rate and overheads — a model, not a
measurement.

Each round runs every configuration once; the best round of each counts (the least disturbed by other work).
Usage: python benchmarks/bench_scale.py [--per-kind N] [--configs plain,plain1,local,ray] [--repeat 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
config, per_kind, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
import torch
from patchlab.core.prompts import PromptSet

from patchlab.runs.backends import peak_rss_mib as rss_mib  # VmHWM: ru_maxrss would carry the parent's size over exec

ps = PromptSet.shipped()
items = list(ps.stratified(per_kind)) if per_kind else list(ps)
out = {"config": config, "items": len(items), "load_before": os.getloadavg()[0], "busy_before": float(sys.argv[4])}
if config.startswith("plain"):
    threads = 1 if config == "plain1" else 2
    torch.set_num_threads(threads)
    from patchlab.methods.gap import evaluate_gap
    from patchlab.methods.locate import locate
    from patchlab.runtime.models import load_model
    model = load_model("smollm2-135m")
    t1 = time.perf_counter()
    cpu = time.process_time()
    gap = evaluate_gap(model, items, progress=False)
    fails = gap.failed_items(items)
    found = locate(model, fails, method="attribution", progress=False)
    compute = time.perf_counter() - t1
    out.update(startup_s=t1 - t0, compute_s=compute, merge_s=0.0, cpu_s=time.process_time() - cpu,
               peak_rss_mib_per_worker=rss_mib(), workers=1, threads=threads)
else:
    from patchlab.runs import jobs
    from patchlab.runs.backends import Load
    backend = jobs.Backend(config, 2, 1)
    with jobs.Run("bench", {"per_kind": per_kind}, items, run_dir, Load("smollm2-135m"), backend) as run:
        t1 = time.perf_counter()
        gap = jobs.evaluate(run, items, ps.source)
        fails = gap.failed_items(items)
        found = jobs.locate(run, fails, items, method="attribution")
        total = time.perf_counter() - t1
        meta = run.meta()
    out.update(startup_s=t1 - t0 + 0.0, compute_s=meta["seconds_in_shards"], merge_s=total - meta["seconds_in_shards"],
               cpu_s=meta["worker_cpu_s"], peak_rss_mib_per_worker=meta["worker_peak_rss_mib"], workers=2, threads=1,
               driver_peak_rss_mib=rss_mib())
    if config == "ray":
        import ray
        ray.shutdown()
out.update(wall_s=time.perf_counter() - t0, located=len(fails), gap_count=gap.summary["all"]["gap_count"],
           top_head=found.ranking[0]["unit"], load_after=os.getloadavg()[0])
print("RESULT " + json.dumps(out))
"""


def busy_cores(seconds: float = 3.0) -> float:
    """Cores kept busy by other processes right now (from /proc/stat over `seconds`): the 1-min load
    average still counts the previous configuration, this does not."""

    def sample():
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    (t0, i0), _ = sample(), time.sleep(seconds)
    t1, i1 = sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def run(config: str, per_kind: int) -> dict:
    """One configuration in a fresh process; its measurements."""
    env = {**os.environ, "PATCHLAB_QUIET": "1", "OMP_NUM_THREADS": "2" if config == "plain" else "1"}
    busy = busy_cores()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, config, str(per_kind), str(Path(tmp) / "run"), f"{busy:.3f}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{config} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[0][len("RESULT ") :])


def table(results: list[dict]) -> None:
    print(
        f"{'config':7} {'items':>5} {'wall s':>7} {'startup s':>9} {'compute s':>9} {'merge s':>7} "
        f"{'items/s':>7} {'CPU s/item':>10} {'peak MiB/worker':>15} {'busy cores before':>17} {'load avg':>8}"
    )
    for r in results:
        work = r["items"] + r["located"]
        r["items_per_s"] = work / r["compute_s"]
        r["cpu_s_per_item"] = r["cpu_s"] / work
        print(
            f"{r['config']:7} {r['items']:5d} {r['wall_s']:7.1f} {r['startup_s']:9.1f} {r['compute_s']:9.1f} "
            f"{r['merge_s']:7.2f} {r['items_per_s']:7.2f} {r['cpu_s_per_item']:10.3f} "
            f"{r['peak_rss_mib_per_worker']:15.0f} {r['busy_before']:17.2f} {r['load_before']:8.2f}"
        )


def projection(results: list[dict], items: int = 10_000) -> None:
    """Time for `items` on N machines of 2 one-thread workers each, from the measured local rate."""
    local = next((r for r in results if r["config"] == "ray"), None) or next(
        r for r in results if r["config"] == "local"
    )
    per_worker = local["items_per_s"] / local["workers"]
    overhead = local["startup_s"] + local["merge_s"]
    print(
        f"\nPROJECTION (a model, not a measurement): {items} items (evaluate + locate), N machines x 2 workers, "
        f"per-worker rate {per_worker:.2f} items/s and overhead {overhead:.0f} s measured with {local['config']}"
    )
    for n in (1, 2, 4, 8, 16, 32):
        seconds = overhead + items / (n * 2 * per_worker)
        print(f"  N={n:3d}: {seconds / 60:7.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-kind", type=int, default=0, help="items per kind (0: the whole shipped set)")
    ap.add_argument("--configs", default="plain,plain1,local,ray")
    ap.add_argument("--repeat", type=int, default=2, help="rounds (configurations interleaved); the best counts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    configs = args.configs.split(",")
    rounds = [[run(c, args.per_kind) for c in configs] for _ in range(args.repeat)]  # interleaved
    for i, round_ in enumerate(rounds):
        print(f"round {i + 1} of {args.repeat}")
        table(round_)
    results = [min((r[j] for r in rounds), key=lambda x: x["compute_s"]) for j in range(len(configs))]
    if args.repeat > 1:
        print("best of the rounds (least disturbed)")
        table(results)
    busy = any(r["busy_before"] > 0.3 for r in results)
    if busy:
        print("\nthe machine was busy before a run (> 0.3 cores used by other processes): no speed-up is reported")
    for base in ("plain", "plain1"):
        ref = next((r for r in results if r["config"] == base), None)
        if busy or ref is None:
            continue
        for r in results:
            if r["config"] in ("local", "ray"):
                print(
                    f"speed-up {r['config']} (2 x 1 thread) vs {base} ({ref['threads']} thread(s)), compute: "
                    f"{ref['compute_s'] / r['compute_s']:.2f}x; end to end: {ref['wall_s'] / r['wall_s']:.2f}x"
                )
                if base == "plain1":
                    print(f"{r['config']}_vs_1x1={ref['compute_s'] / r['compute_s']:.2f}")
    projection(results)
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "best": results}, indent=2))


if __name__ == "__main__":
    main()
