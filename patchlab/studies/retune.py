"""Re-tuning with or without the CARMA regulariser: AdamW on a chosen parameter subset, checkpointed, resumable.

    loss = CE(answer tokens)                                            (plain fine-tuning)
    loss = (1 - lam) * CE + lam * (gamma * L_MI + eta * L_stab)         (CARMA, see `patchlab.carma`)

The task loss is the teacher-forced cross-entropy of the answer tokens (" " + answer after the prompt,
as `patchlab.scoring` tokenizes them), averaged over the answer tokens of a batch. CARMA reads the
residual stream after every block (`blocks.{L}.hook_resid_post`) through TransformerLens hooks; word
spans come from the tokenizer's character offsets over prompt + answer (`carma.word_spans`).

Parameters: "all" (every weight), "attn" (every attention block's weights) or "edit-heads" (only the
W_O columns of an edit's heads: their gradient is masked and the other columns are put back bit-exactly
after each step, so AdamW's weight decay never touches them). The data order is a seeded permutation
per epoch, a pure function of (seed, step); the learning rate warms up linearly, then stays constant;
gradients are clipped by global norm. The model stays in eval mode (no dropout), so a run is a pure
function of its inputs and resuming from a checkpoint gives bit-identical weights on the same machine.

A checkpoint is a folder `step-NNNNNN/` (renamed into place whole) holding the trainable tensors and
AdamW's state (safetensors) and `state.json` (step, config hash, CARMA sampler state, loss history,
sha256 of the tensors). Only the newest `keep` checkpoints are kept. `torch.load` is never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.io import atomic_dir, atomic_write_json, sweep_orphans
from patchlab.core.progress import track
from patchlab.methods.edit import Edit, head_columns, o_proj, tensors_hash
from patchlab.results.base import Result
from patchlab.runtime import sites
from patchlab.runtime.bridge import hf_module, model_name
from patchlab.runtime.identity import provenance, weights_hash
from patchlab.runtime.scoring import answer_token_ids, encode, pad_id, pad_right
from patchlab.runtime.trace import trace
from patchlab.studies.carma import CarmaConfig, CarmaRegulariser, word_spans

FORMAT = "patchlab-retune/1"
PARAMS = ("all", "attn", "edit-heads")
IGNORE = -100  # cross-entropy target of positions that are not answer tokens


def _fail(message: str, where: str | None = None) -> PatchlabError:
    return PatchlabError(f"retune: {message}", where=where)


def _positive(name: str, value: object, integer: bool = False, zero: bool = False) -> None:
    """A finite number > 0 (or >= 0 with zero=True); an int when integer=True."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        what = "an int" if integer else "a finite number"
        raise PatchlabError(f"must be {what} {'>= 0' if zero else '> 0'}, got {value!r}", param=name)


@dataclass(frozen=True)
class RetuneConfig:
    """What a re-tuning run does; validated on construction (errors name the CLI option)."""

    params: str = "all"  # all | attn | edit-heads
    steps: int = 30
    lr: float = 6e-5
    warmup: int = 0  # steps of linear warmup from lr / (warmup + 1) to lr
    clip: float = 1.0  # max global gradient norm; 0 = no clipping
    batch_size: int = 8
    seed: int = 0  # data order
    weight_decay: float = 0.0
    checkpoint_every: int = 0  # 0 = only the final checkpoint (when a checkpoint_dir is given)
    keep: int = 2  # newest checkpoints kept on disk

    def __post_init__(self) -> None:
        if self.params not in PARAMS:
            raise PatchlabError(f"must be one of {', '.join(PARAMS)}, got {self.params!r}", param="params")
        _positive("steps", self.steps, integer=True)
        _positive("lr", self.lr)
        _positive("warmup", self.warmup, integer=True, zero=True)
        _positive("clip", self.clip, zero=True)
        _positive("batch_size", self.batch_size, integer=True)
        _positive("weight_decay", self.weight_decay, zero=True)
        _positive("checkpoint_every", self.checkpoint_every, integer=True, zero=True)
        _positive("keep", self.keep, integer=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PatchlabError(f"must be an int, got {self.seed!r}", param="seed")

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based `step`: linear warmup over `warmup` steps, then constant."""
        return self.lr * min(1.0, (step + 1) / (self.warmup + 1))


# --- data ------------------------------------------------------------------------------------------


def examples(data: Sequence[Any]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from QA objects (first answer), TwoHopItems (composed query) or pairs."""
    out = []
    for i, d in enumerate(data):
        if hasattr(d, "prompt") and hasattr(d, "answer"):
            out.append((d.prompt, d.answer))
        elif hasattr(d, "composed") and hasattr(d, "answer"):
            out.append((d.composed, d.answer))
        elif isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(x, str) for x in d):
            out.append((d[0], d[1]))
        else:
            raise _fail(f"data[{i}] is not a QA, a TwoHopItem or a (prompt, answer) pair")
    if not out:
        raise _fail("no training data")
    return out


