"""Shardable tasks: what one shard of a sharded run computes, registered by the method that owns it.

A task is `fn(model, config, items, pool) -> rows`: `items` and `pool` are JSON-ready records (prompt-set
items, or token rows), each row a dict with the item's `id`. A method declares its task with
`@shard_task("gap")` beside the code it runs; `patchlab.runs` schedules shards and calls `TASKS[name]`
in whichever worker holds a model, so the runs layer needs no list of what can be sharded.
"""

from __future__ import annotations

from collections.abc import Callable

from patchlab.core.errors import PatchlabError

ShardFn = Callable[..., list[dict]]
TASKS: dict[str, ShardFn] = {}


def shard_task(name: str) -> Callable[[ShardFn], ShardFn]:
    """Register `fn` as the shard task `name` (one name, one function)."""

    def register(fn: ShardFn) -> ShardFn:
        if TASKS.get(name, fn) is not fn:
            raise PatchlabError(f"two shard tasks are named '{name}'")
        TASKS[name] = fn
        return fn

    return register


def run_shard(model, task: str, config: dict, items: list[dict], pool: list[dict]) -> list[dict]:
    """The rows of one shard of `task` (the task's module must have been imported: `patchlab.runs.registry`)."""
    if task not in TASKS:
        raise PatchlabError(f"unknown shard task '{task}' (known: {', '.join(sorted(TASKS)) or 'none'})")
    return TASKS[task](model, config, items, pool)
