"""Head patching at the scale of real architectures, simulated: random weights in the published shapes.

No download and no hub: each model below is built in memory from its published shape (the fields of its
`config.json` on the Hugging Face hub: meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-0.5B, google/gemma-2-2b, copied
into `ARCHS` by hand), initialised by transformers' own `_init_weights` (normal, std = initializer_range),
and handed to TransformerLens' `TransformerBridge` as a model object (no disk round-trip). Tokens come from
the SmolLM2 tokenizer (ids < 49,152: valid in every vocab here). The anchor row, `smollm2-135m`, is the real
model (`load_model("smollm2-135m")`, its own weights, shape HuggingFaceTB/SmolLM2-135M's config.json).
Speed and memory depend on the shapes only; the weights are random, so no quality figure is measured here.

Per model, in its own fresh process (one at a time, so the peak memory is that model's own), on the same
template pairs (`template_pairs`, as in bench_locate.py), seconds per pair of:
  * TransformerLens' loops, run on `--tl-layers` evenly spaced layers × all heads and extrapolated linearly
    to all layers (each patch is one full forward whatever its layer, so the loop's time is linear in the
    number of layers patched): `get_act_patch_attn_head_out_all_pos` and `..._by_pos` restricted to the
    last position;
  * every entry of `METHODS`: patchlab exact (all positions), last position (cached prefix), attribution
    (AtP); adding a method is one line there;
and the max abs difference of each exact method vs its TransformerLens loop on the measured layers, the
peak memory (VmHWM; on CUDA also the peak allocated), and whether patchlab's fast paths (start at the patched
layer; last token on the cached prefix) passed their self-check on the model.

Then a cost model. Exact patching starts each batch of patched copies at the lowest layer it patches and runs
it to the top over the S positions after the prompts' shared prefix (of T), so a pair costs Σ over batches of
copies × (n_layers − start layer) layer-passes (≈ n_heads · n_layers² / 2), each ≈ S · P multiply-adds (P:
weights per layer, attention + gated MLP; plus the T² attention terms), and the metric's two vocabulary
columns per copy. Each column's work W (multiply-adds) and weights read R (one read of a layer's weights per
batched call of it) are counted that way from the shape (`costs`), and seconds ≈ W / compute rate + R /
weight-read rate is fitted per column (both rates >= 0, least squares on relative error), with each model's
residual: TransformerLens' loop runs one prompt at a time, so on a CPU its small matmuls are bound by reading
the weights as much as by arithmetic; patchlab's batches of up to 64 copies are compute-bound. Exact
patching's closed form, n_heads · n_layers²/2 · S · P over one fitted rate, is printed too. Rows for a longer
prompt (`name@N`: N shared filler tokens in front of both prompts) test the tokens term.

Usage: python benchmarks/bench_scale_models.py [--models smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,gemma-2-2b]
       [--pairs 1] [--tl-layers 2] [--threads 1] [--device cpu|cuda] [--dtype float32|bfloat16] [--json out.json]
       python benchmarks/bench_scale_models.py --from-json out.json   (report and refit a saved run)
Ends with machine-readable key=value lines.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = "smollm2-135m"  # the real model, cached on this machine
DEFAULT_MODELS = "smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,gemma-2-2b"

# The published shapes: fields of each model's config.json on the Hugging Face hub (weights never read).
ARCHS: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B: 1.24B parameters
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
        "initializer_range": 0.02,
    },
    # Qwen/Qwen2.5-0.5B: 0.49B parameters (q/k/v projections carry biases in Qwen2)
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "tie_word_embeddings": True, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": 24, "bos_token_id": 151643, "eos_token_id": 151643, "initializer_range": 0.02,
    },
    # google/gemma-2-2b: 2.61B parameters (its vocab of 256,000 alone is 0.59B)
    "gemma-2-2b": {
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "attention_bias": False, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, "initializer_range": 0.02,
    },
}  # fmt: skip


# --- what is measured -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One prompt pair as every method takes it: the pair, both runs' caches, the metric."""

    pair: object  # PatchPair
    clean: object  # RunCache
    corrupted: object  # RunCache
    metric: Callable


