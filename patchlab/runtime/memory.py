"""How much memory a run needs, estimated before the model is loaded, and a refusal when it cannot fit.

need(device) = weights placed there + what the method holds at its largest step + a fixed overhead, where

  weights      Σ numel × bytes, read from the safetensors headers (or an empty-weights model built from the
               config), split over devices as `--device-map` / accelerate would place them;
  activations  per workload (`Workload`): the logits of one batch (batch × seq × vocab) and one layer's working
               set; locate's two cached runs per pair (resid_pre and hook_z at every patched layer) plus the
               attribution graph or the exact-patching batch; edit's covariance of the heads' z and one forward
               with grad; retune's gradients and Adam moments;
  overhead     on the cpu: this process's resident set now (python + torch + transformers + TransformerLens,
               measured) and the tokenizer (about 17.5 × its tokenizer.json, measured on SmolLM2 and Gemma-3);
               on a GPU: the CUDA context with cuBLAS' workspace (0.75 GiB; 739 MiB measured on an H100).

Two host transients never overlap a forward, so the cpu counts the larger of them and the activations: every
result records the weights' sha256, which copies the largest tensor to host memory (twice from a GPU), and a
load onto GPUs reads each weight file through host memory (the largest file is resident at once).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import torch

from patchlab.core.errors import PatchlabError

MiB = 1 << 20
GiB = 1 << 30
TOKENIZER_FACTOR = 17.5  # resident bytes per byte of tokenizer.json (SmolLM2: 61 MB for 3.5 MB; Gemma-3: 560 for 33)
TOKENIZER_PER_VOCAB = 2048  # bytes per vocabulary entry when there is no tokenizer.json to measure
CUDA_CONTEXT = 768 * MiB  # per GPU used: 739 MiB after CUDA init and one matmul (H100, torch 2.11)
CUDA_HOST = 256 * MiB  # host memory the CUDA libraries add to the process: 255 MiB measured there
CHARS_PER_TOKEN = 4  # the shipped prompts average 4.4-4.6 characters per token on both offline models
KINDS = ("evaluate", "locate", "edit", "forward", "train", "demo")
_FLOAT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_INT = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}


def prompt_tokens(text: str) -> int:
    """A prompt's length in tokens, guessed from its UTF-8 bytes (no tokenizer is loaded): bytes / 4 + BOS + 1."""
    return math.ceil(len(text.encode("utf-8")) / CHARS_PER_TOKEN) + 2


@dataclass(frozen=True)
class Workload:
    """What a run holds in memory beside the weights, as a command's options describe it."""

    kind: str = "forward"  # evaluate | locate | edit | forward | train | demo (the largest of its steps)
    seq_len: int = 32  # the longest prompt, in tokens
    batch: int = 32  # rows per forward pass
    n_layers_cached: int | None = None  # locate: layers whose activations are cached (None: all); edit: layers edited
    method: str = "both"  # locate: attribution | exact | both
    copies: int = 64  # locate exact: patched copies per batch
    new_tokens: int = 6  # evaluate: greedy tokens generated (KV cache)
    with_gap: bool = False  # a gap evaluation (one batch of generation) runs first
    trainable: str = "all"  # train: all | attn | edit-heads

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PatchlabError(f"workload kind must be one of {', '.join(KINDS)}, got '{self.kind}'")

    @classmethod
    def for_prompts(cls, kind: str, prompts: Sequence[str], **kw: Any) -> Workload:
        """A workload whose sequence length is the longest of `prompts` (guessed from their length)."""
        kw.setdefault("seq_len", max((prompt_tokens(p) for p in prompts), default=32))
        return cls(kind, **kw)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config and weight-file headers (nothing is loaded)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    d_mlp: int
    vocab: int
    n_ctx: int  # the longest prompt the model reads (longer ones are refused, never truncated)
    tensors: dict[str, tuple[int, int, bool]]  # name -> (numel, bytes per element in the file, floating?)
    tokenizer_bytes: int  # resident size of the tokenizer (estimated)
    largest_file: int = 0  # the largest weight file: read through host memory while loading onto GPUs
    quantized: bool = False
    config: dict = field(default_factory=dict, repr=False)

    @property
    def n_params(self) -> int:
        return sum(n for n, _, _ in self.tensors.values())

    def nbytes(self, name: str, dtype: torch.dtype) -> int:
        """Bytes of one tensor once loaded: floats take `dtype` (from_pretrained casts them), unless quantised."""
        numel, size, floating = self.tensors[name]
        return numel * (dtype.itemsize if floating and not self.quantized else size)


# --- reading a model without loading it ---------------------------------------------------------------------


