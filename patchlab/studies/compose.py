"""Compositionality probes across models, after Dhar & Søgaard 2024, "From Words to Worlds:
Compositionality for Cognitive Architectures" (three task types; they found that scale helps and that
instruction tuning often hurts).

* substitutivity (after Pavlick & Callison-Burch 2016's adjective-noun entailment data): does
  "Kim saw a fake gun." entail "Kim saw a gun."? No for privative adjectives, yes otherwise;
* systematicity (after PLANE, Bertolini et al. 2022): the noun is also replaced by its hypernym, so the
  answer must combine the adjective's class with noun -> hypernym ("a fake gun" is a fake weapon but
  not a weapon; "a small elephant" is an animal but not a small animal);
* over-generalisation: per layer, is an endocentric phrase ("brown dog") closer to its head noun ("dog")
  than an exocentric compound with the same head ("hot dog") is? Hidden states at the last token of
  "Here is the <phrase>" (every phrase ends in the head's token), centred by the mean over all phrases
  of the layer, compared by cosine; ties (the embedding layer, where all three are the same token) count
  half, so chance is 0.5.

Entailment prompts carry `shots` demonstrations (the probe files' `"split": "demo"` items, nouns never
used in the test items) and are scored by the log-odds of the answer tokens, log p(yes) - log p(no)
(" yes" and " Yes" pooled, likewise no). Labels are balanced, so chance is 0.5 for the threshold-free
AUROC, for the accuracy of the model's own preference (log-odds > 0), and for the accuracy at the median
log-odds (which calibrates away a yes / no bias). Probe data ship in patchlab/data/compose_*.jsonl
(written by tools/make_compose.py).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.progress import track
from patchlab.core.prompts import check_str, jsonl_lines
from patchlab.methods.lens import capture_resid
from patchlab.results.base import Result
from patchlab.runtime.bridge import hf_module
from patchlab.runtime.identity import provenance
from patchlab.runtime.scoring import encode, length_batches, map_last_logits, pad_id, pad_right

TASKS = ("substitutivity", "systematicity", "overgeneralisation")
ENTAILMENT = ("substitutivity", "systematicity")
FIELDS = {
    "substitutivity": ("id", "premise", "hypothesis", "label"),
    "systematicity": ("id", "premise", "hypothesis", "label"),
    "overgeneralisation": ("id", "noun", "phrase", "exocentric"),
}
LABELS = ("yes", "no")
DEFAULT_SHOTS = 2
QUESTION = "Does the premise entail the hypothesis?"
FRAME = "Here is the {}"
N_PERMUTATIONS = 2000
PROBE_BATCH = 8  # prompts per forward pass: the logits of a 262k vocabulary (Gemma) are large
# instruction tuning of the offline models (None: not known for a model given by name)
INSTRUCTION_TUNED = {"smollm2-135m": True, "gemma3-270m": False}


# ------------------------------------------------------------------------------------------- data


def probe_path(task: str) -> Path:
    """The shipped probe file of `task`."""
    check_tasks([task])
    return Path(str(resources.files("patchlab") / "data" / f"compose_{task}.jsonl"))


def check_tasks(tasks: Sequence[str], where: str = "tasks") -> list[str]:
    """Known task names, in the order given, without repeats."""
    out = list(dict.fromkeys(tasks))
    bad = [t for t in out if t not in TASKS]
    if bad or not out:
        raise PatchlabError(
            f"unknown task {bad[0]!r} (use {', '.join(TASKS)})" if bad else "no tasks given", where=where
        )
    return out


def load_probes(task: str, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Read and validate one task's JSONL probe file (errors name file:line:field); split defaults to 'test'."""
    check_tasks([task], "task")
    path = Path(path) if path is not None else probe_path(task)
    items, seen = [], {}
    for number, text in jsonl_lines(path):
        where = f"{path}:{number}"
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise PatchlabError(f"bad JSON ({str(exc).splitlines()[0][:120]})", where=where) from None
        if not isinstance(obj, dict):
            raise PatchlabError(f"expected a JSON object, got {type(obj).__name__}", where=where)
        for key in FIELDS[task]:
            if key not in obj:
                raise PatchlabError(f"missing required field '{key}'", where=where)
            check_str(obj[key], where, key)
        if "label" in FIELDS[task] and obj["label"] not in LABELS:
            raise PatchlabError(f"field 'label' must be 'yes' or 'no', got {obj['label']!r}", where=where)
        split = obj.setdefault("split", "test")
        if split not in ("test", "demo"):
            raise PatchlabError(f"field 'split' must be 'test' or 'demo', got {split!r}", where=where)
        if task == "overgeneralisation":
            head = obj["noun"].split()[-1]
            if obj["phrase"].split()[-1] != head or obj["exocentric"].split()[-1] != head:
                raise PatchlabError(f"'phrase' and 'exocentric' must end in the noun {head!r}", where=where)
        if obj["id"] in seen:
            raise PatchlabError(f"duplicate id {obj['id']!r} (first on line {seen[obj['id']]})", where=where)
        seen[obj["id"]] = number
        items.append(obj)
    if not any(it["split"] == "test" for it in items):
        raise PatchlabError("no test items", where=str(path))
    return items


