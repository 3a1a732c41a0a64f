"""Re-tuning: settings checks, batching, checkpoints (kill + resume is bit-identical), real-model training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from patchlab.cli import main
from patchlab.core.errors import PatchlabError
from patchlab.methods.edit import Edit, head_columns, o_proj
from patchlab.runtime.bridge import model_name
from patchlab.runtime.identity import base_hash, weights_hash
from patchlab.runtime.scoring import answer_logprob, answer_token_ids, encode
from patchlab.studies import retune as R
from patchlab.studies.carma import CarmaConfig

TINY_DATA = [
    ("the capital of france is", "paris"),
    ("the capital of germany is", "berlin"),
    ("the capital of spain is", "madrid"),
    ("the eiffel tower is located in", "france"),
    ("berlin is the capital of", "germany"),
]


@pytest.mark.parametrize(
    "kwargs, where",
    [
        ({"lr": -1e-5}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": 0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"clip": -1.0}, "clip"),
        ({"warmup": -1}, "warmup"),
        ({"params": "mlp"}, "params"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_config_errors_name_the_option(kwargs, where):
    with pytest.raises(PatchlabError) as exc:
        R.RetuneConfig(**kwargs)
    assert str(exc.value).startswith(f"{where}: ")


def test_warmup_is_linear_then_constant():
    cfg = R.RetuneConfig(lr=1e-3, warmup=3)
    assert [cfg.lr_at(s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert R.RetuneConfig(lr=1e-3).lr_at(0) == 1e-3


def test_batch_rows_cover_every_example_once_per_epoch():
    rows = [r for step in range(6) for r in R.batch_rows(9, 3, seed=4, step=step)]
    assert sorted(rows[:9]) == sorted(rows[9:]) == list(range(9))
    assert rows[:9] != rows[9:]  # a fresh permutation every epoch
    assert rows == [r for step in range(6) for r in R.batch_rows(9, 3, seed=4, step=step)]
    assert rows[:9] != [r for step in range(3) for r in R.batch_rows(9, 3, seed=5, step=step)]


def test_examples_accept_qas_items_and_pairs(shipped):
    from patchlab.studies.tasks import QA

    got = R.examples([QA("a", "p", ("x", "y")), shipped[0], ("q", "z")])
    assert got == [("p", "x"), (shipped[0].composed, shipped[0].answer), ("q", "z")]
    with pytest.raises(PatchlabError, match=r"data\[0\]"):
        R.examples([42])
    with pytest.raises(PatchlabError, match="no training data"):
        R.examples([])


def test_collate_targets_are_the_answer_tokens(tiny):
    enc = [R.encode_example(tiny, p, a) for p, a in TINY_DATA[:3]]
    tokens, mask, targets, words = R.collate(enc, 1)
    for b, e in enumerate(enc):
        n = len(e.ids)
        assert mask[b].sum() == n and tokens[b, :n].tolist() == list(e.ids)
        answer = [t for t in targets[b].tolist() if t != R.IGNORE]
        assert answer == list(e.ids[e.start :]) and targets[b, e.start - 1] == e.ids[e.start]


@pytest.mark.real
def test_word_ids_follow_the_real_tokenizer(smol):
    e = R.encode_example(smol, "The capital of the country where the Eiffel Tower is located is", "Paris")
    pieces = [smol.tokenizer.decode([t]) for t in e.ids]
    assert list(e.ids) == encode(
        smol, "The capital of the country where the Eiffel Tower is located is"
    ) + answer_token_ids(smol, "Paris")
    i = pieces.index(" E")
    assert pieces[i + 1] == "iffel" and e.words[i] == e.words[i + 1] >= 0  # one word, two tokens
    assert sum(w >= 0 for w in e.words) == 2  # every other word is a single token here


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in R.trainable(model, "all").items()}


def test_resume_in_process_is_bit_identical_and_refuses_another_run(tiny_dir, tmp_path):
    from patchlab.runtime.models import load_model

    kw = dict(
        carma=CarmaConfig(n_negatives=2),
        lr=1e-2,
        batch_size=3,
        warmup=2,
        weight_decay=0.01,
        checkpoint_every=2,
        progress=False,
    )
    full = load_model(str(tiny_dir))
    R.retune(full, TINY_DATA, steps=6, checkpoint_dir=tmp_path / "a", **kw)
    part = load_model(str(tiny_dir))
    R.retune(part, TINY_DATA, steps=4, checkpoint_dir=tmp_path / "b", **kw)
    part = load_model(str(tiny_dir))
    res = R.retune(part, TINY_DATA, steps=6, checkpoint_dir=tmp_path / "b", **kw)
    assert res.resumed_from == 4 and [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6]
    a, b = _trained(full), _trained(part)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["lm_head.weight"], _trained(load_model(str(tiny_dir)))["lm_head.weight"])
    assert [p.name for p in R.checkpoints(tmp_path / "b")] == ["step-000004", "step-000006"]  # keep = 2
    fresh = load_model(str(tiny_dir))
    with pytest.raises(PatchlabError, match="at step 6, beyond the 5 steps"):
        R.retune(fresh, TINY_DATA, steps=5, checkpoint_dir=tmp_path / "b", **kw)
    with pytest.raises(PatchlabError, match="another run"):
        R.retune(fresh, TINY_DATA, steps=8, checkpoint_dir=tmp_path / "b", **{**kw, "lr": 2e-2})
    # the final checkpoint holds the trained weights, for a fresh copy of the start weights
    R.load_trainable(fresh, tmp_path / "b" / "step-000006")
    assert all(torch.equal(a[n], p) for n, p in _trained(fresh).items())
    with pytest.raises(PatchlabError, match="other weights"):
        R.load_trainable(fresh, tmp_path / "b" / "step-000006")


def test_the_regulariser_alone_trains_through_the_hooks(tiny):
    with R.restoring(tiny):
        before = _trained(tiny)
        res = R.retune(
            tiny, TINY_DATA, carma=CarmaConfig(lam=1.0, eta=1.0), steps=2, lr=1e-2, batch_size=5, progress=False
        )
        assert res.history[0]["total"] == pytest.approx(res.history[0]["stab"])  # lam = 1: L_stab only (no words)
        after = _trained(tiny)
        assert all(res.history[i]["grad_norm"] > 0 for i in range(2))
        # L_stab reads the residual stream: the blocks move, the unembedding (after the last hook) cannot
        assert not torch.equal(
            before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
        )
        assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert all(torch.equal(p, before[n]) for n, p in _trained(tiny).items())


def test_tampered_checkpoint_is_refused(tiny_dir, tmp_path):
    from patchlab.runtime.models import load_model

    R.retune(load_model(str(tiny_dir)), TINY_DATA, steps=1, batch_size=2, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "step-000001" / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PatchlabError, match="sha256") as exc:
        R.load_checkpoint(tmp_path / "step-000001")
    assert "step-000001" in str(exc.value)
    with pytest.raises(PatchlabError, match="not a readable checkpoint"):
        R.load_checkpoint(tmp_path / "missing")


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tiny_dir, tmp_path):
    from patchlab.runtime.models import load_model

    model = load_model(str(tiny_dir))
    lm_head = R.trainable(model, "all")["lm_head.weight"]

    def poison(step, record):
        if step == 2:
            with torch.no_grad():
                lm_head[0, 0] = float("nan")

    with pytest.raises(PatchlabError) as exc:
        R.retune(
            model,
            TINY_DATA,
            steps=5,
            batch_size=2,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            progress=False,
            on_step=poison,
        )
    msg = str(exc.value)
    assert msg.startswith("retune: non-finite loss at step 3") and "step-000002" in msg
    ck = R.load_checkpoint(tmp_path / "step-000002")
    assert ck.step == 2 and all(torch.isfinite(t).all() for t in ck.weights.values())


CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from patchlab.studies.carma import CarmaConfig
from patchlab.runtime.models import load_model
from patchlab.studies.retune import retune, trainable
data = {data!r}
model = load_model(sys.argv[1])
delay = float(sys.argv[4])
retune(model, data, carma=CarmaConfig(n_negatives=2), steps=12, lr=1e-2, batch_size=3, warmup=3, weight_decay=0.01,
       checkpoint_dir=sys.argv[2], checkpoint_every=2, progress=False, on_step=lambda s, r: time.sleep(delay))
save_file({{n: p.detach().contiguous() for n, p in trainable(model, "all").items()}}, sys.argv[3])
"""


