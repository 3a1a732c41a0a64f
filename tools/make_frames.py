#!/usr/bin/env python3
"""Build patchlab/data/twohop_heldout.jsonl: a second paraphrase family of the shipped two-hop items, in
*other syntactic frames* than the shipped composed queries and paraphrases.

Held out: no edit, optimisation, preservation set, covariance or setting choice in patchlab reads this
file; `patchlab.methods.editeval` scores edits on it only. One line per shipped item:

    {"id": "landmark-capital-0000", "question": "What is the capital of the country where the Eiffel Tower is
     located?", "frames": {"qa": "Q: What is ...?\\nA:", "possessive": "The Eiffel Tower's country's capital
     city is", "relative": "In the country where the Eiffel Tower is located, the capital city is",
     "passive": "The country where the Eiffel Tower is located is governed from the city of",
     "distractor": "The train to the coast was late again this morning. The capital of ..."}}

The frames: `qa` (a question and an answer cue), `possessive` (a possessive chain), `relative` (the
relative clause first), `passive` (a passive construction), `distractor` (an unrelated sentence before
the item's own composed query). `question` is what the chat frame asks; `patchlab` renders it with the
model's own chat template at evaluation time (models without one have no chat frame).

Deterministic, stdlib only. Usage: python tools/make_frames.py [OUTPUT_PATH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_twohop as T  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "patchlab" / "data" / "twohop_heldout.jsonl"

# how the first hop reads in a relative clause: "the country where {s} ..."
WHERE = {
    "landmark": "is located",
    "person": "was born",
    "company": "is headquartered",
    "city": "is located",
    "dish": "originated",
}
# the subject's country as a possessive chain's first link
HOME = {"landmark": "country", "person": "homeland", "company": "home country", "city": "country", "dish": "homeland"}

# Written for this file; none appears in patchlab/data/prefixes.txt (the editor's context prefixes).
DISTRACTORS = [
    "The train to the coast was late again this morning.",
    "My neighbour has started keeping bees in the garden.",
    "It rained for most of the afternoon, so we stayed in.",
    "She finally repaired the old bicycle last weekend.",
    "The bakery on the corner now opens at six.",
    "We spent the evening sorting through boxes of old photographs.",
    "The meeting was moved to Thursday because of the holiday.",
    "His sister is learning to play the cello.",
]

# (work role) -> creator noun, past tense, past participle
ROLE = {
    "book": ("author", "wrote", "written"),
    "play": ("playwright", "wrote", "written"),
    "painting": ("painter", "painted", "painted"),
    "sculpture": ("sculptor", "sculpted", "sculpted"),
    "music": ("composer", "composed", "composed"),
}


def country_frames(first: str, second: str, s: str) -> dict[str, str]:
    """Frames of a subject -> country -> attribute chain; `s` is the subject phrase (with its article)."""
    where, home = WHERE[first], HOME[first]
    poss = T.cap(T.possessive(s))
    clause = f"the country where {s} {where}"
    if second == "capital":
        question = f"What is the capital of {clause}?"
        frames = {
            "possessive": f"{poss} {home}'s capital city is",
            "relative": f"In {clause}, the capital city is",
            "passive": f"{T.cap(clause)} is governed from the city of",
        }
    elif second == "currency":
        question = f"Which currency is used in {clause}?"
        frames = {
            "possessive": f"{poss} {home}'s currency is the",
            "relative": f"In {clause}, the money in use is the",
            "passive": f"Goods in {clause} are paid for with the",
        }
    elif second == "language":
        question = f"Which language do most people speak in {clause}?"
        frames = {
            "possessive": f"{poss} {home}'s main language is",
            "relative": f"In {clause}, the main language is",
            "passive": f"The language that is spoken by most people in {clause} is",
        }
    elif second == "continent":
        question = f"On which continent is {clause}?"
        frames = {
            "possessive": f"{poss} {home}'s continent is",
            "relative": f"Of {clause}, the continent is",
            "passive": f"{T.cap(clause)} is found on the continent of",
        }
    else:
        raise ValueError(second)
    return {"question": question, "qa": f"Q: {question}\nA:", **frames}


def work_frames(title: str, role: str) -> dict[str, str]:
    noun, past, pp = ROLE[role]
    question = f"In which country was the {noun} of {title} born?"
    return {
        "question": question,
        "qa": f"Q: {question}\nA:",
        "possessive": f"{T.cap(T.possessive(title))} {noun}'s country of birth is",
        "relative": f"Whoever {past} {title} was born in the country of",
        "passive": f"The {noun} by whom {title} was {pp} was born in the country of",
    }


KIND = {
    "landmark>country>capital": ("landmark", "capital"),
    "landmark>country>currency": ("landmark", "currency"),
    "landmark>country>language": ("landmark", "language"),
    "person>country>capital": ("person", "capital"),
    "company>country>capital": ("company", "capital"),
    "city>country>continent": ("city", "continent"),
    "dish>country>capital": ("dish", "capital"),
}


def build() -> list[dict]:
    """One record per shipped item, in the shipped order (the subject phrase comes from the same tables)."""
    phrases: list[str] = []
    original = T.make_item

    def recording(idx, kind, id_prefix, tpl, subject, subj_phrase, *rest):
        phrases.append(subj_phrase)
        return original(idx, kind, id_prefix, tpl, subject, subj_phrase, *rest)

    T.make_item = recording
    try:
        items = T.build_all()
    finally:
        T.make_item = original
    roles = [role for _, role, _ in T.WORKS]
    out, w = [], 0
    for i, (it, phrase) in enumerate(zip(items, phrases)):
        if it["kind"] == "work>creator>birth-country":
            f = work_frames(phrase, roles[w])
            w += 1
        else:
            f = country_frames(*KIND[it["kind"]], phrase)
        question = f.pop("question")
        f["distractor"] = f"{DISTRACTORS[i % len(DISTRACTORS)]} {it['composed']}"
        seen = {it["composed"], *it["paraphrases"]}
        assert not seen & set(f.values()), it["id"]
        out.append({"id": it["id"], "question": question, "frames": f})
    return out


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    records = build()
    with out.open("w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} held-out frame records to {out}")


if __name__ == "__main__":
    main(sys.argv)
