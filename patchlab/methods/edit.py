"""The rank-one head editor: CREME's update of the attention output projection, restricted to chosen heads.

Notation for one layer L with chosen heads S (columns S of `o_proj.weight`, W: [d_model, n_heads*d_head]):
  k   = the heads' concatenated output z at the last position of the composed query (mean over prefixes)
  v*  = the target output of o_proj there: CREME's guide target W·z_guide (the same layer on the guide
        prompt, bridge written in), or W·k + δ with δ optimised on the answer's log-probability
  r   = v* − W·k
  ΔW_S = R (K_Sᵀ C⁻¹ K_S + λ I)⁻¹ K_Sᵀ C⁻¹      (only columns S change; K_S: [|S|·d_head, n])
For one item and λ = 0 this is ROME's ΔW_S = r (C⁻¹k_S)ᵀ / (k_Sᵀ C⁻¹ k_S), so W'k = v* exactly; with
C = I and every head of the layer selected it is CREME's layer edit; with many items it is MEMIT's
least-squares batch edit. Layers are edited in ascending order, each computed with the earlier
layers' edits in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.forms import DEFAULT_FORM
from patchlab.core.io import atomic_write_bytes, recover_path
from patchlab.core.prompts import TwoHopItem
from patchlab.core.spec import Head, HeadSet, columns
from patchlab.runtime import sites
from patchlab.runtime.bridge import model_name
from patchlab.runtime.capture import per_prompt
from patchlab.runtime.forms import render_items
from patchlab.runtime.identity import applied_edits, base_hash, weights_hash
from patchlab.runtime.models import cache_root
from patchlab.runtime.scoring import answer_token_id, answer_token_ids, encode, length_batches, pad_id, pad_right
from patchlab.runtime.shards import shard_task
from patchlab.runtime.trace import frozen, run_from_layer, trace

FORMAT = "patchlab-edit/1"


# --- where the weights are ---------------------------------------------------------------------


def o_proj(model, layer: int) -> torch.nn.Linear:
    """The attention output projection of `layer` (the real HF Linear under the bridge)."""
    o = model.blocks[layer].attn.o
    return getattr(o, "original_component", o)


def head_columns(model, heads: Sequence[int]) -> torch.Tensor:
    """Column indices of `o_proj.weight` that belong to `heads` of one layer (see `core.spec.columns`)."""
    return columns(heads, model.cfg.d_head)


def check_editable(model, layers: Sequence[int] | None = None) -> None:
    """Refuse quantised or offloaded weights: an edit adds a float update to W_O in place, which packed integer
    storage cannot hold (and re-quantising would not revert bit-exactly) and a meta placeholder does not have."""
    hf = getattr(model, "original_model", None)
    quant = getattr(getattr(hf, "config", None), "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise PatchlabError(
            f"the model's weights are quantised ({method or 'quantization_config'}): an edit adds a "
            "float update to W_O that quantised storage cannot hold; load a float32 or bfloat16 "
            "checkpoint"
        )
    for layer in range(model.cfg.n_layers) if layers is None else layers:
        w = o_proj(model, layer).weight
        if not w.is_floating_point() or w.element_size() < 2:
            raise PatchlabError(
                f"W_O of layer {layer} is stored as {w.dtype} (quantised): an edit needs float16, "
                "bfloat16 or float32 weights"
            )
        if w.device.type == "meta":
            raise PatchlabError(f"W_O of layer {layer} is offloaded (on the meta device): an edit needs it resident")


def _fingerprint(t: Tensor) -> tuple[float, float]:
    """(sum, sum of squares) of a tensor where it lives, without a copy of it for float32 (chunked otherwise)."""
    v = t.detach().reshape(-1)
    if v.dtype == torch.float32:
        return v.sum().item(), torch.dot(v, v).item()
    if not v.is_floating_point():
        v = v.view(torch.uint8)
    buf = torch.empty(min(v.numel(), 1 << 20), dtype=torch.float32, device=v.device)
    total = squares = 0.0
    for start in range(0, v.numel(), buf.numel()):
        part = buf[: min(buf.numel(), v.numel() - start)]
        part.copy_(v[start : start + part.numel()])
        total, squares = total + part.sum().item(), squares + torch.dot(part, part).item()
    return total, squares


def _fingerprints(model, skip: set[int]) -> dict[str, tuple[float, float]]:
    """A cheap fingerprint of every parameter except those whose id is in `skip` (checked with column sums)."""
    seen, out = set(skip), {}
    for name, p in model.original_model.named_parameters():
        if id(p) not in seen and p.device.type != "meta":
            seen.add(id(p))
            out[name.replace("._original_component", "")] = _fingerprint(p)
    return out


def _column_sums(w: Tensor) -> Tensor:
    """Per-column sums and norms of W_O (float32, on its device): they show a change outside the edited columns."""
    return torch.stack([w.detach().sum(0, dtype=torch.float32), torch.linalg.vector_norm(w.detach().float(), dim=0)])


def prefixes(n: int) -> list[str]:
    """The empty prefix plus `n` short neutral context prefixes shipped with patchlab."""
    text = (resources.files("patchlab") / "data" / "prefixes.txt").read_text(encoding="utf-8")
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return [""] + lines[:n]


def with_prefixes(prompt: str, pre: Sequence[str]) -> list[str]:
    return [f"{p} {prompt}" if p else prompt for p in pre]


# --- reading z at the last position -----------------------------------------------------------


def last_z(model, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 64) -> dict[int, Tensor]:
    """Each layer's concatenated head outputs z at each prompt's last token: {layer: [n, n_heads*d_head]}."""
    stop = max(layers) + 1
    got = per_prompt(model, prompts, [sites.z(l) for l in layers], "last", batch_size,
                     stop if stop < model.cfg.n_layers else None)  # fmt: skip
    return {l: torch.stack([z.reshape(-1) for z in got[sites.z(l)]]) for l in layers}


# --- covariance of z (ROME's C) ------------------------------------------------------------------


def covariance(model, layer: int, max_tokens: int = 4000) -> Float[Tensor, "d d"]:
    """Second moment E[z zᵀ] of a layer's head outputs over patchlab's neutral corpus, cached per model."""
    key = f"{model_name(model).replace('/', '_')}-{_weights_key(model)[:16]}"
    path = cache_root() / "covariance" / key / f"layer{layer}.pt"
    width = model.cfg.n_heads * model.cfg.d_head
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if isinstance(cached, Tensor) and tuple(cached.shape) == (width, width):
                return cached
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed and replaced
            pass
    text = (resources.files("patchlab") / "data" / "corpus.txt").read_text(encoding="utf-8")
    sentences = [l for l in text.splitlines() if l.strip()]
    acc, count = None, 0
    for rows in length_batches([len(s) for s in sentences], 32):
        seqs = [encode(model, sentences[i]) for i in rows]
        tokens, lengths = pad_right(seqs, pad_id(model))
        with torch.inference_mode():
            got = trace(model, tokens, [sites.z(layer)], stop_at_layer=layer + 1)[sites.z(layer)]
        z = got.reshape(*got.shape[:2], -1).float().cpu()
        real = torch.arange(tokens.shape[1])[None] < lengths[:, None]
        z = z[real]
        acc = z.T @ z if acc is None else acc + z.T @ z
        count += z.shape[0]
        if count >= max_tokens:
            break
    cov = acc / count
    if not torch.isfinite(cov).all():  # never cache it: every later edit of this layer would inherit it
        raise PatchlabError(f"non-finite head outputs (NaN or inf) at layer {layer} while computing their covariance")
    atomic_write_bytes(path, _torch_bytes(cov))
    return cov


def _weights_key(model) -> str:
    """The cached hash of the model's base weights, or of its current weights while an edit is applied."""
    return weights_hash(model) if applied_edits(model) else base_hash(model)


