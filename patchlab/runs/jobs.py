"""Sharded, resumable runs of the per-item computations (`evaluate`, `locate`, edit creation and evaluation).

A job is a command's config + the model's identity + the prompt set; its run id hashes all three (and
the patchlab / torch versions and dtype), so a run directory belongs to exactly one run. Items are keyed
by the hash of their normalised record, sorted by key and cut into shards of K: shards, and the batches
inside them, never depend on the number of workers. Each shard's rows are written atomically, then a
`done` record with their count and sha256; the merge reads verified shards in key order and reduces in
float64, so the result does not depend on completion order or worker count.

    RUN/job.json                       run id and what it hashes
    RUN/<stage>-<id>/plan.json         the stage's config and its shards' item keys
    RUN/<stage>-<id>/shard-00003.jsonl rows: {"key": ..., "row": {...}} per line
    RUN/<stage>-<id>/shard-00003.done  {"rows": n, "sha256": ..., "quarantined": [...]}
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.core.io import atomic_write_bytes, atomic_write_json, sweep_stale
from patchlab.core.progress import track
from patchlab.core.prompts import TwoHopItem
from patchlab.runs.backends import Load, Task, check_threads, open_pool, schedule
from patchlab.runtime.identity import versions

DEFAULT_SHARD = 8


def canonical(obj: Any) -> bytes:
    """The one byte string a JSON-like object hashes as: sorted keys, no spaces, NFC-normalised text."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return unicodedata.normalize("NFC", text).encode("utf-8")


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()


def item_key(record: dict) -> str:
    """An item's content key: the sha256 of its normalised record."""
    return digest(record)


# --- the run directory ------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One sharded pass over `items` with one task and config (e.g. the attribution screen)."""

    task: str
    config: dict
    items: list[dict]
    pool: list[dict] = field(default_factory=list)
    shard_size: int = DEFAULT_SHARD

    def __post_init__(self):
        self.keys = {d["id"]: item_key(d) for d in self.items}
        self.id = digest(
            {
                "task": self.task,
                "config": self.config,
                "items": sorted(self.keys.values()),
                "pool": sorted(item_key(d) for d in self.pool),
                "shard_size": self.shard_size,
            }
        )[:16]

    def shards(self) -> list[list[dict]]:
        ordered = sorted(self.items, key=lambda d: self.keys[d["id"]])
        return [ordered[i : i + self.shard_size] for i in range(0, len(ordered), self.shard_size)]