@dataclass(frozen=True)
class Method:
    label: str
    run: Callable  # (model, Case) -> {(layer, pos, head): value}
    baseline: str  # the TransformerLens loop it stands in for (a key of TL_LOOPS)
    exact: bool  # the same numbers as that loop: its max abs difference is reported
    work: str  # its cost-model work term: "exact", "last" or "grad" (see `costs`)


def _locate():
    from patchlab.methods import locate

    return locate


# One line per column.
METHODS: dict[str, Method] = {
    "exact": Method("patchlab exact", lambda m, c: _locate().exact_patch(m, c.clean, c.corrupted, c.metric, positions="all"), "tl_all", True, "exact"),  # noqa: E501
    "last": Method("patchlab last position", lambda m, c: _locate().exact_patch(m, c.clean, c.corrupted, c.metric, positions="last"), "tl_last", True, "last"),  # noqa: E501
    "atp": Method("attribution (AtP)", lambda m, c: _locate().attribution_patch(m, c.clean, c.pair, positions="all"), "tl_all", False, "grad"),  # noqa: E501
    "atp*": Method("AtP* (GradDrop blocks)", lambda m, c: _locate().atp_star_patch(m, c.clean, c.pair, positions="all"), "tl_all", False, "grad*"),  # noqa: E501
}  # fmt: skip

TL_LOOPS = {
    "tl_all": "TL loop, all positions",
    "tl_last": "TL loop, last position",
}


def tl_loop(model, case: Case, tl_cache, loop: str, layers: list[int]) -> dict:
    """TransformerLens' head-patching loop on `layers` × all heads: {(layer, None, head): metric}."""
    import pandas as pd
    from transformer_lens import patching

    heads = range(model.cfg.n_heads)
    last = case.corrupted.tokens.shape[1] - 1
    metric = lambda logits: case.metric(logits[:, -1])[0]  # noqa: E731
    if loop == "tl_all":
        index = pd.DataFrame([(l, h) for l in layers for h in heads], columns=["layer", "head"])
        fn = patching.get_act_patch_attn_head_out_all_pos
    else:
        index = pd.DataFrame([(l, last, h) for l in layers for h in heads], columns=["layer", "pos", "head"])
        fn = patching.get_act_patch_attn_head_out_by_pos
    values = fn(model, case.corrupted.tokens, tl_cache, metric, index_df=index, index_axis_names=None)
    return {(int(r.layer), None, int(r.head)): float(v) for r, v in zip(index.itertuples(), values.tolist())}


# --- building a model ----------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, int]:
    """'name' or 'name@N' (N shared filler tokens in front of both prompts of every pair)."""
    name, _, extra = spec.partition("@")
    if name != ANCHOR and name not in ARCHS:
        raise SystemExit(f"unknown model '{name}' (have: {ANCHOR}, {', '.join(ARCHS)})")
    return name, int(extra or 0)


def build_model(name: str, device: str, dtype):
    """The anchor from its cache, or a random-weight model of a published shape, booted as a bridge in memory."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from patchlab.runtime.decoding import ensure_decoding
    from patchlab.runtime.models import _tokenizer_adds_bos, ensure_cached, load_model, quiet_transformers

    if name == ANCHOR:
        return load_model(ANCHOR, device=device, dtype=dtype)
    quiet_transformers()
    fields = dict(ARCHS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval()
    tok = AutoTokenizer.from_pretrained(ensure_cached(ANCHOR))
    # load_model's steps for a folder, on a model object: boot, the tokenizer's BOS rule, eval, decoding check
    model = TransformerBridge.boot_transformers(
        f"random/{name}", hf_model=hf, tokenizer=tok, device=device, dtype=dtype
    )
    model.cfg.default_prepend_bos = _tokenizer_adds_bos(tok)
    model.eval()
    model.patchlab_name = f"random/{name}"
    ensure_decoding(model)
    return model


def filler_ids(model, n: int) -> list[int]:
    """n tokens of the shipped corpus: the same prefix for clean and corrupted, so pairs stay aligned."""
    text = (ROOT / "patchlab" / "data" / "corpus.txt").read_text()
    ids = model.tokenizer(text)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"the corpus has only {len(ids)} tokens")
    return ids[:n]


# --- the child: one model, one process ---------------------------------------------------------------------


def peak_bytes() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it is not carried over exec)."""
    from patchlab.runs.backends import peak_rss_mib

    return int(peak_rss_mib() * 2**20)