@dataclass(frozen=True)
class Encoded:
    """One training sequence: prompt + answer token ids, where the answer starts, and per-token word ids."""

    ids: tuple[int, ...]
    start: int  # index of the first answer token
    words: tuple[int, ...]  # CARMA word id per token (-1: not part of a multi-token word)


def encode_example(model, prompt: str, answer: str, where: str = "data") -> Encoded:
    """Tokenize prompt + " " + answer as scoring does, with word ids from the tokenizer's offsets.

    Word ids are computed only when the fast tokenizer reproduces the model's own prompt tokens
    (after an optional BOS); otherwise every token gets -1 (no word pairs for CARMA's L_MI).
    """
    p_ids, a_ids = (
        encode(model, prompt, where=f"{where}: prompt"),
        answer_token_ids(model, answer, where=f"{where}: answer"),
    )
    ids = p_ids + a_ids
    if len(ids) > int(model.cfg.n_ctx):
        raise PatchlabError(f"prompt + answer is {len(ids)} tokens, longer than the context", where=where)
    words = [-1] * len(ids)
    tok = model.tokenizer
    if getattr(tok, "is_fast", False):
        pe = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ae = tok(" " + answer.strip(), add_special_tokens=False, return_offsets_mapping=True)
        lead = len(p_ids) - len(pe["input_ids"])
        if lead in (0, 1) and p_ids[lead:] == pe["input_ids"] and ae["input_ids"] == a_ids:
            shift = len(prompt)
            offsets = (
                [(0, 0)] * lead + list(pe["offset_mapping"]) + [(s + shift, e + shift) for s, e in ae["offset_mapping"]]
            )
            real = [False] * lead + [True] * (len(ids) - lead)
            words = word_spans(offsets, real, prompt + " " + answer.strip()).tolist()
    return Encoded(tuple(ids), len(p_ids), tuple(words))


def collate(
    batch: Sequence[Encoded], pad: int
) -> tuple[Int[Tensor, "b pos"], Int[Tensor, "b pos"], Int[Tensor, "b pos"], Int[Tensor, "b pos"]]:
    """Right-padded (tokens, attention mask, next-token targets with IGNORE off the answer, word ids)."""
    tokens, lengths = pad_right([e.ids for e in batch], pad)
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    targets = torch.full_like(tokens, IGNORE)
    words = torch.full_like(tokens, -1)
    for b, e in enumerate(batch):
        n = len(e.ids)
        targets[b, e.start - 1 : n - 1] = torch.tensor(e.ids[e.start :])
        words[b, :n] = torch.tensor(e.words)
    return tokens, mask, targets, words


def batch_rows(n: int, batch_size: int, seed: int, step: int, _cache: dict | None = None) -> list[int]:
    """Rows of 0-based `step`: the stream of per-epoch seeded permutations, cut into batches."""
    cache = _cache if _cache is not None else {}
    rows = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in cache:
            order = list(range(n))
            random.Random(f"retune|{seed}|{epoch}").shuffle(order)
            cache[epoch] = order
        rows.append(cache[epoch][pos % n])
    return rows


