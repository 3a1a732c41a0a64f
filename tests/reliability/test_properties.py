"""Property tests: the JSONL prompt-set reader and the layer / head spec parsers never fail with
anything but a one-line `PatchlabError`, and what they accept is valid and round-trips."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import OPTIONAL_LIST, REQUIRED, PromptSet, TwoHopItem
from patchlab.core.spec import Head, parse_heads, parse_layers

PROPS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that have broken line-based readers: line / paragraph separators that str.splitlines
# honours, NEL, CR, RTL marks, emoji (astral plane), the BOM, NUL, combining marks.
TRICKY = [
    "\u2028",
    "\u2029",
    "\u0085",
    "\r",
    "\n",
    "\t",
    "\x00",
    "\x1c",
    "\u202e",
    "\u200f",
    "\ufeff",
    "😀",
    "👩‍👩‍👧",
    "עברית",
    "مرحبا",
    "\u0301",
    "\\",
    '"',
    "١٢",
    "Ω",
    " ",
]


def one_line(msg: str) -> bool:
    return len(msg.splitlines()) == 1 and "\n" not in msg


# --- JSONL prompt sets ------------------------------------------------------------------------------

chars = st.characters(blacklist_categories=("Cs",))  # no lone surrogates in *valid* text
plain = st.text(chars, max_size=4)  # one draw per string: cheap enough for 1000 examples
text = st.one_of(plain, st.builds(lambda a, t, b: a + t + b, plain, st.sampled_from(TRICKY), plain))
# a non-blank string without a filter: a visible core (no separators / controls) inside tricky text
core = st.text(st.characters(blacklist_categories=("Cs", "Z", "Cc")), min_size=1, max_size=3)
nonblank = st.one_of(core, st.builds(lambda pre, c, post: pre + c + post, text, core, text))
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=4,
)
KNOWN = set(REQUIRED) | {"kind", *OPTIONAL_LIST}
extra_fields = st.dictionaries(text.filter(lambda k: k not in KNOWN), json_value, max_size=2)


@st.composite
def valid_record(draw, ids=None) -> dict:
    rec = {key: draw(nonblank) for key in REQUIRED}
    if ids is not None:
        rec["id"] = draw(ids)
    kind = draw(st.one_of(st.none(), st.just(""), nonblank))  # "" is what `save` writes for "no kind"
    if kind is not None:
        rec["kind"] = kind
    for key in OPTIONAL_LIST:
        if draw(st.booleans()):
            rec[key] = draw(st.lists(nonblank, max_size=2))
    rec.update(draw(extra_fields))
    # shuffle the key order: the reader must not care
    keys = draw(st.permutations(list(rec)))
    return {k: rec[k] for k in keys}


def encode(rec: dict, ascii_only: bool) -> bytes:
    return json.dumps(rec, ensure_ascii=ascii_only).encode("utf-8")


BAD_TYPES = st.sampled_from([None, 7, 1.5, True, [], ["x"], {}, {"a": "b"}, "", "   ", "\u2028\t"])


@st.composite
def bad_line(draw, ids) -> bytes:
    """One physical line (no b'\\n') that must make the reader fail."""
    rec = draw(valid_record(ids))
    how = draw(
        st.sampled_from(
            [
                "truncated",
                "array",
                "number",
                "null",
                "string",
                "wrong_type",
                "bad_list",
                "missing",
                "surrogate_escape",
                "surrogate_bytes",
                "invalid_utf8",
                "trailing_garbage",
                "python_repr",
            ]
        )
    )
    if how == "truncated":
        raw = json.dumps(rec)
        return raw[: draw(st.integers(1, len(raw) - 1))].encode()
    if how == "array":
        return json.dumps([rec]).encode()
    if how == "number":
        return draw(st.sampled_from([b"1", b"-0.5e7", b"1" * 5000, b"1e999999", b"0x10"]))
    if how == "null":
        return draw(st.sampled_from([b"null", b"true", b"[]", b"{}", b'""']))
    if how == "string":
        return json.dumps(draw(text)).encode()
    if how == "wrong_type":
        rec[draw(st.sampled_from(REQUIRED + ("kind",)))] = draw(BAD_TYPES.filter(lambda v: v != ""))
        return encode(rec, draw(st.booleans()))
    if how == "bad_list":
        rec[draw(st.sampled_from(OPTIONAL_LIST))] = draw(
            st.sampled_from(["x", {"a": 1}, 3, [1], ["ok", None], [""], [["x"]]])
        )
        return encode(rec, True)
    if how == "missing":
        del rec[draw(st.sampled_from(REQUIRED))]
        return encode(rec, True)
    if how == "surrogate_escape":
        field = draw(st.sampled_from(REQUIRED + ("paraphrases", "note")))
        lone = draw(st.sampled_from(["\ud800", "\udfff", "x\udbff", "\ude00y"]))
        rec[field] = [lone] if field == "paraphrases" else lone
        return json.dumps(rec).encode()  # ensure_ascii: the surrogate is written as a "\\udXXX" escape
    if how == "surrogate_bytes":  # CESU-8 / WTF-8 bytes of a lone surrogate: not UTF-8
        rec["subject"] = "a\ud800b"
        return json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == "invalid_utf8":
        raw = encode(rec, False)
        at = draw(st.integers(0, len(raw)))
        return (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]))
            + raw[at:]
        )
    if how == "trailing_garbage":
        return encode(rec, True) + draw(st.sampled_from([b" x", b"{}", b",", b"]"]))
    return repr(rec).encode("utf-8", "surrogatepass")  # python_repr: single quotes, not JSON


garbage_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b""))
BLANK = [b"", b" ", b"\t", b"\r", b"  \r", "\u2028".encode(), "\u0085".encode(), "\u3000".encode()]


@st.composite
def jsonl_file(draw):
    """(file bytes, per-line status, the records that should load): status is ok / bad / maybe / blank."""
    id_pool = st.one_of(st.sampled_from(["a", "b", "c", "a\nb", "x\u2028y", "[/x]"]), nonblank)
    lines: list[tuple[bytes, str, dict | None]] = []
    seen: set[str] = set()
    for _ in range(draw(st.integers(0, 6))):
        what = draw(st.sampled_from(["valid", "valid", "valid", "blank", "bad", "maybe", "dup"]))
        if what == "valid":
            rec = draw(valid_record(id_pool))
            status = "bad" if rec["id"] in seen else "ok"
            seen.add(rec["id"])
            lines.append((encode(rec, draw(st.booleans())), status, rec))
        elif what == "dup" and seen:
            rec = draw(valid_record())
            rec["id"] = draw(st.sampled_from(sorted(seen)))
            lines.append((encode(rec, draw(st.booleans())), "bad", None))
        elif what == "blank":
            lines.append((draw(st.sampled_from(BLANK)), "blank", None))
        elif what == "maybe":
            lines.append((draw(garbage_bytes), "maybe", None))
        else:
            lines.append((draw(bad_line(id_pool)), "bad", None))
    crlf = draw(st.booleans())
    body = b"".join(line + (b"\r\n" if crlf else b"\n") for line, _, _ in lines)
    if lines and draw(st.booleans()):
        body = body[: -2 if crlf else -1]  # no newline at the end of the file
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    return body, [s for _, s, _ in lines], [r for _, s, r in lines if s == "ok"]


_TMP = tempfile.TemporaryDirectory(prefix="patchlab-props-")
_COUNTER = iter(range(10**9))


def _write(body: bytes) -> Path:
    path = Path(_TMP.name) / f"set-{next(_COUNTER)}.jsonl"
    path.write_bytes(body)
    return path


@PROPS
@given(jsonl_file())
@example((b"", [], []))
@example((b"\xef\xbb\xbf\r\n\r\n", ["blank", "blank"], []))
@example((b'{"id": "\\ud800"}\n', ["bad"], []))
def test_reader_loads_or_raises_one_line_error(case):
    body, status, good = case
    path = _write(body)
    try:
        ps = PromptSet.load(path)
    except PatchlabError as exc:
        msg = str(exc)
        event("reader: error")
        assert one_line(msg), msg
        m = re.match(re.escape(str(path)) + r":(\d+): \S", msg)
        assert m, f"message does not start with '<file>:<line>: ': {msg!r}"
        n = int(m[1])
        if "prompt set is empty" in msg:
            assert n == 1 and all(s in ("blank", "maybe") for s in status), msg
        else:
            assert 1 <= n <= len(status), msg
            assert status[n - 1] in ("bad", "maybe"), (msg, status)  # never blames a good line
            first_bad = status.index("bad") + 1 if "bad" in status else len(status)
            assert n <= first_bad, (msg, status)  # ... nor one after the first bad line
        path.unlink()
        return
    except Exception as exc:  # pragma: no cover - this is the failure the test looks for
        pytest.fail(f"{type(exc).__name__} escaped the reader: {exc!r}")
    assert "bad" not in status, status
    event(f"reader: loaded {len(ps)} items")
    if "maybe" not in status:
        assert [it.id for it in ps] == [r["id"] for r in good]
        for it, rec in zip(ps, good):
            assert it == TwoHopItem.from_dict(rec)
    path.unlink()


@PROPS
@given(st.lists(valid_record(), min_size=1, max_size=4, unique_by=lambda r: r["id"]), st.booleans(), st.booleans())
def test_valid_files_round_trip(records, crlf, bom):
    body = b"".join(encode(r, False) + (b"\r\n" if crlf else b"\n") for r in records)
    path = _write((b"\xef\xbb\xbf" if bom else b"") + body)
    ps = PromptSet.load(path)
    assert len(ps) == len(records)
    out = path.with_suffix(".saved.jsonl")
    with mock.patch("os.fsync"):  # durability is test_atomic_io's business; 1000 fsyncs are slow
        ps.save(out)
    again = PromptSet.load(out)
    assert again.items == ps.items
    assert (
        [it.extra for it in again]
        == [it.extra for it in ps]
        == [{k: v for k, v in r.items() if k not in KNOWN} for r in records]
    )
    # a fixed point: what was read back serializes to the very bytes that were saved
    assert out.read_bytes() == "".join(json.dumps(it.to_dict(), ensure_ascii=False) + "\n" for it in again).encode()
    path.unlink()
    out.unlink()


# --- layer and head specs ---------------------------------------------------------------------------

NEAR_MISS = [
    "14.03",
    "-1.3",
    "a.b",
    "14.3,14.3",
    "",
    " ",
    ",",
    "14.3,",
    ",14.3",
    "30.0",
    "17.9",
    "1.2.3",
    "+1.2",
    "١.٢",
    "1١.2",
    "1.٢",
    "٣",
    "²",
    "1²",
    "１.２",
    "1 .2",
    "1. 2",
    "1e1.2",
    "1.2e0",
    "0x1.2",
    "1_0.2",
    "01.2",
    "1.02",
    "00",
    "1..2",
    ".1",
    "1.",
    "14.3;17.9",
    "14.3 17.9",
    "9" * 30 + ".1",
    "1." + "9" * 5000,
    "0" * 5000 + ".1",
    "1-3",
    "0-29:3",
    "3-1",
    "0-0:0",
    "-1",
    "-0",
    "all",
    "ALL",
    " all ",
    "1-",
    "-1-3",
    "0--1",
    "0-" + "9" * 12,
    "0-" + "9" * 5000,
    "1:2",
    "1-2:",
    "1-2:-1",
    "0-29:" + "9" * 40,
    "1,1",
    "1, 2",
    "1,\u20032",
    "14.3\u2028",
    "\u200b14.3",
    "14.3\x00",
    "1\n.2",
    "a\nb",
    "[/x]",
    "'",
    '"',
]
numbers = st.integers(0, 40).map(str)
token = st.one_of(
    st.sampled_from(NEAR_MISS),
    st.builds(lambda a, b: f"{a}.{b}", numbers, numbers),
    st.builds(lambda a, b, s: f"{a}-{b}" + (f":{s}" if s != "1" else ""), numbers, numbers, st.integers(0, 5).map(str)),
    numbers,
    st.builds(
        lambda a, sign, pad: f"{pad}{sign}{a}{pad}",
        numbers,
        st.sampled_from(["", "-", "+", "0", "\u2212"]),
        st.sampled_from(["", " ", "\t", "\u00a0"]),
    ),
    st.text(max_size=6),
)
spec_text = st.one_of(st.text(), st.lists(token, max_size=6).map(",".join), st.sampled_from(NEAR_MISS))
sizes = st.one_of(st.just((30, 9)), st.tuples(st.integers(1, 40), st.integers(1, 16)))


def _check_error(exc: PatchlabError, arg: str) -> None:
    msg = str(exc)
    assert one_line(msg), repr(msg)
    assert msg.startswith(f"{arg}: "), msg
    assert len(msg) < 400, msg  # a 5000-digit spec is not echoed back whole


@PROPS
@given(spec_text, sizes)
@example("١.٢", (30, 9))
@example("1١.2", (30, 9))
@example("30.0", (30, 9))
@example("17.9", (30, 9))
@example("1." + "9" * 5000, (30, 9))
def test_parse_heads_gives_valid_heads_or_one_line_error(spec, size):
    n_layers, n_heads = size
    try:
        heads = parse_heads(spec, n_layers, n_heads)
    except PatchlabError as exc:
        _check_error(exc, "heads")
        return
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"{type(exc).__name__} escaped parse_heads({spec!r}): {exc!r}")
    assert heads and all(isinstance(h, Head) for h in heads)
    assert all(0 <= h.layer < n_layers and 0 <= h.head < n_heads for h in heads)
    assert len(set(heads)) == len(heads)
    assert parse_heads(",".join(map(str, heads)), n_layers, n_heads) == heads
    # what was accepted was ASCII layer.head pairs, read literally (no signs, no other digits)
    parts = [p.strip() for p in spec.split(",")]
    assert [re.fullmatch(r"[0-9]+\.[0-9]+", p, re.ASCII) is not None for p in parts] == [True] * len(parts)
    assert [str(h) for h in heads] == parts


@PROPS
@given(spec_text, st.one_of(st.just(30), st.integers(1, 40)))
@example("١", 30)
@example("²", 30)
@example("0-" + "9" * 12, 30)
@example("0" * 5000, 30)
@example("-1", 30)
def test_parse_layers_gives_valid_layers_or_one_line_error(spec, n_layers):
    try:
        layers = parse_layers(spec, n_layers)
    except PatchlabError as exc:
        _check_error(exc, "layers")
        return
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"{type(exc).__name__} escaped parse_layers({spec!r}): {exc!r}")
    assert layers and all(type(x) is int and 0 <= x < n_layers for x in layers)
    assert len(set(layers)) == len(layers)
    assert parse_layers(",".join(map(str, layers)), n_layers) == layers
    if spec.strip() != "all":
        # only ASCII digits, '-', ':' and ',' (plus whitespace around parts) were accepted
        for part in spec.split(","):
            assert re.fullmatch(r"[0-9]+(-[0-9]+(:[0-9]+)?)?", part.strip(), re.ASCII), (spec, part)
        # a plain list of numbers is read back as exactly those numbers, in order
        if all(re.fullmatch(r"[0-9]+", p.strip(), re.ASCII) for p in spec.split(",")):
            assert layers == [int(p.strip().lstrip("0") or "0") for p in spec.split(",")]


# --- the near-misses, one by one (fast, and they name the expected message) --------------------------


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("14.03", "is not a head"),
        ("-1.3", "is not a head"),
        ("a.b", "is not a head"),
        ("14.3,14.3", "listed twice"),
        ("", "no heads given"),
        (" ", "no heads given"),
        ("30.0", "layer 30 does not exist"),
        ("17.9", "head 9 does not exist"),
        ("1.2.3", "is not a head"),
        ("+1.2", "is not a head"),
        ("١.٢", "is not a head"),
        ("1١.2", "is not a head"),
        ("1.٢", "is not a head"),
        ("１.２", "is not a head"),
        ("1 .2", "is not a head"),
        ("1e1.2", "is not a head"),
        ("1." + "9" * 5000, "too large"),
        ("9" * 40 + ".1", "too large"),
        ("1\n.2", "is not a head"),
    ],
)
def test_head_near_misses(spec, needle):
    with pytest.raises(PatchlabError, match=re.escape(needle)) as err:
        parse_heads(spec, 30, 9)
    _check_error(err.value, "heads")


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("١", "is not a layer"),
        ("٣,4", "is not a layer"),
        ("²", "is not a layer"),
        ("1-²", "is not a layer"),
        ("-1", "is not a layer"),
        ("0--1", "is not a layer"),
        ("3-1", "bad range"),
        ("0-4:0", "bad range"),
        ("0-30", "layer 30 does not exist"),
        ("0-" + "9" * 9, "does not exist"),
        ("0-" + "9" * 12, "too large"),
        ("0" * 5000, None),
        ("1,1", "listed twice"),
        ("0-3,2", "listed twice"),
        ("a\nb", "is not a layer"),
    ],
)
def test_layer_near_misses(spec, needle):
    if needle is None:  # 5000 zeros is just 0
        assert parse_layers(spec, 30) == [0]
        return
    with pytest.raises(PatchlabError, match=re.escape(needle)) as err:
        parse_layers(spec, 30)
    _check_error(err.value, "layers")


def test_layer_specs_that_are_fine():
    assert parse_layers(" all ", 4) == [0, 1, 2, 3]
    assert parse_layers("0-29:3", 30) == list(range(0, 30, 3))
    assert parse_layers("007, 3", 30) == [7, 3]
    assert list(parse_heads(" 14.3 , 0.0 ", 30, 9)) == [Head(14, 3), Head(0, 0)]