def child(spec: str, args) -> dict:
    import torch

    from patchlab.core.prompts import PromptSet
    from patchlab.runtime.bridge import hf_module
    from patchlab.runtime.models import parse_dtype
    from patchlab.runtime.trace import check_prefix_cache, check_run_from_layer

    L = _locate()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cuda = args.device.startswith("cuda")

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    name, extra = parse_spec(spec)
    start = sync()
    model = build_model(name, args.device, parse_dtype(args.dtype))
    load_s = sync() - start
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    hf = hf_module(model)
    row = {
        "spec": spec,
        "model": name,
        "weights": "real" if name == ANCHOR else "random",
        "params": sum(p.numel() for p in hf.parameters()),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(hf.config, "num_key_value_heads", None) or n_heads),
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_mlp": int(hf.config.intermediate_size),
        "vocab": int(hf.config.vocab_size),
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "rss_after_load_gb": peak_bytes() / 1e9,
        "loadavg_before": os.getloadavg()[0],
    }
    print(f"[{spec}] built in {load_s:.1f} s: {row['params'] / 1e6:.0f}M params", file=sys.stderr, flush=True)
    items = list(PromptSet.shipped())
    pairs = L.template_pairs(model, items[:80], items)[: args.pairs]
    if extra:
        prefix = filler_ids(model, extra)
        for p in pairs:
            p.clean, p.corrupted = prefix + p.clean, prefix + p.corrupted
    k = min(args.tl_layers, n_layers)
    tl_layers = sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})
    shared = [L._shared_prefix(torch.tensor([p.clean]), torch.tensor([p.corrupted])) for p in pairs]
    row.update(tokens=[len(p.clean) for p in pairs], shared=shared, tl_layers=tl_layers)
    loops = ["tl_all", "tl_last"] if args.tl_last else ["tl_all"]
    seconds = {key: 0.0 for key in [*loops, *METHODS]}
    diffs: dict[str, float] = {key: 0.0 for key, m in METHODS.items() if m.exact and m.baseline in loops}
    scale = 0.0
    for i, pair in enumerate(pairs):
        clean, corrupted = L.run_cache(model, pair.clean), L.run_cache(model, pair.corrupted)
        case = Case(pair, clean, corrupted, L.logit_diff_metric(pair.answer, pair.contrast))
        if i == 0:  # patchlab's once-per-model self-checks of its fast paths, outside the per-pair timings
            t = sync()
            row["fast_start_at_layer"] = check_run_from_layer(model, corrupted.tokens, corrupted.resid)
            row["fast_cached_prefix"] = check_prefix_cache(model, corrupted.tokens, corrupted.resid)
            row["self_check_s"] = sync() - t
        _, tl_cache = model.run_with_cache(clean.tokens)
        ref = {}
        for loop in loops:
            t = sync()
            ref[loop] = tl_loop(model, case, tl_cache, loop, tl_layers)
            seconds[loop] += sync() - t
            print(f"[{spec}] pair {i}: {TL_LOOPS[loop]} on {k} layers {seconds[loop]:.1f} s", file=sys.stderr)
        del tl_cache
        for key, method in METHODS.items():
            t = sync()
            got = method.run(model, case)
            seconds[key] += sync() - t
            print(f"[{spec}] pair {i}: {method.label} {seconds[key]:.2f} s cumulative", file=sys.stderr, flush=True)
            if key in diffs:
                base = ref[method.baseline]
                diffs[key] = max(diffs[key], max(abs(got[key_] - v) for key_, v in base.items()))
                scale = max(scale, max(abs(v) for v in base.values()))
    n = len(pairs)
    row["tl_measured_s_per_pair"] = {loop: seconds[loop] / n for loop in loops}
    row["tl_s_per_pair"] = {loop: seconds[loop] / n * n_layers / len(tl_layers) for loop in loops}
    row["s_per_pair"] = {key: seconds[key] / n for key in METHODS}
    row["max_abs_diff"] = diffs
    row["metric_scale"] = scale  # the largest |metric| of the TL loop: what the differences compare with
    row["peak_rss_gb"] = peak_bytes() / 1e9
    if cuda:
        row["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return row


# --- the cost model ----------------------------------------------------------------------------------------


def per_layer_macs(r: dict) -> int:
    """Multiply-adds per token per layer in the weights (= weights per layer): q, k, v, o and a gated MLP."""
    d, hd = r["d_model"], r["d_head"]
    return d * hd * (2 * r["n_heads"] + 2 * r["n_kv_heads"]) + 3 * d * r["d_mlp"]


def costs(r: dict, term: str) -> tuple[float, float]:
    """(W, R) of one pair for a work term: multiply-adds, and weights read (one read of a layer's weights per
    batched call of that layer), counted from the shape and patchlab's own batching (`_chunks`)."""
    n_layers, n_heads, T = r["n_layers"], r["n_heads"], round(float(np.mean(r["tokens"])))
    S = T - round(float(np.mean(r.get("shared", [0]))))  # positions an all-position patch recomputes
    p, attn, unembed = per_layer_macs(r), n_heads * r["d_head"], r["d_model"] * r["vocab"]
    forward = n_layers * T * (p + attn * (T + 1)) + T * unembed  # every position unembedded
    weights = n_layers * p + unembed
    if term in TL_LOOPS:  # one full forward per patched head
        return n_heads * n_layers * forward, n_heads * n_layers * weights
    if term == "grad":  # one forward and one backward to the activations (the fitted rate absorbs the backward)
        return forward, 2 * weights
    if term == "grad*":  # the same, for AtP's row and one row per GradDrop block, in one batch
        rows = min(_locate().GRADDROP_GROUPS, n_layers) + 1
        return rows * forward, 2 * weights
    defaults = inspect.signature(_locate().exact_patch).parameters
    jobs = [(layer, None, None, 0) for layer in range(n_layers) for _ in range(n_heads)]
    work = reads = 0.0
    for chunk in _locate()._chunks(jobs, defaults["max_batch"].default, defaults["span"].default):
        passes = len(chunk) * (n_layers - chunk[0][0])
        reads += (n_layers - chunk[0][0]) * p
        # only the metric's 2 vocabulary columns are unembedded (LogitDiff.reads)
        if term == "exact":  # the positions after the shared prefix recomputed
            work += passes * S * (p + attn * (T + 1)) + len(chunk) * 2 * r["d_model"]
        else:  # "last": the last token only, attending to the cached prefix
            work += passes * (p + 2 * attn * T) + len(chunk) * 2 * r["d_model"]
    return work, reads


def nonneg_fit(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """c >= 0 minimising Σ ((x·c − s) / s)²: least squares on relative error (every model weighs the same);
    exact for a few columns by trying every subset of them."""
    a = x / s[:, None]
    best, best_err = np.zeros(x.shape[1]), math.inf
    for mask in range(1, 2 ** x.shape[1]):
        cols = [j for j in range(x.shape[1]) if mask >> j & 1]
        if len(cols) > len(s):
            continue
        c, *_ = np.linalg.lstsq(a[:, cols], np.ones(len(s)), rcond=None)
        err = float(((a[:, cols] @ c - 1) ** 2).sum())
        if (c >= 0).all() and err < best_err - 1e-12:
            best, best_err = np.zeros(x.shape[1]), err
            best[cols] = c
    return best


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def fit(rows: list[dict]) -> dict:
    """Per column: seconds ≈ W / compute rate + R / weight-read rate, both rates fitted (>= 0), and residuals."""
    columns = [(loop, loop, "tl_s_per_pair") for loop in TL_LOOPS]
    columns += [(key, m.work, "s_per_pair") for key, m in METHODS.items()]
    out = {}
    for key, term, field in columns:
        pts = [(r["spec"], *costs(r, term), r[field][key]) for r in rows if key in r.get(field, {})]
        if not pts:
            continue
        x = np.array([[w, reads] for _, w, reads, _ in pts])
        s = np.array([p[3] for p in pts])
        c = nonneg_fit(x, s)
        predicted = x @ c
        out[key] = {
            "term": term,
            "s_per_gmac": c[0] * 1e9,
            "s_per_gparam_read": c[1] * 1e9,
            "gmac_per_s": 1 / c[0] / 1e9 if c[0] > 0 else None,
            "weights_gb_per_s": BYTES[rows[0]["dtype"]] / c[1] / 1e9 if c[1] > 0 else None,
            "residuals": {p[0]: float(v / q - 1) for p, v, q in zip(pts, s, predicted)},
            "gmacs": {p[0]: p[1] / 1e9 for p in pts},
            "gparams_read": {p[0]: p[2] / 1e9 for p in pts},
        }
        if term == "exact":  # the closed form alone, one constant: what to budget a new model with
            simple = np.array([[closed_form_macs(r)] for r in rows if key in r.get(field, {})])
            rate = nonneg_fit(simple, s)[0]
            out[key]["closed_form"] = {
                "gmac_per_s": 1 / rate / 1e9,
                "residuals": {p[0]: float(v / q - 1) for p, v, q in zip(pts, s, simple[:, 0] * rate)},
            }
    return out


def closed_form_macs(r: dict) -> float:
    """n_heads · n_layers² / 2 · S · P: exact patching's layer-passes times each one's multiply-adds (S: the
    positions after the prompts' shared prefix)."""
    suffix = float(np.mean(r["tokens"])) - float(np.mean(r.get("shared", [0])))
    return r["n_heads"] * r["n_layers"] ** 2 / 2 * suffix * per_layer_macs(r)


COST_FORMS = """\
Per pair: W multiply-adds and R weights read (P = weights per layer = d·d_head·(2·n_heads + 2·n_kv) + 3·d·d_mlp;
T tokens; V vocab; a batch's pass through a layer reads that layer's weights once, whatever its rows):
  TL loop   one full forward per head        W = n_heads·n_layers · [n_layers·T·(P + n_heads·d_head·(T+1)) + T·d·V]
                                             R = n_heads·n_layers · (n_layers·P + d·V)
  exact     batches of copies start at the   W = Σ_batches copies·(n_layers − start)·S·(P + n_heads·d_head·(T+1))
            layer they patch, run to the top     + copies·2·d  ≈  n_heads · n_layers²/2 · S · P
            over the S positions after the   R = Σ_batches (n_layers − start)·P
            prompts' shared prefix; 2 vocabulary columns unembedded
  last      the last token on the cached     W = Σ_batches copies·(n_layers − start)·(P + 2·n_heads·d_head·T) + copies·2·d
            prefix                           R as exact
  grad      attribution: one forward and     W = n_layers·T·(P + n_heads·d_head·(T+1)) + T·d·V (the rate absorbs the
            one backward                         backward), R = 2·(n_layers·P + d·V)
  grad*     AtP*: the same in G + 1 rows     W = (G + 1) × grad's, R as grad
seconds ≈ W / compute rate + R / weight-read rate; both rates >= 0, fitted per column by least squares on relative
error over the measured models (a rate shown as — is not needed: that column's fit is better without its term)."""


def fit_table(fitted: dict, rows: list[dict]) -> str:
    specs = [r["spec"] for r in rows]
    head = ["column", "work term", "compute GMAC/s", "weights read GB/s", *[f"residual {s}" for s in specs]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, f in fitted.items():
        rates = [f"{v:.1f}" if v else "—" for v in (f["gmac_per_s"], f["weights_gb_per_s"])]
        res = [f"{f['residuals'][s]:+.0%}" if s in f["residuals"] else "" for s in specs]
        lines.append("| " + " | ".join([label(key), f["term"], *rates, *res]) + " |")
    return "\n".join(lines)


def exact_closed_form(fitted: dict) -> str | None:
    f = fitted.get("exact", {}).get("closed_form")
    if not f:
        return None
    res = ", ".join(f"{spec} {v:+.0%}" for spec, v in f["residuals"].items())
    return (
        f"closed form, {METHODS['exact'].label}: seconds per pair ≈ n_heads · n_layers²/2 · S · P / "
        f"({f['gmac_per_s']:.1f}e9 multiply-adds per second); residuals {res}"
    )


# --- the parent: one child per model, tables, fit --------------------------------------------------------------


def label(key: str) -> str:
    return TL_LOOPS.get(key) or METHODS[key].label


def run_child(spec: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec, "--pairs", str(args.pairs)]
    cmd += ["--tl-layers", str(args.tl_layers), "--device", args.device, "--dtype", args.dtype]
    cmd += ["--threads", str(args.threads), "--tl-last" if args.tl_last else "--no-tl-last"]
    start = time.perf_counter()
    env = {**os.environ, "PATCHLAB_QUIET": "1", "TQDM_DISABLE": "1"}
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"spec": spec, "error": f"{why} after {wall:.0f} s", "wall_s": wall}
    return {**json.loads(lines[-1][len("RESULT ") :]), "wall_s": wall}


def model_table(r: dict) -> str:
    k = len(r["tl_layers"])
    lines = [
        f"### {r['spec']} ({r['weights']} weights): {r['params'] / 1e6:.0f}M params, {r['n_layers']} layers × "
        f"{r['n_heads']} heads ({r['n_kv_heads']} KV), d_model {r['d_model']}, {'/'.join(map(str, r['tokens']))} "
        f"tokens, {r['device']} {r['dtype']}, torch threads {r['threads']}",
        "",
        "| | seconds per pair | vs its TL loop | max abs diff vs TL |",
        "| --- | --- | --- | --- |",
    ]
    for loop, s in r["tl_s_per_pair"].items():
        measured = r["tl_measured_s_per_pair"][loop]
        lines.append(f"| {TL_LOOPS[loop]} (extrapolated from {k} layers: {measured:.1f} s measured) | {s:.1f} | 1× | |")
    for key, m in METHODS.items():
        s = r["s_per_pair"][key]
        base = r["tl_s_per_pair"].get(m.baseline)
        ratio = f"{base / s:.1f}× ({TL_LOOPS[m.baseline]})" if base else ""
        diff = f"{r['max_abs_diff'][key]:.1e}" if key in r["max_abs_diff"] else ""
        lines.append(f"| {m.label} | {s:.2f} | {ratio} | {diff} |")
    mem = f"peak RSS {r['peak_rss_gb']:.2f} GB (after building the model {r['rss_after_load_gb']:.2f} GB)"
    if "peak_cuda_gb" in r:
        mem += f", peak CUDA allocated {r['peak_cuda_gb']:.2f} GB"
    lines += [
        "",
        f"{mem}; built in {r['load_s']:.0f} s; fast paths: start at layer {r['fast_start_at_layer']}, cached prefix "
        f"{r['fast_cached_prefix']} (self-check {r['self_check_s']:.1f} s, once per model); |metric| up to "
        f"{r['metric_scale']:.3g}; load average before {r['loadavg_before']:.1f}",
    ]
    return "\n".join(lines)


def summary_table(rows: list[dict], k: int) -> str:
    loops = [loop for loop in TL_LOOPS if any(loop in r["tl_s_per_pair"] for r in rows)]
    head = ["model", "params", "layers × heads", "d_model", "tokens"]
    head += [f"{TL_LOOPS[loop]} s/pair (extrapolated from {k} layers)" for loop in loops]
    head += [f"{m.label} s/pair (× vs {TL_LOOPS[m.baseline]})" for m in METHODS.values()]
    exact = [m.label for m in METHODS.values() if m.exact]
    head += ["peak RSS GB", f"max abs diff vs TL on the measured layers ({', '.join(exact)})"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["spec"] + (" (real)" if r["weights"] == "real" else ""), f"{r['params'] / 1e9:.2f}B"]
        cells += [f"{r['n_layers']} × {r['n_heads']}", str(r["d_model"]), "/".join(map(str, r["tokens"]))]
        cells += [f"{r['tl_s_per_pair'][loop]:.1f}" if loop in r["tl_s_per_pair"] else "" for loop in loops]
        for key, m in METHODS.items():
            s, base = r["s_per_pair"][key], r["tl_s_per_pair"].get(m.baseline)
            cells.append(f"{s:.2f} ({base / s:.1f}×)" if base else f"{s:.2f}")
        cells += [f"{r['peak_rss_gb']:.2f}", ", ".join(f"{r['max_abs_diff'][key]:.1e}" for key in r["max_abs_diff"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path | None, args: dict, rows: list[dict], failed: list[dict]) -> None:
    if path is None:
        return
    data = {"args": args, "models": rows, "failed": failed, "fit": fit(rows) if rows else {}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def report(rows: list[dict], failed: list[dict]) -> None:
    """The summary table, the cost model and the key=value lines."""
    k = max(len(r["tl_layers"]) for r in rows)
    print(summary_table(rows, k) + "\n")
    fitted = fit(rows)
    print(COST_FORMS + "\n")
    print(fit_table(fitted, rows) + "\n")
    closed = exact_closed_form(fitted)
    if closed:
        print(closed + "\n")
    print(f"scale_models={len(rows)}")
    print(f"scale_failed={','.join(f['spec'] for f in failed) or 'none'}")
    for r in rows:
        tag = r["spec"].replace("@", "_at")
        for key in METHODS:
            print(f"{key}_s_per_pair_{tag}={r['s_per_pair'][key]:.3g}")
        for loop, s in r["tl_s_per_pair"].items():
            print(f"{loop}_s_per_pair_{tag}={s:.3g}")
        print(f"peak_rss_gb_{tag}={r['peak_rss_gb']:.2f}")
    for key, f in fitted.items():
        for name, v in (("gmac_per_s", f["gmac_per_s"]), ("weights_gb_per_s", f["weights_gb_per_s"])):
            print(f"cost_{key}_{name}={v:.3g}" if v else f"cost_{key}_{name}=none")
        print(f"cost_{key}_max_abs_residual={max(abs(v) for v in f['residuals'].values()):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of {ANCHOR}, {', '.join(ARCHS)}")
    ap.add_argument("--pairs", type=int, default=1, help="template pairs per model")
    ap.add_argument("--tl-layers", type=int, default=2, help="layers the TransformerLens loops run on")
    ap.add_argument("--tl-last", action=argparse.BooleanOptionalAction, default=True, help="also its last-pos loop")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per model (0: torch's default; 1 on a shared machine)"
    )
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per model before it is given up")
    ap.add_argument("--json", type=Path, default=None, help="write every finished model here (after each one)")
    ap.add_argument("--from-json", type=Path, default=None, help="measure nothing: report (and refit) a saved run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        rows, failed = data["models"], data["failed"]
        for r in rows:
            print("\n" + model_table(r) + "\n")
        for f in failed:
            print(f"\n{f['spec']}: FAILED ({f['error']})\n")
        write_json(args.json, data["args"], rows, failed)
    else:
        saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        specs = [s.strip() for s in args.models.split(",") if s.strip()]
        for spec in specs:
            parse_spec(spec)
        rows, failed = [], []
        for spec in specs:
            r = run_child(spec, args)
            if "error" in r:
                failed.append(r)
                print(f"\n{spec}: FAILED ({r['error']})\n", flush=True)
            else:
                rows.append(r)
                print("\n" + model_table(r) + "\n", flush=True)
            write_json(args.json, saved, rows, failed)
    if not rows:
        raise SystemExit("no model finished")
    report(rows, failed)


if __name__ == "__main__":
    main()