# --- which weights train -------------------------------------------------------------------------------


def _clean(name: str) -> str:
    return name.replace("._original_component", "")


def _attention(model, layer: int) -> torch.nn.Module:
    attn = model.blocks[layer].attn
    return getattr(attn, "original_component", attn)


def trainable(model, params: str, edit: Edit | None = None) -> dict[str, torch.nn.Parameter]:
    """The named weights that `params` trains (names as in the Hugging Face module, sorted)."""
    named = {_clean(n): p for n, p in hf_module(model).named_parameters()}
    if params == "all":
        chosen = named
    elif params == "attn":
        ids = {id(p) for layer in range(model.cfg.n_layers) for p in _attention(model, layer).parameters()}
        chosen = {n: p for n, p in named.items() if id(p) in ids}
    elif params == "edit-heads":
        if edit is None:
            raise PatchlabError(
                "params 'edit-heads' needs an edit (its heads' W_O columns are trained)", param="params"
            )
        ids = {id(o_proj(model, layer).weight) for layer in edit.heads}
        chosen = {n: p for n, p in named.items() if id(p) in ids}
    else:
        raise PatchlabError(f"must be one of {', '.join(PARAMS)}, got {params!r}", param="params")
    if not chosen:
        raise _fail(f"params '{params}' selects no weights in this model")
    return dict(sorted(chosen.items()))


def column_masks(model, named: dict[str, torch.nn.Parameter], edit: Edit) -> dict[str, Tensor]:
    """For params="edit-heads": per trained o_proj weight, the column indices that stay frozen."""
    frozen: dict[str, Tensor] = {}
    for layer, heads in edit.heads.items():
        w = o_proj(model, layer).weight
        name = next(n for n, p in named.items() if p is w)
        keep = torch.ones(w.shape[1], dtype=torch.bool)
        keep[head_columns(model, heads)] = False
        frozen[name] = keep.nonzero().squeeze(1).to(w.device)
    return frozen


