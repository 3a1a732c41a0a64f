"""Soak: many apply / revert cycles of one edit, and many attach / forward / detach cycles of a routed module,
on the real SmolLM2: the weights stay bit-identical (sha256 of every parameter) and the process's memory
flat (VmRSS at the end and the peak VmHWM over the cycles, both within 5% of VmRSS after a warm-up).

The full soak is 1,000 cycles of each (PATCHLAB_SOAK=1; 13 min on 2 busy cores: an apply fingerprints
every parameter to prove that only the edited columns moved, a routed cycle runs a forward). Without it
each runs 50 cycles (the same checks, on a shorter run).
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch
from relhelp import diff, hook_inventory

from patchlab.methods import edit as E
from patchlab.runtime.identity import applied_edits, base_hash, weights_hash
from patchlab.studies import mechanisms as M

CYCLES = 1000 if os.environ.get("PATCHLAB_SOAK") == "1" else 50
WARMUP = 20
LAYER, HEADS = 20, [3, 4]

pytestmark = pytest.mark.real


def status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def soak(cycle, n: int) -> dict[str, float]:
    """Run `cycle` WARMUP times, then `n` times; memory after the warm-up, at the end and the peak between."""
    for _ in range(WARMUP):
        cycle()
    gc.collect()
    warm = status("VmRSS")
    peak_reset = reset_peak()
    start = time.perf_counter()
    for _ in range(n):
        cycle()
    seconds = time.perf_counter() - start
    gc.collect()
    end, peak = status("VmRSS"), status("VmHWM")
    stats = {"cycles": n, "seconds": seconds, "warm_mib": warm / 1024, "end_mib": end / 1024, "peak_mib": peak / 1024}
    print(f"soak: {stats} (peak {'since the warm-up' if peak_reset else 'of the whole process'})")
    assert end <= 1.05 * warm, stats
    if peak_reset:
        assert peak <= 1.05 * warm, stats
    return stats


@pytest.fixture
def soak_edit(smol, one_thread):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(smol.cfg.d_model, len(HEADS) * smol.cfg.d_head, generator=g) * 1e-2
    assert not applied_edits(smol)
    return E.Edit("smollm2-135m", base_hash(smol), {LAYER: HEADS}, {LAYER: delta}, ["soak"])


def test_edit_apply_revert_cycles_leave_weights_bit_identical_and_memory_flat(smol, soak_edit):
    before = weights_hash(smol)

    def cycle():
        soak_edit.apply(smol)
        soak_edit.revert(smol)

    soak(cycle, CYCLES)
    assert weights_hash(smol) == before and not applied_edits(smol)


def test_routed_module_cycles_leave_weights_bit_identical_and_memory_flat(smol, soak_edit):
    """Each cycle attaches the router, runs a forward in which the module's gate opens (its delta is added)
    and detaches it; the plain forward afterwards equals the one before."""
    s = len(HEADS) * smol.cfg.d_head
    key = torch.nn.functional.normalize(torch.randn(s, generator=torch.Generator().manual_seed(1)), dim=0)
    route = M.Route(HEADS, torch.zeros(s), torch.eye(s), key, lo=-1e9, hi=-1e9 + 1, tau=-1e9)  # always open
    router = M.Router([M.Module(soak_edit, {LAYER: route})])
    tokens = smol.to_tokens("The capital of France is")
    before = weights_hash(smol)
    with torch.inference_mode():
        plain = smol(tokens)
        hooks = hook_inventory(smol)
        with router.attached(smol):
            routed = smol(tokens)
    assert not torch.equal(plain, routed)  # the module does act

    def cycle():
        with torch.inference_mode(), router.attached(smol):
            smol(tokens)

    soak(cycle, CYCLES)
    assert router.opened[LAYER] == CYCLES + WARMUP + 1
    with torch.inference_mode():
        assert torch.equal(smol(tokens), plain)
    assert weights_hash(smol) == before
    assert diff(hooks, hook_inventory(smol)) == []