def _text_config(config: dict) -> dict:
    """The language model's part of a config (multimodal configs nest it under text_config)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _dims(cfg: dict) -> dict[str, int]:
    """Layers, widths, heads and vocabulary from a Hugging Face config (Llama / Gemma / GPT-2 / NeoX names)."""
    get = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)  # noqa: E731
    d_model = int(get("hidden_size", "n_embd", "d_model", default=0))
    n_heads = int(get("num_attention_heads", "n_head", default=1))
    if not d_model or not get("num_hidden_layers", "n_layer"):
        raise PatchlabError("config.json has no hidden_size / num_hidden_layers: cannot estimate memory")
    return {
        "n_layers": int(get("num_hidden_layers", "n_layer")),
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": int(get("head_dim", default=d_model // n_heads)),
        "n_kv_heads": int(get("num_key_value_heads", default=n_heads)),
        "d_mlp": int(get("intermediate_size", "n_inner", default=4 * d_model) or 4 * d_model),
        "vocab": int(get("vocab_size", default=32000)),
        "n_ctx": int(get("max_position_embeddings", "n_positions", "n_ctx", default=4096)),
    }


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (8-byte length, then JSON): shapes and dtypes, no tensor data."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 100 * MiB:
            raise PatchlabError("safetensors header is implausibly large", where=str(path))
        return json.loads(fh.read(n))


def _file_tensors(folder: Path) -> dict[str, tuple[int, int, bool]]:
    """name -> (numel, bytes per element, floating?) over every safetensors shard of a folder ({} if none)."""
    out: dict[str, tuple[int, int, bool]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, info in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            dt = str(info.get("dtype", "F32"))
            out[name] = (math.prod(info.get("shape") or [1]), _FLOAT.get(dt) or _INT.get(dt, 4), dt in _FLOAT)
    return out


def _meta_model(config_dir: Path, dtype: torch.dtype):
    """The model built on the meta device from its config (accelerate's empty weights): shapes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from patchlab.runtime.models import quiet_transformers

    quiet_transformers()
    config = AutoConfig.from_pretrained(config_dir)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _meta_tensors(config_dir: Path, dtype: torch.dtype) -> dict[str, tuple[int, int, bool]]:
    model = _meta_model(config_dir, dtype)
    return {n: (p.numel(), p.element_size(), p.is_floating_point()) for n, p in model.named_parameters()}


def _tokenizer_bytes(folder: Path | None, vocab: int) -> int:
    """Resident size of the tokenizer: TOKENIZER_FACTOR × tokenizer.json, else TOKENIZER_PER_VOCAB × vocab."""
    path = folder / "tokenizer.json" if folder is not None else None
    if path is not None and path.is_file():
        return int(TOKENIZER_FACTOR * path.stat().st_size)
    return TOKENIZER_PER_VOCAB * vocab


def read_shape(name: str, dtype: torch.dtype = torch.float32) -> ModelShape | None:
    """The shape of an offline key (cached), a folder, or a hub name in the local HF cache; None if not on disk."""
    from patchlab.runtime.models import hub_file, model_folder

    folder = model_folder(name, build=False)
    if folder is None:
        config_path = hub_file(name, "config.json")
        folder = Path(config_path).parent if config_path else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    raw = json.loads((folder / "config.json").read_text())
    cfg = _text_config(raw)
    tensors = _file_tensors(folder) or _meta_tensors(folder, dtype)
    if raw.get("tie_word_embeddings", True) and "lm_head.weight" in tensors and len(tensors) > 1:
        tensors.pop("lm_head.weight")  # a tied head shares the embedding's storage once loaded
    dims = _dims(cfg)
    largest_file = max((f.stat().st_size for f in folder.glob("*.safetensors")), default=0)
    return ModelShape(
        **dims,
        tensors=tensors,
        tokenizer_bytes=_tokenizer_bytes(folder, dims["vocab"]),
        largest_file=largest_file,
        quantized=bool(raw.get("quantization_config")),
        config=raw,
    )


# --- where the weights go ------------------------------------------------------------------------------------


def _device_name(value: Union[int, str, None]) -> str:
    """0 / 'cuda' / 'cuda:0' -> 'cuda:0'; 'cpu' -> 'cpu' (one spelling per device)."""
    if value is None:
        return "cpu"
    if isinstance(value, int):
        return f"cuda:{value}"
    text = str(value).lower()
    return "cuda:0" if text == "cuda" else text


def _by_prefix(names: Sequence[str], dmap: dict[str, Any]) -> dict[str, str]:
    """Each tensor's device under a {module: device} map (the longest module prefix wins, '' is everything)."""
    keys = sorted(dmap, key=len, reverse=True)
    out = {}
    for n in names:
        hit = next((k for k in keys if k == "" or n == k or n.startswith(k + ".")), None)
        if hit is None:
            raise PatchlabError(
                f"the device map does not place '{n}' (map every module, or use '' for the rest)", param="device_map"
            )
        out[n] = _device_name(dmap[hit])
    return out


def planned_map(
    shape: ModelShape, folder: Path, dtype: torch.dtype, strategy: str, max_memory: dict | None
) -> dict[str, Any]:
    """The {module: device} map Hugging Face would infer for a strategy, computed on an empty-weights model."""
    from accelerate.utils import get_max_memory
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    model = _meta_model(folder, dtype)
    no_split = model._no_split_modules
    if strategy == "sequential":
        budget = get_max_memory(dict(max_memory) if max_memory else None)
    else:
        budget = get_balanced_memory(
            model,
            max_memory=dict(max_memory) if max_memory else None,
            no_split_module_classes=no_split,
            low_zero=strategy == "balanced_low_0",
        )
    return infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)