@contextlib.contextmanager
def only_these(model, named: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Only `named` require grad inside the block (saves the backward pass through frozen weights)."""
    params = list(hf_module(model).parameters())
    before = [p.requires_grad for p in params]
    chosen = {id(p) for p in named.values()}
    try:
        for p in params:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, rg in zip(params, before):
            p.requires_grad_(rg)
            p.grad = None


@contextlib.contextmanager
def restoring(model) -> Iterator[None]:
    """Snapshot every weight and put it back bit-exactly on exit; edits applied inside are forgotten."""
    params = list(hf_module(model).parameters())
    saved = [p.detach().clone() for p in params]
    stack = list(getattr(model, "_patchlab_edits", []))
    cached_hash = getattr(model, "_patchlab_hash", None)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for e in getattr(model, "_patchlab_edits", []):
            if not any(e is k for k in stack):
                e._saved.clear()  # its original columns are back: it is no longer applied
        model._patchlab_edits = stack
        model._patchlab_hash = cached_hash


# --- result ----------------------------------------------------------------------------------------


@dataclass
class RetuneResult(Result):
    """A re-tuning run: its settings, the per-step loss curve, and (when measured) before/after metrics."""

    kind = "retune"
    heading = "Re-tuning (CARMA)"
    intro = (
        "Fine-tuning a parameter subset with or without the CARMA regulariser (word-level mutual-information "
        "alignment + layer stability): the loss curves and the before/after evaluation."
    )
    order = 60
    model: str
    task: str
    config: dict[str, Any]
    carma: dict[str, Any] | None
    history: list[dict[str, Any]]  # per step: step, lr, task, mi, stab, total, grad_norm, seconds
    n_trainable: int
    seconds: float
    resumed_from: int | None = None
    checkpoint: str | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)  # before / after metrics (tasks.evaluate_task)
    edit: dict[str, Any] = field(default_factory=dict)  # heads and correction before / after
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self):
        from patchlab.results import tables

        return tables.retune_table(self)

    def figure(self):
        from patchlab.results.figures import retune_figure

        return retune_figure(self)


# --- checkpoints -------------------------------------------------------------------------------------


def _step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step:06d}"


def checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoint folders under `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _save_file(tensors: dict[str, Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)  # the usual mode, as patchlab.io gives its files
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    sd = opt.state_dict()
    # 0-dim tensors (AdamW's step) are stored with shape (1,) and read back as 0-dim
    return {
        f"opt.{i}.{k}": v.detach().cpu().reshape(v.shape or (1,)).clone()
        for i, st in sd["state"].items()
        for k, v in st.items()
    }


def save_checkpoint(
    folder: str | Path,
    step: int,
    named: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    rng: Tensor | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically (a folder renamed into place), then drop all but the newest `keep`."""
    folder = Path(folder)
    weights = {n: p.detach().cpu().contiguous().clone() for n, p in named.items()}
    opt_t = _optimizer_tensors(opt)
    if rng is not None:
        opt_t["rng.carma"] = rng.clone()
    state = {
        **state,
        "format": FORMAT,
        "step": step,
        "names": list(named),
        "weights_sha256": tensors_hash(weights),
        "optimizer_sha256": tensors_hash(opt_t),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]],
    }
    target = _step_dir(folder, step)
    with atomic_dir(target) as tmp:
        _save_file(weights, tmp / "trainable.safetensors", {"format": FORMAT})
        _save_file(opt_t, tmp / "optimizer.safetensors", {"format": FORMAT})
        atomic_write_json(tmp / "state.json", state)
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass
class Checkpoint:
    """A loaded checkpoint: trainable tensors, AdamW state tensors and the JSON state."""

    path: Path
    weights: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder; a damaged, tampered or foreign one is refused with one line naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(path / "trainable.safetensors"))
        opt_t = load_file(str(path / "optimizer.safetensors"))
    except Exception as exc:  # json / OS / safetensors errors all mean "not a readable checkpoint"
        raise PatchlabError(
            f"not a readable checkpoint ({type(exc).__name__}: {str(exc)[:120]})".replace("\n", " "), where=str(path)
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PatchlabError(
            f"not a patchlab retune checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})",
            where=str(path),
        )
    if tensors_hash(weights) != state.get("weights_sha256") or tensors_hash(opt_t) != state.get("optimizer_sha256"):
        raise PatchlabError(
            "checkpoint tensors do not match their recorded sha256 (changed after saving)", where=str(path)
        )
    return Checkpoint(path, weights, opt_t, state)


def load_trainable(model, path: str | Path, verify_hash: bool = True) -> Checkpoint:
    """Put a checkpoint's trained weights into `model` (which must hold the weights the run started from)."""
    ck = load_checkpoint(path)
    if verify_hash and weights_hash(model) != ck.state.get("base_weights_sha256"):
        raise PatchlabError(
            "checkpoint was trained from other weights than this model's (apply the same edit first?)", where=str(path)
        )
    named = {_clean(n): p for n, p in hf_module(model).named_parameters()}
    missing = [n for n in ck.weights if n not in named or tuple(named[n].shape) != tuple(ck.weights[n].shape)]
    if missing:
        raise PatchlabError(f"checkpoint tensor '{missing[0]}' does not fit this model", where=str(path))
    with torch.no_grad():
        for n, t in ck.weights.items():
            named[n].copy_(t)
    return ck


def _restore_optimizer(opt: torch.optim.Optimizer, ck: Checkpoint) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in ck.optimizer.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t.reshape(()) if name == "step" else t
    groups = [{**g, **saved} for g, saved in zip(sd["param_groups"], ck.state["param_groups"])]
    opt.load_state_dict({"state": state, "param_groups": groups})


def config_hash(
    cfg: RetuneConfig, carma: CarmaConfig | None, data: Sequence[tuple[str, str]], base: str, edit: Edit | None
) -> str:
    """What makes two runs the same run: settings (not the step count), CARMA, data, start weights, edit."""
    run = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("steps", "checkpoint_every", "keep")}
    obj = {
        "config": run,
        "carma": dataclasses.asdict(carma) if carma else None,
        "data": list(map(list, data)),
        "base_weights_sha256": base,
        "edit": None if edit is None else tensors_hash(edit.tensors()),
    }
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --- the loop ----------------------------------------------------------------------------------------


