"""Locate the heads behind failed two-hop answers, edit them, and check the edit — the Python API in ~30 lines.

python examples/locate_then_edit.py [--prompt-set examples/twohop.jsonl] [--edits 2]
"""

import argparse
from pathlib import Path

from patchlab import EditConfig, PromptSet, edit_each, evaluate_edits, evaluate_gap, kl_prompts, load_model, locate

parser = argparse.ArgumentParser()
parser.add_argument("--prompt-set", default=None, help="JSONL (default: the shipped set, 3 items per kind)")
parser.add_argument("--edits", type=int, default=2)
args = parser.parse_args()

model = load_model("smollm2-135m")
prompts = PromptSet.load(args.prompt_set) if args.prompt_set else PromptSet.shipped().stratified(3)
gap = evaluate_gap(model, prompts)  # 1. which composed questions fail?
failures = gap.failed_items(prompts)
print(f"{len(failures)} of {len(prompts)} items fail the composition with both hops right")
if not failures:
    raise SystemExit("nothing to edit: every composition with both hops right is already correct")

located = locate(model, failures[:6], setup="guide", method="both", verify=10)  # 2. which heads carry it?
heads = located.heads(2)  # a HeadSet
print("located heads:", heads)

unrelated, exclude = kl_prompts(list(prompts), gap)  # 3. edit them, one failure at a time
edits = edit_each(model, failures[: args.edits], heads, EditConfig(target="optimize"), unrelated=unrelated)
report = evaluate_edits(model, edits, list(prompts), gap, exclude=exclude)
for name, s in report.summary.items():
    if s["n"]:
        print(f"{name:15s} before {s['before']:.2f}  after {s['after']:.2f}  (n={s['n']})")
out = Path("locate-then-edit")
edits[0].edit.save(out / "first.edit")  # 4. keep an edit (safetensors)
print("wrote", report.save(out)["result.json"])
