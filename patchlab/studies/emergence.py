"""Information emergence (IE) across layers, after Chen et al. 2024, "Quantifying Semantic Emergence in
Language Models" (arXiv 2405.12617).

For block l with input h_l (`blocks.l.hook_resid_pre`) and output h_{l+1} (`blocks.l.hook_resid_post`):

    E(l) = MI(h_{l+1}^macro; h_l^macro) - (1/T) sum_t MI(h_{l+1}^{micro,t}; h_l^{micro,t})

* macro: the last position of the whole sequence; every sequence has the same token length T, so
  positions are aligned across the data set;
* micro t: token t of the sequence run through the model on its own, as a one-token sequence (after
  BOS when the model's tokenizer adds one), read at that token;
* every MI is taken across the data set: row i is sequence i (micro rows repeat whenever two sequences
  share a token at position t).

A block is a deterministic map, so the MI of its continuous input and output is not finite: every value
here is the estimator's (`patchlab.mi`). The Gaussian default looks at each side through its top `dim`
principal components and its ridge acts as a noise floor (at most ~5 bits per component with the
default ridge 1e-3). Compare conditions at the same estimator, `dim` and n, never absolute values; the
shipped controls are the same tokens shuffled within each sequence and a randomly initialised model of
the same shape. Every result records the estimator, its options, n and T beside the numbers.

Hidden states come from TransformerLens hooks and are cached (`HiddenStates`, safetensors) under the
patchlab cache, keyed by the weights' sha256 and the token ids, so estimator tuning never re-runs the
model.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.io import atomic_write_bytes
from patchlab.core.progress import track
from patchlab.methods.lens import lens_logits, resid_hook_names
from patchlab.results.base import Result
from patchlab.runtime.bridge import hf_module, model_name
from patchlab.runtime.identity import provenance
from patchlab.runtime.models import cache_root
from patchlab.runtime.scoring import DEFAULT_BATCH, answer_token_id
from patchlab.runtime.shards import shard_task
from patchlab.runtime.trace import trace
from patchlab.studies.mi import DEFAULT_ESTIMATOR, ESTIMATORS, MIN_SAMPLES, mi

DEFAULT_DIM = 8  # principal components per side for the Gaussian estimator (n of ~150 needs dim << n / 2)
DEFAULT_RIDGE = 0.1  # gaussian: noise at 10% of each whitened component's variance (see the module doc)
DEFAULT_BOOT = 10
DEFAULT_PRE_DIM = 64  # streams are first rotated onto this many principal components (speed)
RANK_TOL = 1e-12  # eigenvalues below this share of the largest are round-off (repeated rows)
DEFAULT_KEEP = 0.75  # with no explicit length, T keeps at least this share of the texts
EXPERIMENTS = ("natural", "icl", "twohop")
STATES_FORMAT = 1


# ---------------------------------------------------------------------------------------------- texts


def read_texts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (lines starting with '#' are comments)."""
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise PatchlabError(f"cannot read texts ({exc.strerror or exc})", where=str(path)) from None
    except UnicodeDecodeError as exc:
        raise PatchlabError(f"not valid UTF-8 (byte {exc.start})", where=str(path)) from None
    texts = [line.strip() for line in raw.split("\n")]
    texts = [t for t in texts if t and not t.startswith("#")]
    if not texts:
        raise PatchlabError("holds no texts (one per line)", where=str(path))
    return texts


def shipped_texts(name: str = "sentences") -> list[str]:
    """A text file shipped in patchlab/data (`sentences`: 196 natural sentences; `corpus`: 170 templated ones)."""
    path = resources.files("patchlab") / "data" / f"{name}.txt"
    return read_texts(Path(str(path)))


def bos_prefix(model) -> list[int]:
    """[BOS] when the model's tokenizer prepends one (Gemma), else [] (SmolLM2)."""
    bos = model.tokenizer.bos_token_id
    return [int(bos)] if model.cfg.default_prepend_bos and bos is not None else []


