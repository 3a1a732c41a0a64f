"""Every example script runs as a user would run it (a subprocess in a scratch folder)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from patchlab.core.prompts import PromptSet

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(script: str, *args: str, cwd: Path):
    env = {**os.environ, "PATCHLAB_QUIET": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_example_prompt_set_is_valid():
    ps = PromptSet.load(EXAMPLES / "twohop.jsonl")
    assert len(ps) >= 5 and len(ps.kinds) >= 5


def test_custom_prompt_set(tmp_path):
    code, out, err = run("custom_prompt_set.py", "mine.jsonl", cwd=tmp_path)
    assert code == 0, err
    assert "2 valid items" in out and "as expected:" in out and "bad_mine.jsonl:1" in out and "composed" in out
    assert len(PromptSet.load(tmp_path / "mine.jsonl")) == 2


def test_bring_your_own_model_offline_hub_name_is_one_clear_line(tmp_path):
    code, out, err = run("bring_your_own_model.py", "no-such-org/no-such-model-xyz", cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "no-such-org/no-such-model-xyz" in err


@pytest.mark.real
def test_bring_your_own_model_runs_an_offline_model(tmp_path, smol):
    code, out, err = run("bring_your_own_model.py", "smollm2-135m", "--per-kind", "1", cwd=tmp_path)
    assert code == 0, err
    assert "30 layers x 9 heads" in out and "Compositionality gap" in out


@pytest.mark.real
def test_locate_then_edit(tmp_path, smol):
    code, out, err = run("locate_then_edit.py", "--edits", "1", cwd=tmp_path)
    assert code == 0, err
    assert "located heads:" in out and "correction" in out
    result = json.loads((tmp_path / "locate-then-edit" / "result.json").read_text())
    c = result["summary"]["correction"]
    assert c["after"] >= c["before"]
    assert (tmp_path / "locate-then-edit" / "first.edit").is_file()
