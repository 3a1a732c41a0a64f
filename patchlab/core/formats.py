"""Peer data formats read into prompt sets: CREME's edit data and MQuAKE, and `convert` to patchlab's JSONL.

CREME (Li et al. 2024, *Understanding and Patching Compositional Reasoning in LLMs*) releases its edit data
as one JSON list of records made by its `make_dataset` scripts. A record and the item it becomes:

    prompt_f_hop        "the country that Ellie Kemper is a citizen of is"   -> hop1 (as written)
    subject_guide       "United States of America"                           -> bridge (hop1's answer)
    prompt_guide        "The capital of {} is"      + subject_guide           -> hop2 (the guide prompt)
    subject_comp        "the country that Ellie Kemper is a citizen of"       -> subject (optional: else
                                                                                prompt_f_hop without " is")
    original query      "The capital of the country that Ellie Kemper ..."   -> composed
    prompt_comp         "The capital of {} is"      + subject                 -> composed when `original query`
                                                                                is absent
    target              "Washington, D.C."                                   -> answer
    paraphrase queries  [cloze or "Q: ...\\nA: ...\\nQ: ...?\\nA:"]            -> paraphrases (as written)
    wrong answer        the model's own wrong answer                         -> extra `wrong_answer`
    generalization queries / answers  (same first hop, other second hops)   -> extra `generalization`
    irrelevant queries / answers      (other subjects)                       -> extra `irrelevance`
                                                                                ([{"query", "answer"}, ...])
    anything else (e.g. `layers`)                                            -> extra `creme` (as written)

Items are numbered by record: `creme-0000`, … (kind `creme-2hop`, no aliases: CREME gives none). patchlab's
own test sets (generalization = other items of the same subject, irrelevance = other items answered right)
are built from the prompt set; CREME's per-record generalization and irrelevance queries are kept with the
item, not scored. Errors name the file, the record (its 0-based index in the JSON list) and the field:
`creme.json: record 3: field 'target': missing`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import PromptSet, TwoHopItem, load_mquake

CREME_KIND = "creme-2hop"
CREME_MAPPED = (
    "prompt_f_hop",
    "subject_guide",
    "prompt_guide",
    "subject_comp",
    "original query",
    "prompt_comp",
    "target",
    "paraphrase queries",
    "wrong answer",
    "generalization queries",
    "generalization answers",
    "irrelevant queries",
    "irrelevant answers",
)


def read_json_list(path: Path, what: str) -> list[Any]:
    """A JSON file holding one list; errors name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise PatchlabError(f"cannot read {what} JSON ({exc.strerror})", where=str(path)) from None
    except UnicodeDecodeError as exc:
        raise PatchlabError(f"invalid UTF-8 at byte {exc.start}", where=str(path)) from None
    except json.JSONDecodeError as exc:
        raise PatchlabError(f"bad JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", where=str(path)) from None
    except (ValueError, RecursionError) as exc:
        raise PatchlabError(f"bad JSON ({str(exc).splitlines()[0][:120]})", where=str(path)) from None
    if not isinstance(data, list):
        raise PatchlabError(f"expected a JSON list of records, got {type(data).__name__}", where=str(path))
    return data


class _Record:
    """Typed access to one record's fields, every error naming file, record and field."""

    def __init__(self, rec: Any, where: str):
        if not isinstance(rec, dict):
            raise PatchlabError(f"expected a JSON object, got {type(rec).__name__}", where=where)
        self.rec, self.where = rec, where

    def at(self, key: str) -> str:
        return f"{self.where}: field {key!r}"

    def text(self, key: str, required: bool = True) -> str | None:
        if key not in self.rec or self.rec[key] is None:
            if required:
                raise PatchlabError("missing", where=self.at(key))
            return None
        value = self.rec[key]
        if not isinstance(value, str):
            raise PatchlabError(f"must be a string, got {type(value).__name__}", where=self.at(key))
        if not value.strip():
            raise PatchlabError("is empty", where=self.at(key))
        return value

    def texts(self, key: str) -> list[str]:
        value = self.rec.get(key, [])
        if value is None:
            return []
        if not isinstance(value, list):
            raise PatchlabError(f"must be a list of strings, got {type(value).__name__}", where=self.at(key))
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v.strip():
                raise PatchlabError(f"entry {i} must be a non-empty string", where=self.at(key))
        return value

    def template(self, key: str, filler: str) -> str:
        """A CREME template (`str.format` with one `{}` slot) filled with `filler`."""
        tpl = self.text(key)
        if tpl.count("{}") != 1:  # type: ignore[union-attr]
            raise PatchlabError(f"needs exactly one '{{}}' slot, got {tpl.count('{}')}", where=self.at(key))  # type: ignore[union-attr]
        return tpl.replace("{}", filler)  # type: ignore[union-attr]

    def pairs(self, queries: str, answers: str) -> list[dict[str, str]]:
        q, a = self.texts(queries), self.texts(answers)
        if len(q) != len(a):
            raise PatchlabError(f"{len(a)} answers for {len(q)} queries in {queries!r}", where=self.at(answers))
        return [{"query": x, "answer": y} for x, y in zip(q, a)]


