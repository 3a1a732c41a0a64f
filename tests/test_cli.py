import json
import subprocess
import sys

import pytest

from patchlab.cli import main


def run_cli(*args):
    """Run the CLI in a subprocess (as a user would) and return (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "patchlab.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PATCHLAB_QUIET": "1", "COLUMNS": "200"},
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "evaluate" in out and "demo" in out


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "empty"),
        ('{"id": "x"\n', ":1: bad JSON"),
        (
            '{"id": "x", "subject": "s", "bridge": "b", "answer": "a", "hop1": "h", "hop2": "h"}\n',
            ":1: missing required field 'composed'",
        ),
    ],
)
def test_malformed_prompt_set_exits_2_with_one_line_and_no_output(tmp_path, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    code, _, err = run_cli("evaluate", "--prompt-set", str(bad), "--out", str(out))
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert str(bad) in lines[0] and needle in lines[0]
    assert not out.exists()


def test_duplicate_id_exits_2(tmp_path, shipped):
    rec = json.dumps(shipped[0].to_dict())
    bad = tmp_path / "dup.jsonl"
    bad.write_text(rec + "\n" + rec + "\n")
    code, _, err = run_cli("evaluate", "--prompt-set", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "dup.jsonl:2: duplicate id" in err


@pytest.mark.real
def test_evaluate_writes_result_and_figure(tmp_path, smol):
    out = tmp_path / "ev"
    code, stdout, err = run_cli("evaluate", "--per-kind", "2", "--out", str(out))
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["type"] == "gap" and result["summary"]["all"]["n"] == 2 * len(result["summary"]) - 2
    assert result["meta"]["model"] == "smollm2-135m" and result["meta"]["dtype"] == "float32"
    assert (out / "figure.html").stat().st_size > 10_000
    assert "Compositionality gap" in stdout
    assert not list(out.glob(".patchlab-tmp-*"))


def test_locate_top_zero_exits_2_before_loading(tmp_path):
    code, _, err = run_cli("locate", "--top", "0", "--out", str(tmp_path / "o"))
    assert code == 2 and "--top" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.real
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--failures", "--heads", "17.9"], "head 9 does not exist"),
        (["--failures", "--heads", "30.0"], "layer 30 does not exist"),
        (["--failures", "--heads", "-1.3"], "is not a head"),
        (["--failures", "--heads", "14.3,14.3"], "listed twice"),
        (["--heads", "14.3"], "exactly one of --ids"),
        (["--failures", "--target", "magic", "--heads", "14.3"], "target"),
    ],
)
def test_edit_bad_arguments_exit_2(tmp_path, smol, args, needle):
    out = tmp_path / "e"
    code, _, err = run_cli("edit", "--gap", str(gap_file(tmp_path, smol)), *args, "--out", str(out))
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not out.exists()


_GAP: dict = {}


def gap_file(tmp_path, smol):
    """A small saved gap result, so CLI edit tests do not re-evaluate the whole shipped set."""
    from patchlab.core.prompts import PromptSet
    from patchlab.methods.gap import evaluate_gap

    if "path" not in _GAP:
        result = evaluate_gap(smol, PromptSet.shipped().stratified(3), progress=False)
        _GAP["path"] = result.save(tmp_path / "gap")["result.json"]
    return _GAP["path"]