def _forward(model, tokens: Tensor, layers: int, carma: bool) -> tuple[Tensor, Tensor | None]:
    """Logits, and with CARMA the stacked residual stream after every block ([layer, batch, pos, d])."""
    if not carma:
        return model(tokens), None
    names = [sites.resid_post(l) for l in range(layers)]
    t = trace(model, tokens, names, graph=True)
    return t.logits, torch.stack([t[n] for n in names]).float()


def task_loss(logits: Float[Tensor, "b pos vocab"], targets: Int[Tensor, "b pos"]) -> Float[Tensor, ""]:
    """Teacher-forced cross-entropy of the answer tokens (mean over the answer tokens of the batch)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().to(logits.device), ignore_index=IGNORE)


def _resume(
    folder: Path,
    run_hash: str,
    steps: int,
    named: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    reg: CarmaRegulariser | None,
    device,
) -> tuple[int, list[dict[str, Any]], Path]:
    """Load the newest checkpoint of this run into the weights, AdamW and CARMA's sampler: (step, history, path)."""
    path = checkpoints(folder)[-1]
    ck = load_checkpoint(path)
    if ck.state.get("config_hash") != run_hash:
        raise PatchlabError(
            "checkpoint belongs to another run (settings, data, CARMA, edit or start weights differ); "
            "use another checkpoint folder or resume=False",
            where=str(path),
        )
    if ck.step > steps:
        raise PatchlabError(f"checkpoint is at step {ck.step}, beyond the {steps} steps asked for", where=str(path))
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(ck.weights[n])
    _restore_optimizer(opt, ck)
    if reg is not None:
        reg.generator(torch.device(device)).set_state(ck.optimizer["rng.carma"])
    return ck.step, list(ck.state["history"]), path


def _step(
    model,
    batch: list[Encoded],
    cfg: RetuneConfig,
    step: int,
    opt: torch.optim.Optimizer,
    named: dict[str, torch.nn.Parameter],
    frozen: dict[str, tuple[Tensor, Tensor]],
    reg: CarmaRegulariser | None,
    where: str,
) -> dict[str, Any]:
    """One AdamW step on one batch; returns its record (losses, lr, gradient norm, seconds)."""
    t0 = time.perf_counter()
    tokens, mask, targets, words = collate(batch, pad_id(model))
    lr = cfg.lr_at(step)
    for g in opt.param_groups:
        g["lr"] = lr
    logits, hidden = _forward(model, tokens.to(model.cfg.device), int(model.cfg.n_layers), reg is not None)
    task_value = task_loss(logits, targets)
    record: dict[str, Any] = {"step": step + 1, "lr": lr, "task": task_value.item()}
    total = task_value
    if reg is not None:
        try:
            terms = reg(hidden, words.to(hidden.device), mask.to(hidden.device))
            total = reg.total(task_value, terms)
        except PatchlabError as exc:  # CARMA's own non-finite checks: say which step
            raise _fail(f"{exc} at {where}") from None
        record.update(mi=terms["mi"].item(), stab=terms["stab"].item())
    if not torch.isfinite(total):
        raise _fail(f"non-finite loss at {where}")
    opt.zero_grad(set_to_none=True)
    total.backward()
    for n, (cols, _) in frozen.items():
        named[n].grad[:, cols] = 0
    norm = torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.clip if cfg.clip > 0 else float("inf"))
    if not torch.isfinite(norm):
        raise _fail(f"non-finite gradient at {where}")
    opt.step()
    with torch.no_grad():
        for n, (cols, values) in frozen.items():
            named[n][:, cols] = values  # bit-exact: weight decay must not move the frozen columns
    return {**record, "total": total.item(), "grad_norm": norm.item(), "seconds": time.perf_counter() - t0}