def token_lists(model, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids without BOS (the BOS rule is applied when the model runs)."""
    return [list(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


@dataclass
class Aligned:
    """Equal-length token rows and where they came from."""

    tokens: Int[Tensor, "n T"]
    kept: list[int]  # index of each row's text in the input
    note: str  # how the texts were cut, for the result


def equal_length(model, texts: Sequence[str], length: int | None = None, keep: float = DEFAULT_KEEP) -> Aligned:
    """Cut texts to one token length T: the first T tokens of every text with at least T; shorter texts dropped.

    With `length` None, T is the largest length that at least `keep` of the texts reach.
    """
    if not texts:
        raise PatchlabError("no texts given", param="texts")
    lists = token_lists(model, texts)
    lens = sorted((len(s) for s in lists), reverse=True)
    if length is None:
        length = lens[max(0, math.ceil(keep * len(lens)) - 1)]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise PatchlabError(f"must be a positive int, got {length!r}", param="length")
    n_ctx = int(model.cfg.n_ctx) - len(bos_prefix(model))
    if length > n_ctx:
        raise PatchlabError(f"{length} tokens exceed the model's context ({n_ctx})", param="length")
    kept = [i for i, s in enumerate(lists) if len(s) >= length]
    if len(kept) < MIN_SAMPLES:
        raise PatchlabError(
            f"only {len(kept)} of {len(texts)} texts have >= {length} tokens; need {MIN_SAMPLES}", param="texts"
        )
    tokens = torch.tensor([lists[i][:length] for i in kept], dtype=torch.long)
    cut = sum(len(lists[i]) > length for i in kept)
    note = f"first {length} tokens of each text; {len(texts) - len(kept)} shorter texts dropped, {cut} cut"
    return Aligned(tokens, kept, note)


def shuffle_tokens(tokens: Int[Tensor, "n T"], seed: int = 0) -> Int[Tensor, "n T"]:
    """The same tokens in a random order within each row (the unigram content kept, the syntax destroyed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([row[torch.randperm(len(row), generator=gen)] for row in tokens])


def tokens_hash(tokens: Int[Tensor, "n T"], bos: Sequence[int]) -> str:
    """sha256 of the token rows and the BOS rule: the data part of the hidden-state cache key."""
    h = hashlib.sha256(f"{tuple(tokens.shape)}|{list(bos)}|".encode())
    h.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- hidden states


@dataclass
class HiddenStates:
    """Residual streams at every block boundary: the last position of each sequence and each token run alone.

    Stream s is the input of block s (`hook_resid_pre`) for s < n_layers and the last block's output
    (`hook_resid_post`) for s = n_layers, so block l maps stream l to stream l + 1.
    """

    tokens: Int[Tensor, "n T"]  # content tokens (no BOS)
    macro: Float[Tensor, "n s d"]  # last position of every whole sequence
    vocab: Int[Tensor, " u"]  # the distinct tokens, sorted
    micro: Float[Tensor, "u s d"]  # each distinct token as a one-token sequence (after BOS if any)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_streams(self) -> int:
        return int(self.macro.shape[1])

    def micro_rows(self, t: int) -> Int[Tensor, " n"]:
        """Row of `micro` holding the token at position t of each sequence."""
        return torch.searchsorted(self.vocab, self.tokens[:, t].contiguous())

    def save(self, path: str | Path) -> Path:
        """One safetensors file (tensors + JSON metadata), written atomically."""
        from safetensors.torch import save

        tensors = {"tokens": self.tokens, "macro": self.macro, "vocab": self.vocab, "micro": self.micro}
        blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"patchlab": json.dumps(self.meta)})
        return atomic_write_bytes(path, blob)

    @classmethod
    def load(cls, path: str | Path) -> HiddenStates:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("patchlab", "{}"))
                tensors = {k: fh.get_tensor(k) for k in ("tokens", "macro", "vocab", "micro")}
        except Exception as exc:  # a truncated or foreign file: say which
            raise PatchlabError(f"not a patchlab hidden-state file ({type(exc).__name__})", where=str(path)) from None
        return cls(meta=meta, **tensors)


def capture_last(
    model, tokens: Int[Tensor, "n pos"], batch_size: int = DEFAULT_BATCH, progress: str | None = None
) -> Float[Tensor, "n s d"]:
    """Every stream at the last position of equal-length rows (BOS is prepended here when the model uses one)."""
    names = resid_hook_names(model)
    bos = bos_prefix(model)
    if bos:
        tokens = torch.cat([torch.full((tokens.shape[0], 1), bos[0], dtype=torch.long), tokens], 1)
    out = []
    starts = range(0, tokens.shape[0], batch_size)
    with torch.inference_mode():
        for start in track(starts, progress, total=len(starts)):
            t = trace(model, tokens[start : start + batch_size], names, at=-1, to_cpu=True)
            out.append(torch.stack([t[n] for n in names], 1))
    return torch.cat(out)


def states_path(cache_dir: str | Path | None, weights: str, data: str) -> Path:
    """Where the hidden states of these weights on these tokens are cached."""
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "hidden"
    return root / f"{weights[:16]}-{data[:16]}.safetensors"


def _weights_sha256(model) -> str:
    """The model's weights hash, computed once per model (as every result records it), not on every capture."""
    from patchlab.runtime.identity import weights_id

    return weights_id(model)["weights_sha256"]