class RunDir:
    """A run directory bound to one run id: refuses another run's folder, verifies and merges shards."""

    def __init__(self, path: str | Path, job: dict, resume: bool = False):
        self.path, self.job = Path(path), job
        self.run_id = job["run_id"]
        marker = self.path / "job.json"
        if marker.is_file():
            try:
                found = json.loads(marker.read_text(encoding="utf-8")).get("run_id")
            except (OSError, ValueError, AttributeError):
                raise PatchlabError("job.json is unreadable: not a patchlab run directory", where=str(marker)) from None
            if found != self.run_id:
                raise PatchlabError(
                    f"belongs to run {found}, not to this run ({self.run_id}): a run directory holds "
                    "one run (same command, model, prompt set, versions); use a new `run_dir`",
                    where=str(self.path),
                )
        elif resume:
            raise PatchlabError("no run to resume here (no job.json)", param="resume", where=f"{self.path}")
        elif self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise PatchlabError("exists and is not an empty patchlab run directory", where=str(self.path))
        else:
            atomic_write_json(marker, job)

    def stage_dir(self, stage: Stage) -> Path:
        folder = self.path / f"{stage.task}-{stage.id}"
        if not (folder / "plan.json").is_file():
            plan = {
                "task": stage.task,
                "config": stage.config,
                "shard_size": stage.shard_size,
                "shards": [[stage.keys[d["id"]] for d in s] for s in stage.shards()],
            }
            atomic_write_json(folder / "plan.json", plan)
        sweep_stale(folder)  # temp files of a killed run
        return folder

    def verified(self, folder: Path, index: int, keys: list[str]) -> dict | None:
        """The shard's rows and quarantined ids if its done record matches its rows file, else None."""
        rows_path, done_path = folder / f"shard-{index:05d}.jsonl", folder / f"shard-{index:05d}.done"
        try:
            done = json.loads(done_path.read_text(encoding="utf-8"))
            data = rows_path.read_bytes()
        except (OSError, ValueError):
            return None
        if (
            not isinstance(done, dict)
            or hashlib.sha256(data).hexdigest() != done.get("sha256")
            or done.get("keys") != keys
        ):
            return None
        lines = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
        if len(lines) != done.get("rows"):
            return None
        if done.get("tensors_sha256"):  # rows holding tensors keep them beside, in safetensors
            tensors = _read_tensors(folder / f"shard-{index:05d}.safetensors", done["tensors_sha256"])
            if tensors is None:
                return None
            lines = [{**line, "row": _with_tensors(line["row"], tensors)} for line in lines]
        return {"rows": lines, "quarantined": done.get("quarantined", [])}

    def write_shard(
        self, folder: Path, index: int, keys: list[str], rows: list[dict], quarantined: list[str], seconds: float
    ) -> None:
        tensors: dict[str, Any] = {}
        plain = [{**r, "row": _without_tensors(r["row"], tensors)} for r in rows]
        data = b"".join(_line(r) for r in plain)
        done = {
            "rows": len(rows),
            "sha256": hashlib.sha256(data).hexdigest(),
            "keys": keys,
            "quarantined": quarantined,
            "seconds": round(seconds, 3),
        }
        if tensors:
            from safetensors.torch import save

            blob = save({k: v.contiguous() for k, v in tensors.items()})
            atomic_write_bytes(folder / f"shard-{index:05d}.safetensors", blob)
            done["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        atomic_write_bytes(folder / f"shard-{index:05d}.jsonl", data)
        atomic_write_json(folder / f"shard-{index:05d}.done", done)


def _without_tensors(row: dict, tensors: dict) -> dict:
    """`row` with each tensor value replaced by {"tensor": name}, the tensor put in `tensors` under that name."""
    out = {}
    for key, value in row.items():
        if hasattr(value, "detach"):
            name = f"{row['id']}/{key}"
            tensors[name], value = value, {"tensor": name}
        out[key] = value
    return out


def _with_tensors(row: dict, tensors: dict) -> dict:
    return {k: tensors[v["tensor"]] if isinstance(v, dict) and set(v) == {"tensor"} else v for k, v in row.items()}


def _read_tensors(path: Path, sha256: str) -> dict | None:
    """A shard's tensors if the file is whole and the one its done record hashed, else None."""
    from safetensors.torch import load

    try:
        blob = path.read_bytes()
    except OSError:
        return None
    return load(blob) if hashlib.sha256(blob).hexdigest() == sha256 else None


def _line(row: dict) -> bytes:
    """One row as one JSON line, exactly as given (no normalisation: a resumed run reads back the same text)."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"


# --- running stages ---------------------------------------------------------------------------------------


@dataclass
class Backend:
    """Where a run's shards go: `local` (in-process for 1 worker, else spawned processes) or `ray`."""

    kind: str = "local"
    workers: int = 1
    threads: int | None = None  # per worker; default: cores // workers (at least 1)
    address: str | None = None  # Ray cluster address (else a local Ray is started)

    def per_worker_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


class Run:
    """An open run: a started worker pool and a run directory bound to the run id. Use as a context manager."""

    def __init__(
        self,
        command: str,
        config: dict,
        items: Sequence[TwoHopItem],
        run_dir: str | Path,
        load: Load,
        backend: Backend = Backend(),
        model=None,
        resume: bool = False,
    ):
        check_threads(backend.kind, backend.workers, backend.per_worker_threads(), backend.address)
        self.command, self.config, self.backend = command, config, backend
        self.records = [it.to_dict() for it in items]
        self.load = Load(load.model, load.dtype, backend.per_worker_threads(), load.kwargs, _fault_from_env())
        self.model, self.run_dir_path, self.resume = model, Path(run_dir), resume
        self.quarantined: list[str] = []
        self.stats = {
            "shards_run": 0,
            "shards_reused": 0,
            "workers_died": 0,
            "seconds_in_shards": 0.0,
            "worker_cpu_s": 0.0,
            "worker_peak_rss_mib": 0.0,
        }

    def __enter__(self) -> Run:
        started = time.perf_counter()
        self.pool = open_pool(self.backend.kind, self.load, self.backend.workers, self.model, self.backend.address)
        try:
            for _ in range(self.backend.workers):
                self.pool.start()
            self.idle = [self._first_ready()]  # its model's identity fixes the run id
            self.dir = RunDir(self.run_dir_path, self.job(), self.resume)
        except BaseException:
            self.pool.close()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        self.pool.close()

    def _first_ready(self):
        worker, status, payload = self.pool.next_event(timeout=None)
        if status == "ready":
            self.identity = payload
            return worker
        if status == "error":
            raise PatchlabError(str(payload))
        raise PatchlabError(
            f"a worker died while loading {self.load.model} (exit {payload}); from a script, call "
            "patchlab under `if __name__ == '__main__':` (local workers are spawned processes that "
            "import your script)"
        )

    def job(self) -> dict:
        """job.json: the run id and everything it hashes."""
        body = {
            "command": self.command,
            "config": self.config,
            "model": _bare(self.identity),
            "versions": versions(),
            "prompt_set_sha256": digest(sorted(item_key(d) for d in self.records)),
        }
        return {"run_id": digest(body)[:16], **body, "items": len(self.records)}

    def _check_identity(self, ident: dict) -> None:
        if _bare(ident) != _bare(self.identity):
            raise PatchlabError(
                f"a worker loaded other weights ({ident['weights_sha256'][:12]}) than the run's "
                f"({self.identity['weights_sha256'][:12]}): every worker must see the same model files"
            )

    def stage(self, task: str, config: dict, items: Sequence[dict], pool: Sequence[dict] = ()) -> dict[str, dict]:
        """Run (or reuse) every shard of a stage; the rows by item id, in the stage's key order."""
        stage = Stage(task, config, list(items), list(pool), self.config.get("shard_size", DEFAULT_SHARD))
        folder = self.dir.stage_dir(stage)
        shards = stage.shards()
        keys = [[stage.keys[d["id"]] for d in s] for s in shards]
        done = {i: self.dir.verified(folder, i, keys[i]) for i in range(len(shards))}
        todo = [Task(i, task, config, s, list(pool)) for i, s in enumerate(shards) if done[i] is None]
        self.stats["shards_reused"] += len(shards) - len(todo)
        started = time.perf_counter()
        finished = schedule(self.pool, self.idle, todo, self._check_identity, self.stats)
        for index, rows, quarantined in track(finished, f"{task} shards" if todo else None, total=len(todo)):
            lines = [{"key": stage.keys[r["id"]], "row": r} for r in rows]
            self.dir.write_shard(folder, index, keys[index], lines, quarantined, time.perf_counter() - started)
            done[index] = {"rows": lines, "quarantined": quarantined}
            self.stats["shards_run"] += 1
        self.stats["seconds_in_shards"] += time.perf_counter() - started
        rows: dict[str, dict] = {}
        for i in range(len(shards)):
            for line in done[i]["rows"]:
                if line["row"]["id"] in rows:
                    raise PatchlabError(f"item {line['row']['id']!r} has two rows", where=str(folder))
                rows[line["row"]["id"]] = line["row"]
            self.quarantined += [q for q in done[i]["quarantined"] if q not in self.quarantined]
        return rows

    def meta(self) -> dict:
        """What a result records about its run: id, directory, backend, shards, quarantined items, timings."""
        return {
            "run_id": self.dir.run_id,
            "run_dir": str(self.dir.path),
            "backend": self.backend.kind,
            "workers": self.backend.workers,
            "threads_per_worker": self.load.threads,
            "shard_size": self.config.get("shard_size", DEFAULT_SHARD),
            "quarantined": list(self.quarantined),
            "startup_s": round(self.startup_s, 3),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in self.stats.items()},
        }