def split(items: Sequence[dict[str, Any]], which: str) -> list[dict[str, Any]]:
    return [it for it in items if it["split"] == which]


# ------------------------------------------------------------------------------------ entailment


def entailment_block(item: dict[str, Any], answer: str | None = None) -> str:
    """One premise / hypothesis / question block, answered (a demonstration) or open."""
    text = f"Premise: {item['premise']}\nHypothesis: {item['hypothesis']}\n{QUESTION} Answer:"
    return text + (f" {answer}\n\n" if answer else "")


def entailment_prompt(item: dict[str, Any], demos: Sequence[dict[str, Any]]) -> str:
    return "".join(entailment_block(d, d["label"]) for d in demos) + entailment_block(item)


def pick_demos(demos: Sequence[dict[str, Any]], shots: int) -> list[dict[str, Any]]:
    """The first `shots` demonstrations, alternating yes / no (yes first) as far as the pool allows."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise PatchlabError(f"must be an int >= 0, got {shots!r}", param="shots")
    pools = {y: [d for d in demos if d["label"] == y] for y in LABELS}
    out = []
    for i in range(shots):
        want = LABELS[i % 2]
        pool = pools[want] or pools[LABELS[1 - i % 2]]
        if not pool:
            raise PatchlabError(f"{shots} shots asked but the probe file has {len(demos)} demo items", param="shots")
        out.append(pool.pop(0))
    return out


def answer_ids(model, word: str) -> list[int]:
    """First tokens of ' word' and ' Word' (deduplicated): the answer's spellings pooled in the log-odds."""
    ids = []
    for w in (word, word.capitalize()):
        toks = model.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if toks and toks[0] not in ids:
            ids.append(int(toks[0]))
    return ids


def yes_no_logodds(model, prompts: Sequence[str], batch_size: int = PROBE_BATCH) -> Float[Tensor, " n"]:
    """log p(yes) - log p(no) at each prompt's last position, each side pooled over its spellings."""
    yes, no = answer_ids(model, "yes"), answer_ids(model, "no")

    def logodds(logits: Tensor, _rows: list[int]) -> Tensor:
        logp = torch.log_softmax(logits.double(), -1)
        return torch.logsumexp(logp[:, yes], -1) - torch.logsumexp(logp[:, no], -1)

    return map_last_logits(model, prompts, logodds, batch_size)


def auroc(scores: Float[Tensor, " n"], positive: Tensor) -> float:
    """Area under the ROC curve of `scores` for the boolean labels (ties count half): Mann-Whitney U / n1 n0."""
    ranks = _midranks(scores)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return float("nan")
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _midranks(scores: Tensor) -> Tensor:
    """1-based ranks, tied values sharing their mean rank."""
    s = scores.double().numpy()
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return torch.from_numpy(ranks)


