"""Attention views of heads on the real SmolLM2: the figure's numbers are the model's own attention (checked
against plain transformers), shares sum to 1, spans decode to the entity, and the command line writes it."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.methods.gap import evaluate_gap
from patchlab.methods.heads import attention_view, char_span, token_offsets, token_span
from patchlab.runtime.scoring import encode

pytestmark = pytest.mark.real

HEADS = "23.4,23.5"
IDS = ["landmark-capital-0000", "person-capital-0000", "city-continent-0000", "work-birthcountry-0000"]


@pytest.fixture(scope="module")
def items(shipped):
    chosen = [it for it in shipped if it.id in IDS]
    assert len(chosen) == len(IDS)
    return chosen


@pytest.fixture(scope="module")
def view(smol, items):
    gap = evaluate_gap(smol, items, progress=False)
    return attention_view(smol, items, HEADS, gap=gap)


@pytest.fixture(scope="module")
def hf_model():
    """The same weights as a plain transformers model (eager attention), independent of TransformerLens."""
    from transformers import AutoModelForCausalLM

    from patchlab.runtime.models import model_cache_dir

    model = AutoModelForCausalLM.from_pretrained(
        model_cache_dir("smollm2-135m"), attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


def _heatmap(fig, name):
    return next(t for t in fig.data if t.type == "heatmap" and t.name == name)


def test_figure_numbers_are_the_models_attention(smol, view, items, hf_model):
    fig = view.figure()
    heads = [tuple(map(int, h.split("."))) for h in view.heads]
    for it in items:
        for prompt, text in (("composed", it.composed), ("guide", it.hop2)):
            ids = torch.tensor([encode(smol, text)])
            with torch.inference_mode():
                attn = hf_model(ids, output_attentions=True).attentions  # [layer] [1, head, q, k]
                _, cache = smol.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
            z = torch.tensor(_heatmap(fig, f"{it.id}: {prompt}").z, dtype=torch.float64)
            assert z.shape == (len(heads), ids.shape[1])
            for row, (layer, head) in enumerate(heads):
                ref = attn[layer][0, head, -1].double()
                assert torch.allclose(z[row], ref, atol=1e-5), (it.id, prompt, layer, head)
                tl = cache[f"blocks.{layer}.attn.hook_pattern"][0, head, -1].double()
                assert torch.allclose(z[row], tl, atol=1e-6)


def test_shares_sum_to_one_and_match_the_pattern(view):
    for it in view.items:
        for prompt, entity in (("composed", "subject"), ("guide", "bridge")):
            v = it[prompt]
            for h, row in enumerate(v["pattern"]):
                start, stop = v["span"]
                assert abs(sum(row) - 1) < 1e-5
                assert v["share"][entity][h] == pytest.approx(sum(row[start:stop]), abs=1e-9)
                assert v["share"][entity][h] + v["share"]["rest"][h] == pytest.approx(1, abs=1e-5)
    for s in view.summary.values():
        for prompt, entity in (("composed", "subject"), ("guide", "bridge")):
            for a, b in zip(s[prompt][entity], s[prompt]["rest"]):
                assert a + b == pytest.approx(1, abs=1e-5)
    assert set(view.summary) <= {"correct", "failed", "other"} and sum(s["n"] for s in view.summary.values()) == 4


def test_spans_decode_to_the_subject_and_the_bridge(smol, view, items):
    decode = smol.tokenizer.decode
    by_id = {it.id: it for it in items}
    multi = 0
    for row in view.items:
        it = by_id[row["id"]]
        ids = encode(smol, it.composed)
        start, stop = row["composed"]["span"]
        assert decode(ids[start:stop]).strip() == it.subject
        multi += stop - start > 1
        ids = encode(smol, it.hop2)
        start, stop = row["guide"]["span"]
        assert decode(ids[start:stop]).strip() == it.bridge
    assert multi >= 2  # "Eiffel Tower" (3 tokens), "Albert Einstein" (2)


def test_offsets_without_a_fast_tokenizer_give_the_same_spans(smol, items):
    slow = SimpleNamespace(tokenizer=SimpleNamespace(is_fast=False, decode=smol.tokenizer.decode))
    for it in items:
        ids = encode(smol, it.composed)
        chars = char_span(it.composed, it.subject)
        fast = token_span(token_offsets(smol, it.composed, ids), chars)
        assert token_span(token_offsets(slow, it.composed, ids), chars) == fast


def test_char_span_prefers_whole_words():
    assert char_span("Turkey is in Turkeyland and Turkey", "Turkey") == (0, 6)
    assert char_span("the Rome of Romeo", "Rome") == (4, 8)
    assert char_span("in Romeo", "Rome") == (3, 7)  # no whole word: any occurrence
    assert char_span("in paris", "Paris") == (3, 8) and char_span("x", "y") is None


@pytest.mark.parametrize(
    "heads, needle",
    [("23.9", "head 9 does not exist"), ("30.0", "layer 30 does not exist"), ("23", "is not a head"), ("", "no heads")],
)
def test_bad_heads_are_one_line_errors_naming_the_parameter(smol, items, heads, needle):
    with pytest.raises(PatchlabError) as exc:
        attention_view(smol, items[:1], heads, gap=evaluate_gap(smol, items[:1], progress=False))
    assert exc.value.param == "heads" and needle in str(exc.value) and "\n" not in str(exc.value)


def test_cli_writes_result_and_offline_figure(tmp_path, shipped):
    from test_cli import run_cli

    ps = tmp_path / "two.jsonl"
    ps.write_text("".join(json.dumps(shipped[i].to_dict()) + "\n" for i in IDS[:2]))
    out = tmp_path / "heads"
    code, stdout, err = run_cli("heads", "--heads", HEADS, "--prompt-set", str(ps), "--ids", ",".join(IDS[:2]),
                                "--out", str(out))  # fmt: skip
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["type"] == "head-attention" and result["heads"] == HEADS.split(",")
    assert [r["id"] for r in result["items"]] == IDS[:2] and result["meta"]["model"] == "smollm2-135m"
    page = (out / "figure.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page) and len(page) > 1_000_000  # plotly.js inlined, nothing fetched
    assert "Attention from the last position" in stdout
    assert not list(out.glob(".patchlab-tmp*"))

    code, _, err = run_cli("heads", "--heads", "23.9", "--prompt-set", str(ps), "--out", str(tmp_path / "bad"))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--heads" in lines[0] and "head 9 does not exist" in lines[0], err
    assert not (tmp_path / "bad").exists()