def place_weights(
    shape: ModelShape, dtype: torch.dtype, device: str | None, device_map, max_memory: dict | None, folder: Path | None
) -> dict[str, int]:
    """Weight bytes per device ('cpu', 'cuda:0', ... and 'disk' when a plan would offload)."""
    names = list(shape.tensors)
    if device_map is None:
        where = dict.fromkeys(names, _device_name(device))
    else:
        dmap = device_map if isinstance(device_map, dict) else planned_map(shape, folder, dtype, device_map, max_memory)
        where = _by_prefix(names, dmap)
    out: dict[str, int] = {}
    for n in names:
        out[where[n]] = out.get(where[n], 0) + shape.nbytes(n, dtype)
    return out


# --- activations per workload -------------------------------------------------------------------------------


def _forward(s: ModelShape, rows: int, seq: int, e: int, logit_rows: int | None = None) -> int:
    """One inference forward: the logits (every position unless `logit_rows`) and one layer's working set."""
    logits = (rows * seq if logit_rows is None else logit_rows) * s.vocab * e
    layer = rows * seq * (4 * s.d_model + 3 * s.d_mlp + 2 * s.n_heads * s.d_head) * e
    scores = 2 * rows * s.n_heads * seq * seq * e
    return logits + layer + scores


def _kv_cache(s: ModelShape, rows: int, seq: int, e: int) -> int:
    return 2 * s.n_layers * rows * seq * s.n_kv_heads * s.d_head * e


def _graph(s: ModelShape, rows: int, seq: int, layers: int, e: int) -> int:
    """What a forward with grad keeps for backward: ~12 d_model + 4 d_mlp + 3 score rows per token and layer,
    plus the logits, their softmax and their gradient."""
    per_layer = rows * seq * (12 * s.d_model + 4 * s.d_mlp + 3 * s.n_heads * seq) * e
    return layers * per_layer + 3 * rows * seq * s.vocab * e


def _evaluate(s: ModelShape, w: Workload, e: int) -> dict[str, int]:
    rows, seq = w.batch, w.seq_len
    return {
        "logits + layer (one batch)": _forward(s, rows, seq, e),
        "KV cache": _kv_cache(s, rows, seq + w.new_tokens, e),
    }


def _locate(s: ModelShape, w: Workload, e: int) -> dict[str, int]:
    layers = s.n_layers if w.n_layers_cached is None else w.n_layers_cached
    seq = w.seq_len
    parts = {"2 cached runs (resid_pre + hook_z)": 2 * layers * seq * (s.d_model + s.n_heads * s.d_head) * e}
    attribution = _graph(s, 1, seq, s.n_layers, e)
    exact = w.copies * seq * s.d_model * e + _forward(s, w.copies, seq, e, logit_rows=w.copies)
    if w.method == "attribution":
        parts["attribution graph"] = attribution
    elif w.method == "exact":
        parts["exact patching batch"] = exact
    else:
        parts["attribution graph | exact batch"] = max(attribution, exact)
    return parts


def _edit(s: ModelShape, w: Workload, e: int) -> dict[str, int]:
    width = s.n_heads * s.d_head
    layers = w.n_layers_cached or 1
    return {
        "covariance of z (float32)": layers * width * width * 4 + s.d_model * width * 4,
        "z batch": _forward(s, min(w.batch, 64), w.seq_len, e, logit_rows=0),
        "forward with grad (7 rows)": _graph(s, 7, w.seq_len, s.n_layers, e),
    }


