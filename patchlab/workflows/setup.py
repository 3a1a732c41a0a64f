"""What every command settles before it computes: which model and where (placement checked, memory
estimated, then loaded), and how it runs (in this process, or sharded over workers)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.runtime import models, placement
from patchlab.runtime.models import DEFAULT_MODEL, model_type, parse_dtype

Notify = Callable[[str], None]


def silent(_: str) -> None:
    return None


# bytes a prompt form adds around a prompt, for the memory estimate made before any tokenizer is loaded: the
# qa cue ("Q: ... what?\nA:"), and a chat template's turns (SmolLM2's default system turn is ~110 bytes)
FORM_BYTES = {"plain": 0, "qa": 16, "chat": 200}


def workload(kind: str, items=None, form: str = "plain", **kw: Any):
    """A command's memory workload: `kind` over prompt-set items (their longest prompt, in `form`, sets the length)."""
    from patchlab.runtime.memory import Workload

    pad = " " * FORM_BYTES.get(form, 0)
    prompts = [getattr(it, f) + pad for it in items for f in ("hop1", "hop2", "composed")] if items is not None else []
    return Workload.for_prompts(kind, prompts, **kw)


@dataclass(frozen=True)
class ModelSpec:
    """A model to load: an offline key, a TransformerLens name or a folder, with its dtype and placement."""

    name: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str = "float32"
    device_map: str | None = None
    max_memory: str | None = None

    def placement(self, work=None, notify: Notify = silent) -> placement.Placement:
        """The parsed placement, the dtype checked for this model and, given a workload, the memory estimate
        reported through `notify` (refused, with the arithmetic, when it cannot fit)."""
        from patchlab.runtime.memory import estimate

        place = placement.parse(self.device, self.device_map, self.max_memory)
        dtype = parse_dtype(self.dtype)
        placement.refuse_dtype(model_type(self.name), dtype)
        if work is not None:
            est = estimate(self.name, dtype, work, place.device, place.device_map, place.max_memory)
            if est is None:
                notify(f"memory estimate skipped: no config or weights of {self.name} on disk yet")
            else:
                for line in est.lines():
                    notify(line)
                est.refuse()
        return place

    def load(self, work=None, notify: Notify = silent):
        """Check, estimate, then load the model as a TransformerBridge."""
        place = self.placement(work, notify)
        start = time.perf_counter()
        model = models.load_model(self.name, device=self.device, dtype=parse_dtype(self.dtype), **place.load_kwargs())
        notify(f"loaded {self.name} in {time.perf_counter() - start:.1f} s")
        return model

    def worker_load(self, work=None, notify: Notify = silent):
        """How each worker of a sharded run loads the model (checked and estimated per worker first)."""
        from patchlab.runs.backends import Load

        place = self.placement(work, notify)
        return Load(
            self.name, self.dtype, kwargs={**({"device": self.device} if self.device else {}), **place.load_kwargs()}
        )


@dataclass(frozen=True)
class Scale:
    """How a command runs: in this process, or sharded and resumable (a run folder, workers, Ray)."""

    run_dir: Path | None = None
    resume: Path | None = None
    backend: str = "local"
    workers: int = 1
    threads: int | None = None
    ray_address: str | None = None
    shard_size: int = 8

    @property
    def sharded(self) -> bool:
        """A run goes through shards when asked for a run folder, a resume, several workers or Ray."""
        if self.run_dir is not None and self.resume is not None:
            raise PatchlabError("give `run_dir` or `resume`, not both", param="resume")
        return self.run_dir is not None or self.resume is not None or self.workers != 1 or self.backend != "local"

    def open(self, command: str, config: dict, items: Sequence, out: Path, load):
        """A started `patchlab.runs.jobs.Run` (run folder: `resume`, `run_dir` or OUT/run)."""
        from patchlab.runs.jobs import Backend, Run

        if self.shard_size < 1:
            raise PatchlabError(f"must be >= 1, got {self.shard_size}", param="shard_size")
        folder = self.resume or self.run_dir or Path(out) / "run"
        return Run(
            command,
            {**config, "shard_size": self.shard_size},
            list(items),
            folder,
            load,
            Backend(self.backend, self.workers, self.threads, self.ray_address),
            resume=self.resume is not None,
        )


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def saved_gap(path: Path, model: str | None, form: str | None = None):
    """A saved GapResult, refused when it was made on another model (or, given `form`, in another prompt form)."""
    from patchlab.methods.gap import GapResult

    gap = GapResult.from_json(path)
    if model is not None and gap.model != model:
        raise PatchlabError(f"gap result was made on '{gap.model}', not this model", param="gap", where=str(path))
    made = gap.meta.get("form", "plain")  # results made before forms: plain
    if form is not None and made != form:
        raise PatchlabError(
            f"gap result was made in the {made} prompt form, not {form} (see `form`)", param="gap", where=str(path)
        )
    return gap


def gap_for(model, items, path: Path | None, form: str = "plain"):
    """A saved GapResult (made on this model, in `form`), or a fresh gap evaluation of `items` in `form`."""
    from patchlab.methods.gap import evaluate_gap

    if path is None:
        return evaluate_gap(model, items, form=form)
    return saved_gap(path, getattr(model, "patchlab_name", None), form)