def _bare(ident: dict) -> dict:
    """A model identity without its provenance (threads differ between workers; weights must not)."""
    return {k: v for k, v in ident.items() if k != "meta"}


def _fault_from_env() -> dict:
    """Test-only fault injection for worker processes: PATCHLAB_FAULT_ITEM (and PATCHLAB_FAULT_ONCE)."""
    item = os.environ.get("PATCHLAB_FAULT_ITEM")
    return {"item": item, "once": os.environ.get("PATCHLAB_FAULT_ONCE")} if item else {}


# --- the sharded commands ---------------------------------------------------------------------------------


def _form(form: str) -> dict[str, str]:
    """The stage config's form entry: none for plain, so runs in the default form keep their run ids."""
    return {} if form == "plain" else {"form": form}


def evaluate(
    run: Run,
    items: Sequence[TwoHopItem],
    source: str = "<items>",
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    form: str = "plain",
):
    """The gap evaluation of `items`, sharded: the same rows and summaries as `patchlab.evaluate.evaluate_gap`."""
    from patchlab.core.forms import check_forms, window
    from patchlab.methods.gap import CRITERION, gap_from_rows

    max_new_tokens = max_new_tokens or window(items, form)
    config = {
        "source": source,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        **_form(check_forms(items, form)),
    }
    rows = run.stage("gap", config, [it.to_dict() for it in items])
    meta = {
        **run.identity["meta"],
        "max_new_tokens": max_new_tokens,
        "criterion": CRITERION,
        "form": form,
        "run": run.meta(),
    }
    return gap_from_rows([rows[it.id] for it in items if it.id in rows], run.identity["model"], source, meta)