def creme_item(rec: Any, index: int, where: str) -> TwoHopItem:
    """One CREME record as an item (the mapping is in the module doc)."""
    r = _Record(rec, where)
    hop1 = r.text("prompt_f_hop")
    bridge = r.text("subject_guide")
    answer = r.text("target")
    hop2 = r.template("prompt_guide", bridge)  # type: ignore[arg-type]
    subject = r.text("subject_comp", required=False)
    if subject is None:
        subject = hop1.strip().removesuffix(" is").strip() or hop1  # type: ignore[union-attr]
    composed = r.text("original query", required=False)
    if composed is None:
        if "prompt_comp" not in rec:
            raise PatchlabError("missing (and no 'prompt_comp' to build it from)", where=r.at("original query"))
        composed = r.template("prompt_comp", subject)
    extra: dict[str, Any] = {"source": {"format": "creme", "record": index}}
    wrong = r.text("wrong answer", required=False)
    if wrong is not None:
        extra["wrong_answer"] = wrong
    if "generalization queries" in rec or "generalization answers" in rec:
        extra["generalization"] = r.pairs("generalization queries", "generalization answers")
    if "irrelevant queries" in rec or "irrelevant answers" in rec:
        extra["irrelevance"] = r.pairs("irrelevant queries", "irrelevant answers")
    unmapped = {k: v for k, v in rec.items() if k not in CREME_MAPPED}
    if unmapped:
        extra["creme"] = unmapped
    obj = {
        "id": f"creme-{index:04d}",
        "kind": CREME_KIND,
        "subject": subject,
        "bridge": bridge,
        "answer": answer,
        "hop1": hop1,
        "hop2": hop2,
        "composed": composed,
        "paraphrases": r.texts("paraphrase queries"),
        **extra,
    }
    return TwoHopItem.from_dict(obj, where=where)


def load_creme(path: str | Path) -> PromptSet:
    """Read CREME's edit data (a JSON list of records, see the module doc) as a prompt set, one item a record."""
    path = Path(path)
    records = read_json_list(path, "CREME")
    items = [creme_item(rec, i, f"{path}: record {i}") for i, rec in enumerate(records)]
    if not items:
        raise PatchlabError("no records (an empty list)", where=str(path))
    return PromptSet(items, source=str(path))


READERS: dict[str, Callable[[str | Path], PromptSet]] = {"creme": load_creme, "mquake": load_mquake}


@dataclass
class Conversion:
    """What `convert` read and wrote: the items, where they went, and which source fields were kept aside."""

    prompt_set: PromptSet
    out: Path
    source_format: str
    kept: dict[str, int] = field(default_factory=dict)  # extra field -> items holding it (not used by patchlab)

    def lines(self) -> list[str]:
        out = [f"{len(self.prompt_set)} items from {self.prompt_set.source} ({self.source_format}) -> {self.out}"]
        if self.kept:
            kept = ", ".join(f"{k} ({n})" for k, n in sorted(self.kept.items()))
            out.append(f"kept with the items, not used by patchlab's metrics: {kept}")
        return out


def read_format(source_format: str, path: str | Path) -> PromptSet:
    """A peer data file read with the reader of `source_format` (one of `READERS`)."""
    if source_format not in READERS:
        raise PatchlabError(f"unknown format {source_format!r} (formats: {', '.join(READERS)})", param="source_format")
    return READERS[source_format](path)


def convert(source_format: str, path: str | Path, out: str | Path) -> Conversion:
    """Read a peer data file and write it as a patchlab JSONL prompt set, atomically; the written file is read
    back with `PromptSet.load` before this returns."""
    ps = read_format(source_format, path)
    written = ps.save(out)
    PromptSet.load(written)  # what a user will load next: any disagreement shows here, not later
    kept = Counter(k for it in ps for k in it.extra if k != "source")
    return Conversion(ps, written, source_format, dict(kept))
