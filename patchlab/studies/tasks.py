"""Re-tuning tasks with data the project wrote: two-hop QA, inverse dictionary modelling, synonym robustness.

* `twohop`: train on every item's hop1 and hop2 facts and on the composed queries of a seeded share of
  the items; test on the composed queries of the other items and on their paraphrases.
* `idm` (inverse dictionary modelling): a definition whose continuation is the word it defines
  ("A large grey animal with a trunk is called an" -> " elephant"); `data/idm.jsonl` ships 502 pairs
  whose answer is one token of the SmolLM2 tokenizer; train and test words never overlap.
* synonym substitution: replace a seeded 25% / 40% of a prompt's replaceable words (lowercase words of
  `data/synonyms.tsv`) by a synonym; robustness is the share of previously-correct items that stay correct.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import PromptSet, TwoHopItem
from patchlab.runtime.scoring import DEFAULT_BATCH, MAX_NEW_TOKENS, correct

TASKS = ("twohop", "idm")
RATES = (0.25, 0.40)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@dataclass(frozen=True)
class QA:
    """One query: a prompt and its accepted answers; the first answer is the training target."""

    id: str
    prompt: str
    answers: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass
class Task:
    """Training queries, named held-out test sets, and how many greedy tokens decide correctness."""

    name: str
    train: list[QA]
    test: dict[str, list[QA]]
    max_new_tokens: int = MAX_NEW_TOKENS
    meta: dict[str, Any] = field(default_factory=dict)


def _data_path(name: str) -> Path:
    with resources.as_file(resources.files("patchlab") / "data" / name) as path:
        return Path(path)


# --- inverse dictionary modelling ----------------------------------------------------------------


def load_idm(path: str | Path | None = None) -> list[QA]:
    """Read an IDM JSONL file (id, prompt, answer per line); errors name file:line:field."""
    path = Path(path) if path is not None else _data_path("idm.jsonl")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise PatchlabError(f"cannot read IDM file ({exc})".splitlines()[0], where=str(path)) from None
    out: list[QA] = []
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise PatchlabError(f"bad JSON ({str(exc).splitlines()[0][:120]})", where=where) from None
        if not isinstance(obj, dict):
            raise PatchlabError("expected a JSON object", where=where)
        for key in ("id", "prompt", "answer"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise PatchlabError(f"field '{key}' must be a non-empty string", where=where)
        if obj["id"] in seen:
            raise PatchlabError(f"duplicate id {obj['id']!r}", where=where)
        seen.add(obj["id"])
        out.append(QA(obj["id"], obj["prompt"], (obj["answer"],)))
    if not out:
        raise PatchlabError("IDM file is empty", where=f"{path}:1")
    return out


def split(items: Sequence[Any], test_share: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded (train, test) split; the test part is round(test_share * n) items, never all or none."""
    if not 0.0 < test_share < 1.0:
        raise PatchlabError(f"test share must be in (0, 1), got {test_share}", param="test_share")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = min(max(1, round(test_share * len(items))), len(items) - 1)
    test = set(order[:n_test])
    return [it for i, it in enumerate(items) if i not in test], [it for i, it in enumerate(items) if i in test]


def idm_task(seed: int = 0, test_share: float = 0.3, path: str | Path | None = None) -> Task:
    """IDM definitions -> words, split by word; correctness is the first greedy token (the word itself)."""
    train, test = split(load_idm(path), test_share, seed)
    return Task("idm", train, {"held-out": test}, max_new_tokens=1, meta={"seed": seed, "test_share": test_share})


# --- two-hop QA ------------------------------------------------------------------------------------


def twohop_task(
    prompt_set: PromptSet | Sequence[TwoHopItem] | None = None, seed: int = 0, test_share: float = 0.5
) -> Task:
    """Train on hop1 + hop2 of every item and the composed query of a seeded share; test on the rest."""
    items = list(prompt_set if prompt_set is not None else PromptSet.shipped())
    seen, held = split(items, test_share, seed)
    train = [QA(f"{it.id}/hop1", it.hop1, it.bridges) for it in items]
    train += [QA(f"{it.id}/hop2", it.hop2, it.answers) for it in items]
    train += [QA(f"{it.id}/composed", it.composed, it.answers) for it in seen]
    test = {
        "composed": [QA(f"{it.id}/composed", it.composed, it.answers) for it in held],
        "paraphrase": [
            QA(f"{it.id}/paraphrase{j}", p, it.answers) for it in held for j, p in enumerate(it.paraphrases)
        ],
    }
    return Task("twohop", train, test, meta={"seed": seed, "test_share": test_share, "items": len(items)})


def load(name: str, seed: int = 0, prompt_set: PromptSet | None = None) -> Task:
    """A task by name: "twohop" (on `prompt_set`, default the shipped set) or "idm"."""
    if name == "idm":
        return idm_task(seed)
    if name == "twohop":
        return twohop_task(prompt_set, seed)
    raise PatchlabError(f"unknown task '{name}' (use {' | '.join(TASKS)})", param="task")


# --- synonym substitution --------------------------------------------------------------------------


