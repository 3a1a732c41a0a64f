"""Mutual-information estimators against Gaussian pairs with known MI, plus determinism and input checks.

x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) eps per dimension: true MI = -(d/2) log2(1 - rho^2) bits.

Tolerances (n = 2000, fixed data seeds, so every check is deterministic):
* gaussian: |est - true| <= max(0.15 bits, 10%). Over 50 data seeds the estimator is unbiased to
  within 0.02 bits except for the ridge (-0.1 bits at 19 bits) and its std is <= 0.065 bits up to
  5 bits (0.13 at 19 bits): the band is >= 2.3 std at its tightest (d = 4, rho = 0.5) and mostly > 4.
* infonce: a lower bound, so true - max(0.3 bits, 30%) <= est <= true + 0.15 where true < log2(k)
  (the cap, k = 256 here) and 0.75 log2(k) < est <= cap otherwise. Even a perfect critic loses up to
  0.25 bits to the cap at 4.8 bits; a critic learned from ~1400 rows loses more (mean -0.6 bits at
  d = 16, rho = 0.5, worst -0.77 in 12 seeds, i.e. 23%). The 0.3 / 0.15 bit floors cover the noise of
  a 400-row read-out (sd ~0.04-0.07 bits below 1 bit) plus the sample's own MI being off the truth.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from patchlab.core.errors import PatchlabError
from patchlab.studies.mi import MIEstimate, gaussian_mi, infonce_mi, mi, mine_mi

N = 2000
RHOS = (0.0, 0.5, 0.8, 0.9)
DIMS = (1, 4, 16)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def true_mi(rho: float, d: int) -> float:
    return -(d / 2) * math.log2(1 - rho**2)


def gaussian_pair(rho: float, d: int, n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * d + int(100 * rho) + seed)
    x = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)


def gaussian_tol(truth: float) -> float:
    return max(0.15, 0.10 * truth)


def infonce_tol(truth: float) -> float:
    return max(0.3, 0.30 * truth)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("rho", RHOS)
def test_gaussian_recovers_known_mi(rho, d):
    x, y = gaussian_pair(rho, d)
    est, truth = gaussian_mi(x, y), true_mi(rho, d)
    assert abs(est - truth) <= gaussian_tol(truth), (est, truth)
    if rho == 0:
        assert abs(est) < 0.1


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("rho", RHOS)
def test_infonce_is_a_capped_lower_bound(rho, d):
    x, y = gaussian_pair(rho, d)
    e, truth = infonce_mi(x, y), true_mi(rho, d)
    cap = e.params["cap_bits"]
    assert cap == pytest.approx(math.log2(256)) and e.params["eval_k"] == 256
    assert e.value_bits <= cap + 1e-9
    if truth < cap:
        assert truth - infonce_tol(truth) <= e.value_bits <= truth + 0.15, (e.value_bits, truth)
    else:
        assert e.value_bits > 0.75 * cap  # saturated: "at least this much"
    if rho == 0:
        assert abs(e.value_bits) < 0.1


def test_mine_on_a_low_dimensional_pair():
    x, y = gaussian_pair(0.8, 1)
    e, truth = mine_mi(x, y), true_mi(0.8, 1)
    assert e.estimator == "mine"
    assert abs(e.value_bits - truth) <= infonce_tol(truth), (e.value_bits, truth)
    assert abs(mine_mi(*gaussian_pair(0.0, 4)).value_bits) < 0.1


def test_near_deterministic_map_gives_a_large_value():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 4, generator=g)
    a = torch.randn(4, 4, generator=g) + 2 * torch.eye(4)
    assert torch.linalg.matrix_rank(a) == 4
    y = x @ a.T + 1e-3 * torch.randn(N, 4, generator=g)
    assert gaussian_mi(x, y) > 10  # bounded only by the ridge
    e = infonce_mi(x, y, steps=200)
    assert e.value_bits > e.params["cap_bits"] - 0.5


def test_pca_projection_finds_a_low_dimensional_signal():
    """64 dims of which 4 (larger-variance, then randomly rotated) carry all the dependence."""
    g = torch.Generator().manual_seed(3)
    for rho in (0.5, 0.8):
        z = torch.randn(N, 4, generator=g)
        w = rho * z + math.sqrt(1 - rho**2) * torch.randn(N, 4, generator=g)
        qx, qy = (torch.linalg.qr(torch.randn(64, 64, generator=g)).Q for _ in range(2))
        x = torch.cat([3 * z, torch.randn(N, 60, generator=g)], 1) @ qx
        y = torch.cat([3 * w, torch.randn(N, 60, generator=g)], 1) @ qy
        truth = true_mi(rho, 4)
        est = mi(x, y, dim=8)
        assert est.params["proj_dims"] == (8, 8)
        assert abs(est.value_bits - truth) <= gaussian_tol(truth), (est.value_bits, truth)
        assert abs(gaussian_mi(x, y, dim=4) - truth) <= gaussian_tol(truth)
        assert abs(gaussian_mi(x.numpy(), y.numpy(), dim=8) - est.value_bits) < 1e-9  # numpy == torch


def test_bias_correction_matters_in_many_dimensions():
    x, y = gaussian_pair(0.0, 16, n=300)
    assert abs(gaussian_mi(x, y)) < 0.1
    assert gaussian_mi(x, y, bias_correct=False) > 0.3  # plug-in bias ~ dx*dy/(2n) nats


def test_too_few_rows_for_the_dimension_warns():
    x, y = gaussian_pair(0.5, 8, n=12)
    with pytest.warns(UserWarning, match="ridge-dominated"):
        assert math.isfinite(gaussian_mi(x, y))


def test_same_seed_same_result_and_global_rng_untouched():
    x, y = gaussian_pair(0.8, 4, n=600)
    assert gaussian_mi(x, y) == gaussian_mi(x, y)
    state = torch.get_rng_state()
    a, b = infonce_mi(x, y, seed=5, steps=150), infonce_mi(x, y, seed=5, steps=150)
    assert torch.equal(state, torch.get_rng_state())
    assert a.value_bits == b.value_bits and a.params == b.params
    assert infonce_mi(x, y, seed=6, steps=150).value_bits != a.value_bits
    assert mine_mi(x, y, seed=1, steps=150).value_bits == mine_mi(x, y, seed=1, steps=150).value_bits


def test_dispatcher_result_and_spread():
    x, y = gaussian_pair(0.8, 4)
    e = mi(x, y)
    assert isinstance(e, MIEstimate) and e.estimator == "gaussian" and e.spread is None
    assert e.n_samples == N and e.dims == (4, 4) and float(e) == e.value_bits == gaussian_mi(x, y)
    b = mi(x, y, n_boot=20)
    assert b.value_bits == e.value_bits and b.params["spread_kind"] == "bootstrap"
    assert 0.01 < b.spread < 0.2  # sampling sd of this estimate is ~0.06 bits
    low = mi(x.to(torch.bfloat16), y.numpy().astype(np.float32))  # any real dtype, tensor or array
    assert abs(low.value_bits - e.value_bits) < 0.1
    s = mi(x[:500], y[:500], estimator="infonce", n_boot=2, steps=100)
    assert s.estimator == "infonce" and s.spread is not None and s.params["spread_kind"] == "seeds"


BAD = {
    "mismatched n": (lambda: (torch.randn(50, 3), torch.randn(40, 3)), "y"),
    "nan in x": (lambda: (torch.randn(50, 3).index_fill_(0, torch.tensor([4]), float("nan")), torch.randn(50, 3)), "x"),
    "inf in y": (lambda: (torch.randn(50, 3), np.full((50, 2), np.inf)), "y"),
    "1-D x": (lambda: (torch.randn(50), torch.randn(50, 3)), "x"),
    "3-D y": (lambda: (torch.randn(50, 3), torch.randn(50, 3, 1)), "y"),
    "n < 10": (lambda: (torch.randn(9, 3), torch.randn(9, 3)), "x"),
    "list x": (lambda: ([[1.0, 2.0]] * 20, torch.randn(20, 2)), "x"),
    "complex y": (lambda: (torch.randn(20, 2), np.ones((20, 2), dtype=complex)), "y"),
}


@pytest.mark.parametrize("fn", [gaussian_mi, infonce_mi, mine_mi, mi])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_one_line_error_naming_the_argument(fn, case):
    make, arg = BAD[case]
    with pytest.raises(PatchlabError) as err:
        fn(*make())
    msg = str(err.value)
    assert msg.startswith(f"{arg}: ") and "\n" not in msg


@pytest.mark.parametrize(
    "kw, arg",
    [
        (dict(estimator="knn"), "estimator"),
        (dict(estimator="gaussian", steps=10), "mi"),
        (dict(n_boot=1), "n_boot"),
        (dict(dim=0), "dim"),
        (dict(ridge=-1.0), "ridge"),
        (dict(estimator="infonce", val_fraction=1.0), "val_fraction"),
        (dict(estimator="infonce", batch=1), "batch"),
        (dict(estimator="mine", ema=0.0), "ema"),
    ],
)
def test_bad_options_raise(kw, arg):
    x, y = gaussian_pair(0.5, 2, n=50)
    with pytest.raises(PatchlabError, match=f"^{arg}: "):
        mi(x, y, **kw)


@pytest.mark.parametrize("ridge", [1e-2, 1e-1, 1.0])
@pytest.mark.parametrize("rho, d", [(0.5, 4), (0.9, 4), (0.999, 8)])
def test_ridge_is_a_noise_floor(rho, d, ridge):
    """The ridge adds variance `ridge` to every whitened component: the estimate is the MI of the noisy pair,
    -(d/2) log2(1 - rho^2 / (1 + ridge)^2), which stays finite as rho -> 1 (how emergence uses it)."""
    x, y = gaussian_pair(rho, d)
    truth = -(d / 2) * math.log2(1 - rho**2 / (1 + ridge) ** 2)
    assert abs(gaussian_mi(x, y, ridge=ridge) - truth) <= gaussian_tol(truth), (gaussian_mi(x, y, ridge=ridge), truth)


def test_unequal_dimensions_and_correlated_coordinates():
    """x in 3 dims with a non-diagonal covariance, y in 5 dims mixing x with noise: MI from the covariances."""
    g = torch.Generator().manual_seed(11)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.3, -0.4, 0.5]])
    b = torch.randn(5, 3, generator=g)
    x = torch.randn(N, 3, generator=g) @ a.T
    y = x @ b.T + torch.randn(N, 5, generator=g)
    sx, sy = a @ a.T, b @ a @ a.T @ b.T + torch.eye(5)
    joint = torch.cat([torch.cat([sx, sx @ b.T], 1), torch.cat([b @ sx, sy], 1)])
    truth = 0.5 * float(torch.logdet(sx) + torch.logdet(sy) - torch.logdet(joint)) / math.log(2)
    assert abs(gaussian_mi(x, y, ridge=0.0) - truth) <= gaussian_tol(truth), (gaussian_mi(x, y, ridge=0.0), truth)


def test_repeated_rows_use_the_sample_rank():
    """Rows drawn from 3 distinct points span 2 dimensions: the PCA keeps 2 (bias correction included), and a
    constant side carries no information."""
    g = torch.Generator().manual_seed(5)
    points = torch.randn(3, 6, generator=g)
    idx = torch.randint(3, (300,), generator=g)
    e = mi(points[idx], points[idx] @ torch.randn(6, 6, generator=g), dim=4)
    assert e.params["proj_dims"] == (2, 2)
    assert mi(torch.ones(50, 3), torch.randn(50, 3, generator=g)).value_bits == 0.0
