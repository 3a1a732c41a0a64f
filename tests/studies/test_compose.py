"""Compositionality probes: the shipped probe data, the scoring maths on known inputs, error messages for
malformed probe files, compare() plumbing on the tiny model (loaded by path), and real scores on SmolLM2."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.studies import compose as C

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.mark.parametrize("task", C.TASKS)
def test_shipped_probes_validate_and_are_balanced(task):
    items = C.load_probes(task)
    test = C.split(items, "test")
    assert len(test) >= 150 and len({it["id"] for it in items}) == len(items)
    if task in C.ENTAILMENT:
        assert Counter(it["label"] for it in test) == {"yes": 90, "no": 90}
        demos = C.split(items, "demo")
        assert Counter(d["label"] for d in demos) == {"yes": 4, "no": 4}
        demo_nouns = {d[k].rstrip(".").split()[-1] for d in demos for k in ("premise", "hypothesis")}
        assert not demo_nouns & {it["noun"] for it in test}  # no test noun is a demonstration's noun
        by_cell = Counter((it["pattern"], it["label"]) for it in test)
        assert len(set(by_cell.values())) == 1  # every (pattern, label) cell the same size
    else:
        assert len({it["exocentric"] for it in test}) >= 60
        assert all(it["phrase"] != it["exocentric"] and it["phrase"].split()[-1] == it["noun"] for it in test)


def test_labels_follow_the_adjective_class():
    """A N => N is 'no' exactly for privative adjectives; A N => A N' is 'no' exactly for subsective ones."""
    for it in C.split(C.load_probes("substitutivity"), "test"):
        assert (it["label"] == "no") == (it["adj_class"] == "privative")
        assert it["hypothesis"].replace(f"{it['adjective']} ", "").replace(" an ", " a ") == it["premise"].replace(
            f"{it['adjective']} ", ""
        ).replace(" an ", " a ")
    for it in C.split(C.load_probes("systematicity"), "test"):
        no = {"hypernym": "privative", "adjective-hypernym": "subsective"}[it["pattern"]]
        assert (it["label"] == "no") == (it["adj_class"] == no) and it["hypernym"] in it["hypothesis"]


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"id": "a", "premise": "p", "hypothesis": "h"}', ":1: missing required field 'label'"),
        ('{"id": "a", "premise": "p", "hypothesis": "h", "label": "maybe"}', ":1: field 'label' must be 'yes' or 'no'"),
        ('{"id": "a", "premise": "p", "hypothesis": "h", "label": "yes", "split": "train"}', ":1: field 'split'"),
        ('{"id": "a", "premise": 3, "hypothesis": "h", "label": "yes"}', ":1: field 'premise' must be a string"),
        ('{"id": "a"', ":1: bad JSON"),
        ("[1, 2]", ":1: expected a JSON object"),
    ],
)
def test_malformed_probe_lines_name_file_line_and_field(tmp_path, line, needle):
    path = tmp_path / "probes.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PatchlabError) as err:
        C.load_probes("substitutivity", path)
    assert str(err.value) == f"{path}{needle}" or (
        str(err.value).startswith(f"{path}{needle}") and "\n" not in str(err.value)
    )


def test_duplicates_heads_and_unknown_tasks(tmp_path):
    path = tmp_path / "p.jsonl"
    row = {"id": "a", "premise": "p", "hypothesis": "h", "label": "yes"}
    path.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(PatchlabError, match=r":3: duplicate id 'a' \(first on line 1\)"):
        C.load_probes("substitutivity", path)
    path.write_text(json.dumps({"id": "b", "noun": "dog", "phrase": "big dog", "exocentric": "hot cat"}) + "\n")
    with pytest.raises(PatchlabError, match="must end in the noun 'dog'"):
        C.load_probes("overgeneralisation", path)
    path.write_text(json.dumps({**row, "split": "demo"}) + "\n")
    with pytest.raises(PatchlabError, match="no test items"):
        C.load_probes("substitutivity", path)
    with pytest.raises(PatchlabError, match="^tasks: unknown task 'plane'"):
        C.check_tasks(["substitutivity", "plane"])


