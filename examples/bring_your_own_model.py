"""Run patchlab on any TransformerLens model by name (GPT-2, Pythia, Llama ...) or a local HF folder.

    python examples/bring_your_own_model.py gpt2
    python examples/bring_your_own_model.py path/to/hf-folder --per-kind 2

Hub models need the internet or a filled Hugging Face cache; offline, loading fails at once with one
line saying what to do (and this script exits with code 2), instead of hanging on the network.
"""

import argparse
import sys

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import PromptSet
from patchlab.methods.gap import evaluate_gap
from patchlab.results.tables import gap_table
from patchlab.runtime.models import load_model

parser = argparse.ArgumentParser()
parser.add_argument("model", help="TransformerLens name, HF folder, or an offline key (smollm2-135m, gemma3-270m)")
parser.add_argument("--per-kind", type=int, default=3)
args = parser.parse_args()

try:
    model = load_model(args.model)
except PatchlabError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
print(f"{args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model {model.cfg.d_model}")
gap = evaluate_gap(model, PromptSet.shipped().stratified(args.per_kind))
from rich import print as rprint  # noqa: E402

rprint(gap_table(gap).to_rich())
