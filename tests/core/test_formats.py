"""Peer formats (CREME, MQuAKE), `patchlab convert`, and the text rules of the prompt forms."""

import json
import shutil
from pathlib import Path

import pytest

from patchlab.cli import main
from patchlab.core.errors import PatchlabError
from patchlab.core.formats import convert, load_creme
from patchlab.core.forms import (
    FORMS,
    NEW_TOKENS,
    check_form,
    cloze_question,
    item_form,
    qa_prompt,
    qa_turns,
    question,
    window,
)
from patchlab.core.prompts import PromptSet, TwoHopItem

SAMPLE = Path(__file__).parent.parent / "data" / "creme_sample.json"


def records():
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def cli(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code


def write(tmp_path, recs, name="creme.json"):
    path = tmp_path / name
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return path


# --- CREME ------------------------------------------------------------------------------------------


def test_creme_fixture_maps_every_field():
    ps = load_creme(SAMPLE)
    assert [it.id for it in ps] == ["creme-0000", "creme-0001", "creme-0002", "creme-0003"]
    it = ps[0]
    assert it.kind == "creme-2hop"
    assert it.hop1 == "the country where the Eiffel Tower is located is"  # prompt_f_hop, as written
    assert (it.bridge, it.answer) == ("France", "Paris")  # subject_guide, target
    assert it.hop2 == "The capital of France is"  # prompt_guide filled with subject_guide
    assert it.composed == "The capital of the country where the Eiffel Tower is located is"  # original query
    assert it.subject == "the country where the Eiffel Tower is located"  # subject_comp
    assert len(it.paraphrases) == 2 and it.paraphrases[1].startswith("Q: What is the largest planet")
    assert it.extra["wrong_answer"] == "France"
    assert it.extra["generalization"][0] == {
        "query": "The official language of the country where the Eiffel Tower is located is",
        "answer": "French",
    }
    assert [q["answer"] for q in it.extra["irrelevance"]] == ["Rome", "Rome"]
    assert it.extra["source"] == {"format": "creme", "record": 0}
    assert ps[1].extra["creme"] == {"layers": [12, 13, 14]}  # unknown fields are kept as written
    assert "creme" not in it.extra


def test_creme_composed_built_from_prompt_comp_and_subject_from_first_hop():
    it = load_creme(SAMPLE)[2]  # no `original query`, no `subject_comp`
    assert it.subject == "the author of Don Quixote"
    assert it.composed == "The city that the author of Don Quixote was born in is"
    assert it.answer == "Alcalá de Henares"


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda r: r.pop("target"), "record 3: field 'target': missing"),
        (lambda r: r.update(target=7), "record 3: field 'target': must be a string, got int"),
        (lambda r: r.update(subject_guide="  "), "record 3: field 'subject_guide': is empty"),
        (lambda r: r.update(prompt_guide="The capital of Ghana is"), "field 'prompt_guide': needs exactly one '{}'"),
        (lambda r: r.update({"paraphrase queries": "x"}), "field 'paraphrase queries': must be a list of strings"),
        (lambda r: r.update({"paraphrase queries": ["ok", ""]}), "field 'paraphrase queries': entry 1 must be"),
        (
            lambda r: r.update({"generalization answers": []}),
            "field 'generalization answers': 0 answers for 1 queries",
        ),
        (
            lambda r: (r.pop("original query"), r.pop("prompt_comp")),
            "field 'original query': missing (and no 'prompt_comp'",
        ),
    ],
)
def test_creme_errors_name_file_record_and_field(tmp_path, change, needle):
    recs = records()
    change(recs[3])
    path = write(tmp_path, recs)
    with pytest.raises(PatchlabError) as exc:
        load_creme(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{", "bad JSON"),
        ('{"a": 1}', "expected a JSON list of records, got dict"),
        ("[]", "no records"),
        ('[{"target": "x"}, 3]', "record 0: field 'prompt_f_hop': missing"),
        ("[3]", "record 0: expected a JSON object, got int"),
    ],
)
def test_creme_bad_files(tmp_path, text, needle):
    path = tmp_path / "creme.json"
    path.write_text(text)
    with pytest.raises(PatchlabError, match=needle):
        load_creme(path)


def test_creme_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(PatchlabError, match="cannot read CREME JSON"):
        load_creme(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'["\xff"]')
    with pytest.raises(PatchlabError, match="invalid UTF-8 at byte 2"):
        load_creme(bad)


# --- convert ------------------------------------------------------------------------------------------


def test_convert_round_trips_through_the_prompt_set_loader(tmp_path):
    done = convert("creme", SAMPLE, tmp_path / "twohop.jsonl")
    again = PromptSet.load(done.out)
    assert [it.to_dict() for it in again] == [it.to_dict() for it in load_creme(SAMPLE)]
    assert again[0].extra["generalization"][1]["answer"] == "euro"
    assert done.kept == {"wrong_answer": 4, "generalization": 4, "irrelevance": 4, "creme": 1}
    assert "4 items" in done.lines()[0] and "generalization (4)" in done.lines()[1]
    assert [p.name for p in tmp_path.iterdir()] == ["twohop.jsonl"]  # atomic: no temp file left


