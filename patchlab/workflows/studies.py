"""The other studies as the commands run them: re-tuning around an edit, stacked mechanisms, information
emergence, compositionality across models. Each decides what is computed and returns typed results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import PromptSet
from patchlab.core.spec import parse_layers
from patchlab.workflows.setup import ModelSpec, Notify, Scale, file_sha256, gap_for, silent, workload


def edit_queries(edit_file: Path, ps: PromptSet):
    """An edit file and the composed queries and paraphrases of the items it was made for."""
    from patchlab.methods.edit import Edit
    from patchlab.methods.editeval import Query

    e = Edit.load(edit_file)
    missing = [i for i in e.item_ids if i not in {it.id for it in ps}]
    if missing:
        raise PatchlabError(
            f"edit item '{missing[0]}' is not in the prompt set {ps.source}", param="edit_file", where=str(edit_file)
        )
    items = list(ps.filter(ids=e.item_ids))
    return e, {
        "composed": [Query(it.composed, it.answers) for it in items],
        "paraphrase": [Query(p, it.answers) for it in items for p in it.paraphrases],
    }


def correction(model, queries) -> dict:
    """The share of each query set answered right."""
    from patchlab.methods.editeval import measure

    return {
        name: float(sum(r["correct"] for r in rows) / len(rows)) if rows else None
        for name, rows in ((n, measure(model, q)) for n, q in queries.items())
    }


def retune(
    spec: ModelSpec,
    task: str = "idm",
    edit_file: Path | None = None,
    carma: bool = True,
    lam: float = 0.3,
    gamma: float = 0.3,
    eta: float = 0.2,
    params: str = "all",
    steps: int = 30,
    lr: float = 6e-5,
    warmup: int = 0,
    clip: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    checkpoint_every: int = 10,
    resume: bool = False,
    eval_items: int = 150,
    prompt_set: str | None = None,
    out: Path = Path("."),
    notify: Notify = silent,
):
    """Fine-tune on a task (plain or CARMA), around an edit if given; evaluate before and after, and how much
    of the edit's correction survives."""
    from patchlab.studies import tasks as T
    from patchlab.studies.carma import CarmaConfig
    from patchlab.studies.retune import RetuneConfig
    from patchlab.studies.retune import retune as run_retune

    for name, value in (("lam", lam), ("gamma", gamma), ("eta", eta)):
        if not math.isfinite(value) or value < 0 or (name == "lam" and value > 1):
            raise PatchlabError(
                f"must be a finite number in {'[0, 1]' if name == 'lam' else '[0, inf)'}, got {value}", param=name
            )
    if eval_items < 1:
        raise PatchlabError(f"must be >= 1, got {eval_items}", param="eval_items")
    if task not in T.TASKS:
        raise PatchlabError(f"unknown task '{task}' (use {' | '.join(T.TASKS)})", param="task")
    if params == "edit-heads" and edit_file is None:
        raise PatchlabError("params 'edit-heads' needs `edit_file`", param="params")
    RetuneConfig(params, steps, lr, warmup, clip, batch_size, seed, 0.0, checkpoint_every)  # fail before loading
    cfg = CarmaConfig(lam=lam, gamma=gamma, eta=eta, seed=seed) if carma else None
    work = T.load(task, seed=seed, prompt_set=PromptSet.resolve(prompt_set) if task == "twohop" else None)
    e, queries = edit_queries(edit_file, PromptSet.resolve(prompt_set)) if edit_file is not None else (None, {})
    m = spec.load(workload("train", batch=batch_size, seq_len=64, trainable=params), notify)
    base = correction(m, queries) if e is not None else {}
    if e is not None:
        e.apply(m)
    before_edit = correction(m, queries) if e is not None else {}
    notify("evaluating before re-tuning ...")
    before = T.evaluate_task(m, work, seed=seed, limit=eval_items)
    result = run_retune(
        m,
        work.train,
        carma=cfg,
        params=params,
        edit=e,
        steps=steps,
        lr=lr,
        warmup=warmup,
        clip=clip,
        batch_size=batch_size,
        seed=seed,
        checkpoint_dir=Path(out) / "checkpoints",
        checkpoint_every=checkpoint_every,
        resume=resume,
        task=task,
    )
    notify("evaluating after re-tuning ...")
    after = T.evaluate_task(m, work, seed=seed, limit=eval_items)
    result.evaluation = {"before": before, "after": after, "eval_items": eval_items}
    if e is not None:
        after_edit = correction(m, queries)
        result.edit["correction"] = {
            n: {"n": len(queries[n]), "base": base[n], "before": before_edit[n], "after": after_edit[n]}
            for n in queries
            if queries[n]
        }
    return result