def _train(s: ModelShape, w: Workload, e: int, weights: int) -> dict[str, int]:
    attn = 2 * (s.n_heads + s.n_kv_heads) * s.d_head * s.d_model * s.n_layers / max(1, s.n_params)
    share = {"all": 1.0, "attn": attn, "edit-heads": 0.0}.get(w.trainable, 1.0)
    return {
        "gradients + Adam moments": int(3 * share * weights),
        "forward with grad": _graph(s, w.batch, w.seq_len, s.n_layers, e),
    }


def activations(s: ModelShape, w: Workload, dtype: torch.dtype, weights: int = 0) -> dict[str, int]:
    """The named parts of the largest step of `w` (bytes); a gap evaluation run first counts if larger."""
    e = dtype.itemsize
    w = replace(w, seq_len=min(w.seq_len, s.n_ctx))  # a longer prompt is refused before any forward
    steps = {
        "evaluate": [_evaluate(s, w, e)],
        "locate": [_locate(s, w, e)],
        "edit": [_edit(s, w, e)],
        "forward": [{"logits + layer (one batch)": _forward(s, w.batch, w.seq_len, e)}],
        "train": [_train(s, w, e, weights)],
        "demo": [_evaluate(s, w, e), _locate(s, w, e), _edit(s, w, e)],
    }[w.kind]
    if w.with_gap and w.kind not in ("evaluate", "demo"):
        steps.append(_evaluate(s, w, e))
    return max(steps, key=lambda parts: sum(parts.values()))


# --- what is available ---------------------------------------------------------------------------------------


def resident_bytes() -> int:
    """This process's resident set now (VmRSS), or 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def runtime_bytes() -> int:
    """The resident set of the runtime the load will use: imports transformers and TransformerLens first (the
    load imports them anyway), then measures python + torch + both as they stand in this process."""
    import transformer_lens.model_bridge  # noqa: F401
    import transformers  # noqa: F401

    return resident_bytes()


def host_available() -> int:
    """Bytes the machine can still give this process: MemAvailable, capped by a cgroup limit if one is set."""
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        except OSError:
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail if avail is not None else 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else 1 << 62


def gpu_available(index: int) -> int:
    """Free bytes on GPU `index` (torch.cuda.mem_get_info); refuses a GPU this machine does not have."""
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise PatchlabError(f"cuda:{index} is asked for but this machine has {have} CUDA device(s)", param="device")
    return int(torch.cuda.mem_get_info(index)[0])


# --- the estimate ---------------------------------------------------------------------------------------------


@dataclass
class DeviceNeed:
    """One device's share of a run: weights, activations at the largest step, overhead, and what it may use."""

    device: str
    weights: int = 0
    activations: int = 0
    overhead: int = 0  # cpu: runtime + tokenizer; GPU: CUDA context
    transient: int = 0  # cpu: the weights hash's copy of the largest tensor, or a weight file read while loading
    transient_what: str = "weights-hash copy"
    available: int | None = None
    source: str = ""  # where `available` comes from

    @property
    def total(self) -> int:
        return self.weights + self.overhead + max(self.activations, self.transient)

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def arithmetic(self) -> str:
        """The sum as words: 'weights 513 MiB + activations 173 MiB + runtime and tokenizer 486 MiB = 1.14 GiB'."""
        moving = (
            f"activations {fmt(self.activations)}"
            if self.activations >= self.transient
            else f"{self.transient_what} {fmt(self.transient)}"
        )
        extra = "runtime and tokenizer" if self.device == "cpu" else "CUDA context"
        return f"weights {fmt(self.weights)} + {moving} + {extra} {fmt(self.overhead)} = {fmt(self.total)}"


@dataclass
class Estimate:
    """A run's memory need per device, and the parts of the activations, for printing and refusing."""

    model: str
    dtype: str
    workload: Workload
    devices: dict[str, DeviceNeed]
    parts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def need(self, device: str = "cpu") -> int:
        return self.devices[device].total if device in self.devices else 0

    def lines(self) -> list[str]:
        """One line per device plus the activation parts: what the CLI prints before loading."""
        out = [f"memory estimate for {self.model} ({self.dtype}, {self.workload.kind}):"]
        for d in self.devices.values():
            avail = f"{fmt(d.available)} available ({d.source})" if d.available is not None else "no limit known"
            out.append(f"  {d.device}: {d.arithmetic()}  vs {avail}{'' if d.fits else '  -> does not fit'}")
        out.append("  activations at the largest step: " + ", ".join(f"{k} {fmt(v)}" for k, v in self.parts.items()))
        return out + [f"  note: {n}" for n in self.notes]

    def refuse(self) -> None:
        """Raise one line with the arithmetic of the first device the run does not fit on."""
        for d in self.devices.values():
            if not d.fits:
                param = "max_memory" if d.source.startswith("`max_memory`") else None
                raise PatchlabError(
                    f"{self.model} ({self.dtype}, {self.workload.kind}) needs {d.arithmetic()} on "
                    f"{d.device}, but only {fmt(d.available)} is available ({d.source})",
                    param=param,
                    where=None if param else "memory",
                )