def test_convert_cli_creme_and_mquake(tmp_path, capsys):
    out = tmp_path / "creme.jsonl"
    assert cli("convert", str(SAMPLE), "--from", "creme", "--out", str(out)) == 0
    assert "4 items" in capsys.readouterr().out
    assert len(PromptSet.load(out)) == 4

    case = {
        "case_id": 5,
        "questions": ["What is the capital of the country where the Louvre is?"],
        "single_hops": [
            {"question": "Where is the Louvre?", "cloze": "The Louvre is in the country of", "answer": "France"},
            {"question": "What is the capital of France?", "cloze": "The capital of France is", "answer": "Paris"},
        ],
    }
    src = write(tmp_path, [case], "mquake.json")
    out2 = tmp_path / "mquake.jsonl"
    assert cli("convert", str(src), "--from", "mquake", "--out", str(out2)) == 0
    it = PromptSet.load(out2)[0]
    assert (it.id, it.answer) == ("mquake-5", "Paris")
    assert it.extra["questions"] == {"hop1": "Where is the Louvre?", "hop2": "What is the capital of France?"}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--from", "nope"], "--from: unknown format 'nope' (formats: creme, mquake)"),
        (["--from", "mquake"], "needs 'single_hops'"),  # a CREME file is no MQuAKE file
    ],
)
def test_convert_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "o.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(SAMPLE), *args, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


def test_convert_cli_names_the_bad_record_and_keeps_an_existing_output(tmp_path, capsys):
    recs = records()
    del recs[2]["target"]
    src = write(tmp_path, recs)
    out = tmp_path / "o.jsonl"
    shutil.copy(SAMPLE, out)
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), "--from", "creme", "--out", str(out)])
    assert exc.value.code == 2
    assert f"{src}: record 2: field 'target': missing" in capsys.readouterr().err
    assert out.read_bytes() == before


# --- prompt forms: the text rules ---------------------------------------------------------------------

ITEM = {
    "id": "x",
    "subject": "Eiffel Tower",
    "bridge": "France",
    "answer": "Paris",
    "hop1": "The Eiffel Tower is located in the country of",
    "hop2": "The capital of France is",
    "composed": "The capital of the country where the Eiffel Tower is located is",
    "paraphrases": ["Q: Who wrote Hamlet?\nA: Shakespeare\nQ: Which city is the Eiffel Tower's capital?\nA:"],
}


def test_question_rules():
    it = TwoHopItem.from_dict(ITEM)
    assert question(it, "hop2") == "Complete the sentence: The capital of France is"
    assert question(it, "paraphrases", 0) == "Which city is the Eiffel Tower's capital?"
    own = TwoHopItem.from_dict({**ITEM, "questions": {"hop2": "What is the capital of France?"}})
    assert question(own, "hop2") == "What is the capital of France?"
    assert question(own, "hop1").startswith("Complete the sentence: ")  # the others fall through
    assert cloze_question("What is the capital of France?") == "What is the capital of France?"
    assert qa_prompt("The capital of France is", question(it, "hop2")) == (
        "Q: Complete the sentence: The capital of France is\nA:"
    )
    assert qa_prompt(it.paraphrases[0], "ignored") == it.paraphrases[0]  # already in the qa form


def test_qa_turns():
    assert qa_turns("Q: a?\nA: b\nQ: c?\nA:") == ([("a?", "b")], "c?")
    assert qa_turns("Q: c?\nA:") == ([], "c?")
    assert qa_turns("The capital of France is") is None
    assert qa_turns("Q: a?\nA: b") is None  # no open question
    assert qa_turns("Q: c?\nA: more text after") is None


def test_form_checks_and_windows():
    assert FORMS == ("plain", "qa", "chat")
    with pytest.raises(PatchlabError, match=r"^form: unknown prompt form 'json' \(forms: plain, qa, chat\)$"):
        check_form("json")
    it = TwoHopItem.from_dict(ITEM)
    asks = TwoHopItem.from_dict({**ITEM, "form": "chat"})
    assert item_form(it, "qa") == "qa" and item_form(asks, "plain") == "chat"  # the item's own form wins
    with pytest.raises(PatchlabError, match="item 'x' field 'form': unknown prompt form 'cloze'"):
        item_form(TwoHopItem.from_dict({**ITEM, "form": "cloze"}))
    assert window([it], "plain") == NEW_TOKENS["plain"] == 6
    assert window([it, asks], "plain") == NEW_TOKENS["chat"]
    with pytest.raises(PatchlabError, match="field 'questions': entry 'hop3'"):
        question(TwoHopItem.from_dict({**ITEM, "questions": {"hop3": "?"}}), "hop1")


@pytest.mark.parametrize("command", ["evaluate", "locate", "edit"])
def test_unknown_form_exits_2_before_loading_a_model(tmp_path, capsys, command):
    extra = ["--failures", "--heads", "1.0"] if command == "edit" else []
    code = cli(command, "--form", "json", "--model", "no-such-model", *extra, "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --form: unknown prompt form 'json' (forms: plain, qa, chat)"


def test_answer_text_is_the_first_line_outside_the_plain_form():
    from patchlab.core.forms import answer_text

    assert answer_text(" Spain\nB: Europe\n", "qa") == "Spain"
    assert answer_text("\nThe capital of France is Paris.\nuser", "chat") == "The capital of France is Paris."
    assert answer_text(" Paris.\n\nThe answer", "plain") == " Paris.\n\nThe answer"
