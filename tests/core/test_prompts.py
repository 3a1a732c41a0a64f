import json

import pytest

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import PromptSet, TwoHopItem, load_mquake

ITEM = {
    "id": "t-1",
    "kind": "landmark>country>capital",
    "subject": "Eiffel Tower",
    "bridge": "France",
    "answer": "Paris",
    "hop1": "The Eiffel Tower is located in the country of",
    "hop2": "The capital of France is",
    "composed": "The capital of the country where the Eiffel Tower is located is",
    "paraphrases": ["The Eiffel Tower stands in a country whose capital is"],
}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_shipped_set_size_kinds_and_paraphrases(shipped):
    assert len(shipped) >= 300
    assert len(shipped.kinds) >= 6
    assert all(len(it.paraphrases) >= 2 for it in shipped)
    for it in shipped:
        assert it.bridge not in it.composed and it.answer not in it.composed, it.id
        assert not it.composed.endswith(" ")


def test_round_trip_keeps_extra_fields(tmp_path):
    rec = {**ITEM, "source": "hand-written", "answer_aliases": ["Paris"]}
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(rec)])
    ps = PromptSet.load(path)
    ps.save(tmp_path / "b.jsonl")
    again = PromptSet.load(tmp_path / "b.jsonl")
    assert again.items == ps.items
    assert again[0].extra == {"source": "hand-written"}
    assert json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])["source"] == "hand-written"


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "empty"),
        (["", "   ", ""], "empty"),
        ([json.dumps(ITEM), "{not json"], ":2: bad JSON"),
        ([json.dumps({k: v for k, v in ITEM.items() if k != "bridge"})], ":1: missing required field 'bridge'"),
        ([json.dumps({**ITEM, "answer": 7})], "field 'answer' must be a string"),
        ([json.dumps({**ITEM, "paraphrases": "x"})], "field 'paraphrases' must be a list"),
        ([json.dumps(ITEM), json.dumps(ITEM)], ":2: duplicate id 't-1' (first on line 1)"),
        (["[1, 2]"], ":1: expected a JSON object"),
        ([json.dumps({**ITEM, "subject": "\ud800"})], "lone surrogate"),
    ],
)
def test_bad_prompt_sets_name_file_and_line(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(PatchlabError) as err:
        PromptSet.load(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(ITEM).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(PatchlabError, match=r"bin.jsonl:2: invalid UTF-8"):
        PromptSet.load(path)


def test_bom_crlf_and_line_separators_inside_strings(tmp_path):
    rec = {**ITEM, "subject": "Eiffel\u2028Tower\u0085"}
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec, ensure_ascii=False).encode() + b"\r\n")
    ps = PromptSet.load(path)
    assert len(ps) == 1 and ps[0].subject == "Eiffel\u2028Tower\u0085"


def test_filters(shipped):
    kind = shipped.kinds[0]
    only = shipped.filter(kinds=[kind])
    assert {it.kind for it in only} == {kind} and len(only) > 0
    assert len(shipped.stratified(2)) == 2 * len(shipped.kinds)
    first = shipped[0].id
    assert shipped.filter(ids=[first])[0].id == first
    with pytest.raises(PatchlabError, match="unknown kind"):
        shipped.filter(kinds=["nope"])
    with pytest.raises(PatchlabError, match="no item with id"):
        shipped.filter(ids=["nope"])


def test_mquake_reader(tmp_path):
    cases = [
        {
            "case_id": 11,
            "questions": [
                "What is the capital of the country where the Eiffel Tower is?",
                "Which city is the capital of the Eiffel Tower's country?",
            ],
            "single_hops": [
                {
                    "question": "Where is the Eiffel Tower?",
                    "cloze": "The Eiffel Tower is located in the country of",
                    "answer": "France",
                    "answer_alias": ["French Republic"],
                },
                {
                    "question": "What is the capital of France?",
                    "cloze": "The capital of France is",
                    "answer": "Paris",
                    "answer_alias": ["City of Light"],
                },
            ],
            "orig": {"triples_labeled": [["Eiffel Tower", "country", "France"], ["France", "capital", "Paris"]]},
        },
        {"case_id": 12, "questions": ["q"], "single_hops": [{"cloze": "a", "answer": "b"}] * 3},
    ]
    path = tmp_path / "mquake.json"
    path.write_text(json.dumps(cases))
    ps = load_mquake(path)
    assert len(ps) == 1  # the 3-hop case is skipped
    it = ps[0]
    assert (it.id, it.subject, it.bridge, it.answer) == ("mquake-11", "Eiffel Tower", "France", "Paris")
    assert it.hop2 == "The capital of France is" and len(it.paraphrases) == 1
    assert "City of Light" in it.answers and "French Republic" in it.bridges


def test_mquake_bad_case_names_index(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"questions": ["q"], "single_hops": [{"cloze": 1, "answer": "x"}, {}]}]))
    with pytest.raises(PatchlabError, match=r"case\[0\]: single_hops\[0\] needs a string 'cloze'"):
        load_mquake(path)


def test_item_answers_deduplicate_aliases():
    it = TwoHopItem.from_dict({**ITEM, "answer_aliases": ["Paris", "Paree"]})
    assert it.answers == ("Paris", "Paree")
