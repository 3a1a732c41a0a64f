"""Re-tuning tasks: the shipped IDM pairs and synonym lexicon, the splits, the seeded synonym perturbation."""

from __future__ import annotations

import json
import re

import pytest

from patchlab.core.errors import PatchlabError
from patchlab.studies import tasks as T


def test_idm_ships_300_single_token_pairs_with_agreeing_articles(smol):
    qas = T.load_idm()
    assert len(qas) >= 300
    assert len({q.id for q in qas}) == len(qas) and len({q.answer for q in qas}) == len(qas)
    tok = smol.tokenizer
    multi = [q.answer for q in qas if len(tok(" " + q.answer, add_special_tokens=False)["input_ids"]) != 1]
    assert multi == []
    for q in qas:
        last = q.prompt.split()[-1]
        if last == "an":
            assert q.answer[0] in "aeiou" or q.answer == "hour", q
        elif last == "a":
            assert q.answer[0] not in "aeiou" or q.answer == "uniform", q


def test_idm_split_is_seeded_and_disjoint():
    a, b, c = T.idm_task(seed=0), T.idm_task(seed=0), T.idm_task(seed=1)
    assert [q.id for q in a.train] == [q.id for q in b.train]
    held = a.test["held-out"]
    assert {q.answer for q in a.train}.isdisjoint({q.answer for q in held})
    assert len(held) == round(0.3 * (len(held) + len(a.train)))
    assert {q.id for q in held} != {q.id for q in c.test["held-out"]}
    assert a.max_new_tokens == 1


def test_twohop_split(shipped):
    task = T.twohop_task(shipped, seed=3)
    composed_train = {q.id.split("/")[0] for q in task.train if q.id.endswith("/composed")}
    held = {q.id.split("/")[0] for q in task.test["composed"]}
    assert composed_train.isdisjoint(held) and len(composed_train | held) == len(shipped)
    assert len(held) == round(0.5 * len(shipped))
    hops = [q for q in task.train if q.id.endswith("/hop1") or q.id.endswith("/hop2")]
    assert len(hops) == 2 * len(shipped)  # every item's facts are trained on
    assert {q.id.split("/")[0] for q in task.test["paraphrase"]} <= held
    it = shipped[0]
    hop1 = next(q for q in task.train if q.id == f"{it.id}/hop1")
    assert hop1.prompt == it.hop1 and hop1.answers == it.bridges


def test_load_by_name_and_unknown():
    assert T.load("idm").name == "idm"
    with pytest.raises(PatchlabError, match="task: unknown task 'qa'"):
        T.load("qa")


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", ":2: bad JSON"),
        ('{"id": "x", "prompt": "p"}', ":2: field 'answer'"),
        ('{"id": "a", "prompt": "p", "answer": "w"}', ":2: duplicate id 'a'"),
        ("[1]", ":2: expected a JSON object"),
    ],
)
def test_idm_file_errors_name_the_line(tmp_path, line, needle):
    path = tmp_path / "idm.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p", "answer": "w"}) + "\n" + line + "\n")
    with pytest.raises(PatchlabError) as exc:
        T.load_idm(path)
    assert str(path) in str(exc.value) and needle in str(exc.value)


def test_shipped_lexicon_covers_the_prompts():
    lex = T.load_synonyms()
    assert len(lex) >= 100 and all(w == w.lower() and syns for w, syns in lex.items())
    qas = T.load_idm()
    counts = [len(T.replaceable(q.prompt, lex)) for q in qas]
    assert sum(c >= 1 for c in counts) / len(qas) >= 0.8  # most definitions can be perturbed
    assert sum(c >= 3 for c in counts) / len(qas) >= 0.2  # and many at several places


@pytest.mark.parametrize(
    "text, needle",
    [
        ("big\n", ":1: expected"),
        ("Big\tlarge\n", ":1: expected"),
        ("big\tlarge\nbig\thuge\n", ":2: word 'big' listed twice"),
        ("big\tlarge|\n", ":1: expected"),
    ],
)
def test_lexicon_errors_name_the_line(tmp_path, text, needle):
    path = tmp_path / "syn.tsv"
    path.write_text(text)
    with pytest.raises(PatchlabError) as exc:
        T.load_synonyms(path)
    assert needle in str(exc.value) and str(path) in str(exc.value)


LEX = {w: (f"S{w.upper()}",) for w in "one two three four five six seven eight nine ten".split()}


@pytest.mark.parametrize("rate, k", [(0.25, 3), (0.40, 4), (0.0, 0), (1.0, 10), (0.01, 1)])
def test_perturb_replaces_the_share_of_replaceable_words(rate, k):
    prompt = "One one two three four five six seven eight nine ten Ten"  # capitalised words are names: kept
    out = T.perturb(prompt, rate, seed=0, lexicon=LEX)
    assert len(re.findall(r"\bS[A-Z]+\b", out)) == k
    assert out.startswith("One ") and out.endswith(" Ten")
    assert out == T.perturb(prompt, rate, seed=0, lexicon=LEX)  # seeded


def test_perturb_seed_changes_the_choice_and_keeps_text_around():
    prompt = "one, two; three four (five) six seven eight nine ten."
    outs = {T.perturb(prompt, 0.25, seed=s, lexicon=LEX) for s in range(10)}
    assert len(outs) > 3
    for out in outs:
        assert re.sub(r"S[A-Z]+", "w", out).count(",") == 1 and out.endswith(".") and "(" in out
    assert T.perturb("nothing to replace here", 0.4, lexicon=LEX) == "nothing to replace here"
    with pytest.raises(PatchlabError, match="rate"):
        T.perturb(prompt, 1.5, lexicon=LEX)


def test_perturb_with_shipped_lexicon():
    prompt = "A large grey animal with a trunk is called an"
    out = T.perturb(prompt, 0.4, seed=0)
    assert out != prompt and out.endswith("is called an")
    assert T.perturb("The Great Wall of China is located in", 0.4, seed=0).startswith("The Great Wall of China is ")


@pytest.mark.real
def test_idm_accuracy_and_synonym_retention_on_the_real_model(smol):
    held = T.idm_task().test["held-out"][:40]
    right = T.accuracy(smol, held, max_new_tokens=1)
    assert 0.1 <= sum(right) / len(right) <= 0.6  # SmolLM2 gets about a quarter of unseen definitions
    r = T.synonym_retention(smol, held, 0.4, right=right, draws=2)
    assert 0 < r["items"] <= sum(right) and r["n"] <= 2 * r["items"]
    assert r["retention"] == pytest.approx(r["kept"] / r["n"])
    assert T.synonym_retention(smol, held, 0.0, right=right)["n"] == 0  # nothing changed, nothing counted
    ev = T.evaluate_task(smol, T.idm_task(), limit=12)
    assert ev["n"] == {"train": 12, "held-out": 12} and set(ev["synonyms"]["held-out"]) == {"0.25", "0.40"}
