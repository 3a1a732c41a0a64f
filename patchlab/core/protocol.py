"""The honest edit-evaluation protocol: a dev / test split by subject, and held-out paraphrase frames.

* Split: an item's split is a function of its subject alone (sha256 of the normalised subject), so no
  subject is ever in both halves, whatever set the item sits in; about `TEST_SHARE` of subjects are test.
  Settings are chosen on dev items; headline figures are test-split figures.
* Frames: the shipped set's paraphrases ("seen frames") come from a handful of templates shared by all
  items, and patchlab's settings were chosen on them. `data/twohop_heldout.jsonl` (written by
  `tools/make_frames.py`) holds a second family in other syntactic frames — a question with an answer cue,
  a possessive chain, the relative clause first, a passive, a distractor sentence — plus the question the
  model's chat template asks. No optimisation, preservation set, covariance or setting choice reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import TwoHopItem, jsonl_lines

FRAMES = ("qa", "possessive", "relative", "passive", "distractor", "chat")
TEST_SHARE = 0.5
HELDOUT_FILE = "twohop_heldout.jsonl"


def split_of(subject: str, test_share: float = TEST_SHARE) -> str:
    """'dev' or 'test', from the subject alone (case and surrounding space ignored)."""
    digest = hashlib.sha256(" ".join(subject.lower().split()).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_share else "dev"


def split_by_subject(
    items: Iterable[TwoHopItem], test_share: float = TEST_SHARE
) -> tuple[list[TwoHopItem], list[TwoHopItem]]:
    """(dev, test), each in the given order; no subject in both."""
    if not 0.0 < test_share < 1.0:
        raise PatchlabError(f"must be in (0, 1), got {test_share}", param="test_share")
    dev, test = [], []
    for it in items:
        (test if split_of(it.subject, test_share) == "test" else dev).append(it)
    return dev, test


def load_frames(path: str | Path | None = None) -> dict[str, dict]:
    """{item id: {"question": str, "frames": {frame: prompt}}} from a held-out frames file (default: the
    shipped one). Errors name the file and line."""
    if path is None:
        with resources.as_file(resources.files("patchlab") / "data" / HELDOUT_FILE) as p:
            return load_frames(p)
    out: dict[str, dict] = {}
    for n, line in jsonl_lines(Path(path)):
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise PatchlabError(f"not valid JSON ({exc})", where=where) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not isinstance(obj.get("frames"), dict):
            raise PatchlabError("expected an object with 'id' and 'frames'", where=where)
        bad = [k for k, v in obj["frames"].items() if k not in FRAMES or not isinstance(v, str) or not v.strip()]
        if bad:
            raise PatchlabError(f"frame {bad[0]!r} is unknown or empty (frames: {', '.join(FRAMES)})", where=where)
        if obj["id"] in out:
            raise PatchlabError(f"duplicate id {obj['id']!r}", where=where)
        out[obj["id"]] = {"question": obj.get("question"), "frames": dict(obj["frames"])}
    return out


def heldout_frames(items: Sequence[TwoHopItem], frames: dict[str, dict] | None = None) -> dict[str, dict]:
    """The held-out frames of `items` (those that have any), from `frames` (default: the shipped file)."""
    table = load_frames() if frames is None else frames
    return {it.id: table[it.id] for it in items if it.id in table}