def retune(
    model,
    data: Sequence[Any],
    carma: CarmaConfig | None = None,
    params: str = "all",
    edit: Edit | None = None,
    steps: int = 30,
    lr: float = 6e-5,
    warmup: int = 0,
    clip: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    weight_decay: float = 0.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    keep: int = 2,
    task: str = "custom",
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> RetuneResult:
    """Fine-tune `model` in place on (prompt, answer) data, plain (carma=None) or with the CARMA regulariser.

    With `edit`, the edit is applied first (if it is not already) so that the model is re-tuned around
    it; params="edit-heads" then trains only its heads' W_O columns. With `checkpoint_dir`, a
    checkpoint is written every `checkpoint_every` steps and at the end, and `resume=True` continues
    from the newest one (resume=False deletes them first). `on_step(step, record)` runs after every step.
    """
    cfg = RetuneConfig(params, steps, lr, warmup, clip, batch_size, seed, weight_decay, checkpoint_every, keep)
    if carma is not None and not isinstance(carma, CarmaConfig):
        raise _fail(f"carma must be a CarmaConfig or None, got {type(carma).__name__}")
    pairs = examples(data)
    encoded = [encode_example(model, p, a, where=f"data[{i}]") for i, (p, a) in enumerate(pairs)]
    if edit is not None and not edit._saved:
        edit.apply(model)
    base = weights_hash(model)
    run_hash = config_hash(cfg, carma, pairs, base, edit)
    named = trainable(model, cfg.params, edit)
    frozen = {
        n: (cols, named[n].detach()[:, cols].clone())
        for n, cols in (column_masks(model, named, edit) if cfg.params == "edit-heads" else {}).items()
    }
    opt = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    reg = CarmaRegulariser(carma) if carma is not None else None
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, history, last_ck = 0, [], None
    if folder is not None:
        sweep_orphans(folder)
        if not resume:
            for old in checkpoints(folder):
                shutil.rmtree(old)
        elif checkpoints(folder):
            start, history, last_ck = _resume(folder, run_hash, cfg.steps, named, opt, reg, model.cfg.device)
    state = {
        "config_hash": run_hash,
        "config": dataclasses.asdict(cfg),
        "carma": dataclasses.asdict(carma) if carma else None,
        "base_weights_sha256": base,
        "model": model_name(model),
        "task": task,
        "edit_heads": edit.head_list if edit is not None else None,
    }
    order: dict[int, list[int]] = {}
    model._patchlab_hash = None  # edit.base_hash caches the weights' hash: these weights are about to change
    began = time.perf_counter()
    with only_these(model, named), torch.enable_grad():
        for step in track(range(start, cfg.steps), "retuning" if progress else None, total=cfg.steps - start):
            batch = [encoded[i] for i in batch_rows(len(encoded), cfg.batch_size, cfg.seed, step, order)]
            where = f"step {step + 1}; last good checkpoint: {last_ck if last_ck is not None else 'none'}"
            history.append(_step(model, batch, cfg, step, opt, named, frozen, reg, where))
            done = step + 1
            if folder is not None and (
                done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            ):
                rng = reg.generator(torch.device(model.cfg.device)).get_state() if reg is not None else None
                last_ck = save_checkpoint(folder, done, named, opt, {**state, "history": history}, rng, cfg.keep)
            if on_step is not None:
                on_step(done, history[-1])
    n_frozen = sum(named[n].shape[0] * len(cols) for n, (cols, _) in frozen.items())
    return RetuneResult(
        model=model_name(model),
        task=task,
        config=dataclasses.asdict(cfg),
        carma=dataclasses.asdict(carma) if carma else None,
        history=history,
        n_trainable=int(sum(p.numel() for p in named.values()) - n_frozen),
        seconds=time.perf_counter() - began,
        resumed_from=start or None,
        checkpoint=str(last_ck) if last_ck is not None else None,
        edit={"heads": edit.head_list, "items": edit.item_ids} if edit is not None else {},
        meta=provenance(model, seed=cfg.seed, config_hash=run_hash, n_examples=len(pairs)),
    )