def test_sigkill_mid_run_then_resume_gives_bit_identical_weights(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(data=TINY_DATA))
    env = {**os.environ, "PATCHLAB_QUIET": "1"}

    def child(ck: str, out: str, delay: float) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(tiny_dir), str(tmp_path / ck), str(tmp_path / out), str(delay)],
            env=env,
            stderr=subprocess.PIPE,
        )

    killed, straight = child("ck-killed", "killed.safetensors", 0.4), child("ck-straight", "straight.safetensors", 0.0)
    deadline = time.monotonic() + 240
    while not any(int(p.name[5:]) >= 4 for p in R.checkpoints(tmp_path / "ck-killed")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert straight.wait(timeout=240) == 0, straight.stderr.read().decode()[-2000:]
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "killed.safetensors").exists()
    last = R.checkpoints(tmp_path / "ck-killed")[-1]
    assert 4 <= int(last.name[5:]) < 12  # killed mid-run, after a checkpoint
    resumed = child("ck-killed", "killed.safetensors", 0.0)
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read().decode()[-2000:]
    a, b = load_file(str(tmp_path / "straight.safetensors")), load_file(str(tmp_path / "killed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = R.load_checkpoint(tmp_path / "ck-killed" / "step-000012")
    assert [h["step"] for h in final.state["history"]] == list(range(1, 13))
    straight_final = R.load_checkpoint(tmp_path / "ck-straight" / "step-000012")
    assert all(torch.equal(final.optimizer[k], straight_final.optimizer[k]) for k in final.optimizer)


# --- the real model ------------------------------------------------------------------------------------

IDM = [
    ("A large grey animal with a trunk is called an", "elephant"),
    ("A young dog is called a", "puppy"),
    ("A tool with a heavy head used to drive in nails is called a", "hammer"),
    ("A building where books are kept for people to borrow is called a", "library"),
    ("An insect with large colourful wings is called a", "butterfly"),
    ("A person who looks after people's teeth is called a", "dentist"),
]


@pytest.mark.real
def test_a_few_carma_steps_lower_the_task_loss_and_restore_bit_exactly(smol):
    prompts, answers = [p for p, _ in IDM], [a for _, a in IDM]
    start = weights_hash(smol)
    with R.restoring(smol):
        before = -answer_logprob(smol, prompts, answers).mean().item()
        res = R.retune(smol, IDM, carma=CarmaConfig(), params="attn", steps=3, lr=6e-5, batch_size=6, progress=False)
        after = -answer_logprob(smol, prompts, answers).mean().item()
        assert all(h["mi"] > 0 and h["stab"] > 0 for h in res.history)  # real multi-token words ("colourful")
        assert res.n_trainable == smol.cfg.n_layers * sum(p.numel() for p in R._attention(smol, 0).parameters())
    assert after < 0.7 * before, (before, after)
    assert weights_hash(smol) == start


@pytest.mark.real
def test_edit_heads_trains_only_those_columns_and_resumes_exactly(smol, tmp_path):
    torch.manual_seed(0)
    base = base_hash(smol)
    delta = torch.randn(smol.cfg.d_model, 2 * smol.cfg.d_head) * 1e-3

    def edit() -> Edit:
        return Edit(model_name(smol), base, {20: [3, 5]}, {20: delta.clone()}, [])

    kw = dict(
        carma=CarmaConfig(),
        params="edit-heads",
        lr=1e-3,
        batch_size=3,
        weight_decay=0.1,
        checkpoint_every=2,
        progress=False,
    )
    w = o_proj(smol, 20).weight
    with R.restoring(smol):
        e = edit()
        e.apply(smol)
        edited = w.detach().clone()
        everything = {n: p.detach().clone() for n, p in R.trainable(smol, "all").items()}
        R.retune(smol, IDM, edit=e, steps=4, checkpoint_dir=tmp_path, **kw)
        cols = head_columns(smol, [3, 5])
        other = torch.ones(w.shape[1], dtype=torch.bool)
        other[cols] = False
        assert not torch.equal(w[:, cols], edited[:, cols])
        assert torch.equal(w[:, other], edited[:, other])  # weight decay never touched them
        changed = [n for n, p in R.trainable(smol, "all").items() if not torch.equal(p, everything[n])]
        assert changed == ["model.layers.20.self_attn.o_proj.weight"]
        final = w.detach().clone()
    assert base_hash(smol) == base and weights_hash(smol) == base
    (tmp_path / "step-000004" / "state.json").unlink()  # as if killed while writing step 4
    with R.restoring(smol):
        res = R.retune(smol, IDM, edit=edit(), steps=4, checkpoint_dir=tmp_path, **kw)
        assert res.resumed_from == 2
        assert torch.equal(w, final)  # CARMA's negative sampler state came back with the checkpoint
    assert weights_hash(smol) == base


# --- the command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, where",
    [
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lambda", "1.5"], "--lambda"),
        (["--lambda", "-0.1"], "--lambda"),
        (["--steps", "0"], "--steps"),
        (["--params", "mlp"], "--params"),
        (["--params", "edit-heads"], "--params"),
        (["--task", "qa"], "--task"),
        (["--eta", "inf"], "--eta"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(args, where, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["retune", *args, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {where}: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_cli_retune_around_an_edit(smol, shipped, tmp_path):
    item = shipped[0]
    e = Edit(
        model_name(smol),
        base_hash(smol),
        {23: [4]},
        {23: torch.randn(smol.cfg.d_model, smol.cfg.d_head) * 1e-3},
        [item.id],
    )
    e.save(tmp_path / "x.edit")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "retune",
                "--edit",
                str(tmp_path / "x.edit"),
                "--params",
                "edit-heads",
                "--steps",
                "2",
                "--eval-items",
                "6",
                "--batch-size",
                "4",
                "--checkpoint-every",
                "1",
                "--out",
                str(out),
            ]
        )
    assert exc.value.code in (0, None)
    res = json.loads((out / "result.json").read_text())
    assert res["type"] == "retune" and len(res["history"]) == 2 and res["carma"]["lam"] == 0.3
    ev = res["evaluation"]
    assert ev["before"]["n"] == ev["after"]["n"] == {"train": 6, "held-out": 6}
    assert set(ev["after"]["synonyms"]["held-out"]) == {"0.25", "0.40"}
    corr = res["edit"]["correction"]
    assert corr["composed"]["n"] == 1 and corr["paraphrase"]["n"] == len(item.paraphrases)
    assert (out / "figure.html").stat().st_size > 1000
    assert [p.name for p in R.checkpoints(out / "checkpoints")] == ["step-000001", "step-000002"]
    assert res["n_trainable"] == smol.cfg.d_model * smol.cfg.d_head
