"""Two-hop prompt sets: the `TwoHopItem` record, JSONL load/validate/save, filters, shipped sets, MQuAKE.

A JSONL file is split on b"\\n" only (never `str.splitlines`, which also splits on U+2028 / U+0085
inside JSON strings); every validation error names the file, the 1-based line and the field.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.core.io import atomic_write_text

REQUIRED = ("id", "subject", "bridge", "answer", "hop1", "hop2", "composed")
OPTIONAL_STR = ("kind",)
OPTIONAL_LIST = ("paraphrases", "answer_aliases", "bridge_aliases")
SHIPPED = ("twohop",)


@dataclass(frozen=True)
class TwoHopItem:
    """One two-hop fact chain: subject -> bridge (hop1), bridge -> answer (hop2), and the composed query."""

    id: str
    subject: str
    bridge: str
    answer: str
    hop1: str
    hop2: str
    composed: str
    kind: str = ""
    paraphrases: tuple[str, ...] = ()
    answer_aliases: tuple[str, ...] = ()
    bridge_aliases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer and its aliases, canonical first, without repeats."""
        return tuple(dict.fromkeys((self.answer, *self.answer_aliases)))

    @property
    def bridges(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.bridge, *self.bridge_aliases)))

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies `extra` too (unused here), recursing once per level of
        # nesting, so an extra field nested ~500 deep that `load` accepted made `save` hit RecursionError
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for k in OPTIONAL_LIST:
            d[k] = list(d[k])
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "item") -> TwoHopItem:
        """Validate a parsed JSON object; errors name `where` and the field."""
        if not isinstance(obj, dict):
            raise PatchlabError(f"expected a JSON object, got {type(obj).__name__}", where=where)
        kwargs: dict[str, Any] = {}
        for key in REQUIRED + OPTIONAL_STR:
            if key not in obj:
                if key in REQUIRED:
                    raise PatchlabError(f"missing required field '{key}'", where=where)
                continue
            if key in OPTIONAL_STR and obj[key] == "":
                continue  # `save` writes "kind": "" for an item without a kind; read it back as absent
            kwargs[key] = check_str(obj[key], where, key)
        for key in OPTIONAL_LIST:
            value = obj.get(key, [])
            if not isinstance(value, list):
                raise PatchlabError(f"field '{key}' must be a list of strings", where=where)
            kwargs[key] = tuple(check_str(v, where, f"{key}[{i}]") for i, v in enumerate(value))
        known = set(REQUIRED + OPTIONAL_STR + OPTIONAL_LIST)
        kwargs["extra"] = {k: v for k, v in obj.items() if k not in known}
        for k, v in kwargs["extra"].items():
            # an unknown field is kept as is, but must be writable again by `save` (UTF-8)
            try:
                json.dumps({k: v}, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise PatchlabError(f"field {k!r} holds a lone surrogate (not valid Unicode)", where=where) from None
            except RecursionError:
                raise PatchlabError(f"field {k!r} is nested too deeply", where=where) from None
        return cls(**kwargs)


def check_str(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise PatchlabError(f"field '{key}' must be a string, got {type(value).__name__}", where=where)
    if not value.strip():
        raise PatchlabError(f"field '{key}' is empty", where=where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PatchlabError(f"field '{key}' holds a lone surrogate (not valid Unicode)", where=where) from None
    return value


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) of the non-blank lines of a UTF-8 JSONL file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PatchlabError(f"cannot read prompt set ({exc.strerror})", where=str(path)) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark is harmless: drop it
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise PatchlabError(f"invalid UTF-8 at byte {exc.start}", where=f"{path}:{number}") from None
        if text.strip():
            yield number, text


@dataclass
class PromptSet:
    """An ordered, id-unique collection of `TwoHopItem`s, with where it came from."""

    items: list[TwoHopItem]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        dupes = [k for k, n in Counter(it.id for it in self.items).items() if n > 1]
        if dupes:
            raise PatchlabError(f"duplicate id {dupes[0]!r}", where=self.source)  # repr: one line

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[TwoHopItem]:
        return iter(self.items)

    def __getitem__(self, key: int | str) -> TwoHopItem:
        if isinstance(key, str):
            for it in self.items:
                if it.id == key:
                    return it
            raise PatchlabError(f"no item with id '{key}'", where=self.source)
        return self.items[key]

    @property
    def kinds(self) -> list[str]:
        return sorted({it.kind for it in self.items})

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        """Read and validate a JSONL prompt set; raises `PatchlabError` naming file:line:field."""
        path = Path(path)
        items: list[TwoHopItem] = []
        seen: dict[str, int] = {}
        for number, text in jsonl_lines(path):
            where = f"{path}:{number}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PatchlabError(f"bad JSON ({exc.msg} at column {exc.colno})", where=where) from None
            except (ValueError, RecursionError) as exc:  # an int of > 4300 digits; nesting too deep
                raise PatchlabError(f"bad JSON ({str(exc).splitlines()[0][:120]})", where=where) from None
            item = TwoHopItem.from_dict(obj, where=where)
            if item.id in seen:
                # repr, so an id holding a newline / U+2028 still gives a one-line message
                raise PatchlabError(f"duplicate id {item.id!r} (first on line {seen[item.id]})", where=where)
            seen[item.id] = number
            items.append(item)
        if not items:
            raise PatchlabError("prompt set is empty (no JSON lines)", where=f"{path}:1")
        return cls(items, source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the set as JSONL, atomically."""
        lines = (json.dumps(it.to_dict(), ensure_ascii=False) for it in self.items)
        return atomic_write_text(path, "".join(line + "\n" for line in lines))

    @classmethod
    def shipped(cls, name: str = "twohop") -> PromptSet:
        """A prompt set that ships inside the package (see `SHIPPED`)."""
        if name not in SHIPPED:
            raise PatchlabError(f"unknown shipped set '{name}' (have: {', '.join(SHIPPED)})")
        with resources.as_file(resources.files("patchlab") / "data" / f"{name}.jsonl") as path:
            return cls.load(path)

    @classmethod
    def resolve(cls, spec: str | Path | None) -> PromptSet:
        """A path to a JSONL file, a shipped set's name, or None for the default shipped set."""
        if spec is None:
            return cls.shipped()
        if str(spec) in SHIPPED and not Path(spec).exists():
            return cls.shipped(str(spec))
        return cls.load(spec)

    def filter(
        self,
        kinds: Iterable[str] | None = None,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> PromptSet:
        """A new set restricted to `kinds` and/or `ids` (unknown ones are an error), then the first `limit`."""
        items = self.items
        if kinds is not None:
            kinds = list(kinds)
            unknown = sorted(set(kinds) - set(self.kinds))
            if unknown:
                raise PatchlabError(f"unknown kind '{unknown[0]}' (have: {', '.join(self.kinds)})", where=self.source)
            items = [it for it in items if it.kind in kinds]
        if ids is not None:
            wanted = list(dict.fromkeys(ids))
            by_id = {it.id: it for it in items}
            missing = [i for i in wanted if i not in by_id]
            if missing:
                raise PatchlabError(f"no item with id '{missing[0]}'", where=self.source)
            items = [by_id[i] for i in wanted]
        if limit is not None:
            if limit < 1:
                raise PatchlabError(f"limit must be >= 1, got {limit}")
            items = items[:limit]
        return PromptSet(list(items), source=self.source)

    def stratified(self, per_kind: int) -> PromptSet:
        """The first `per_kind` items of every kind: a small slice that still covers every chain."""
        counts: Counter[str] = Counter()
        keep = []
        for it in self.items:
            if counts[it.kind] < per_kind:
                counts[it.kind] += 1
                keep.append(it)
        return PromptSet(keep, source=self.source)


def item_fields() -> list[str]:
    return [f.name for f in fields(TwoHopItem) if f.name != "extra"]


# --- MQuAKE -----------------------------------------------------------------------------------


def _mquake_case(case: Any, where: str) -> TwoHopItem | None:
    """Turn one MQuAKE case into an item if it is a 2-hop chain (else None)."""
    if not isinstance(case, dict):
        raise PatchlabError("expected a JSON object", where=where)
    hops = case.get("single_hops")
    questions = case.get("questions")
    if not isinstance(hops, list) or not isinstance(questions, list) or not questions:
        raise PatchlabError("needs 'single_hops' (list) and 'questions' (non-empty list)", where=where)
    if len(hops) != 2:
        return None
    for i, hop in enumerate(hops):
        for key in ("cloze", "answer"):
            if not isinstance(hop, dict) or not isinstance(hop.get(key), str):
                raise PatchlabError(f"single_hops[{i}] needs a string '{key}'", where=where)
    triples = case.get("orig", {}).get("triples_labeled") if isinstance(case.get("orig"), dict) else None
    subject = triples[0][0] if isinstance(triples, list) and triples and triples[0] else hops[0]["cloze"]
    obj = {
        "id": f"mquake-{case.get('case_id', where.rsplit(':', 1)[-1])}",
        "kind": "mquake-2hop",
        "subject": subject,
        "bridge": hops[0]["answer"],
        "answer": hops[1]["answer"],
        "hop1": hops[0]["cloze"],
        "hop2": hops[1]["cloze"],
        "composed": questions[0],
        "paraphrases": [q for q in questions[1:] if isinstance(q, str)],
        "answer_aliases": [a for a in hops[1].get("answer_alias", []) if isinstance(a, str)],
        "bridge_aliases": [a for a in hops[0].get("answer_alias", []) if isinstance(a, str)],
    }
    # the hops' own questions, for the qa and chat prompt forms (see patchlab.core.forms)
    asked = {f: h.get("question") for f, h in zip(("hop1", "hop2"), hops) if isinstance(h.get("question"), str)}
    if asked:
        obj["questions"] = {f: q for f, q in asked.items() if q.strip()}
    return TwoHopItem.from_dict(obj, where=where)


def load_mquake(path: str | Path) -> PromptSet:
    """Read an MQuAKE JSON file (a list of cases) and keep its 2-hop cases as items.

    hop1/hop2 are the cases' single-hop clozes, `composed` the first multi-hop question and the
    other questions its paraphrases. MQuAKE's composed queries are questions, not clozes; the hops'
    own questions are kept as `questions` (used by the qa and chat prompt forms, `patchlab.core.forms`).
    """
    path = Path(path)
    try:
        cases = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatchlabError(f"cannot read MQuAKE JSON ({exc})".splitlines()[0], where=str(path)) from None
    if not isinstance(cases, list):
        raise PatchlabError("expected a JSON list of cases", where=str(path))
    items = [it for i, c in enumerate(cases) if (it := _mquake_case(c, f"{path}:case[{i}]")) is not None]
    if not items:
        raise PatchlabError("no 2-hop cases found", where=str(path))
    return PromptSet(items, source=str(path))


def prompts_of(items: Sequence[TwoHopItem], which: str) -> list[str]:
    """The `which` prompt (hop1 / hop2 / composed) of every item."""
    if which not in ("hop1", "hop2", "composed"):
        raise PatchlabError(f"unknown prompt field '{which}'")
    return [getattr(it, which) for it in items]