class Capturer(Protocol):
    """Captures hidden states elsewhere (e.g. `patchlab.runs.jobs.ShardedCapture`: a sharded run's workers),
    for the model whose weights hash is `weights_sha256`; other models are captured in this process."""

    weights_sha256: str

    def __call__(self, tokens: Tensor, bos: list[int], streams: list[str], batch_size: int) -> HiddenStates: ...


def hidden_states(
    model,
    tokens: Int[Tensor, "n T"],
    cache_dir: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
    weights: str | None = None,
    capture: Capturer | None = None,
) -> HiddenStates:
    """Macro and micro streams of equal-length token rows, read from / written to the cache when it has them.

    The cache key is the weights' sha256 (`weights`, computed if None) and the token rows with the BOS
    rule; pass cache_dir=False to skip the cache. A `capture` of this model's weights captures them instead
    of this process (a sharded run).
    """
    if tokens.ndim != 2 or tokens.shape[0] < MIN_SAMPLES or tokens.shape[1] < 1:
        raise PatchlabError(f"need [n >= {MIN_SAMPLES}, T >= 1] token rows, got {tuple(tokens.shape)}", param="tokens")
    bos = bos_prefix(model)
    data = tokens_hash(tokens, bos)
    path = None
    if cache_dir is not False:
        weights = weights or _weights_sha256(model)
        path = states_path(cache_dir, weights, data)
        if path.is_file():
            hs = HiddenStates.load(path)
            if (
                hs.meta.get("format") == STATES_FORMAT
                and hs.meta.get("tokens_sha256") == data
                and torch.equal(hs.tokens, tokens)
            ):
                return hs
    if capture is not None and (weights or _weights_sha256(model)) == capture.weights_sha256:
        hs = capture(tokens, bos, resid_hook_names(model), batch_size)
    else:
        macro = capture_last(model, tokens, batch_size, "hidden states (sequences)" if progress else None)
        vocab = torch.unique(tokens)
        micro = capture_last(
            model, vocab[:, None], 8 * batch_size, "hidden states (tokens alone)" if progress else None
        )
        meta = {
            "format": STATES_FORMAT,
            "model": model_name(model),
            "weights_sha256": weights,
            "tokens_sha256": data,
            "bos": bos,
            "streams": resid_hook_names(model),
        }
        hs = HiddenStates(tokens.clone(), macro, vocab, micro, meta)
    if path is not None:
        hs.save(path)
    return hs


# --------------------------------------------------------------------------------------------- IE


@dataclass
class EmergenceResult(Result):
    """Per-block information emergence with its macro and micro parts (bits), and how it was estimated."""

    kind = "emergence"
    heading = "Information emergence"
    intro = (
        "Per block: MI between the block's input and output at the last position of whole sequences, minus "
        "the mean MI of single tokens run on their own (Chen et al. 2024); estimator and sample size are "
        "stated in the figure."
    )
    order = 70
    model: str
    condition: str
    layers: list[int]  # block l: stream l -> stream l + 1
    ie: list[float]
    macro: list[float]
    micro: list[float]  # mean over positions
    micro_t: list[list[float]]  # [layer][position]
    ie_std: list[float] | None  # over bootstrap resamples of the sequences (gaussian) or over seeds (neural)
    macro_std: list[float] | None
    micro_std: list[float] | None
    spread_kind: str  # "bootstrap", "seeds" or "none"
    estimator: str
    estimator_params: dict[str, Any]
    n: int  # sequences (rows of every MI)
    T: int  # tokens per sequence (without BOS)
    distinct_t: list[int]  # distinct tokens at each position (micro rows repeat otherwise)
    data_note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self):
        from patchlab.results import tables

        return tables.emergence_table(self)

    def figure(self):
        from patchlab.results.figures import emergence_figure

        return emergence_figure({self.condition or "ie": self.to_json()}, self.model, "")


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """All blocks when None, else each a block index."""
    if layers is None:
        return list(range(n_layers))
    out = list(layers)
    bad = [l for l in out if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers]
    if bad or not out:
        raise PatchlabError(f"need block indices in 0..{n_layers - 1}, got {bad or out}", param="layers")
    return out


def ceiling_bits(dim: int, ridge: float) -> float:
    """The largest Gaussian MI with `dim` components and noise floor `ridge`: dim/2 log2((1+r)^2 / (r(2+r)))."""
    return dim / 2 * math.log2((1 + ridge) ** 2 / (ridge * (2 + ridge))) if ridge > 0 else math.inf


