import pytest

from patchlab.methods.gap import GapResult, evaluate_gap, summarize


def test_summarize_counts_gap_over_items_with_both_hops_right():
    rows = [
        {"hop1": True, "hop2": True, "composed": False},
        {"hop1": True, "hop2": True, "composed": True},
        {"hop1": False, "hop2": True, "composed": False},
        {"hop1": True, "hop2": False, "composed": True},
    ]
    s = summarize(rows)
    assert (s["n"], s["both_hops"], s["gap_count"]) == (4, 2, 1)
    assert s["gap_share"] == 0.5 and s["composed_acc"] == 0.5 and s["hop1_acc"] == 0.75


@pytest.mark.real
def test_gap_on_real_slice_is_consistent(smol, shipped, tmp_path):
    ps = shipped.stratified(3)
    result = evaluate_gap(smol, ps, progress=False)
    assert len(result.items) == len(ps)
    per_kind = [v for k, v in result.summary.items() if k != "all"]
    total = result.summary["all"]
    assert sum(s["n"] for s in per_kind) == total["n"] == len(ps)
    assert sum(s["gap_count"] for s in per_kind) == total["gap_count"] == len(result.failures)
    # the small model knows most second hops (capitals, currencies ...) of the shipped set
    assert total["hop2_acc"] >= 0.7
    for row in result.items:
        if row["id"] in result.failures:
            assert row["hop1"] and row["hop2"] and not row["composed"]
    paths = result.save(tmp_path / "out")
    again = GapResult.from_json(paths["result.json"])
    assert again.summary == result.summary and again.failures == result.failures
    assert "plotly" in paths["figure.html"].read_text()[:5000].lower()


def test_failed_and_correct_items_select_in_the_callers_order(shipped):
    from patchlab.methods.gap import GapResult

    items = list(shipped)[:4]
    rows = [
        {"id": items[0].id, "hop1": True, "hop2": True, "composed": False},
        {"id": items[1].id, "hop1": True, "hop2": False, "composed": False},
        {"id": items[2].id, "hop1": True, "hop2": True, "composed": True},
        {"id": items[3].id, "hop1": True, "hop2": True, "composed": False},
    ]
    gap = GapResult("m", "p", rows, {})
    assert [it.id for it in gap.failed_items(reversed(items))] == [items[3].id, items[0].id]
    assert [it.id for it in gap.correct_items(items)] == [items[2].id]