def permutation_p(scores: Tensor, positive: Tensor, n_perm: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of |AUROC - 0.5| under random relabelling (labels shuffled, counts kept)."""
    ranks = _midranks(scores)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(len(ranks), generator=gen)[:n1] for _ in range(n_perm)])
    null = (ranks[perms].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    observed = abs(auroc(scores, positive) - 0.5)
    return float(((null - 0.5).abs() >= observed - 1e-12).sum() + 1) / (n_perm + 1)


def entailment_summary(scores: Tensor, labels: Sequence[str], groups: Sequence[str] | None = None) -> dict[str, Any]:
    """AUROC (with permutation p), accuracy of the model's own preference and at the median log-odds, yes-rate."""
    positive = torch.tensor([y == "yes" for y in labels])
    median = float(scores.median())
    own, calibrated = scores > 0, scores > median
    out: dict[str, Any] = {
        "n": len(labels), "auroc": auroc(scores, positive), "p_value": permutation_p(scores, positive),
        "accuracy": float((own == positive).double().mean()),
        "calibrated_accuracy": float((calibrated == positive).double().mean()),
        "yes_rate": float(own.double().mean()), "chance": 0.5, "mean_logodds": float(scores.mean()), "threshold": median,
    }  # fmt: skip
    if groups is not None:
        by: dict[str, Any] = {}
        for g in sorted(set(groups)):
            idx = torch.tensor([x == g for x in groups])
            by[g] = {
                "n": int(idx.sum()),
                "label_yes": float(positive[idx].double().mean()),
                "accuracy": float((own[idx] == positive[idx]).double().mean()),
                "calibrated_accuracy": float((calibrated[idx] == positive[idx]).double().mean()),
            }
        out["by_group"] = by
    return out


def score_entailment(
    model, items: Sequence[dict[str, Any]], shots: int = DEFAULT_SHOTS, batch_size: int = PROBE_BATCH
) -> dict[str, Any]:
    """Score one entailment task's test items with `shots` demonstrations from its demo items."""
    tests, demos = split(items, "test"), pick_demos(split(items, "demo"), shots)
    prompts = [entailment_prompt(it, demos) for it in tests]
    scores = yes_no_logodds(model, prompts, batch_size)
    groups = [f"{it.get('pattern', 'all')}/{it.get('adj_class', 'all')}" for it in tests]
    out = entailment_summary(scores, [it["label"] for it in tests], groups)
    out.update(
        shots=len(demos),
        score="log p(yes) - log p(no)",
        items=[[it["id"], round(float(s), 4)] for it, s in zip(tests, scores)],
    )
    return out


# ------------------------------------------------------------------------------- over-generalisation


def phrase_states(
    model, phrases: Sequence[str], frame: str = FRAME, batch_size: int = PROBE_BATCH, progress: str | None = None
) -> Float[Tensor, "n s d"]:
    """Residual stream entering every block (and the final one) at the last token of each framed phrase."""
    seqs = [encode(model, frame.format(p), where=f"phrase[{i}]") for i, p in enumerate(phrases)]
    pad = pad_id(model)
    out: list[Tensor | None] = [None] * len(seqs)
    batches = list(length_batches([len(s) for s in seqs], batch_size))
    with torch.inference_mode():
        for rows in track(batches, progress):
            tokens, lengths = pad_right([seqs[i] for i in rows], pad)
            _, resid = capture_resid(model, tokens.to(model.cfg.device), lengths.to(model.cfg.device))
            for j, i in enumerate(rows):
                out[i] = resid[:, j, 0].float().cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def score_overgeneralisation(
    model,
    items: Sequence[dict[str, Any]],
    frame: str = FRAME,
    batch_size: int = PROBE_BATCH,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per stream, the share of triples whose endocentric phrase is closer (centred cosine) to the noun
    than the exocentric compound is; ties count half. Also the mean margin, and the layer-mean share
    (streams 1..n, i.e. every block's output) with a bootstrap CI over compounds."""
    tests = split(items, "test")
    phrases = sorted({p for it in tests for p in (it["noun"], it["phrase"], it["exocentric"])})
    index = {p: i for i, p in enumerate(phrases)}
    states = phrase_states(model, phrases, frame, batch_size).double()  # [p, s, d]
    states = states - states.mean(0, keepdim=True)
    unit = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    pick = lambda key: unit[[index[it[key]] for it in tests]]  # noqa: E731
    noun, endo, exo = pick("noun"), pick("phrase"), pick("exocentric")
    margin = (endo * noun).sum(-1) - (exo * noun).sum(-1)  # [item, stream]
    tol = 1e-9
    wins = (margin > tol).double() + 0.5 * (margin.abs() <= tol).double()
    share = wins.mean(0)
    compounds = sorted({it["exocentric"] for it in tests})
    by_compound = torch.stack(
        [wins[[i for i, it in enumerate(tests) if it["exocentric"] == c]].mean(0) for c in compounds]
    )
    layer_mean = by_compound[:, 1:].mean(1)  # per compound, over every block's output
    gen = torch.Generator().manual_seed(seed)
    boot = layer_mean[torch.randint(len(compounds), (n_boot, len(compounds)), generator=gen)].mean(1)
    best = int(share[1:].argmax()) + 1
    return {
        "n": len(tests), "n_compounds": len(compounds), "chance": 0.5, "frame": frame,
        "share": share.tolist(), "mean_margin": margin.mean(0).tolist(),
        "layer_mean": float(wins[:, 1:].mean()), "ci95": [float(boot.quantile(0.025)), float(boot.quantile(0.975))],
        "final": float(share[-1]), "best_stream": best, "best": float(share[best]),
        "worst_compounds": [c for _, c in sorted(zip(layer_mean.tolist(), compounds))[:5]],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ compare


@dataclass
class CompareResult(Result):
    """Compositionality probe scores and the two-hop gap per model, with what each model is."""

    kind = "compare"
    heading = "Compositionality across models"
    intro = (
        "Substitutivity, systematicity and over-generalisation probes (after Dhar & Søgaard 2024) and the "
        "two-hop gap, per model."
    )
    order = 90
    models: list[str]
    tasks: list[str]
    scores: dict[str, dict[str, dict[str, Any]]]  # model -> task -> summary (entailment: auroc ...; overgen: share ...)
    gap: dict[str, dict[str, Any]]  # model -> evaluate_gap summary of all items (empty if not run)
    info: dict[str, dict[str, Any]]  # model -> parameters, layers, d_model, instruction_tuned, seconds
    meta: dict[str, Any] = field(default_factory=dict)

    def headline(self, model: str, task: str) -> float:
        """The one number per task: AUROC (entailment) or the layer-mean share (over-generalisation)."""
        s = self.scores[model][task]
        return s["auroc"] if task in ENTAILMENT else s["layer_mean"]

    def table(self):
        from patchlab.results import tables

        return tables.compare_table(self)

    def figure(self):
        from patchlab.results.figures import compare_figure

        return compare_figure(self)


def model_info(model, name: str) -> dict[str, Any]:
    """Size and kind of a loaded model (instruction tuning from the offline table, or the name)."""
    tuned = INSTRUCTION_TUNED.get(name)
    if tuned is None and any(tag in name.lower() for tag in ("instruct", "-it", "chat")):
        tuned = True
    return {
        "parameters": int(sum(p.numel() for p in hf_module(model).parameters())),
        "n_layers": int(model.cfg.n_layers),
        "d_model": int(model.cfg.d_model),
        "instruction_tuned": tuned,
    }


def probe_model(
    model,
    tasks: Sequence[str],
    probes: dict[str, list[dict[str, Any]]],
    shots: int = DEFAULT_SHOTS,
    batch_size: int = PROBE_BATCH,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Every task's summary for one loaded model."""
    out = {}
    for task in track(list(tasks), "probing" if progress else None):
        if task in ENTAILMENT:
            out[task] = score_entailment(model, probes[task], shots, batch_size)
        else:
            out[task] = score_overgeneralisation(model, probes[task], batch_size=batch_size)
    return out


def compare(
    models: Sequence[str],
    tasks: Sequence[str] = TASKS,
    gap: bool = True,
    prompt_set=None,
    shots: int = DEFAULT_SHOTS,
    probe_files: dict[str, str | Path] | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = PROBE_BATCH,
    loader: Callable[..., Any] | None = None,
    progress: bool = True,
    placement: dict[str, Any] | None = None,
) -> CompareResult:
    """Probe each model (loaded one at a time, freed before the next) on `tasks` and, with `gap`, measure its
    two-hop compositionality gap on `prompt_set` (default: the shipped set). `placement` holds `load_model`'s
    device_map / max_memory, given to every model."""
    import time

    from patchlab.core.prompts import PromptSet
    from patchlab.methods.gap import evaluate_gap
    from patchlab.runtime.models import load_model

    names = list(dict.fromkeys(models))
    if not names:
        raise PatchlabError("no models given", param="models")
    tasks = check_tasks(tasks)
    probes = {t: load_probes(t, (probe_files or {}).get(t)) for t in tasks}
    ps = (prompt_set if prompt_set is not None else PromptSet.shipped()) if gap else None
    loader = loader or load_model
    scores, gaps, info = {}, {}, {}
    for name in names:
        start = time.perf_counter()
        model = loader(name, device=device, dtype=dtype, **(placement or {}))
        scores[name] = probe_model(model, tasks, probes, shots, batch_size, progress)
        if ps is not None:
            gaps[name] = evaluate_gap(model, ps, batch_size=batch_size, progress=progress).summary["all"]
        info[name] = {**model_info(model, name), "seconds": round(time.perf_counter() - start, 1)}
        del model
        gc.collect()
    meta = provenance(
        None,
        shots=shots,
        prompt_set=getattr(ps, "source", None),
        dtype=str(dtype).replace("torch.", ""),
        frame=FRAME,
        question=QUESTION,
    )
    return CompareResult(models=names, tasks=tasks, scores=scores, gap=gaps, info=info, meta=meta)


__all__ = [
    "CompareResult",
    "TASKS",
    "auroc",
    "compare",
    "load_probes",
    "probe_model",
    "score_entailment",
    "score_overgeneralisation",
]