def locate(
    run: Run,
    items: Sequence[TwoHopItem],
    pool: Sequence[TwoHopItem] = (),
    setup: str = "guide",
    method: str = "both",
    site: str = "z",
    positions: str = "last",
    top_k: int = 10,
    verify: int = 20,
    form: str = "plain",
    screen: str = "atp",
    audit: int = 20,
):
    """Activation patching of `items`, sharded: screen (attribution) and/or verify (exact) stages, then the
    same aggregation (and audit of the screen) as `patchlab.locate.locate_pairs`."""
    from patchlab.core.forms import check_forms
    from patchlab.methods.locate import (
        METRIC,
        aggregate,
        attribution_mean,
        audit_bound,
        audit_sample,
        check_options,
        check_pairs,
        merged_heads,
        screened_heads,
        site_units,
    )

    check_options(method, site, top_k, screen)
    if setup not in ("guide", "template"):
        raise PatchlabError(f"setup must be 'guide' or 'template', got '{setup}'", param="setup")
    started = time.perf_counter()
    base = {"setup": setup, "site": site, "positions": positions, **_form(check_forms([*items, *pool], form))}
    if screen != "atp":  # the default stays out of the config: earlier runs keep their ids
        base["screen"] = screen
    records = [it.to_dict() for it in items]
    partners = [it.to_dict() for it in pool] if setup == "template" else []
    ids = [it.id for it in items]
    screen = run.stage("screen", base, records, partners) if method != "exact" else {}
    screen_rows = [screen[i] for i in ids if i in screen]
    att_mean = attribution_mean(screen_rows)
    rows = screen_rows
    audited: dict = {}
    if method != "attribution":
        heads = (
            screened_heads(att_mean, max(verify, top_k), run.identity["n_heads"], site) if method == "both" else None
        )
        if heads:
            audited = audit_sample(att_mean, heads, audit, run.identity["n_heads"], site)
            heads = merged_heads(heads, audited)
        config = {**base, "heads": sorted(heads.items()) if heads is not None else None}
        verified = run.stage("verify", config, records, partners)
        rows = [verified[i] for i in ids if i in verified]
    if not rows:
        check_pairs([], positions)
    meta = {**run.identity["meta"], "metric": METRIC, "form": form, "run": run.meta()}
    result = aggregate(
        rows,
        run.identity["model"],
        run.identity["n_layers"],
        site_units(site, run.identity["n_heads"]),
        setup,
        method,
        site,
        positions,
        top_k,
        att_mean,
        time.perf_counter() - started,
        meta,
    )
    if audited:
        result.audit = audit_bound(result, audited)
    return result