def mechanisms(
    spec: ModelSpec,
    ps: PromptSet,
    edits: str | None = None,
    more: Sequence[str] = (),
    gap: Path | None = None,
    stages: str = "1,10,50,all",
    gate: str = "hard",
    orthogonal: bool = True,
    key_heads: str = "layer",
    n_test: int = 60,
    notify: Notify = silent,
):
    """Stack saved edits stage by stage, summed into W_O vs routed modules."""
    from patchlab.studies import mechanisms as M

    if n_test < 1:
        raise PatchlabError(f"must be >= 1, got {n_test}", param="n_test")
    if gate not in M.GATES:
        raise PatchlabError(f"must be one of {', '.join(M.GATES)}, got '{gate}'", param="gate")
    cfg = M.RouteConfig(key_heads=key_heads, orthogonal=orthogonal)
    stack = [M.load_any(p) for p in M.stack_paths(edits, list(more))]
    M.parse_stages(stages, len(stack))
    m = spec.load(workload("forward", ps, with_gap=gap is None), notify)
    return M.run_stack(m, stack, list(ps), gap_for(m, ps, gap), stages, gate, cfg, n_test)


def emergence(
    spec: ModelSpec,
    out: Path,
    experiment: str | None = None,
    texts: Path | None = None,
    prompt_set: str | None = None,
    layers: str = "all",
    length: int | None = None,
    estimator: str = "gaussian",
    dim: int = 8,
    ridge: float = 0.1,
    n_boot: int = 10,
    seeds: str = "0",
    random_init: bool = True,
    demos: str = "0-6",
    n: int = 150,
    failed: str = "wrong",
    min_group: int = 10,
    gap: Path | None = None,
    cache_dir: Path | None = None,
    scale: Scale = Scale(),
    notify: Notify = silent,
):
    """Information emergence: natural vs shuffled text, in-context demonstrations, or two-hop right vs wrong;
    hidden states captured by a sharded run's workers when `scale` asks for one."""
    from patchlab.studies import emergence as E

    experiment = experiment or ("twohop" if prompt_set else "natural")
    if experiment not in E.EXPERIMENTS:
        raise PatchlabError(f"unknown experiment '{experiment}' (use {', '.join(E.EXPERIMENTS)})", param="experiment")
    if texts is not None and experiment != "natural":
        raise PatchlabError(f"`texts` is for experiment natural, not {experiment}", param="texts")
    if prompt_set is not None and experiment != "twohop":
        raise PatchlabError(f"`prompt_set` is for experiment twohop, not {experiment}", param="prompt_set")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise PatchlabError(f"must be comma-separated ints, got {seeds!r}", param="seeds") from None
    kw = dict(
        estimator=estimator,
        n_boot=n_boot if estimator == "gaussian" else 0,
        seeds=seed_list,
        dim=dim,
        cache_dir=cache_dir,
        **({"ridge": ridge} if estimator == "gaussian" else {}),
    )
    ps = PromptSet.resolve(prompt_set) if experiment == "twohop" else None
    work = workload("forward", ps, seq_len=length or 64)
    m = spec.load(work, notify)
    kw["layers"] = parse_layers(layers, m.cfg.n_layers, "layers")
    per_experiment = {
        "natural": lambda: dict(
            texts=E.read_texts(texts) if texts is not None else None, length=length, random_init=random_init
        ),
        "icl": lambda: dict(demos=parse_layers(demos, 10**6, "demos"), n=n),
        "twohop": lambda: dict(
            prompt_set=ps, gap=gap_for(m, ps, gap) if gap else None, failed=failed, min_group=min_group
        ),
    }
    if not scale.sharded:
        return E.run_experiment(m, experiment, **kw, **per_experiment[experiment]())
    from patchlab.runs.jobs import ShardedCapture

    config = {
        "experiment": experiment,
        "texts": file_sha256(texts) if texts else None,
        "length": length,
        "demos": demos,
        "n": n,
        "failed": failed,
    }
    with scale.open("emergence", config, list(ps or []), out, spec.worker_load(work, notify)) as run:
        return E.run_experiment(m, experiment, capture=ShardedCapture(run), **kw, **per_experiment[experiment]())


def compare(
    models: Sequence[str],
    tasks: Sequence[str],
    gap: bool = True,
    ps: PromptSet | None = None,
    shots: int = 2,
    batch_size: int = 8,
    spec: ModelSpec = ModelSpec(),
    notify: Notify = silent,
):
    """Compositionality probes and the two-hop gap, per model (each loaded, probed and freed in turn)."""
    from patchlab.runtime.models import parse_dtype
    from patchlab.studies.compose import compare as run_compare

    if not models:
        raise PatchlabError("give at least one model", param="models")
    work = workload("forward", ps, batch=batch_size, with_gap=gap)
    place = None
    for name in models:  # every model's placement checked and estimated before any is loaded
        place = ModelSpec(name, spec.device, spec.dtype, spec.device_map, spec.max_memory).placement(work, notify)
    return run_compare(
        list(models),
        list(tasks),
        gap=gap,
        prompt_set=ps,
        shots=shots,
        device=spec.device,
        dtype=parse_dtype(spec.dtype),
        batch_size=batch_size,
        placement=place.load_kwargs(),
    )