@dataclass
class _Streams:
    """Per stream, the macro states of the base rows and, per position, the micro states of the same rows,
    each rotated onto its own top principal components (float64)."""

    macro: dict[int, Float[Tensor, "n k"]]
    micro: dict[int, list[Float[Tensor, "n k"]]]  # stream -> [position]


def reduce_pca(a: Float[Tensor, "m d"], k: int | None) -> Float[Tensor, "m r"]:
    """`a` centred and rotated onto its top-k principal components (unscaled scores; k None: all of them).

    Components without variance (beyond the rank of a sample whose rows repeat, e.g. a token shared by
    many sequences) are dropped, so r <= min(k, rank). Uses the eigen-decomposition of the smaller of the
    Gram and the covariance matrix (much faster than an SVD here); a later PCA to <= r components is
    exactly the PCA of `a`.
    """
    c = a.to(torch.float64)
    c = c - c.mean(0)
    m, d = c.shape
    k = min(k or d, m, d)
    if m < d:
        vals, vecs = torch.linalg.eigh(c @ c.T)
        vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
        scores = vecs * vals.clamp_min(0).sqrt()[None, :]
    else:
        vals, vecs = torch.linalg.eigh(c.T @ c)
        vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
        scores = c @ vecs
    live = vals > RANK_TOL * vals[0].clamp_min(1e-300)
    return scores[:, live]


def _streams(hs: HiddenStates, base: Tensor, layers: list[int], pre_dim: int | None) -> _Streams:
    """Reduce every stream the blocks in `layers` read or write (macro once, micro once per position)."""
    wanted = sorted({s for l in layers for s in (l, l + 1)})
    rows = [hs.micro_rows(t)[base] for t in range(hs.tokens.shape[1])]
    return _Streams(
        macro={s: reduce_pca(hs.macro[base, s], pre_dim) for s in wanted},
        micro={s: [reduce_pca(hs.micro[r, s], pre_dim) for r in rows] for s in wanted},
    )


def _mi_bits(y: Tensor, x: Tensor, estimator: str, kw: dict[str, Any]) -> float:
    """MI in bits; 0 when a side does not vary (e.g. the same token at one position in every sequence)."""
    if y.shape[1] == 0 or x.shape[1] == 0:
        return 0.0
    return mi(y, x, estimator=estimator, **kw).value_bits


def _block_mi(st: _Streams, rows: Tensor, layer: int, estimator: str, kw: dict[str, Any]) -> tuple[float, list[float]]:
    """Macro MI and the per-position micro MIs of block `layer` on rows `rows` (indices into the base rows)."""
    macro = _mi_bits(st.macro[layer + 1][rows], st.macro[layer][rows], estimator, kw)
    outs, ins = st.micro[layer + 1], st.micro[layer]
    return macro, [_mi_bits(o[rows], i[rows], estimator, kw) for o, i in zip(outs, ins)]