def _torch_bytes(t: Tensor) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


# --- the update ------------------------------------------------------------------------------------


def solve_delta(
    R: Float[Tensor, "d_model n"], K: Float[Tensor, "s n"], C: Float[Tensor, "s s"] | None, ridge: float = 0.0
) -> Float[Tensor, "d_model s"]:
    """ΔW_S = R (Kᵀ C⁻¹ K + λI)⁻¹ Kᵀ C⁻¹: the minimum C-norm change with ΔW_S K = R (λ = 0)."""
    R, K = R.double(), K.double()
    CinvK = K if C is None else torch.linalg.solve(C.double(), K)
    gram = K.T @ CinvK
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype) * gram.diagonal().mean()
    return (R @ torch.linalg.solve(gram, CinvK.T)).float()


@dataclass
class EditConfig:
    """How an edit is computed."""

    target: str = "optimize"  # optimize (ROME-style v*, the default here and in the CLI) | guide (CREME's v*)
    covariance: bool = True  # ROME's C over the heads' z (else C = I, CREME's code)
    cov_ridge: float = 0.01  # C + ridge·mean(diag C)·I
    n_prefixes: int = 20
    batch_ridge: float = 0.0  # λ of the batch (MEMIT-style) solve, relative to the Gram diagonal
    opt_steps: int = 25
    opt_lr: float = 0.5
    opt_prefixes: int = 6
    kl_weight: float = 1.0
    norm_weight: float = 0.05
    target_prob: float = 0.9
    phrasings: int = 0  # also key (and optimise) on the first N of each item's own paraphrases, solved jointly
    whole_answer: bool = False  # optimise log p of every answer token (teacher-forced), not the first only
    null_space: float = 0.0  # > 0: project the update off the directions the preserved prompts' z use (AlphaEdit)
    preserve: float = 0.0  # > 0: add the preserved prompts' z second moment (this share of C's scale) to C

    def __post_init__(self) -> None:
        if self.target not in ("guide", "optimize"):
            raise PatchlabError(f"target must be 'guide' or 'optimize', got '{self.target}'", param="target")
        for name in ("cov_ridge", "batch_ridge", "opt_lr", "kl_weight", "norm_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v == v and abs(v) != float("inf") and v >= 0):
                raise PatchlabError(f"{name} must be a finite number >= 0, got {v}")
        if not (isinstance(self.target_prob, (int, float)) and 0 < self.target_prob <= 1):
            raise PatchlabError(f"target_prob must be in (0, 1], got {self.target_prob}")
        if not (isinstance(self.preserve, (int, float)) and 0 <= self.preserve < float("inf")):
            raise PatchlabError(f"preserve must be a finite number >= 0, got {self.preserve}", param="preserve")
        if not (isinstance(self.null_space, (int, float)) and 0 <= self.null_space < 1):
            raise PatchlabError(f"null_space must be in [0, 1), got {self.null_space}", param="null_space")
        for name, least in (("opt_steps", 1), ("n_prefixes", 0), ("opt_prefixes", 0), ("phrasings", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise PatchlabError(f"{name} must be an integer >= {least}, got {v!r}")


def _regularised(C: Tensor, ridge: float) -> Tensor:
    return C + ridge * C.diagonal().mean() * torch.eye(C.shape[0])


@dataclass
class Edit:
    """Head-restricted deltas of W_O for one or more layers, with what they apply to.

    `deltas[L]` is the change of the o_proj columns of `heads[L]` ([d_model, len(heads)*d_head]).
    Apply / revert restore the exact original columns (bit-identical), never by subtraction.
    """

    model: str
    weights_sha256: str
    heads: dict[int, list[int]]
    deltas: dict[int, Tensor]
    item_ids: list[str]
    method: dict[str, Any] = field(default_factory=dict)
    _saved: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def head_set(self) -> HeadSet:
        return HeadSet.from_by_layer(self.heads)

    @property
    def head_list(self) -> list[str]:
        return [str(h) for h in self.head_set]

    def _check(self, model, verify_hash: bool) -> None:
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        if not self.heads or set(self.heads) != set(self.deltas):
            raise PatchlabError(
                f"edit's deltas (layers {sorted(self.deltas)}) do not match its heads (layers {sorted(self.heads)})"
            )
        for layer, hs in self.heads.items():
            # check the numbers before indexing with them: -1 would wrap around to the last layer / head
            if (
                not _index(layer, n_layers)
                or not hs
                or not all(_index(h, n_heads) for h in hs)
                or len(set(hs)) != len(hs)
            ):
                raise PatchlabError(
                    f"edit does not fit this model (layer {layer}, heads {hs}; the model has layers "
                    f"0..{n_layers - 1} and heads 0..{n_heads - 1})"
                )
            delta, w = self.deltas[layer], o_proj(model, layer).weight
            want = (w.shape[0], len(hs) * model.cfg.d_head)
            shape = tuple(delta.shape) if torch.is_tensor(delta) else type(delta).__name__
            if shape != want or not delta.is_floating_point():
                raise PatchlabError(
                    f"edit does not fit this model (layer {layer}, heads {hs}, delta "
                    f"{shape} {getattr(delta, 'dtype', '')} vs {want})"
                )
            if not torch.isfinite(delta).all():
                raise PatchlabError(f"edit has a non-finite delta at layer {layer}")
        if verify_hash:
            have = base_hash(model)
            if have != self.weights_sha256:
                raise PatchlabError(
                    f"edit was made for weights {self.weights_sha256[:12]}… ('{self.model}'); "
                    f"this model's weights are {have[:12]}…"
                )

    def apply(self, model, verify_hash: bool = True) -> Edit:
        """Add the deltas to the model's W_O columns (refuses a model with other weights, or a second apply).

        Each update is built on the device and in the dtype of its own W_O (a split model's W_O never moves);
        afterwards every other parameter, and W_O outside the edited columns, must be unchanged."""
        if self._saved:
            raise PatchlabError("edit is already applied")
        self._check(model, verify_hash)
        check_editable(model, list(self.heads))
        weights = {layer: o_proj(model, layer).weight for layer in self.heads}
        others, columns = _fingerprints(model, {id(w) for w in weights.values()}), {}
        with torch.no_grad():
            for layer, hs in self.heads.items():
                w = weights[layer]
                cols = head_columns(model, hs).to(w.device)
                columns[layer] = (cols, _column_sums(w))
                self._saved[layer] = w[:, cols].clone()
                w[:, cols] = _updated(self._saved[layer], self.deltas[layer])
            moved = _moved(model, others, weights, columns)
        if moved:
            self._restore(model)
            raise PatchlabError(
                f"applying the edit changed {moved}, not only the edited W_O columns; the edit was "
                "taken back, but that parameter may stay changed: reload the model"
            )
        applied_edits(model).append(self)
        return self

    def _restore(self, model) -> None:
        """Write the saved original columns back (bit-identical) and forget them."""
        with torch.no_grad():
            for layer, hs in self.heads.items():
                if layer in self._saved:
                    w = o_proj(model, layer).weight
                    w[:, head_columns(model, hs).to(w.device)] = self._saved[layer]
        self._saved.clear()

    def revert(self, model) -> None:
        """Put back the exact original columns."""
        if not self._saved:
            raise PatchlabError("edit is not applied")
        stack = applied_edits(model)
        if stack and stack[-1] is not self:
            raise PatchlabError("revert edits in the reverse order of applying them")
        self._restore(model)
        stack.pop()

    @contextlib.contextmanager
    def applied(self, model, verify_hash: bool = True) -> Iterator[Edit]:
        """`with edit.applied(model): ...` — the edit is reverted however the block exits."""
        self.apply(model, verify_hash)
        try:
            yield self
        finally:
            self.revert(model)

    # --- files: safetensors + JSON metadata, tensors hashed against tampering ---

    def tensors(self) -> dict[str, Tensor]:
        return {f"layer.{l}.delta": d.contiguous().float() for l, d in self.deltas.items()}

    def metadata(self) -> dict[str, str]:
        """The edit's identity as file metadata (format, model, weights hash, heads, items, method)."""
        return {
            "format": FORMAT,
            "model": self.model,
            "weights_sha256": self.weights_sha256,
            "heads": json.dumps({str(k): v for k, v in self.heads.items()}),
            "item_ids": json.dumps(self.item_ids),
            "method": json.dumps(self.method),
        }

    def save(self, path: str | Path) -> Path:
        return write_signed(path, self.tensors(), self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        """Read an edit file; refuses a tampered, truncated or foreign file with one line naming it."""
        meta, tensors = read_signed(path, FORMAT, "edit")
        return cls.from_file(meta, tensors, str(path))

    @classmethod
    def from_file(cls, meta: dict[str, str], tensors: dict[str, Tensor], where: str) -> Edit:
        """Rebuild an edit from verified file contents (`read_signed`); refuses missing fields and non-finite deltas."""
        try:
            heads = {int(k): [int(h) for h in v] for k, v in json.loads(meta["heads"]).items()}
            deltas = {l: tensors[f"layer.{l}.delta"] for l in heads}
            edit = cls(
                meta["model"],
                meta["weights_sha256"],
                heads,
                deltas,
                json.loads(meta["item_ids"]),
                json.loads(meta["method"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise PatchlabError(f"edit metadata is incomplete ({exc})", where=where) from None
        bad = [l for l, d in deltas.items() if not d.is_floating_point() or not torch.isfinite(d).all()]
        if bad:
            raise PatchlabError(f"edit has a non-finite (or non-float) delta at layer {bad[0]}", where=where)
        return edit


def _updated(saved: Tensor, delta: Tensor) -> Tensor:
    """The edited columns: saved + delta, added in float32 on the columns' own device, stored in their dtype."""
    return (saved.float() + delta.to(device=saved.device, dtype=torch.float32)).to(saved.dtype)


def _moved(
    model, others: dict[str, tuple[float, float]], weights: dict[int, Tensor], columns: dict[int, tuple[Tensor, Tensor]]
) -> str | None:
    """The first parameter (or W_O outside the edited columns) whose fingerprint changed, else None."""
    after = _fingerprints(model, {id(w) for w in weights.values()})
    for name, value in others.items():
        if after.get(name) != value:
            return f"parameter '{name}'"
    for layer, (cols, before) in columns.items():
        keep = torch.ones(before.shape[1], dtype=torch.bool, device=before.device)
        keep[cols] = False
        if not torch.equal(_column_sums(weights[layer])[:, keep], before[:, keep]):
            return f"W_O of layer {layer} outside the edited heads' columns"
    return None


def write_signed(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> Path:
    """Write tensors + metadata as one safetensors file (atomically), sealed by a sha256 of the tensors and of
    the metadata: safetensors itself notices neither a flipped data byte nor an edited header."""
    from safetensors.torch import save

    meta = {**meta, "tensors_sha256": tensors_hash(tensors)}
    meta["meta_sha256"] = meta_hash(meta)
    return atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=meta)))


def canonical_safetensors(blob: bytes) -> bytes:
    """`blob` with its JSON header written with sorted keys: safetensors writes the metadata in hash-map order,
    which differs between processes, so the same tensors and metadata would give different bytes. The data
    offsets count from the end of the header, so re-padding it (spaces, to 8 bytes) moves nothing."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    raw = header.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n :]


def read_signed(path: str | Path, fmt: str, what: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Read a `write_signed` file of format `fmt`; a damaged, foreign or tampered file is one line naming it."""
    from safetensors import safe_open

    path = Path(path)
    recover_path(path)  # a folder a killed writer left aside is put back first
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise PatchlabError(
            f"not a readable {what} file ({type(exc).__name__}: {str(exc)[:120]})".replace("\n", " "), where=str(path)
        ) from None
    if meta.get("format") != fmt:
        raise PatchlabError(f"not a patchlab {what} file (format {meta.get('format')!r})", where=str(path))
    if tensors_hash(tensors) != meta.get("tensors_sha256"):
        raise PatchlabError(
            f"{what} tensors do not match their recorded sha256 (file changed after saving)", where=str(path)
        )
    if "meta_sha256" in meta and meta_hash(meta) != meta["meta_sha256"]:  # files before it have none
        raise PatchlabError(
            f"{what} metadata does not match its recorded sha256 (file changed after saving)", where=str(path)
        )
    return meta, tensors


def _index(value: Any, size: int) -> bool:
    """A valid 0-based index below `size` (an int, not a bool, never negative)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size


def meta_hash(meta: dict[str, str]) -> str:
    """sha256 over an edit file's metadata (all but this hash): heads, model, weights hash, tensors hash."""
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k != "meta_sha256"):
        h.update(json.dumps([key, meta[key]]).encode())
    return h.hexdigest()


def tensors_hash(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- targets ------------------------------------------------------------------------------------------


def _mean_last_z(model, prompts_per_item: list[list[str]], layer: int) -> Tensor:
    flat = [p for ps in prompts_per_item for p in ps]
    z = last_z(model, flat, [layer])[layer]
    n = len(prompts_per_item[0])
    return z.view(len(prompts_per_item), n, -1).mean(1)  # [items, H*dh]


def optimize_delta(
    model,
    item: TwoHopItem,
    layer: int,
    k_full: Tensor,
    cfg: EditConfig,
    pre: Sequence[str],
    unrelated: Sequence[str] = (),
    key_S: Tensor | None = None,
    cols: Tensor | None = None,
    C_inv: Tensor | None = None,
    bases: Sequence[str] | None = None,
    P: Tensor | None = None,
) -> Tensor:
    """δ added to o_proj's output at the last position that makes the answer likely (ROME-style).

    Loss = −log p(answer) over the prefixed `bases` (default: the composed query) + kl_weight · KL on
    unrelated prompts where δ is added at every position in proportion to how strongly the edit would fire
    there (its key similarity, through the projector P when the update is projected) + norm_weight ·
    ‖δ‖²/‖W k‖². With `cfg.whole_answer` the first term is the teacher-forced log-probability of every
    answer token, δ still added at the prompt's last position only.
    """
    W = o_proj(model, layer).weight
    answer = answer_token_id(model, item.answer, where=f"{item.id}: answer", after=item.composed)
    prompts = [q for b in (bases or [item.composed]) for q in with_prefixes(b, pre)]
    seqs = [encode(model, p) for p in prompts]
    ends = torch.tensor([len(q) for q in seqs])
    if cfg.whole_answer:
        answer_ids = answer_token_ids(model, item.answer, where=f"{item.id}: answer", after=item.composed)
        seqs = [q + answer_ids for q in seqs]
    tokens, lengths = pad_right(seqs, pad_id(model))
    resid = _resid_at(model, tokens, layer)
    scale = (W.float() @ k_full).norm().item()
    delta = torch.zeros(W.shape[0], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.opt_lr * scale / (W.shape[0] ** 0.5))
    rows = torch.arange(len(seqs))
    un = _unrelated_setup(model, unrelated, layer, key_S, cols, C_inv, P) if unrelated and cfg.kl_weight > 0 else None
    with frozen(model):
        if cfg.whole_answer:
            reads = ends[:, None] - 1 + torch.arange(len(answer_ids))[None]  # position t predicts answer token t
            targets = torch.tensor(answer_ids)[None].expand(len(seqs), -1)
            _descend(model, layer, delta, opt, resid, rows, ends, targets, scale, un, cfg, reads)
        else:
            _descend(model, layer, delta, opt, resid, rows, lengths, answer, scale, un, cfg)
    return delta.detach()


def _descend(model, layer, delta, opt, resid, rows, ends, answer, scale, un, cfg, reads=None) -> None:
    """Adam on δ (added at each row's position ends − 1). `answer` is one token id, read at ends − 1; or, with
    `reads` [rows, k], the token ids [rows, k] read there (the whole answer, teacher-forced)."""
    for step in range(cfg.opt_steps):

        def add(act, hook):
            out = act.clone()
            out[rows, ends - 1] = out[rows, ends - 1] + delta.to(act.dtype)
            return out

        with torch.enable_grad():
            logits = run_from_layer(
                model, resid, layer, ends - 1 if reads is None else reads, patch=[(sites.o_out(layer), add)]
            )
            logp = torch.log_softmax(logits.float(), -1)
            if reads is None:
                logp = logp[:, answer]
            else:
                logp = logp.gather(-1, answer[..., None])[..., 0].mean(-1)  # per row: mean log p per token
        loss = -logp.mean() + cfg.norm_weight * (delta.norm() / scale) ** 2
        if un is not None:
            with torch.enable_grad():
                loss = loss + cfg.kl_weight * _kl_preview(model, un, layer, delta)
        if logp.exp().min().item() >= cfg.target_prob:
            break
        if not torch.isfinite(loss):
            raise PatchlabError(f"target optimisation: non-finite loss at step {step}")
        opt.zero_grad()
        loss.backward()
        opt.step()


def _resid_at(model, tokens: Tensor, layer: int) -> Tensor:
    with torch.inference_mode():
        got = trace(model, tokens, [sites.resid_pre(layer)], stop_at_layer=layer + 1)[sites.resid_pre(layer)]
    return got.clone()  # out of inference mode: usable under autograd


def _unrelated_setup(model, prompts, layer, key_S, cols, C_inv, P=None) -> dict[str, Tensor]:
    """For the KL preview: resid at `layer`, the original last-position log-probs, and how strongly the
    edit fires at every position (α = z_Sᵀ C⁻¹ k_S / k_Sᵀ C⁻¹ k_S)."""
    seqs = [encode(model, p) for p in prompts]
    tokens, lengths = pad_right(seqs, pad_id(model))
    with torch.inference_mode():
        t = trace(model, tokens, [sites.resid_pre(layer), sites.z(layer)], stop_at_layer=layer + 1)
    got = {"r": t[sites.resid_pre(layer)].clone(), "z": t[sites.z(layer)].clone()}  # usable under autograd
    z = got["z"].reshape(*got["z"].shape[:2], -1)[..., cols].float()
    if P is not None:  # a projected update fires on the projected keys
        z, key_S = z @ P, P @ key_S
    u = key_S if C_inv is None else C_inv @ key_S
    alpha = (z @ u) / (key_S @ u)
    alpha = alpha * (torch.arange(tokens.shape[1])[None] < lengths[:, None])
    with torch.inference_mode():
        base = torch.log_softmax(run_from_layer(model, got["r"], layer, lengths - 1).float(), -1)
    return {"resid": got["r"], "lengths": lengths, "alpha": alpha, "base": base}


def _kl_preview(model, un: dict[str, Tensor], layer: int, delta: Tensor) -> Tensor:
    def add(act, hook):
        return act + un["alpha"][..., None].to(act.dtype) * delta.to(act.dtype)

    logits = run_from_layer(model, un["resid"], layer, un["lengths"] - 1, patch=[(sites.o_out(layer), add)])
    logp = torch.log_softmax(logits.float(), -1)
    return (un["base"].exp() * (un["base"] - logp)).sum(-1).mean()


# --- computing an edit -------------------------------------------------------------------------------


def compute_edit(
    model,
    items: Sequence[TwoHopItem],
    heads: Sequence[Head],
    cfg: EditConfig | None = None,
    unrelated: Sequence[str] = (),
    preserved: Sequence[str] = (),
    form: str = DEFAULT_FORM,
) -> Edit:
    """Compute the head-restricted edit that makes the chosen heads output their targets on `items`.

    One item: a rank-one edit per layer (several keys with `cfg.phrasings`). Several items: one
    least-squares update per layer (batch). With `cfg.null_space`, the update is projected off the
    directions that the heads' outputs on `preserved` (and `unrelated`) prompts use (AlphaEdit's null space).
    `form`: the prompt form the items' prompts are keyed and optimised in (see `patchlab.core.forms`); the
    context prefixes go before the rendered prompt. `unrelated` and `preserved` are prompts, taken as given.
    """
    cfg = cfg or EditConfig()
    if not items:
        raise PatchlabError("no items to edit")
    items = render_items(model, items, form)
    if not heads:
        raise PatchlabError("no heads to edit", param="heads")
    base = base_hash(model)
    pre = prefixes(cfg.n_prefixes)
    for it in items:  # refuse a prompt too long for the model now, naming it, before any work
        for name in ("composed", "hop2"):
            for p in with_prefixes(getattr(it, name), pre):
                encode(
                    model, p, where=f"{it.id}: {name}" + (" (with a context prefix)" if p != getattr(it, name) else "")
                )
    layer_heads = HeadSet(heads, model.cfg.n_layers, model.cfg.n_heads).by_layer()
    # ROME / MEMIT's C and the preserved keys: statistics of the unedited model, read before any layer is staged
    covs = {layer: covariance(model, layer) for layer in layer_heads} if cfg.covariance else {}
    keep = list(dict.fromkeys([*preserved, *unrelated]))
    moments = (
        {layer: preserved_moment(model, layer, head_columns(model, hs), keep) for layer, hs in layer_heads.items()}
        if (cfg.null_space > 0 or cfg.preserve > 0) and keep
        else {}
    )
    projectors = {l: null_projector(m, cfg.null_space) for l, m in moments.items()} if cfg.null_space > 0 else {}
    deltas: dict[int, Tensor] = {}
    staged: list[Edit] = []
    try:
        for layer, hs in layer_heads.items():
            deltas[layer] = _layer_delta(
                model, items, layer, hs, cfg, pre, unrelated, covs.get(layer), projectors.get(layer),
                moments.get(layer) if cfg.preserve > 0 else None,
            )  # fmt: skip
            step = Edit(model_name(model), base, {layer: hs}, {layer: deltas[layer]}, [])
            staged.append(step.apply(model, verify_hash=False))  # later layers see this one
    finally:
        for step in reversed(staged):
            step.revert(model)
    method = {
        "target": cfg.target,
        "covariance": cfg.covariance,
        "n_prefixes": cfg.n_prefixes,
        "batch": len(items) > 1,
        "config": cfg.__dict__,
        "preserved_prompts": len(keep) if moments else 0,
        **({} if form == DEFAULT_FORM else {"form": form}),  # absent: plain (edit files made before forms)
    }
    return Edit(model_name(model), base, layer_heads, deltas, [it.id for it in items], method)


def preserved_moment(model, layer: int, cols: Tensor, prompts: Sequence[str]) -> Tensor:
    """E[z_S z_Sᵀ] of the edited heads' outputs over every real position of `prompts` (float64)."""
    zs = per_prompt(model, prompts, [sites.z(layer)], "real", 32, layer + 1, "preserved prompt")[sites.z(layer)]
    z = torch.cat([q.reshape(q.shape[0], -1)[:, cols] for q in zs]).double()
    return z.T @ z / z.shape[0]


def null_projector(moment: Tensor, energy: float) -> Tensor:
    """P = U Uᵀ over the eigenvectors of the preserved keys' second moment whose eigenvalue is at most
    `energy` × the largest: an update ΔW P leaves those keys (nearly) unmoved (AlphaEdit, Fang et al. 2025:
    the update is projected onto the preserved keys' null space)."""
    values, vectors = torch.linalg.eigh(moment)
    kept = vectors[:, values <= energy * values.max()]
    return (kept @ kept.T).float()


def _layer_delta(
    model,
    items,
    layer: int,
    hs: list[int],
    cfg: EditConfig,
    pre,
    unrelated,
    cov: Tensor | None = None,
    P: Tensor | None = None,
    moment: Tensor | None = None,
) -> Tensor:
    W = o_proj(model, layer).weight.detach().float().cpu()
    cols = head_columns(model, hs)
    bases = [[it.composed, *it.paraphrases[: cfg.phrasings]] for it in items]
    owner = torch.tensor([i for i, b in enumerate(bases) for _ in b])
    K = _mean_last_z(model, [with_prefixes(q, pre) for b in bases for q in b], layer)  # [keys, H*dh]
    C = _regularised(cov[cols][:, cols], cfg.cov_ridge) if cov is not None else None
    if moment is not None:  # preservation as part of C: directions the preserved keys use cost more to change
        base_C = C if C is not None else torch.eye(len(cols))
        C = base_C + cfg.preserve * (base_C.trace() / moment.trace()).float() * moment.float()
    if cfg.target == "guide":
        V = (_mean_last_z(model, [with_prefixes(it.hop2, pre) for it in items], layer) @ W.T)[owner]
    else:
        C_inv = torch.linalg.inv(C) if C is not None else None
        opt_pre = pre[: cfg.opt_prefixes + 1]
        k_item = torch.stack([K[owner == i].mean(0) for i in range(len(items))])
        deltas = torch.stack(
            [
                optimize_delta(
                    model, it, layer, k_item[i], cfg, opt_pre, unrelated, k_item[i, cols], cols, C_inv, bases[i], P
                )
                for i, it in enumerate(items)
            ]
        )
        V = torch.stack([W @ K[j] + deltas[owner[j]] for j in range(len(K))])
    if not (torch.isfinite(K).all() and torch.isfinite(V).all()):
        raise PatchlabError(f"non-finite head outputs or targets (NaN or inf) at layer {layer}")
    R = (V - K @ W.T).T  # [d_model, keys]
    if P is None:
        return solve_delta(R, K[:, cols].T, C, cfg.batch_ridge)
    return solve_delta(R, P @ K[:, cols].T, C, cfg.batch_ridge) @ P  # ΔW = R (K̃ᵀC⁻¹K̃)⁻¹ K̃ᵀC⁻¹ P, K̃ = P K


class ComputedEdit(NamedTuple):
    """One computed edit: the items it was made for, the edit, and the seconds it took."""

    items: list[TwoHopItem]
    edit: Edit
    seconds: float


def edit_each(
    model,
    items: Sequence[TwoHopItem],
    heads: Sequence[Head],
    cfg: EditConfig | None = None,
    batch: bool = False,
    unrelated: Sequence[str] = (),
    progress: bool = True,
    preserved: Sequence[str] | Callable[[list[TwoHopItem]], Sequence[str]] = (),
    form: str = DEFAULT_FORM,
) -> list[ComputedEdit]:
    """One edit per item (or one batch edit for all), each with the seconds it took to compute. `preserved`
    (prompts, or a function of the edit's items giving them) feeds `cfg.null_space`. The items come back
    rendered in `form` (see `patchlab.runtime.forms`)."""
    import time

    from patchlab.core.progress import track

    items = render_items(model, items, form)
    groups = [list(items)] if batch else [[it] for it in items]
    out = []
    for group in track(groups, "computing edits" if progress else None):
        start = time.perf_counter()
        keep = preserved(group) if callable(preserved) else preserved
        edit = compute_edit(model, group, heads, cfg, unrelated, keep, form)
        out.append(ComputedEdit(group, edit, time.perf_counter() - start))
    return out


# --- edit creation as a sharded job (`patchlab.runs.jobs.compute_edits`) -------------------------------


def shard_config(
    heads: Sequence[Head], cfg: EditConfig, unrelated: Sequence[str], preserved: Sequence[str] | None, form: str
) -> dict[str, Any]:
    """The config of the sharded "edit" stage: the heads (as `14.3,17.9`), the EditConfig's fields, the KL
    prompts, the preserved prompts shared by every item (None: each item record carries its own), the form."""
    return {
        "heads": str(HeadSet(heads)),
        "cfg": dict(cfg.__dict__),
        "unrelated": list(unrelated),
        **({} if preserved is None else {"preserved": list(preserved)}),
        **({} if form == DEFAULT_FORM else {"form": form}),
    }


@shard_task("edit")
def edit_shard(model, config: dict, items: list[dict], pool: list[dict]) -> list[dict]:
    """One shard of a sharded `edit_each` (per-item edits; a batch edit is one computation and is not
    sharded): each record {"id", "item", ["preserved"]} gets its own `compute_edit`, returned as a row with
    the deltas as tensors (`delta.LAYER`), the edit's identity and method, and the seconds it took. Each item's
    edit reads only the item, the config and the unedited model, so it does not depend on the shard or worker."""
    import time

    cfg = EditConfig(**config["cfg"])
    heads = HeadSet.parse(config["heads"], model.cfg.n_layers, model.cfg.n_heads)
    form = config.get("form", DEFAULT_FORM)
    rows = []
    for record in items:
        item = TwoHopItem.from_dict(record["item"], where=f"item {record['id']}")
        start = time.perf_counter()
        keep = record.get("preserved", config.get("preserved", []))
        edit = compute_edit(model, [item], heads, cfg, config["unrelated"], keep, form)
        rows.append(
            {
                "id": record["id"],
                "seconds": time.perf_counter() - start,
                "model": edit.model,
                "weights_sha256": edit.weights_sha256,
                "heads": [[layer, hs] for layer, hs in edit.heads.items()],
                "item_ids": edit.item_ids,
                "method": edit.method,
                **{f"delta.{layer}": delta.contiguous() for layer, delta in edit.deltas.items()},
            }
        )
    return rows


def edit_from_row(row: dict) -> Edit:
    """The `Edit` an "edit" shard row holds (its deltas read back from the row's tensors)."""
    heads = {int(layer): [int(h) for h in hs] for layer, hs in row["heads"]}
    deltas = {layer: row[f"delta.{layer}"] for layer in heads}
    return Edit(row["model"], row["weights_sha256"], heads, deltas, list(row["item_ids"]), row["method"])
