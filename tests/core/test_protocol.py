"""The honest protocol: a dev / test split by subject and a held-out frame family nothing else reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from patchlab.core.errors import PatchlabError
from patchlab.core.protocol import FRAMES, heldout_frames, load_frames, split_by_subject, split_of

ROOT = Path(__file__).resolve().parents[2]


def test_split_is_by_subject_and_stable(shipped):
    dev, test = split_by_subject(shipped)
    assert len(dev) + len(test) == len(shipped) and dev and test
    assert not {it.subject for it in dev} & {it.subject for it in test}
    assert 0.3 < len(test) / len(shipped) < 0.7
    assert split_of("Eiffel Tower") == split_of("  eiffel   tower ")  # normalised
    with pytest.raises(PatchlabError, match="test_share"):
        split_by_subject(shipped, test_share=1.0)


def test_every_shipped_item_has_held_out_frames_unlike_its_seen_ones(shipped):
    frames = load_frames()
    assert set(frames) == {it.id for it in shipped}
    for it in shipped:
        rec = frames[it.id]
        assert set(rec["frames"]) == set(FRAMES) - {"chat"} and rec["question"].endswith("?")
        seen = {it.composed, *it.paraphrases}
        assert not seen & set(rec["frames"].values()), it.id
        assert rec["frames"]["qa"].startswith("Q: ") and rec["frames"]["qa"].endswith("\nA:")
        assert rec["frames"]["distractor"].endswith(it.composed)
        assert it.subject.lower() in rec["frames"]["possessive"].lower()


def test_held_out_frames_are_read_by_evaluation_only():
    """No optimisation, preservation set, covariance or setting choice may read the held-out file: only the
    protocol module (which loads it) and the command's workflow (which hands it to the evaluation) name it."""
    readers = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "patchlab").rglob("*.py")
        if re.search(r"load_frames|heldout_frames|twohop_heldout", p.read_text())
    ]
    assert set(readers) <= {"patchlab/core/protocol.py", "patchlab/workflows/chain.py"}, readers
    methods = (ROOT / "patchlab" / "methods" / "edit.py").read_text()
    assert "frames" not in methods


def test_bad_frames_file_names_file_and_line(tmp_path):
    path = tmp_path / "frames.jsonl"
    path.write_text(
        json.dumps({"id": "a", "frames": {"qa": "Q: x?\nA:"}})
        + "\n"
        + json.dumps({"id": "b", "frames": {"odd": "x"}})
        + "\n"
    )
    with pytest.raises(PatchlabError, match=r"frames.jsonl:2: frame 'odd' is unknown"):
        load_frames(path)
    path.write_text("{not json\n")
    with pytest.raises(PatchlabError, match=r"frames.jsonl:1: not valid JSON"):
        load_frames(path)


def test_heldout_frames_of_some_items(shipped):
    got = heldout_frames(list(shipped)[:3])
    assert list(got) == [it.id for it in list(shipped)[:3]]
