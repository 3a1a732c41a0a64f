#!/usr/bin/env python3
"""Build the compositionality probe sets of `patchlab compare` (patchlab/data/compose_*.jsonl).

Standalone and deterministic (stdlib only, a fixed-seed shuffle). Three task types after Dhar & Sogaard
2024, "From Words to Worlds: Compositionality for Cognitive Architectures", all written by the project
from the hand-made word tables below:

* substitutivity (after Pavlick & Callison-Burch 2016's adjective-noun entailment data): does
  "Kim saw a fake gun." entail "Kim saw a gun."? Yes for intersective ("red car") and subsective
  ("small elephant") adjectives, no for privative ones ("fake gun", "toy lion").
* systematicity (after PLANE, Bertolini et al. 2022): the noun is also replaced by its hypernym, so the
  answer combines the adjective class with the lexical entailment noun -> hypernym:
  "a fake gun" entails "a fake weapon" but not "a weapon"; "a small elephant" entails "an animal" but
  not "a small animal"; "a red car" entails both "a red vehicle" and "a vehicle".
* over-generalisation: triples (noun, endocentric adjective-noun phrase, exocentric compound with the
  same head), e.g. (dog, brown dog, hot dog): a hot dog is not a dog, so a model that does not
  over-generalise composition should place "brown dog" closer to "dog" than "hot dog".

Labels are balanced (yes / no) within every task and pattern; each entailment file also holds a few
`"split": "demo"` items (nouns never used in the test items) for few-shot prompts.

Usage:  python tools/make_compose.py [OUTPUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "patchlab" / "data"
SEED = 20240517
PER_CLASS = 90  # substitutivity: 90 yes + 90 no
PER_CELL = 45  # systematicity: 45 items in each (pattern, label) cell

# noun -> category; the category gives the hypernym and the adjectives that combine with it
NOUNS = {
    "animal": [
        "dog",
        "cat",
        "lion",
        "tiger",
        "bear",
        "horse",
        "elephant",
        "rabbit",
        "wolf",
        "fox",
        "monkey",
        "giraffe",
    ],
    "bird": ["duck", "owl", "parrot", "eagle", "pigeon", "swan"],
    "vehicle": ["car", "truck", "bus", "train", "tractor", "airplane", "motorcycle"],
    "weapon": ["gun", "sword", "rifle", "pistol", "spear", "dagger"],
    "instrument": ["violin", "guitar", "piano", "drum", "trumpet", "flute"],
    "fruit": ["apple", "banana", "orange", "pear", "lemon", "strawberry", "cherry", "peach"],
    "vegetable": ["carrot", "potato", "onion", "cabbage", "cucumber"],
    "flower": ["rose", "tulip", "lily", "daisy", "sunflower", "orchid"],
    "gem": ["diamond", "ruby", "emerald", "sapphire", "pearl"],
    "tool": ["hammer", "saw", "drill", "wrench", "screwdriver", "axe"],
}
HYPERNYM = {
    "animal": "animal",
    "bird": "bird",
    "vehicle": "vehicle",
    "weapon": "weapon",
    "instrument": "instrument",
    "fruit": "fruit",
    "vegetable": "vegetable",
    "flower": "flower",
    "gem": "gem",
    "tool": "tool",
}

# intersective: an A N is an N and is A (a red car is a car, and a red vehicle)
INTERSECTIVE = {
    "animal": ["brown", "black", "white", "hungry", "sleeping", "wild", "sick", "wet"],
    "bird": ["white", "black", "brown", "hungry", "sleeping", "wild", "wet", "injured"],
    "vehicle": ["red", "blue", "white", "black", "broken", "stolen", "rusty", "parked"],
    "weapon": ["stolen", "rusty", "black", "silver", "broken", "hidden"],
    "instrument": ["red", "black", "broken", "stolen", "wooden", "shiny"],
    "fruit": ["ripe", "rotten", "fresh", "sliced", "peeled", "juicy"],
    "vegetable": ["fresh", "rotten", "raw", "sliced", "peeled", "boiled"],
    "flower": ["red", "white", "yellow", "pink", "fresh", "wilted"],
    "gem": ["polished", "stolen", "shiny", "precious", "hidden", "lost"],
    "tool": ["rusty", "broken", "new", "stolen", "red", "yellow"],
}
# privative: an A N is not an N (a fake gun is not a gun), but it is an A N' (a fake weapon)
PRIVATIVE = {
    "animal": ["toy", "stuffed", "fake", "plastic", "cartoon", "robot"],
    "bird": ["toy", "stuffed", "fake", "plastic", "cartoon", "robot"],
    "vehicle": ["toy", "model", "cardboard", "fake"],
    "weapon": ["toy", "fake", "replica", "rubber", "cardboard"],
    "instrument": ["toy", "cardboard", "inflatable", "chocolate"],
    "fruit": ["plastic", "fake", "artificial", "ceramic", "toy"],
    "vegetable": ["plastic", "fake", "toy", "artificial"],
    "flower": ["plastic", "paper", "silk", "artificial", "fake"],
    "gem": ["fake", "imitation", "glass", "plastic", "counterfeit"],
    "tool": ["toy", "cardboard", "inflatable", "chocolate"],
}
# subsective (relative size): a small elephant is an elephant and an animal, but not a small animal
SUBSECTIVE = [
    (adj, noun)
    for adjs, nouns in (
        (("small", "tiny"), ("elephant", "giraffe", "horse", "bear", "tiger", "lion")),
        (("small", "tiny"), ("truck", "bus", "train", "airplane", "tractor")),
        (("small", "tiny"), ("eagle", "swan")),
        (("big", "huge", "large"), ("rabbit", "cat", "fox")),
        (("big", "huge", "large"), ("pigeon", "parrot", "duck", "owl")),
        (("big", "huge"), ("strawberry", "cherry")),
    )
    for adj in adjs
    for noun in nouns
]
CATEGORY = {noun: cat for cat, nouns in NOUNS.items() for noun in nouns}

PEOPLE = ["Kim", "Sam", "Maria", "Tom", "Lena", "Omar", "Priya", "Jonas", "Yuki", "Ada", "Luis", "Nina"]
FRAMES = [
    "{p} saw {x}.",
    "{p} found {x}.",
    "{p} photographed {x}.",
    "{p} noticed {x} in the window.",
    "{p} pointed at {x}.",
    "{p} drew a picture of {x}.",
]

DEMOS = {
    "substitutivity": [
        ("Ana bought a red chair.", "Ana bought a chair.", "yes"),
        ("Ben saw a toy crocodile.", "Ben saw a crocodile.", "no"),
        ("Cleo found a big puppy.", "Cleo found a puppy.", "yes"),
        ("Dev kept a fake watch.", "Dev kept a watch.", "no"),
        ("Eli painted a wooden sofa.", "Eli painted a sofa.", "yes"),
        ("Fay held a plastic lizard.", "Fay held a lizard.", "no"),
        ("Gus cleaned a dusty kettle.", "Gus cleaned a kettle.", "yes"),
        ("Hana wore a paper crown.", "Hana wore a crown.", "no"),
    ],
    "systematicity": [
        ("Ana bought a red chair.", "Ana bought a red piece of furniture.", "yes"),
        ("Ben saw a toy crocodile.", "Ben saw a reptile.", "no"),
        ("Cleo met a tall child.", "Cleo met a tall person.", "no"),
        ("Dev held a toy crocodile.", "Dev held a toy reptile.", "yes"),
        ("Eli painted a wooden sofa.", "Eli painted a piece of furniture.", "yes"),
        ("Fay held a plastic lizard.", "Fay held a reptile.", "no"),
        ("Gus saw a small hippo.", "Gus saw a small mammal.", "no"),
        ("Hana met a tall child.", "Hana met a person.", "yes"),
    ],
}

# exocentric compound -> what it is (its head noun is not what it names); head = the last word
EXOCENTRIC = {
    "hot dog": "a sausage in a bun",
    "top dog": "a person in charge",
    "prairie dog": "a burrowing rodent",
    "sea dog": "an old sailor",
    "sea horse": "a small fish",
    "dark horse": "an unexpected winner",
    "clothes horse": "a frame for drying clothes",
    "rocking horse": "a child's toy",
    "iron horse": "a steam train",
    "guinea pig": "a rodent, or a test subject",
    "sea lion": "a seal",
    "paper tiger": "a harmless threat",
    "white elephant": "a useless possession",
    "fat cat": "a rich person",
    "copy cat": "an imitator",
    "cash cow": "a steady source of money",
    "sea cow": "a manatee",
    "lame duck": "an official about to leave",
    "sitting duck": "an easy target",
    "Bombay duck": "a dried fish",
    "night owl": "a person who stays up late",
    "early bird": "a person who gets up early",
    "jail bird": "a prisoner",
    "red herring": "a misleading clue",
    "cold turkey": "sudden quitting",
    "couch potato": "a lazy person",
    "hot potato": "an awkward issue",
    "sweet potato": "a different root vegetable",
    "sea cucumber": "a marine animal",
    "bad apple": "a bad person",
    "Adam's apple": "a part of the throat",
    "big cheese": "an important person",
    "loan shark": "a money lender",
    "card shark": "a skilled card player",
    "road hog": "a selfish driver",
    "koala bear": "a marsupial",
    "flying fox": "a fruit bat",
    "black widow": "a spider",
    "yellow jacket": "a wasp",
    "red admiral": "a butterfly",
    "painted lady": "a butterfly",
    "Komodo dragon": "a lizard",
    "bearded dragon": "a lizard",
    "Tasmanian devil": "a marsupial",
    "horseshoe crab": "a relative of spiders",
    "sea anemone": "an animal",
    "jelly bean": "a sweet",
    "hot rod": "a fast car",
    "soap opera": "a television drama",
    "cold shoulder": "a deliberate snub",
    "sweet tooth": "a liking for sugar",
    "green thumb": "a gift for gardening",
    "red tape": "bureaucracy",
    "glass ceiling": "an invisible barrier",
    "elbow grease": "hard work",
    "fish finger": "a breaded fish stick",
    "cow pie": "dung",
    "white knight": "a rescuer",
    "Welsh rabbit": "melted cheese on toast",
    "yellow belly": "a coward",
    "lone wolf": "a person who acts alone",
    "eager beaver": "a keen worker",
    "Jerusalem artichoke": "a sunflower tuber",
}
# endocentric modifiers of each head: an A N here *is* an N
ENDO = ["old", "big", "small", "young", "brown", "black", "white", "grey", "wet", "new", "little", "large"]
HEAD_MODIFIERS = {  # heads where generic colour / age words would read oddly get their own
    "shoulder": ["left", "right", "bare"],
    "tooth": ["front", "loose", "broken"],
    "thumb": ["left", "right", "sore"],
    "tape": ["long", "sticky", "new"],
    "ceiling": ["high", "white", "low"],
    "grease": ["black", "thick", "old"],
    "finger": ["left", "long", "sore"],
    "pie": ["warm", "fresh", "large"],
    "knight": ["young", "brave", "old"],
    "belly": ["round", "full", "big"],
    "opera": ["long", "new", "famous"],
    "rod": ["long", "metal", "thin"],
    "bean": ["green", "dried", "fresh"],
    "admiral": ["old", "famous", "retired"],
    "lady": ["old", "young", "kind"],
    "widow": ["young", "old", "rich"],
    "jacket": ["warm", "black", "new"],
    "devil": ["grinning", "horned", "red"],
    "artichoke": ["fresh", "large", "green"],
    "turkey": ["roast", "big", "wild"],
    "cheese": ["hard", "old", "soft"],
    "herring": ["smoked", "small", "fresh"],
    "apple": ["green", "red", "ripe"],
    "potato": ["baked", "large", "raw"],
    "cucumber": ["fresh", "long", "green"],
    "crab": ["large", "small", "red"],
    "anemone": ["white", "blue", "pink"],
    "dragon": ["fierce", "old", "green"],
    "shark": ["grey", "young", "big"],
    "hog": ["wild", "fat", "young"],
}


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def np_(*words: str) -> str:
    """An indefinite noun phrase: 'a red car', 'an old owl'."""
    phrase = " ".join(w for w in words if w)
    return f"{article(phrase)} {phrase}"


def context(rng: random.Random) -> tuple[str, str]:
    return rng.choice(PEOPLE), rng.choice(FRAMES)


def combos(kind: str) -> list[tuple[str, str]]:
    """All (adjective, noun) pairs of one adjective class."""
    if kind == "subsective":
        return list(SUBSECTIVE)
    table = INTERSECTIVE if kind == "intersective" else PRIVATIVE
    return [(adj, noun) for cat, nouns in NOUNS.items() for noun in nouns for adj in table[cat]]


def entail_item(task: str, i: int, adj: str, cls: str, noun: str, pattern: str, rng: random.Random) -> dict:
    """One premise / hypothesis pair; the label follows from the adjective class and the pattern."""
    hyper = HYPERNYM[CATEGORY[noun]]
    person, frame = context(rng)
    premise = frame.format(p=person, x=np_(adj, noun))
    if pattern == "drop-adjective":  # A N => N
        hyp, label = np_(noun), "no" if cls == "privative" else "yes"
    elif pattern == "hypernym":  # A N => N'
        hyp, label = np_(hyper), "no" if cls == "privative" else "yes"
    else:  # "adjective-hypernym": A N => A N'
        hyp, label = np_(adj, hyper), "no" if cls == "subsective" else "yes"
    return {
        "id": f"{task}-{i:04d}",
        "task": task,
        "premise": premise,
        "hypothesis": frame.format(p=person, x=hyp),
        "label": label,
        "adjective": adj,
        "adj_class": cls,
        "noun": noun,
        "hypernym": hyper,
        "pattern": pattern,
        "split": "test",
    }


def demo_items(task: str) -> list[dict]:
    return [
        {"id": f"{task}-demo-{j}", "task": task, "premise": p, "hypothesis": h, "label": y, "split": "demo"}
        for j, (p, h, y) in enumerate(DEMOS[task])
    ]


def substitutivity(rng: random.Random) -> list[dict]:
    """A N => N: 90 privative (no), 90 non-privative (yes: 2/3 intersective, 1/3 subsective)."""
    priv = rng.sample(combos("privative"), PER_CLASS)
    yes = rng.sample(combos("intersective"), PER_CLASS - PER_CLASS // 3) + rng.sample(
        combos("subsective"), PER_CLASS // 3
    )
    cells = [(a, "privative", n) for a, n in priv] + [
        (a, "intersective" if (a, n) not in SUBSECTIVE else "subsective", n) for a, n in yes
    ]
    rng.shuffle(cells)
    items = [entail_item("substitutivity", i, a, c, n, "drop-adjective", rng) for i, (a, c, n) in enumerate(cells)]
    return demo_items("substitutivity") + items


def systematicity(rng: random.Random) -> list[dict]:
    """Balanced cells: A N => N' (privative no / other yes) and A N => A N' (subsective no / other yes)."""
    half = PER_CELL // 2
    cells = [(a, "privative", n, "hypernym") for a, n in rng.sample(combos("privative"), PER_CELL)]
    cells += [(a, "intersective", n, "hypernym") for a, n in rng.sample(combos("intersective"), PER_CELL - half)]
    cells += [(a, "subsective", n, "hypernym") for a, n in rng.sample(combos("subsective"), half)]
    cells += [(a, "subsective", n, "adjective-hypernym") for a, n in rng.sample(combos("subsective"), PER_CELL)]
    cells += [
        (a, "intersective", n, "adjective-hypernym") for a, n in rng.sample(combos("intersective"), PER_CELL - half)
    ]
    cells += [(a, "privative", n, "adjective-hypernym") for a, n in rng.sample(combos("privative"), half)]
    rng.shuffle(cells)
    items = [entail_item("systematicity", i, a, c, n, p, rng) for i, (a, c, n, p) in enumerate(cells)]
    return demo_items("systematicity") + items


def overgeneralisation() -> list[dict]:
    """Three endocentric phrases per exocentric compound, each a (noun, phrase, exocentric) triple."""
    items = []
    for c, (compound, gloss) in enumerate(EXOCENTRIC.items()):
        head, first = compound.split()[-1], compound.split()[0].lower()
        pool = HEAD_MODIFIERS.get(head) or ENDO[3 * c % len(ENDO) :] + ENDO[: 3 * c % len(ENDO)]  # rotate generic ones
        mods = [m for m in pool if m.lower() != first][:3]
        for mod in mods:
            items.append({
                "id": f"overgeneralisation-{len(items):04d}", "task": "overgeneralisation", "noun": head,
                "phrase": f"{mod} {head}", "exocentric": compound, "gloss": gloss, "split": "test",
            })  # fmt: skip
    return items


def main(out_dir: Path) -> None:
    rng = random.Random(SEED)
    sets = {
        "substitutivity": substitutivity(rng),
        "systematicity": systematicity(rng),
        "overgeneralisation": overgeneralisation(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, items in sets.items():
        path = out_dir / f"compose_{task}.jsonl"
        path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
        test = [it for it in items if it.get("split") == "test"]
        labels = sorted({it.get("label", "-") for it in test})
        counts = {y: sum(it.get("label", "-") == y for it in test) for y in labels}
        print(f"{path}: {len(test)} test items {counts}, {len(items) - len(test)} demos")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