def fmt(n: int | None) -> str:
    """Bytes as MiB below 10 GiB, else GiB."""
    if n is None:
        return "?"
    return f"{n / MiB:.0f} MiB" if abs(n) < 10 * GiB else f"{n / GiB:.1f} GiB"


def _available(device: str, max_memory: dict | None, resident: int) -> tuple[int | None, str]:
    """What `device` may hold: its max_memory entry, else the machine's available RAM (plus what this process
    already holds, which the total counts) or the GPU's free memory."""
    if device != "cpu" and not device.startswith("cuda:"):
        return None, f"{device}: not measured"
    key: Union[int, str] = "cpu" if device == "cpu" else int(device.split(":")[1])
    free = host_available() + resident if device == "cpu" else gpu_available(int(key))  # refuses a missing GPU
    if max_memory and key in max_memory:
        return int(max_memory[key]), f"`max_memory` {key}={fmt(int(max_memory[key]))}"
    return free, "MemAvailable + this process" if device == "cpu" else "free on the GPU"


def _spread(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split per-layer activations over the devices in proportion to the weights they hold."""
    all_w = sum(weights.values()) or 1
    return {d: total * w // all_w for d, w in weights.items()}


def estimate(
    name: str,
    dtype: torch.dtype,
    work: Workload,
    device: str | None = None,
    device_map=None,
    max_memory: dict | None = None,
) -> Estimate | None:
    """The memory `work` needs on `name` loaded in `dtype` with this placement; None (with nothing loaded)
    where neither the weights nor the config are on disk yet."""
    from patchlab.runtime.models import hub_file, model_folder

    shape = read_shape(name, dtype)
    if shape is None:
        return None
    folder = model_folder(name, build=False) or Path(str(hub_file(name, "config.json"))).parent
    if device is None and device_map is None and model_folder(name, build=False) is None and torch.cuda.is_available():
        device = "cuda"  # a hub model goes where TransformerLens puts it
    weights = place_weights(shape, dtype, device, device_map, max_memory, folder)
    if "disk" in weights or "meta" in weights:
        off = weights.get("disk", 0) + weights.get("meta", 0)
        raise PatchlabError(
            f"{fmt(off)} of {name}'s weights would be offloaded to disk: they do not fit "
            f"{', '.join(f'{d} {fmt(b)}' for d, b in weights.items() if d not in ('disk', 'meta'))}"
            " (patchlab's hooks need every weight on a device): give more `max_memory` or GPUs, "
            "or use `dtype` bfloat16",
            param="max_memory" if max_memory else "device_map",
        )
    parts = activations(shape, work, dtype, sum(weights.values()))
    act = sum(parts.values())
    gpus = {d: b for d, b in weights.items() if d != "cpu"}
    cuda_host = CUDA_HOST if gpus and not torch.cuda.is_initialized() else 0  # else already in the resident set
    resident = runtime_bytes()
    largest = max((shape.nbytes(n, dtype) for n in shape.tensors), default=0)
    needs = {
        "cpu": DeviceNeed(
            "cpu",
            weights.get("cpu", 0),
            0 if gpus and "cpu" not in weights else act,
            resident + shape.tokenizer_bytes + cuda_host,
            largest,
        )
    }
    if gpus:  # the hash copies a GPU tensor to the host and then to bytes; loading reads each weight file there
        needs["cpu"].transient, needs["cpu"].transient_what = max(
            (2 * largest, "weights-hash copy"), (shape.largest_file, "weight file read while loading")
        )
    for d, share in _spread(act, gpus).items():
        needs[d] = DeviceNeed(d, gpus[d], share, CUDA_CONTEXT)
    if gpus and "cpu" in weights:  # a cpu share of an all-placed map computes its own layers there
        needs["cpu"].activations = _spread(act, weights)["cpu"]
    for d in needs.values():
        d.available, d.source = _available(d.device, max_memory, resident if d.device == "cpu" else 0)
    notes = [] if shape.tensors else ["no weight files: sizes from the config"]
    return Estimate(name, str(dtype).replace("torch.", ""), work, needs, parts, notes)