def evaluate_edit(
    run: Run,
    edit_path: str | Path,
    items: Sequence[TwoHopItem],
    pool: Sequence[TwoHopItem],
    gap,
    n_irrelevant: int = 30,
    exclude: set[str] = frozenset(),
):
    """A saved edit's before/after report on `items`, sharded by item (each shard measures its own unedited
    queries, so its numbers do not depend on which shards a worker ran before)."""
    from patchlab.methods.edit import Edit
    from patchlab.methods.editeval import METRIC, report_from_rows

    edit_path = Path(edit_path).resolve()
    edit = Edit.load(edit_path)
    if edit.weights_sha256 != run.identity["weights_sha256"]:
        raise PatchlabError(
            f"edit was made for '{edit.model}' weights {edit.weights_sha256[:12]}…, not these", where=str(edit_path)
        )
    config = {
        "edit": str(edit_path),
        "edit_sha256": hashlib.sha256(edit_path.read_bytes()).hexdigest(),
        "right_composed": sorted(r["id"] for r in gap.items if r["composed"]),
        "right_hop2": sorted(r["id"] for r in gap.items if r["hop2"]),
        "n_irrelevant": n_irrelevant,
        "exclude": sorted(exclude),
    }
    rows = run.stage("edit-eval", config, [it.to_dict() for it in items], [it.to_dict() for it in pool])
    meta = {
        **run.identity["meta"],
        "seed": 0,
        "n_irrelevant": n_irrelevant,
        "method": edit.method,
        "metric": METRIC,
        "run": run.meta(),
    }
    return report_from_rows([rows[it.id] for it in items if it.id in rows], run.identity["model"], edit, 0.0, meta)


def compute_edits(
    run: Run,
    items: Sequence[TwoHopItem],
    heads,
    cfg=None,
    unrelated: Sequence[str] = (),
    preserved=(),
    form: str = "plain",
):
    """One edit per item, computed in shards: the same `ComputedEdit`s (items, edit, seconds), in `items`' order,
    as `patchlab.methods.edit.edit_each(..., batch=False)` — bit-identical deltas when the workers use as many
    torch threads as the serial run. `preserved`: prompts, or a function of an edit's items giving them (as
    `edit_each`; evaluated here, per item, and stored with its record). A quarantined item has no edit."""
    from patchlab.methods.edit import ComputedEdit, EditConfig, edit_from_row, shard_config

    cfg = cfg or EditConfig()
    if not items:
        raise PatchlabError("no items to edit")
    each = callable(preserved)
    records = [
        {"id": it.id, "item": it.to_dict(), **({"preserved": list(preserved([it]))} if each else {})} for it in items
    ]
    config = shard_config(heads, cfg, unrelated, None if each else preserved, form)
    rows = run.stage("edit", config, records)
    return [ComputedEdit([it], edit_from_row(rows[it.id]), rows[it.id]["seconds"]) for it in items if it.id in rows]


class ShardedCapture:
    """Emergence's hidden states of the run's model captured by the run's workers, in resumable shards
    (pass as `capture=` to `patchlab.studies.emergence` functions)."""

    def __init__(self, run: Run):
        self.run = run
        self.weights_sha256 = run.identity["weights_sha256"]

    def __call__(self, tokens, bos: list[int], streams: list[str], batch_size: int = 32):
        return hidden_states(self.run, tokens, bos, streams, batch_size)


def hidden_states(run: Run, tokens, bos: list[int], streams: list[str], batch_size: int = 32):
    """Emergence's hidden states of equal-length token rows, captured in shards: the sequences, then each
    distinct token alone (the same `HiddenStates` that `patchlab.emergence.hidden_states` captures in-process)."""
    import torch

    from patchlab.studies.emergence import STATES_FORMAT, HiddenStates, tokens_hash

    config = {"batch_size": batch_size, "bos": bos}
    seqs = [{"id": f"s{i:07d}", "tokens": row} for i, row in enumerate(tokens.tolist())]
    vocab = torch.unique(tokens)
    singles = [{"id": f"t{t}", "tokens": [t]} for t in vocab.tolist()]
    macro, micro = run.stage("capture", config, seqs), run.stage("capture", config, singles)
    meta = {
        "format": STATES_FORMAT,
        "model": run.identity["model"],
        "weights_sha256": run.identity["weights_sha256"],
        "tokens_sha256": tokens_hash(tokens, bos),
        "bos": bos,
        "streams": streams,
        "run": run.meta(),
    }
    return HiddenStates(
        tokens.clone(),
        torch.stack([macro[d["id"]]["states"] for d in seqs]),
        vocab,
        torch.stack([micro[d["id"]]["states"] for d in singles]),
        meta,
    )