def test_auroc_and_permutation_p_on_known_inputs():
    scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])
    assert C.auroc(scores, labels) == 0.75  # the textbook example
    assert C.auroc(torch.zeros(6), torch.tensor([True, False] * 3)) == 0.5  # all tied: chance
    assert C.auroc(-scores, labels) == 0.25
    g = torch.Generator().manual_seed(0)
    y = torch.rand(200, generator=g) > 0.5
    noise = torch.randn(200, generator=g)
    assert C.permutation_p(noise + 2 * y, y) < 0.001 and C.permutation_p(noise - 2 * y, y) < 0.001
    assert C.permutation_p(noise, y) > 0.05
    s = C.entailment_summary(noise + 2 * y, ["yes" if v else "no" for v in y])
    assert s["auroc"] > 0.85 and s["calibrated_accuracy"] > 0.75 and s["chance"] == 0.5


def test_demos_alternate_and_prompts_end_at_the_answer():
    items = C.load_probes("systematicity")
    demos = C.pick_demos(C.split(items, "demo"), 4)
    assert [d["label"] for d in demos] == ["yes", "no", "yes", "no"]
    prompt = C.entailment_prompt(C.split(items, "test")[0], demos)
    assert prompt.endswith("Answer:") and prompt.count("Answer: yes\n\n") == 2 and prompt.count("Premise:") == 5
    with pytest.raises(PatchlabError, match="^shots: 9 shots asked"):
        C.pick_demos(C.split(items, "demo"), 9)


def test_compare_on_the_tiny_model_by_path(tiny_dir, shipped, tmp_path):
    probe_files = {}
    for task in C.TASKS:  # a small slice of each shipped task (all demos kept)
        items = C.load_probes(task)
        keep = C.split(items, "demo") + C.split(items, "test")[:12]
        probe_files[task] = tmp_path / f"{task}.jsonl"
        probe_files[task].write_text("".join(json.dumps(it) + "\n" for it in keep))
    r = C.compare([str(tiny_dir)], probe_files=probe_files, prompt_set=shipped.stratified(1), shots=0, progress=False)
    name = str(tiny_dir)
    assert r.models == [name] and r.tasks == list(C.TASKS) and r.info[name]["n_layers"] == 2
    for task in C.ENTAILMENT:
        s = r.scores[name][task]
        assert s["n"] == 12 and 0 <= s["auroc"] <= 1 and 0 < s["p_value"] <= 1 and s["shots"] == 0
        assert len(s["items"]) == 12
    og = r.scores[name]["overgeneralisation"]
    assert len(og["share"]) == 3 and og["share"][0] == 0.5  # the embedding layer: the same head token, all tied
    assert r.gap[name]["n"] == len(shipped.stratified(1)) and r.headline(name, "overgeneralisation") == og["layer_mean"]
    back = C.CompareResult.from_json(r.to_json())
    assert back.scores == r.scores
    paths = r.save(tmp_path / "out")
    assert "Compositionality across models" in paths["figure.html"].read_text()


def test_cli_compare_rejects_unknown_task_and_model(tiny_dir, tmp_path, capsys):
    from patchlab.cli import main

    for args, needle in (
        (["--tasks", "plane"], "unknown task 'plane'"),
        (["--models", ","], "--models: give at least one"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["compare", "--models", str(tiny_dir), "--no-gap", *args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and needle in err


@pytest.mark.real
def test_smollm2_probe_scores_as_measured(smol):
    """Measured on all items (2 shots): SmolLM2 never prefers 'yes' (log-odds < 0 for every item) and does
    not beat chance on the entailment tasks, while its hidden states place endocentric phrases closer to
    the head noun than exocentric compounds in 0.89 of triples (layer mean; 0.50 at the embeddings by
    construction), against 0.47 through random weights. This test uses 40 substitutivity items and all triples."""
    sub = C.load_probes("substitutivity")
    sub = C.split(sub, "demo") + C.split(sub, "test")[:40]
    s = C.score_entailment(smol, sub)
    no_share = sum(it["label"] == "no" for it in C.split(sub, "test")) / 40
    assert s["n"] == 40 and s["yes_rate"] == 0.0 and s["accuracy"] == pytest.approx(no_share) and 0.3 < s["auroc"] < 0.7
    og = C.score_overgeneralisation(smol, C.load_probes("overgeneralisation"))
    assert og["share"][0] == 0.5 and og["layer_mean"] > 0.8 and og["ci95"][0] > 0.75
    assert min(og["share"][5:]) > 0.8 and og["mean_margin"][-1] > 0.2
    # the same test through random weights of the same shape sits at chance (measured 0.47, CI 0.39-0.56)
    from patchlab.studies.emergence import random_init_like

    rnd = C.score_overgeneralisation(random_init_like(smol), C.load_probes("overgeneralisation"))
    assert rnd["ci95"][0] < 0.5 < rnd["ci95"][1] and og["layer_mean"] - rnd["layer_mean"] > 0.3
