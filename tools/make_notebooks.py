"""Write notebooks/*.ipynb from the cell sources below (no outputs are committed; tests execute them).

Run `python tools/make_notebooks.py` after changing a cell. Every notebook reads PATCHLAB_NB_QUICK=1
(set by the tests) to work on a small slice of the shipped set.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = """import os
from patchlab.runtime.models import load_model
from patchlab.core.prompts import PromptSet

QUICK = os.environ.get("PATCHLAB_NB_QUICK") == "1"   # the tests run every notebook on a small slice
model = load_model("smollm2-135m")                  # the offline default model (a TransformerLens TransformerBridge)
prompts = PromptSet.shipped().stratified(3 if QUICK else 40)
print(model.cfg.n_layers, "layers x", model.cfg.n_heads, "heads;", len(prompts), "two-hop items")"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_compositionality_gap": [
        (
            "md",
            "# 01 · The compositionality gap\n\nA model can know both hops of a question — *the Eiffel Tower is in "
            "France*, *the capital of France is Paris* — and still fail the composition. This notebook measures "
            "how often, per kind of two-hop chain, on the shipped prompt set.",
        ),
        ("code", SETUP),
        (
            "md",
            "Each item has a first hop (subject → bridge), a second hop (bridge → answer) and the composed question. "
            "An answer counts as right when it appears in the greedy continuation (aliases allowed).",
        ),
        (
            "code",
            "item = prompts[0]\nprint(item.hop1, '->', item.bridge)\nprint(item.hop2, '->', item.answer)\nprint(item.composed, '->', item.answer)",
        ),
        (
            "code",
            "from patchlab.methods.gap import evaluate_gap\n\ngap = evaluate_gap(model, prompts)\ngap.summary['all']",
        ),
        ("md", "The **gap** is the share of items with both hops right whose composed question is wrong."),
        (
            "code",
            "from patchlab.results.tables import gap_table\nfrom rich import print as rprint\n\nrprint(gap_table(gap).to_rich())",
        ),
        ("code", "gap.figure()"),
        (
            "code",
            "# the failures are what the next notebooks look into\nprint(len(gap.failures), 'failures, e.g.', gap.failures[:5])\n"
            "assert 0 <= gap.summary['all']['gap_share'] <= 1",
        ),
    ],
    "02_logit_lens": [
        (
            "md",
            "# 02 · Logit lens: where do the bridge and the answer appear?\n\nRead each layer's residual stream at the "
            "last position through the final norm and the unembedding, and follow the rank of the bridge entity "
            "(*France*) and of the answer (*Paris*), for composed questions the model gets right vs wrong.",
        ),
        ("code", SETUP),
        (
            "code",
            "from patchlab.methods.gap import evaluate_gap\nfrom patchlab.methods.lens import lens_items\n\ngap = evaluate_gap(model, prompts, progress=False)\n"
            "lens = lens_items(model, list(prompts), gap=gap)\nlens.first_top10   # first layer whose geometric-mean rank is <= 10",
        ),
        ("code", "lens.figure()"),
        ("md", "One prompt, every position: the top tokens per layer, with the bridge and answer tracked."),
        (
            "code",
            "from patchlab.methods.lens import top_tokens\n\nitem = prompts[0]\nview = top_tokens(model, item.composed, k=3, track_words=[item.bridge, item.answer])\nview.figure()",
        ),
        (
            "md",
            "**Bridge-entity intervention**: remove the bridge's unembedding direction from the residual stream at "
            "one layer and see how much the answer's probability drops, beside random control tokens.",
        ),
        (
            "code",
            "from patchlab.methods.lens import bridge_intervention\n\ncorrect = gap.correct_items(prompts)[:4 if QUICK else 16]\n"
            "iv = bridge_intervention(model, correct, layers=list(range(0, model.cfg.n_layers, 4 if QUICK else 2)))\niv.figure()",
        ),
    ],
    "03_locate_heads": [
        (
            "md",
            "# 03 · Locate the heads that carry the composition\n\nFor each failed composed question, patch one head's "
            "output (`blocks.L.attn.hook_z`) from the *guide* prompt — the question with the bridge written in, which "
            "the model answers right — and measure how much of the right answer comes back: the normalised effect on "
            "logit(answer) − logit(wrong answer). Attribution patching screens all heads with one backward pass; "
            "exact patching verifies the best ones.",
        ),
        ("code", SETUP),
        (
            "code",
            "from patchlab.methods.gap import evaluate_gap\nfrom patchlab.methods.locate import locate\n\ngap = evaluate_gap(model, prompts, progress=False)\n"
            "failures = gap.failed_items(prompts)[:4 if QUICK else 12]\n"
            "result = locate(model, failures, setup='guide', method='both', verify=10 if QUICK else 20)\nresult.heads(5)",
        ),
        (
            "code",
            "from patchlab.results.tables import locate_table\nfrom rich import print as rprint\n\nrprint(locate_table(result, 8).to_rich())",
        ),
        ("code", "result.figure()"),
        (
            "md",
            "**Where do the located heads look?** Each head's attention from the last token over the composed "
            "question and over the guide prompt, and its share on the subject's and the bridge's tokens, for "
            "questions the model answers right vs wrong (`patchlab heads`, see docs/attention.md). The menu picks "
            "the item shown in the heatmaps.",
        ),
        (
            "code",
            "from patchlab.methods.heads import attention_view\n\nlooked_at = failures + gap.correct_items(prompts)[:len(failures)]\n"
            "view = attention_view(model, looked_at, result.heads(2), gap=gap)\nview.summary",
        ),
        ("code", "view.figure()"),
        (
            "code",
            "# save it; `patchlab edit --heads-from DIR/result.json` reads it back\npaths = result.save('locate-out')\npaths",
        ),
    ],
    "04_edit_heads": [
        (
            "md",
            "# 04 · Edit the located heads\n\nA rank-one update of each located head's output columns (its slice of "
            "`W_O`, CREME's method done per head) that makes the failed composition come out right, proven with "
            "correction, paraphrase, generalization and irrelevance metrics. Every edit can be reverted to "
            "bit-identical weights.",
        ),
        ("code", SETUP),
        (
            "code",
            "from patchlab.methods.gap import evaluate_gap\nfrom patchlab.methods.locate import locate\n"
            "gap = evaluate_gap(model, prompts, progress=False)\nfailures = gap.failed_items(prompts)\n"
            "screen = locate(model, failures[:4], setup='guide', method='attribution', progress=False)\n"
            "heads = screen.heads(2)\nheads",
        ),
        (
            "code",
            "from patchlab.methods.edit import EditConfig, edit_each\nfrom patchlab.methods.editeval import evaluate_edits, kl_prompts\n\n"
            "unrelated, exclude = kl_prompts(list(prompts), gap)\n"
            "edits = edit_each(model, failures[:1 if QUICK else 10], heads, EditConfig(target='optimize'), unrelated=unrelated)\n"
            "report = evaluate_edits(model, edits, list(prompts), gap, exclude=exclude)\nreport.summary['correction']",
        ),
        ("code", "report.figure()"),
        ("md", "Apply one edit, look at the answer, and revert: the weights are bit-identical again."),
        (
            "code",
            "import torch\nfrom patchlab.runtime.scoring import greedy_continuations\n\n(item,), edit = edits[0].items, edits[0].edit\n"
            "before = {k: v.clone() for k, v in model.original_model.state_dict().items()}\n"
            "print('before:', greedy_continuations(model, [item.composed])[0])\nwith edit.applied(model):\n"
            "    print('edited:', greedy_continuations(model, [item.composed])[0], '| answer:', item.answer)\n"
            "after = model.original_model.state_dict()\nassert all(torch.equal(before[k], after[k]) for k in before)\nprint('reverted bit-exactly')",
        ),
        ("code", "path = edit.save('first.edit')   # safetensors + metadata (weights hash, tensors hash)\npath"),
    ],
    "05_carma_retune": [
        (
            "md",
            "# 05 · Re-tune with the CARMA regulariser\n\nCARMA (Aljaafari, Carvalho, Freitas 2025) adds two terms to a "
            "fine-tuning loss: an InfoNCE loss that keeps the tokens of one multi-token word close at each layer "
            "(mutual-information alignment), and a penalty on how much consecutive layers' outputs differ "
            "(stability). Here: plain fine-tuning vs CARMA on inverse dictionary modelling (definition → word), "
            "then accuracy and robustness to synonym substitution on held-out definitions.",
        ),
        (
            "code",
            "import os\nfrom patchlab.runtime.models import load_model\nfrom patchlab import tasks\n\n"
            "QUICK = os.environ.get('PATCHLAB_NB_QUICK') == '1'\nmodel = load_model('smollm2-135m')\n"
            "task = tasks.load('idm')\nprint(len(task.train), 'training pairs; e.g.', task.train[0].prompt, '->', task.train[0].answers[0])",
        ),
        (
            "code",
            "from patchlab.studies.carma import CarmaConfig\nfrom patchlab.studies.retune import restoring, retune\n\n"
            "steps = 3 if QUICK else 24\nheld_out = task.test['held-out'][:20 if QUICK else None]\nruns = {}\n"
            "for name, carma in [('plain', None), ('carma', CarmaConfig(lam=0.3, gamma=0.3, eta=0.2))]:\n"
            "    with restoring(model):   # every weight is put back bit-exactly afterwards\n"
            "        result = retune(model, task.train, carma=carma, params='attn', steps=steps, batch_size=4 if QUICK else 8, seed=0)\n"
            "        right = tasks.accuracy(model, held_out, task.max_new_tokens)\n"
            "        runs[name] = (result, sum(right) / len(right), tasks.synonym_retention(model, held_out, 0.25, max_new_tokens=task.max_new_tokens, right=right))\n"
            "{k: (round(acc, 3), ret) for k, (_, acc, ret) in runs.items()}",
        ),
        ("md", "The training curves: the task loss, and for CARMA its two terms."),
        ("code", "runs['carma'][0].figure()"),
        (
            "md",
            "On this model the benchmark (`benchmarks/bench_carma.py`, 3 seeds) finds no measurable difference "
            "between plain fine-tuning and CARMA; see the README for the table.",
        ),
    ],
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main() -> None:
    folder = Path(__file__).resolve().parent.parent / "notebooks"
    folder.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), folder / f"{name}.ipynb")
        print("wrote", folder / f"{name}.ipynb")


if __name__ == "__main__":
    main()