def emergence_from_states(
    hs: HiddenStates,
    layers: Sequence[int] | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    n_boot: int = DEFAULT_BOOT,
    seeds: Sequence[int] = (0,),
    rows: Sequence[int] | None = None,
    condition: str = "",
    pre_dim: int | None = DEFAULT_PRE_DIM,
    progress: bool = True,
    **mi_kw: Any,
) -> EmergenceResult:
    """IE per block from cached states (no model run): tune the estimator here.

    gaussian: the plain estimate, with the std over `n_boot` bootstrap resamples of the sequences (each
    resample recomputes macro and micro on the same rows). infonce / mine: the mean over `seeds`, with
    their std (n_boot is not used: one neural fit per MI is already slow). `mi_kw` goes to the
    estimator; `dim` defaults to DEFAULT_DIM and, for gaussian, `ridge` to DEFAULT_RIDGE (the noise floor).
    For speed every stream is first rotated onto its top `pre_dim` principal components (macro: over the
    sequences; micro: over the sequences' tokens at each position; None: all components), which leaves
    the point estimate exact for dim <= pre_dim and drops the directions a sample with repeated rows does
    not have; bootstrap resamples reuse those components.
    """
    if estimator not in ESTIMATORS:
        raise PatchlabError(f"unknown estimator {estimator!r} (use {', '.join(ESTIMATORS)})", param="estimator")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0 or n_boot == 1:
        raise PatchlabError(f"must be 0 or an int >= 2, got {n_boot!r}", param="n_boot")
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise PatchlabError(f"need ints >= 0, got {seeds!r}", param="seeds")
    if pre_dim is not None and (isinstance(pre_dim, bool) or not isinstance(pre_dim, int) or pre_dim < 1):
        raise PatchlabError(f"must be None or a positive int, got {pre_dim!r}", param="pre_dim")
    kw = {"dim": DEFAULT_DIM, **({"ridge": DEFAULT_RIDGE} if estimator == "gaussian" else {}), **mi_kw}
    layers = _check_layers(layers, hs.n_streams - 1)
    base = torch.arange(hs.tokens.shape[0]) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    n = int(base.numel())
    if n < MIN_SAMPLES:
        raise PatchlabError(f"{n} sequences; need at least {MIN_SAMPLES}", param="rows")
    with one_thread():
        return _estimate(hs, base, layers, estimator, n_boot, seeds, condition, pre_dim, progress, kw)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread: the many small eigen-problems are ~50x faster than on several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _estimate(
    hs: HiddenStates,
    base: Tensor,
    layers: list[int],
    estimator: str,
    n_boot: int,
    seeds: list[int],
    condition: str,
    pre_dim: int | None,
    progress: bool,
    kw: dict[str, Any],
) -> EmergenceResult:
    """The body of `emergence_from_states`, after its checks."""
    n, T = int(base.numel()), int(hs.tokens.shape[1])
    st = _streams(hs, base, layers, pre_dim)
    neural = estimator != "gaussian"
    runs = [dict(kw, seed=s) for s in seeds] if neural else [kw]
    gen = torch.Generator().manual_seed(seeds[0])
    every = torch.arange(n)
    boots = [torch.randint(n, (n,), generator=gen) for _ in range(0 if neural else n_boot)]
    ie, mac, mic, mic_t, stds = [], [], [], [], {"ie": [], "macro": [], "micro": []}
    for layer in track(layers, f"IE {condition}".strip() if progress else None):
        vals = [_block_mi(st, every, layer, estimator, r) for r in runs]
        m_layer = float(np.mean([v[0] for v in vals]))
        t_layer = np.mean([v[1] for v in vals], 0)
        mac.append(m_layer)
        mic_t.append([float(x) for x in t_layer])
        mic.append(float(t_layer.mean()))
        ie.append(m_layer - mic[-1])
        spread = vals if neural else [_block_mi(st, b, layer, estimator, kw) for b in boots]
        if len(spread) >= 2:
            m_s = np.array([v[0] for v in spread])
            u_s = np.array([np.mean(v[1]) for v in spread])
            stds["ie"].append(float(np.std(m_s - u_s, ddof=1)))
            stds["macro"].append(float(np.std(m_s, ddof=1)))
            stds["micro"].append(float(np.std(u_s, ddof=1)))
    has_spread = bool(stds["ie"])
    params = dict(kw, pre_dim=pre_dim, **({"seeds": seeds} if neural else {"n_boot": n_boot}))
    if not neural:
        params["ceiling_bits"] = ceiling_bits(kw["dim"], kw.get("ridge", 1e-3))
    distinct = [int(hs.tokens[base, t].unique().numel()) for t in range(T)]
    return EmergenceResult(
        model=str(hs.meta.get("model", "")), condition=condition, layers=layers, ie=ie, macro=mac, micro=mic,
        micro_t=mic_t, ie_std=stds["ie"] if has_spread else None, macro_std=stds["macro"] if has_spread else None,
        micro_std=stds["micro"] if has_spread else None,
        spread_kind=("seeds" if neural else "bootstrap") if has_spread else "none",
        estimator=estimator, estimator_params=params, n=n, T=T, distinct_t=distinct,
        meta={"weights_sha256": hs.meta.get("weights_sha256"), "tokens_sha256": hs.meta.get("tokens_sha256")},
    )  # fmt: skip


def information_emergence(
    model,
    texts: Sequence[str] | Int[Tensor, "n T"],
    layers: Sequence[int] | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    n_boot: int = DEFAULT_BOOT,
    seeds: Sequence[int] = (0,),
    length: int | None = None,
    cache_dir: str | Path | None = None,
    condition: str = "",
    progress: bool = True,
    capture: Capturer | None = None,
    **mi_kw: Any,
) -> EmergenceResult:
    """IE of every block (or `layers`) of `model` over `texts` (strings, cut by `equal_length`, or token rows).

    Hidden states are captured by hooks and cached (see `hidden_states`); `mi_kw` goes to the estimator.
    """
    if isinstance(texts, Tensor):
        aligned = Aligned(texts.to(torch.long), list(range(texts.shape[0])), f"{texts.shape[1]} given tokens per row")
    else:
        aligned = equal_length(model, list(texts), length)
    hs = hidden_states(model, aligned.tokens, cache_dir, progress=progress, capture=capture)
    result = emergence_from_states(
        hs, layers, estimator, n_boot, seeds, condition=condition, progress=progress, **mi_kw
    )
    result.model, result.data_note = model_name(model), aligned.note
    result.meta.update(provenance(model))
    return result


