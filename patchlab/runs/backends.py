"""Where shards run: in this process, in spawned local processes, or in Ray actors — one scheduling loop.

Every backend is a pool of workers, each holding one loaded model. The loop (`schedule`) hands a free
worker the next shard; a worker that dies is replaced and its shard re-run (shards are idempotent); a
shard that kills workers twice is re-run item by item, and an item that kills workers twice is
quarantined. Workers only compute: the driver writes every file.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from patchlab.core.errors import PatchlabError
from patchlab.runs.registry import load_plugins
from patchlab.runtime.shards import run_shard

START_TIMEOUT_S = 600.0  # a queue with no worker running or starting for this long is an error


@dataclass(frozen=True)
class Load:
    """How a worker loads its model (passed to `patchlab.models.load_model`) and how many threads it uses."""

    model: str
    dtype: str = "float32"
    threads: int = 1
    kwargs: dict = field(default_factory=dict)  # device, device_map, max_memory ...
    fault: dict = field(default_factory=dict)  # test-only fault injection, see `_maybe_crash`


@dataclass
class Task:
    """One shard (or, after it killed two workers, one of its items) to run."""

    shard: int
    task: str
    config: dict
    items: list[dict]
    pool: list[dict]
    solo: bool = False

    @property
    def key(self) -> tuple:
        return (self.shard, self.items[0]["id"] if self.solo else None)


Event = tuple[Any, str, Any]  # (worker, "ready" | "ok" | "error" | "died", payload)


# --- what a worker does -------------------------------------------------------------------------------


def load_worker_model(load: Load):
    """Load the model of a worker process with its thread count set explicitly."""
    import torch

    from patchlab.runtime.models import load_model, parse_dtype

    torch.set_num_threads(load.threads)
    os.environ["PATCHLAB_QUIET"] = "1"
    return load_model(load.model, dtype=parse_dtype(load.dtype), **load.kwargs)


def _maybe_crash(load: Load, task: Task) -> None:
    """Test hook: kill this worker process on a shard holding item `fault["item"]` (once, if `fault["once"]`
    names a marker file), so tests can exercise replacement and quarantine with real process deaths."""
    item = load.fault.get("item")
    if not item or item not in {d["id"] for d in task.items}:
        return
    once = load.fault.get("once")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    os._exit(70)


def run_in_worker(model, load: Load, task: Task) -> dict:
    """A shard's rows, with the CPU seconds they took and the worker's peak resident memory so far."""
    _maybe_crash(load, task)
    load_plugins()
    cpu = time.process_time()
    rows = run_shard(model, task.task, task.config, task.items, task.pool)
    return {"rows": rows, "cpu_s": time.process_time() - cpu, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM of its own memory map. Not `ru_maxrss`, which Linux
    carries over `exec`, so a worker forked from a big driver would report the driver's size."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _local_main(conn, load: Load) -> None:
    """Body of a spawned local worker: load once, then answer tasks until told to stop."""
    from patchlab.runtime.identity import identity

    try:
        model = load_worker_model(load)
        conn.send(("ready", identity(model)))
    except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
        conn.send(("error", _one_line(exc)))
        return
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            conn.send(("ok", run_in_worker(model, load, task)))
        except Exception as exc:  # noqa: BLE001
            conn.send(("error", _one_line(exc)))


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, PatchlabError) else f"{type(exc).__name__}: {text}"


# --- pools --------------------------------------------------------------------------------------------


class SerialPool:
    """One worker: this process and its already-loaded model."""

    name = "serial"

    def __init__(self, model, load: Load):
        # no fault injection here: a crash would kill the driver itself
        self.model, self.load, self.events, self.starting = (
            model,
            Load(load.model, load.dtype, load.threads, load.kwargs),
            deque(),
            0,
        )

    def start(self) -> None:
        from patchlab.runtime.identity import identity

        self.events.append((0, "ready", identity(self.model)))

    def submit(self, worker, task: Task) -> None:
        self.events.append((worker, "ok", run_in_worker(self.model, self.load, task)))

    def next_event(self, timeout: float | None = None) -> Event | None:
        return self.events.popleft() if self.events else None

    def close(self) -> None:
        pass


class LocalPool:
    """Spawned processes on this machine, one model each."""

    name = "local"

    def __init__(self, load: Load):
        import multiprocessing as mp

        self.ctx, self.load, self.workers, self.starting, self.ready = mp.get_context("spawn"), load, {}, 0, set()

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_local_main, args=(child, self.load), daemon=True)
        proc.start()
        child.close()
        self.workers[parent] = proc
        self.starting += 1

    def submit(self, worker, task: Task) -> None:
        worker.send(task)

    def next_event(self, timeout: float | None = None) -> Event | None:
        from multiprocessing.connection import wait

        ready = wait(list(self.workers), timeout=timeout)
        if not ready:
            return None
        conn = ready[0]
        try:
            status, payload = conn.recv()
        except (EOFError, OSError):
            proc = self.workers.pop(conn)
            proc.join(5)
            if conn not in self.ready:
                self.starting -= 1
            self.ready.discard(conn)
            return conn, "died", proc.exitcode
        if status == "ready":
            self.starting -= 1
            self.ready.add(conn)
        return conn, status, payload

    def close(self) -> None:
        for conn in self.workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.workers.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self.workers.clear()


class _RayWorker:
    """A Ray actor holding one model (wrapped with `ray.remote` at run time: Ray stays optional)."""

    def __init__(self, load: Load):
        self.load, self.model = load, load_worker_model(load)

    def ready(self) -> dict:
        from patchlab.runtime.identity import identity

        return identity(self.model)

    def run(self, task: Task) -> list[dict]:
        return run_in_worker(self.model, self.load, task)


def import_ray():
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PatchlabError("Ray is not installed: pip install 'patchlab[ray]'", param="backend", where="ray") from None
    return ray


class RayPool:
    """Ray Core actors, one model each (`num_cpus` = the worker's threads); joins `address` or starts Ray here."""

    name = "ray"

    def __init__(self, load: Load, address: str | None, workers: int):
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            opts: dict[str, Any] = {"address": address} if address else {"num_cpus": workers * load.threads}
            ray.init(**opts, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.actor_cls = ray.remote(_RayWorker)
        self.load, self.pending, self.starting, self.actors = load, {}, 0, []

    def start(self) -> None:
        actor = self.actor_cls.options(num_cpus=self.load.threads, max_restarts=0).remote(self.load)
        self.actors.append(actor)
        self.pending[actor.ready.remote()] = ("ready", actor)
        self.starting += 1

    def submit(self, worker, task: Task) -> None:
        self.pending[worker.run.remote(task)] = ("ok", worker)

    def next_event(self, timeout: float | None = None) -> Event | None:
        from ray.exceptions import RayActorError, RayTaskError

        done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if not done:
            return None
        kind, actor = self.pending.pop(done[0])
        self.starting -= kind == "ready"
        try:
            return actor, kind, self.ray.get(done[0])
        except RayActorError:
            return actor, "died", None
        except RayTaskError as exc:
            return actor, "error", _one_line(getattr(exc, "cause", None) or exc)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors.clear()


# --- the one scheduling loop ----------------------------------------------------------------------------


def schedule(
    pool, idle: list, tasks: list[Task], identity: Callable[[dict], None], stats: dict | None = None
) -> Iterator[tuple[int, list[dict], list[str]]]:
    """Run `tasks` on the pool's workers (`idle`: those free now; kept up to date across calls); yield
    (shard, rows, quarantined item ids) as each shard finishes. `identity` checks each new worker's model;
    `stats["workers_died"]` counts the deaths."""
    stats = stats if stats is not None else {}
    queue, running, deaths = deque(tasks), {}, Counter()
    split: dict[int, dict] = {}  # shard -> its items' results while it runs item by item
    restarts = max(4, 2 * len(tasks))  # a worker that cannot even start is not replaced forever
    while queue or running:
        while queue and idle:
            worker, task = idle.pop(), queue.popleft()
            running[worker] = task
            pool.submit(worker, task)
        if not running and not pool.starting:
            raise PatchlabError("every worker died and none could be started again")
        event = pool.next_event(timeout=START_TIMEOUT_S)
        if event is None:
            raise PatchlabError(f"no worker finished or started in {START_TIMEOUT_S:.0f} s")
        worker, status, payload = event
        if status == "ready":
            identity(payload)
            idle.append(worker)
        elif status == "error":
            raise PatchlabError(str(payload))
        elif status == "ok":
            idle.append(worker)
            stats["worker_cpu_s"] = stats.get("worker_cpu_s", 0.0) + payload["cpu_s"]
            stats["worker_peak_rss_mib"] = max(stats.get("worker_peak_rss_mib", 0.0), payload["peak_rss_mib"])
            yield from _finished(running.pop(worker), payload["rows"], split)
        elif status == "died":
            stats["workers_died"] = stats.get("workers_died", 0) + 1
            task = running.pop(worker, None)
            if worker in idle:
                idle.remove(worker)
            if restarts > 0:
                restarts -= 1
                pool.start()  # a replacement; it joins when ready
            if task is None:
                continue
            deaths[task.key] += 1
            if deaths[task.key] < 2:
                queue.appendleft(task)
            elif not task.solo:  # this shard killed two workers: find the item(s) that do
                split[task.shard] = {"results": {}, "order": [it["id"] for it in task.items]}
                queue.extendleft(
                    Task(task.shard, task.task, task.config, [it], task.pool, solo=True) for it in reversed(task.items)
                )
            else:
                yield from _finished(task, None, split)


def _finished(
    task: Task, rows: list[dict] | None, split: dict[int, dict]
) -> Iterator[tuple[int, list[dict], list[str]]]:
    """A whole shard at once, or — for a split shard — once its last item is in (None: quarantined)."""
    if not task.solo:
        yield task.shard, rows, []
        return
    state = split[task.shard]
    state["results"][task.items[0]["id"]] = rows
    if len(state["results"]) == len(state["order"]):
        results, order = state["results"], state["order"]  # rows in the shard's order, not completion order
        del split[task.shard]
        yield (
            task.shard,
            [row for i in order if results[i] is not None for row in results[i]],
            [i for i in order if results[i] is None],
        )


def open_pool(backend: str, load: Load, workers: int, model=None, address: str | None = None):
    """The pool for `backend`: serial (this process, `model` or a fresh load), local processes, or Ray."""
    if backend == "ray":
        return RayPool(load, address, workers)
    if backend != "local":
        raise PatchlabError(f"unknown backend '{backend}' (use local or ray)", param="backend")
    if workers == 1:
        return SerialPool(model if model is not None else load_worker_model(load), load)
    return LocalPool(load)


def check_threads(backend: str, workers: int, threads: int, address: str | None) -> None:
    """Refuse a non-positive worker or thread count, and more local threads than this machine has cores."""
    if workers < 1:
        raise PatchlabError(f"must be >= 1, got {workers}", param="workers")
    if threads < 1:
        raise PatchlabError(f"must be >= 1, got {threads}", param="threads")
    cores = os.cpu_count() or 1
    if (backend == "local" or address is None) and workers * threads > cores:
        raise PatchlabError(
            f"{workers} workers x {threads} threads = {workers * threads} > {cores} cores on this "
            "machine: lower `workers` or `threads`",
            param="workers",
        )