def load_synonyms(path: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """Read a `word<TAB>syn|syn` lexicon ('#' comments); errors name file:line."""
    path = Path(path) if path is not None else _data_path("synonyms.tsv")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise PatchlabError(f"cannot read synonym lexicon ({exc})".splitlines()[0], where=str(path)) from None
    lexicon: dict[str, tuple[str, ...]] = {}
    for number, text in enumerate(lines, start=1):
        text = text.rstrip("\r")
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        parts = text.split("\t")
        syns = tuple(s.strip() for s in parts[1].split("|")) if len(parts) == 2 else ()
        word = parts[0].strip()
        if len(parts) != 2 or not _WORD.fullmatch(word) or word != word.lower() or not all(syns):
            raise PatchlabError("expected 'word<TAB>synonym|synonym' with a lowercase word", where=f"{path}:{number}")
        if word in lexicon:
            raise PatchlabError(f"word {word!r} listed twice", where=f"{path}:{number}")
        lexicon[word] = syns
    if not lexicon:
        raise PatchlabError("synonym lexicon is empty", where=str(path))
    return lexicon


def replaceable(prompt: str, lexicon: dict[str, tuple[str, ...]]) -> list[tuple[int, int]]:
    """(start, end) of every lowercase word of `prompt` that the lexicon has synonyms for."""
    return [m.span() for m in _WORD.finditer(prompt) if m.group() in lexicon]


def perturb(prompt: str, rate: float, seed: int = 0, lexicon: dict[str, tuple[str, ...]] | None = None) -> str:
    """Replace round(rate * n) (at least one) of the n replaceable words by a synonym, seeded per prompt.

    A prompt without replaceable words, or rate 0, comes back unchanged.
    """
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
        raise PatchlabError(f"rate must be in [0, 1], got {rate!r}", param="rate")
    lexicon = lexicon if lexicon is not None else _default_lexicon()
    spans = replaceable(prompt, lexicon)
    k = max(1, math.floor(rate * len(spans) + 0.5)) if spans and rate > 0 else 0
    if not k:
        return prompt
    rng = random.Random(f"{seed}|{rate}|{prompt}")
    chosen = sorted(rng.sample(spans, k))
    out, last = [], 0
    for start, end in chosen:
        out += [prompt[last:start], rng.choice(lexicon[prompt[start:end]])]
        last = end
    return "".join(out) + prompt[last:]


_LEXICON: dict[str, tuple[str, ...]] | None = None


def _default_lexicon() -> dict[str, tuple[str, ...]]:
    global _LEXICON
    if _LEXICON is None:
        _LEXICON = load_synonyms()
    return _LEXICON


# --- evaluation ------------------------------------------------------------------------------------


def accuracy(
    model,
    qas: Sequence[QA],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH,
    progress: str | None = None,
) -> list[bool]:
    """Is each query answered right (its greedy continuation contains an accepted answer)?"""
    if not qas:
        return []
    ok, _ = correct(
        model, [q.prompt for q in qas], [q.answers for q in qas], max_new_tokens, batch_size, progress=progress
    )
    return ok


def synonym_retention(
    model,
    qas: Sequence[QA],
    rate: float,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    right: Sequence[bool] | None = None,
    draws: int = 3,
) -> dict[str, Any]:
    """Share of the queries answered right on their own prompt that stay right with synonyms substituted.

    Every right query is perturbed `draws` times (seeds seed, seed + 1, ...); only perturbations that
    change the prompt count. `right` is the per-query correctness on the plain prompts when known.
    """
    right = list(right) if right is not None else accuracy(model, qas, max_new_tokens)
    changed = [(q, perturb(q.prompt, rate, seed + d)) for q, ok in zip(qas, right) if ok for d in range(draws)]
    changed = list(dict.fromkeys((q, p) for q, p in changed if p != q.prompt))  # a repeated draw counts once
    kept = accuracy(model, [QA(q.id, p, q.answers) for q, p in changed], max_new_tokens)
    return {
        "rate": rate,
        "draws": draws,
        "items": len({q.id for q, _ in changed}),
        "n": len(changed),
        "kept": int(sum(kept)),
        "retention": float(sum(kept) / len(changed)) if changed else None,
    }


def evaluate_task(
    model, task: Task, rates: Sequence[float] = RATES, seed: int = 0, limit: int | None = None, train: bool = True
) -> dict[str, Any]:
    """Accuracy on (a seeded sample of `limit` of) the train queries and every test set, and synonym
    retention on the test sets at each rate."""

    def sample(qas: list[QA]) -> list[QA]:
        if limit is None or len(qas) <= limit:
            return qas
        return [qas[i] for i in sorted(random.Random(seed).sample(range(len(qas)), limit))]

    sets = ({"train": sample(task.train)} if train else {}) | {k: sample(v) for k, v in task.test.items()}
    out: dict[str, Any] = {"accuracy": {}, "n": {}, "synonyms": {}}
    for name, qas in sets.items():
        right = accuracy(model, qas, task.max_new_tokens)
        out["accuracy"][name] = float(sum(right) / len(right)) if right else None
        out["n"][name] = len(qas)
        if name != "train":
            out["synonyms"][name] = {
                f"{r:.2f}": synonym_retention(model, qas, r, seed, task.max_new_tokens, right) for r in rates
            }
    return out