# ------------------------------------------------------------------------------------ random control


def random_init_like(model, seed: int = 0):
    """A bridge with the same config (shape, norms, tokenizer) and freshly initialised random weights."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    config = hf_module(model).config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(config, dtype=model.cfg.dtype)
    bridge = TransformerBridge.boot_transformers(
        str(model.cfg.model_name),
        hf_model=hf,
        tokenizer=model.tokenizer,
        device=str(model.cfg.device),
        dtype=model.cfg.dtype,
    )
    bridge.cfg.default_prepend_bos = model.cfg.default_prepend_bos
    bridge.eval()
    bridge.patchlab_name = f"{model_name(model)} (random init, seed {seed})"
    return bridge


# ------------------------------------------------------------------------------------- experiments


@dataclass
class EmergenceExperiment(Result):
    """IE curves of one model under several conditions of one experiment, with a summary per condition."""

    kind = "emergence-experiment"
    heading = "Information emergence: experiment"
    intro = (
        "Information emergence under a controlled change of the input (demonstrations, shuffled tokens, right "
        "vs failed two-hop items)."
    )
    order = 80
    experiment: str
    model: str
    conditions: dict[str, dict[str, Any]]  # name -> EmergenceResult.to_json()
    summary: dict[str, dict[str, Any]]  # name -> mean IE / macro / micro over layers, n, T, extras
    meta: dict[str, Any] = field(default_factory=dict)

    def result(self, name: str) -> EmergenceResult:
        return EmergenceResult.from_json(self.conditions[name])

    def table(self):
        from patchlab.results import tables

        return tables.emergence_table(self)

    def figure(self):
        from patchlab.results.figures import emergence_figure

        return emergence_figure(self.conditions, self.model, self.experiment, self.summary)


def _summary(r: EmergenceResult, **extra: Any) -> dict[str, Any]:
    """Layer means of IE, macro and micro MI (bits) with n and T."""
    out = {
        "mean_ie": float(np.mean(r.ie)),
        "mean_macro": float(np.mean(r.macro)),
        "mean_micro": float(np.mean(r.micro)),
        "n": r.n,
        "T": r.T,
    }
    if r.ie_std:
        out["mean_ie_std"] = float(np.mean(r.ie_std))
    return {**out, **extra}


def _experiment(
    name: str, model, results: dict[str, EmergenceResult], extras: dict[str, dict] | None = None, **meta: Any
) -> EmergenceExperiment:
    extras = extras or {}
    return EmergenceExperiment(
        experiment=name,
        model=model_name(model),
        conditions={k: r.to_json() for k, r in results.items()},
        summary={k: _summary(r, **extras.get(k, {})) for k, r in results.items()},
        meta=provenance(model, **meta),
    )


def natural_vs_shuffled(
    model,
    texts: Sequence[str] | None = None,
    length: int | None = None,
    random_init: bool = True,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **ie_kw: Any,
) -> EmergenceExperiment:
    """IE on natural sentences, on the same tokens shuffled within each sentence, and through random weights."""
    texts = list(texts) if texts is not None else shipped_texts()
    aligned = equal_length(model, texts, length)
    conds = {"natural": aligned.tokens, "shuffled": shuffle_tokens(aligned.tokens, seed)}
    results = {
        k: information_emergence(model, v, layers, cache_dir=cache_dir, condition=k, progress=progress, **ie_kw)
        for k, v in conds.items()
    }
    if random_init:
        rnd = random_init_like(model, seed)
        results["random-init"] = information_emergence(
            rnd, aligned.tokens, layers, cache_dir=cache_dir, condition="random-init", progress=progress, **ie_kw
        )
        del rnd
        gc.collect()
    for r in results.values():
        r.data_note = aligned.note
    return _experiment("natural", model, results, texts=len(texts), data_note=aligned.note, shuffle_seed=seed)


def load_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Word / opposite pairs from a TSV file (default: the shipped antonyms.tsv)."""
    path = Path(path) if path is not None else Path(str(resources.files("patchlab") / "data" / "antonyms.tsv"))
    pairs = []
    for i, line in enumerate(read_texts(path), 1):
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise PatchlabError(f"pair {i}: expected 'word<TAB>opposite', got {line!r}", where=str(path))
        pairs.append((parts[0].strip(), parts[1].strip()))
    if len(pairs) < 8:
        raise PatchlabError(f"{len(pairs)} pairs; need at least 8", where=str(path))
    return pairs


def icl_prompt(demos: Sequence[tuple[str, str]], query: str) -> str:
    """k demonstrations 'word -> opposite' on their own lines, then the query word and its arrow."""
    return "".join(f"{a} -> {b}\n" for a, b in demos) + f"{query} ->"


