"""Explicit bad (and odd-but-good) prompt sets: each error is one line naming file, line and field.

tests/core/test_prompts.py covers the basic shapes (empty, blank, bad JSON, missing / wrongly typed field,
duplicate id, array line, lone surrogate in `subject`, \\xff byte, BOM + CRLF with U+2028 in one
field); these are the cases around them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import PromptSet

ITEM = {
    "id": "t-1",
    "kind": "landmark>country>capital",
    "subject": "Eiffel Tower",
    "bridge": "France",
    "answer": "Paris",
    "hop1": "The Eiffel Tower is located in the country of",
    "hop2": "The capital of France is",
    "composed": "The capital of the country where the Eiffel Tower is located is",
}


def rec(**kw) -> bytes:
    """One JSON line (no newline) of ITEM with fields changed; ensure_ascii so escapes stay escapes."""
    return json.dumps({**ITEM, **kw}).encode()


def raw(**kw) -> bytes:
    """Like `rec`, but non-ASCII characters are written as raw UTF-8."""
    return json.dumps({**ITEM, **kw}, ensure_ascii=False).encode("utf-8")


def load_error(path, body: bytes) -> str:
    path.write_bytes(body)
    with pytest.raises(PatchlabError) as err:
        PromptSet.load(path)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, repr(msg)
    assert msg.startswith(f"{path}:") or msg.startswith(f"{path}: "), msg
    return msg


# --- errors: (body, the text the message must hold after the file name) --------------------------

BAD = {
    "empty-file": (b"", ":1: prompt set is empty"),
    "bom-only": (b"\xef\xbb\xbf", ":1: prompt set is empty"),
    "blank-crlf-and-separators": (b"\r\n \r\n\t\n" + "\u2028\n\u0085\n".encode(), ":1: prompt set is empty"),
    "bad-json-after-crlf-lines": (rec() + b"\r\n\r\n" + rec(id="t-2") + b'\r\n{"id": \r\n', ":4: bad JSON"),
    "truncated-last-line-no-newline": (rec() + b"\n" + rec(id="t-2")[:-9], ":2: bad JSON"),
    "two-objects-on-one-line": (rec() + rec(id="t-2") + b"\n", ":1: bad JSON"),
    "old-mac-cr-only-endings": (rec() + b"\r" + rec(id="t-2") + b"\r", ":1: bad JSON"),
    "single-quoted-python-dict": (repr(ITEM).encode() + b"\n", ":1: bad JSON"),
    "nan-is-not-an-object": (b"NaN\n", ":1: expected a JSON object, got float"),
    "null-line": (rec() + b"\nnull\n", ":2: expected a JSON object, got NoneType"),
    "string-line": (rec() + b'\n"t-2"\n', ":2: expected a JSON object, got str"),
    "missing-field-after-blank-lines": (
        b"\n\n" + json.dumps({k: v for k, v in ITEM.items() if k != "hop2"}).encode(),
        ":3: missing required field 'hop2'",
    ),
    "null-required": (rec(bridge=None), ":1: field 'bridge' must be a string, got NoneType"),
    "number-id": (rec(id=7), ":1: field 'id' must be a string, got int"),
    "list-composed": (rec(composed=["a"]), ":1: field 'composed' must be a string, got list"),
    "kind-wrong-type": (rec(kind=3), ":1: field 'kind' must be a string, got int"),
    "whitespace-only-field": (raw(hop1=" \u2028\t"), ":1: field 'hop1' is empty"),
    "empty-required": (rec(answer=""), ":1: field 'answer' is empty"),
    "alias-list-element": (rec(answer_aliases=["Paree", 3]), ":1: field 'answer_aliases[1]' must be a string, got int"),
    "paraphrase-empty-element": (rec(paraphrases=["ok", ""]), ":1: field 'paraphrases[1]' is empty"),
    "aliases-dict": (rec(bridge_aliases={"a": "b"}), ":1: field 'bridge_aliases' must be a list"),
    "aliases-null": (rec(bridge_aliases=None), ":1: field 'bridge_aliases' must be a list"),
    "duplicate-id-not-adjacent": (
        rec() + b"\n\n" + rec(id="t-2") + b"\n" + rec() + b"\n",
        ":4: duplicate id 't-1' (first on line 1)",
    ),
    # an id holding a newline is legal JSON; the message must still be one line (repr of the id)
    "duplicate-id-with-newline": (
        rec(id="a\nb") + b"\n" + rec(id="a\nb") + b"\n",
        ":2: duplicate id 'a\\nb' (first on line 1)",
    ),
    "duplicate-id-with-u2028": (
        raw(id="a\u2028b") + b"\n" + raw(id="a\u2028b") + b"\n",
        ":2: duplicate id 'a\\u2028b' (first on line 1)",
    ),
    "invalid-utf8-first-line-with-bom": (b"\xef\xbb\xbf" + rec()[:-1] + b', "x": "\xc3"}\n', ":1: invalid UTF-8"),
    # the byte offset is 0-based within the line (JSON columns are 1-based)
    "overlong-utf8": (rec() + b"\n" + b'{"id": "\xc0\xaf"}\n', ":2: invalid UTF-8 at byte 8"),
    # a lone surrogate written as raw (CESU-8 / WTF-8) bytes rather than as an escape
    "cesu8-surrogate-bytes": (
        json.dumps({**ITEM, "subject": "a\ud800b"}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
        ":1: invalid UTF-8",
    ),
    "latin1-file": (json.dumps({**ITEM, "subject": "Café"}, ensure_ascii=False).encode("latin-1"), ":1: invalid UTF-8"),
    "utf16-file": (json.dumps(ITEM).encode("utf-16"), ":1: invalid UTF-8"),
    "lone-low-surrogate-escape": (rec(hop2="x\udc00"), ":1: field 'hop2' holds a lone surrogate"),
    "lone-surrogate-in-paraphrase": (
        rec(paraphrases=["ok", "\ud83d"]),
        ":1: field 'paraphrases[1]' holds a lone surrogate",
    ),
    # unknown fields are kept, so they must be writable again
    "lone-surrogate-in-extra-field": (rec(note="\ud800"), ":1: field 'note' holds a lone surrogate"),
    "lone-surrogate-deep-in-extra": (rec(meta={"a": ["\udfff"]}), ":1: field 'meta' holds a lone surrogate"),
    "lone-surrogate-in-extra-key": (rec(**{"k\ud800": 1}), ":1: field 'k\\ud800' holds a lone surrogate"),
    # json raises ValueError / RecursionError (not JSONDecodeError) for these
    "int-with-5000-digits": (rec()[:-1] + b', "n": ' + b"1" * 5000 + b"}\n", ":1: bad JSON (Exceeds the limit"),
    "nesting-100000-deep": (rec() + b"\n" + b"[" * 100_000 + b"\n", ":2: bad JSON (maximum recursion depth"),
    "second-bom-mid-file": (rec() + b"\n\xef\xbb\xbf" + rec(id="t-2") + b"\n", ":2: bad JSON"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_prompt_set(tmp_path, name):
    body, needle = BAD[name]
    path = tmp_path / f"{name}.jsonl"
    msg = load_error(path, body)
    assert f"{path}{needle}" in msg, msg


def test_unreadable_paths_are_one_line_errors(tmp_path):
    for path, needle in [(tmp_path / "missing.jsonl", "cannot read prompt set"), (tmp_path, "cannot read prompt set")]:
        with pytest.raises(PatchlabError, match=needle) as err:
            PromptSet.load(path)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


# --- odd but valid ----------------------------------------------------------------------------------


def test_one_megabyte_line_loads(tmp_path):
    big = "x" * (1 << 20)
    path = tmp_path / "big.jsonl"
    path.write_bytes(rec() + b"\n" + rec(id="t-2", composed=big, note="y" * 1000) + b"\n")
    ps = PromptSet.load(path)
    assert len(ps) == 2 and ps["t-2"].composed == big and ps["t-2"].extra == {"note": "y" * 1000}


@pytest.mark.parametrize("sep", ["\u0085", "\u2028", "\u2029", "\x1c", "\x1e", "\x0b", "\x0c"])
def test_line_separators_inside_strings_do_not_split_lines(tmp_path, sep):
    # str.splitlines() splits on all of these; a JSONL line ends only at b"\n"
    path = tmp_path / "sep.jsonl"
    path.write_bytes(
        raw(subject=f"Eiffel{sep}Tower", paraphrases=[f"a{sep}b"]) + b"\n" + raw(id="t-2", kind=sep + "k") + b"\n{"
    )
    msg = load_error(path, path.read_bytes())
    assert f"{path}:3: bad JSON" in msg  # line 3, so neither line 1 nor 2 was split
    path.write_bytes(path.read_bytes()[:-1])
    ps = PromptSet.load(path)
    assert len(ps) == 2 and ps[0].subject == f"Eiffel{sep}Tower" and ps[0].paraphrases == (f"a{sep}b",)


def test_bom_crlf_many_lines_and_no_final_newline(tmp_path):
    lines = [raw(id=f"t-{i}", subject=f"S{i} \u05e2\u05d1\u05e8\u05d9\u05ea 😀") for i in range(5)]
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines))
    ps = PromptSet.load(path)
    assert [it.id for it in ps] == [f"t-{i}" for i in range(5)]
    assert not any(it.composed.endswith("\r") or it.id.startswith("\ufeff") for it in ps)


def test_escaped_surrogate_pair_is_a_real_character(tmp_path):
    path = tmp_path / "pair.jsonl"
    path.write_bytes(rec(subject="\U0001f600"))  # written as "\\ud83d\\ude00": a valid pair
    assert PromptSet.load(path)[0].subject == "\U0001f600"


def test_item_without_kind_round_trips(tmp_path):
    # `save` writes "kind": "" for an item without a kind; loading that back must work
    path = tmp_path / "nokind.jsonl"
    path.write_bytes(json.dumps({k: v for k, v in ITEM.items() if k != "kind"}).encode())
    ps = PromptSet.load(path)
    ps.save(tmp_path / "again.jsonl")
    again = PromptSet.load(tmp_path / "again.jsonl")
    assert again.items == ps.items and again[0].kind == ""


def test_deeply_nested_extra_field_round_trips(tmp_path):
    # json accepts ~990 levels; `save` used to recurse in dataclasses.asdict and fail from ~500
    deep = json.loads("[" * 900 + "]" * 900)
    path = tmp_path / "deep.jsonl"
    path.write_bytes(rec(meta=deep))
    ps = PromptSet.load(path)
    ps.save(tmp_path / "again.jsonl")
    assert PromptSet.load(tmp_path / "again.jsonl")[0].extra == {"meta": deep}


def test_big_numbers_and_non_finite_floats_in_extra_fields_round_trip(tmp_path):
    path = tmp_path / "nums.jsonl"
    path.write_bytes(rec()[:-1] + b', "big": ' + b"9" * 4000 + b', "inf": 1e999, "neg": -0.0}\n')
    ps = PromptSet.load(path)
    ps.save(tmp_path / "again.jsonl")
    extra = PromptSet.load(tmp_path / "again.jsonl")[0].extra
    assert extra == {"big": int("9" * 4000), "inf": float("inf"), "neg": 0.0}


# --- the CLI: exit 2, one line on stderr, no traceback, no output folder ----------------------------

CLI_BAD = {
    "invalid-utf8": (rec() + b"\n" + b'{"id": "\xff"}\n', ":2: invalid UTF-8"),
    "lone-surrogate": (rec(bridge="\ud800"), ":1: field 'bridge' holds a lone surrogate"),
    "dup-id-with-newline": (rec(id="a\nb") + b"\n" + rec(id="a\nb") + b"\n", ":2: duplicate id 'a\\nb'"),
    "deep-nesting": (b"[" * 100_000 + b"\n", ":1: bad JSON"),
    "only-blank-crlf": (b"\xef\xbb\xbf\r\n\r\n", ":1: prompt set is empty"),
}


def run_evaluate(tmp_path, name: str, body: bytes):
    bad = tmp_path / f"{name}.jsonl"
    bad.write_bytes(body)
    out = tmp_path / f"out-{name}"
    proc = subprocess.run(
        [sys.executable, "-m", "patchlab.cli", "evaluate", "--prompt-set", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATCHLAB_QUIET": "1", "COLUMNS": "80", "PATCHLAB_CACHE": str(tmp_path / "cache")},
    )
    return bad, out, proc


@pytest.mark.parametrize("name", list(CLI_BAD))
def test_cli_bad_prompt_set_exits_2_with_one_line(tmp_path, name):
    body, needle = CLI_BAD[name]
    bad, out, proc = run_evaluate(tmp_path, name, body)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{bad}{needle}" in lines[0], lines[0]
    assert not out.exists()


def test_cli_error_text_is_not_read_as_rich_markup(tmp_path):
    bad, out, proc = run_evaluate(tmp_path, "markup", rec(id="[/x]") + b"\n" + rec(id="[/x]") + b"\n")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "duplicate id '[/x]'" in proc.stderr