def single_token_pairs(model, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs whose word (at a line start) and opposite (after a space) are one token each for this model."""
    one = lambda text: len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) == 1  # noqa: E731
    return [(a, b) for a, b in pairs if one(a) and one(" " + b)]


def icl_prompts(
    model, k: int, n: int, pairs: Sequence[tuple[str, str]], seed: int = 0, candidates: int = 2000
) -> tuple[Int[Tensor, "n T"], list[str]]:
    """n equal-length prompts with k demonstrations each, and each prompt's expected answer.

    Pairs are drawn from those that are single tokens for the model when at least k + 1 are (then every
    prompt has the same layout: word, ' ->', ' opposite', newline, ..., so positions align by role), else
    from all; of `candidates` random prompts those of the modal token length are kept (first n drawn).
    """
    single = single_token_pairs(model, pairs)
    pool = single if len(single) > k else list(pairs)
    rng = random.Random(f"{seed}-{k}")
    drawn = []
    for _ in range(candidates):
        chosen = rng.sample(pool, k + 1)
        text = icl_prompt(chosen[:k], chosen[k][0])
        drawn.append((token_lists(model, [text])[0], chosen[k][1]))
    lengths = Counter(len(t) for t, _ in drawn)
    T = max(lengths, key=lambda L: (lengths[L], -L))
    same = [(t, a) for t, a in drawn if len(t) == T][:n]
    if len(same) < MIN_SAMPLES:
        raise PatchlabError(f"only {len(same)} prompts with k={k} share one token length", param="pairs")
    return torch.tensor([t for t, _ in same]), [a for _, a in same]


def icl_emergence(
    model,
    demos: Sequence[int] = range(7),
    n: int = 150,
    pairs: Sequence[tuple[str, str]] | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **ie_kw: Any,
) -> EmergenceExperiment:
    """IE against the number k of in-context demonstrations of 'word -> opposite' (equal length within each k).

    Also records, per k, how often the model's top next token is the first token of the right opposite.
    """
    pairs = list(pairs) if pairs is not None else load_pairs()
    results, extras = {}, {}
    for k in demos:
        tokens, answers = icl_prompts(model, k, n, pairs, seed)
        name = f"k={k}"
        results[name] = information_emergence(
            model, tokens, layers, cache_dir=cache_dir, condition=name, progress=progress, **ie_kw
        )
        hs = hidden_states(model, tokens, cache_dir, progress=False, capture=ie_kw.get("capture"))
        with torch.inference_mode():
            top = lens_logits(model, hs.macro[:, -1].to(model.cfg.device, model.cfg.dtype)).argmax(-1).cpu()
        want = torch.tensor([answer_token_id(model, a) for a in answers])
        extras[name] = {"k": k, "accuracy": float((top == want).float().mean())}
    return _experiment(
        "icl",
        model,
        results,
        extras,
        pairs=len(pairs),
        single_token_pairs=len(single_token_pairs(model, pairs)),
        seed=seed,
    )


FAILED = ("wrong", "gap")


def twohop_groups(model, prompt_set, gap, failed: str = "wrong") -> dict[int, dict[str, list[int]]]:
    """Composed queries grouped by token length, then by outcome: 'correct' (composed right) and 'failed'
    (composed wrong; with failed="gap" only those with both hops right); indices into `prompt_set`."""
    if failed not in FAILED:
        raise PatchlabError(f"must be one of {', '.join(FAILED)}, got {failed!r}", param="failed")
    rows = {r["id"]: r for r in gap.items}
    items = list(prompt_set)
    missing = [it.id for it in items if it.id not in rows]
    if missing:
        raise PatchlabError(f"gap result has no row for item '{missing[0]}'", param="gap")
    lens = [len(t) for t in token_lists(model, [it.composed for it in items])]
    groups: dict[int, dict[str, list[int]]] = {}
    for i, it in enumerate(items):
        r = rows[it.id]
        if r.get("flagged"):  # NaN / inf logits: no outcome
            continue
        outcome = "correct" if r["composed"] else "failed" if failed == "wrong" or (r["hop1"] and r["hop2"]) else None
        if outcome:
            groups.setdefault(lens[i], {"correct": [], "failed": []})[outcome].append(i)
    return groups


def twohop_emergence(
    model,
    prompt_set=None,
    gap=None,
    failed: str = "wrong",
    min_group: int = 10,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **ie_kw: Any,
) -> EmergenceExperiment:
    """IE on composed two-hop queries the model answers right vs those it fails (`failed`: "wrong" = any
    composed failure, "gap" = only failures with both hops right).

    Queries are grouped by token length (so positions align); in every length with at least `min_group`
    queries of each outcome, the larger outcome is subsampled to the smaller one's size (seeded), and IE is
    computed per length and outcome. A condition's curve is the n-weighted mean over lengths. Small groups
    need a small `dim` (n - 1 must exceed 2 dim): pass e.g. dim=3.
    """
    from patchlab.core.prompts import PromptSet
    from patchlab.methods.gap import evaluate_gap

    ps = prompt_set if prompt_set is not None else PromptSet.shipped()
    items = list(ps)
    gap = gap if gap is not None else evaluate_gap(model, ps, progress=progress)
    groups = twohop_groups(model, ps, gap, failed)
    rng = random.Random(seed)
    per: dict[str, list[EmergenceResult]] = {"correct": [], "failed": []}
    used: dict[str, int] = {}
    for length, g in sorted(groups.items()):
        m = min(len(g["correct"]), len(g["failed"]))
        if m < min_group:
            continue
        used[str(length)] = m
        for outcome in ("correct", "failed"):
            idx = sorted(rng.sample(g[outcome], m))
            tokens = torch.tensor(token_lists(model, [items[i].composed for i in idx]))
            per[outcome].append(
                information_emergence(
                    model,
                    tokens,
                    layers,
                    cache_dir=cache_dir,
                    condition=f"{outcome} (T={length})",
                    progress=progress,
                    **ie_kw,
                )
            )
    if not used:
        sizes = {L: (len(g["correct"]), len(g["failed"])) for L, g in groups.items()}
        raise PatchlabError(
            f"no token length has >= {min_group} correct and failed queries (length: (correct, failed) {sizes})",
            param="prompt_set",
        )
    results = {k: pool_results(v, k) for k, v in per.items()}
    return _experiment(
        "twohop",
        model,
        results,
        {k: {"lengths": used} for k in results},
        min_group=min_group,
        failed=failed,
        seed=seed,
        gap_share=gap.summary["all"]["gap_share"],
    )


def pool_results(results: Sequence[EmergenceResult], condition: str) -> EmergenceResult:
    """The n-weighted mean of per-group results with the same layers (std combined as that of a weighted mean)."""
    w = np.array([r.n for r in results], dtype=float)
    w = w / w.sum()
    avg = lambda key: (w[:, None] * np.array([getattr(r, key) for r in results])).sum(0).tolist()  # noqa: E731
    std = lambda key: np.sqrt((w[:, None] ** 2 * np.array([getattr(r, key) for r in results]) ** 2).sum(0)).tolist()  # noqa: E731
    has = all(r.ie_std for r in results)
    first = results[0]
    return EmergenceResult(
        model=first.model, condition=condition, layers=first.layers, ie=avg("ie"), macro=avg("macro"), micro=avg("micro"),
        micro_t=[],  # positions differ between lengths: see each group's own result
        ie_std=std("ie_std") if has else None, macro_std=std("macro_std") if has else None,
        micro_std=std("micro_std") if has else None, spread_kind=first.spread_kind if has else "none",
        estimator=first.estimator, estimator_params=first.estimator_params, n=int(sum(r.n for r in results)),
        T=int(round(sum(r.T * r.n for r in results) / sum(r.n for r in results))),
        distinct_t=[], data_note=f"pooled over {len(results)} length groups: " + ", ".join(f"T={r.T} n={r.n}" for r in results),
        meta=first.meta,
    )  # fmt: skip


def run_experiment(model, experiment: str, **kw: Any) -> EmergenceExperiment:
    """Dispatch `natural`, `icl` or `twohop`."""
    table = {"natural": natural_vs_shuffled, "icl": icl_emergence, "twohop": twohop_emergence}
    if experiment not in table:
        raise PatchlabError(f"unknown experiment {experiment!r} (use {', '.join(EXPERIMENTS)})", param="experiment")
    return table[experiment](model, **kw)


__all__ = [
    "EmergenceExperiment",
    "EmergenceResult",
    "HiddenStates",
    "emergence_from_states",
    "equal_length",
    "hidden_states",
    "icl_emergence",
    "information_emergence",
    "natural_vs_shuffled",
    "random_init_like",
    "run_experiment",
    "shuffle_tokens",
    "twohop_emergence",
]


@shard_task("capture")
def capture_shard(model, config: dict, items: list[dict], pool: list[dict]) -> list[dict]:
    """Every residual stream at the last position of each equal-length token row (a sharded capture)."""
    states = capture_last(model, torch.tensor([d["tokens"] for d in items], dtype=torch.long), config["batch_size"])
    return [{"id": d["id"], "states": states[i].clone()} for i, d in enumerate(items)]
