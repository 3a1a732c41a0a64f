"""Mutual information between two sets of vectors (e.g. hidden states at two layers), in bits.

Built for the "information emergence" measure of Chen et al. 2024 (arXiv 2405.12617),
E(l) = MI(h_{l+1}^macro; h_l^macro) - mean_t MI(h_{l+1}^{micro,t}; h_l^{micro,t}), where every MI is
taken across a data set of n vectors (rows). The paper trains a large MINE critic for thousands of
epochs; these estimators are fast enough for CPU:

* ``gaussian`` (the DEFAULT): the log-det estimate I = 1/2 log(det Sx det Sy / det Sxy) of the sample
  covariances, optionally after PCA to the top ``dim`` components of each side, with a ridge and the
  exact Wishart small-sample bias correction. Exact for jointly Gaussian data; for other data it is the
  MI of the best Gaussian fit (a measure of linear dependence). Deterministic, milliseconds.
* ``infonce``: the InfoNCE lower bound with a small separable critic trained on a train split and read
  on a held-out split. Catches non-linear dependence but is capped at log2(batch size).
* ``mine``: the Donsker-Varadhan (MINE) estimate with a small joint critic and the moving-average
  gradient correction. Not capped, but noisier; offered for comparison with the paper.

`mi(x, y, estimator=...)` validates the input and dispatches; every estimator takes (n, dx) and (n, dy)
torch tensors or numpy arrays with the same n (paired rows).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from patchlab.core.errors import PatchlabError

LN2 = math.log(2.0)
MIN_SAMPLES = 10
DEFAULT_ESTIMATOR = "gaussian"
EVAL_REPEATS = 8  # random re-partitions of held-out rows averaged by the neural estimators
EVAL_EVERY = 25  # training steps between early-stopping checks
STOP_FRACTION = 0.15  # of the non-held-out rows, kept back to choose the training step

ArrayX = Union[Float[Tensor, "n dx"], Float[np.ndarray, "n dx"]]
ArrayY = Union[Float[Tensor, "n dy"], Float[np.ndarray, "n dy"]]


@dataclass
class MIEstimate:
    """One MI estimate in bits, with what produced it and (if requested) its spread."""

    value_bits: float
    estimator: str
    n_samples: int
    dims: tuple[int, int]  # (dx, dy) of the input, before any projection
    params: dict[str, Any] = field(default_factory=dict)
    spread: float | None = None  # std over bootstrap resamples (gaussian) or seeds (neural); see `mi`

    def __float__(self) -> float:
        return float(self.value_bits)


# ----------------------------------------------------------------------------------------- input checks


def as_matrix(a: Any, name: str) -> Float[Tensor, "n d"]:
    """Check one input (2-D, real, finite, non-empty) and return it as a float64 CPU tensor."""
    if isinstance(a, Tensor):
        if a.dtype == torch.bool or a.is_complex():
            raise PatchlabError(f"must hold real numbers, got dtype {a.dtype}", where=name)
        t = a.detach().to("cpu", torch.float64)
    elif isinstance(a, np.ndarray):
        if a.dtype.kind not in "fiu":
            raise PatchlabError(f"must hold real numbers, got dtype {a.dtype}", where=name)
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    else:
        raise PatchlabError(f"must be a torch.Tensor or numpy.ndarray, got {type(a).__name__}", where=name)
    if t.ndim != 2:
        raise PatchlabError(f"must be 2-D [n_samples, dim], got shape {tuple(t.shape)}", where=name)
    if t.shape[1] < 1:
        raise PatchlabError("has zero columns", where=name)
    bad = int((~torch.isfinite(t)).any(1).sum())
    if bad:
        raise PatchlabError(f"has NaN/inf values in {bad} of {t.shape[0]} rows", where=name)
    return t


def check_pair(x: ArrayX, y: ArrayY) -> tuple[Float[Tensor, "n dx"], Float[Tensor, "n dy"]]:
    """Validate a pair of paired-sample matrices; float64 CPU tensors back."""
    X, Y = as_matrix(x, "x"), as_matrix(y, "y")
    if X.shape[0] != Y.shape[0]:
        raise PatchlabError(f"has {Y.shape[0]} rows but x has {X.shape[0]} (rows must be paired)", param="y")
    if X.shape[0] < MIN_SAMPLES:
        raise PatchlabError(f"has {X.shape[0]} rows; need at least {MIN_SAMPLES} samples", param="x")
    return X, Y


def _check_dim(dim: int | None) -> None:
    """`dim` is None or a positive int."""
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise PatchlabError(f"must be None or a positive int, got {dim!r}", param="dim")


def _check_positive(value: float, name: str, *, integer: bool = False) -> None:
    """`value` is a positive number (int if `integer`)."""
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or value <= 0 or (not integer and not math.isfinite(value)):
        raise PatchlabError(f"must be a positive {'int' if integer else 'number'}, got {value!r}", where=name)


# ------------------------------------------------------------------------------------------ projection


def fit_whitener(a: Float[Tensor, "n d"], dim: int | None) -> tuple[Float[Tensor, " d"], Float[Tensor, "d k"]]:
    """Centre, rotate onto the top-`dim` principal components (all if None), scale to unit variance.

    Returns (shift, matrix) with z = (a - shift) @ matrix; `dim` >= d keeps every coordinate unrotated.
    Directions without variance (a constant column, or beyond the rank of a sample with repeated rows)
    are dropped, so k == the sample's rank when that is below `dim`.
    """
    n, d = a.shape
    mu = a.mean(0)
    c = a - mu
    if dim is None or dim >= d:
        basis = torch.eye(d, dtype=a.dtype)
    elif n <= d:
        basis = torch.linalg.svd(c, full_matrices=False).Vh[: min(dim, n - 1)].T  # centred rank <= n - 1
    else:
        basis = torch.linalg.eigh(c.T @ c).eigenvectors[:, -dim:].flip(1)
    sd = (c @ basis).std(0)
    live = sd > 1e-10 * sd.max().clamp_min(1e-300)  # round-off only: never blow it up to unit variance
    return mu, basis[:, live] / sd[live][None, :]


def whiten(a: Float[Tensor, "n d"], dim: int | None) -> Float[Tensor, "n k"]:
    """`a` centred, PCA-projected to `dim` components and standardised, using its own statistics."""
    mu, w = fit_whitener(a, dim)
    return (a - mu) @ w


# ------------------------------------------------------------------------------------------- gaussian


def logdet_bias(p: int, dof: int) -> float:
    """E[log det S] - log det Sigma for a p-dim sample covariance S with `dof` degrees of freedom (Wishart)."""
    i = torch.arange(p, dtype=torch.float64)
    return float(torch.special.digamma((dof - i) / 2).sum()) + p * math.log(2.0 / dof)


def _gaussian(
    X: Float[Tensor, "n dx"], Y: Float[Tensor, "n dy"], dim: int | None, ridge: float, bias_correct: bool
) -> tuple[float, dict[str, Any]]:
    """Gaussian MI in bits of validated float64 inputs, with the details that went into it."""
    zx, zy = whiten(X, dim), whiten(Y, dim)
    px, py = zx.shape[1], zy.shape[1]
    z = torch.cat([zx, zy], 1)
    dof = z.shape[0] - 1
    cov = z.T @ z / dof + ridge * torch.eye(px + py, dtype=z.dtype)
    logdet = lambda m: torch.linalg.slogdet(m)[1]  # noqa: E731
    nats = 0.5 * float(logdet(cov[:px, :px]) + logdet(cov[px:, px:]) - logdet(cov))
    corrected = bias_correct and dof > px + py
    if dof <= px + py:
        warnings.warn(
            f"gaussian MI: n={dof + 1} samples for {px}+{py} dims; the value is ridge-dominated, pass dim", stacklevel=4
        )
    if corrected:
        nats -= 0.5 * (logdet_bias(px, dof) + logdet_bias(py, dof) - logdet_bias(px + py, dof))
    info = {"dim": dim, "proj_dims": (px, py), "ridge": ridge, "bias_corrected": corrected}
    return nats / LN2, info


def gaussian_mi(
    x: ArrayX, y: ArrayY, dim: int | None = None, ridge: float = 1e-3, seed: int = 0, bias_correct: bool = True
) -> float:
    """Gaussian (log-det) MI in bits, after optional per-side PCA to `dim` components; deterministic.

    Each side is centred, projected onto its top-`dim` principal components (fitted on this sample; None
    or dim >= d keeps all) and standardised, then I = 1/2 log2(det Sx det Sy / det Sxy) with `ridge` added
    to every covariance diagonal (unit-variance scale) so it stays finite when n is small against the
    dimension. `bias_correct` removes the exact Wishart bias of the plug-in log-dets (about
    dx*dy / (2n) nats) when n - 1 > dx + dy, so independent data give ~0 (and can give slightly < 0).
    The ridge biases the value down by about ridge/2 * (tr Sx^-1 + tr Sy^-1 - tr Sxy^-1) nats: nothing
    when n >> dx + dy, but about -0.8 bits for 576 + 576 dims at n = 2000; with n <= dx + dy the value is
    ridge-dominated and meaningless (a warning says so). For hidden states, project with `dim` first.
    `seed` is unused (the estimate is deterministic) and accepted so every estimator takes one.
    """
    return _gaussian_checked(x, y, dim, ridge, bias_correct)[0]


def _gaussian_checked(
    x: ArrayX, y: ArrayY, dim: int | None, ridge: float, bias_correct: bool
) -> tuple[float, dict[str, Any], tuple[int, ...]]:
    """Validate, then `_gaussian`; also returns (n, dx, dy)."""
    X, Y = check_pair(x, y)
    _check_dim(dim)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge < 0 or not math.isfinite(ridge):
        raise PatchlabError(f"must be a finite number >= 0, got {ridge!r}", param="ridge")
    value, info = _gaussian(X, Y, dim, float(ridge), bias_correct)
    return value, info, (X.shape[0], X.shape[1], Y.shape[1])


def _gaussian_estimate(
    x: ArrayX, y: ArrayY, dim: int | None = None, ridge: float = 1e-3, seed: int = 0, bias_correct: bool = True
) -> MIEstimate:
    """`gaussian_mi` wrapped in an MIEstimate."""
    value, info, (n, dx, dy) = _gaussian_checked(x, y, dim, ridge, bias_correct)
    return MIEstimate(value, "gaussian", n, (dx, dy), info)


# ------------------------------------------------------------------------------------- neural helpers


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Two hidden ReLU layers."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


class Tower(nn.Module):
    """x -> W x + MLP(x): a linear map (the Gaussian-optimal part) plus a two-layer ReLU correction."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.lin, self.mlp = nn.Linear(d_in, d_out), _mlp(d_in, hidden, d_out)
        nn.init.zeros_(self.mlp[-1].weight)  # start linear; the non-linear part grows only if it helps
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Float[Tensor, "b d_in"]) -> Float[Tensor, "b d_out"]:
        return self.lin(x) + self.mlp(x)


class SeparableCritic(nn.Module):
    """score[i, j] = <f(x_i), g(y_j)> / tau with two towers and a learned temperature tau."""

    def __init__(self, dx: int, dy: int, hidden: int, embed: int):
        super().__init__()
        self.f, self.g = Tower(dx, hidden, embed), Tower(dy, hidden, embed)
        self.log_tau = nn.Parameter(torch.tensor(0.5 * math.log(embed)))  # scores start O(1), not O(sqrt(embed))

    def forward(self, x: Float[Tensor, "b dx"], y: Float[Tensor, "c dy"]) -> Float[Tensor, "b c"]:
        return self.f(x) @ self.g(y).T * torch.exp(-self.log_tau)


class JointCritic(nn.Module):
    """T(x, y): one tower on the concatenated pair."""

    def __init__(self, dx: int, dy: int, hidden: int):
        super().__init__()
        self.net = Tower(dx + dy, hidden, 1)

    def forward(self, x: Float[Tensor, "b dx"], y: Float[Tensor, "b dy"]) -> Float[Tensor, " b"]:
        return self.net(torch.cat([x, y], 1)).squeeze(1)


Pair = tuple[Tensor, Tensor]


@dataclass
class _Split:
    """Fit / stop (early stopping) / held-out parts of a pair, whitened with fit-part statistics, float32."""

    fit: Pair
    stop: Pair
    val: Pair


def _split(X: Tensor, Y: Tensor, val_fraction: float, dim: int | None, gen: torch.Generator) -> _Split:
    """Shuffle rows; hold out `val_fraction`, then STOP_FRACTION of the rest; whiten with the fit part."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise PatchlabError(f"must be in (0, 1), got {val_fraction!r}", param="val_fraction")
    n = X.shape[0]
    n_val = min(max(2, round(val_fraction * n)), n - 4)
    n_stop = max(2, round(STOP_FRACTION * (n - n_val)))
    perm = torch.randperm(n, generator=gen)
    va, st, fi = perm[:n_val], perm[n_val : n_val + n_stop], perm[n_val + n_stop :]
    (mx, wx), (my, wy) = fit_whitener(X[fi], dim), fit_whitener(Y[fi], dim)
    part = lambda r: (((X[r] - mx) @ wx).float(), ((Y[r] - my) @ wy).float())  # noqa: E731
    return _Split(part(fi), part(st), part(va))


def _batches(n: int, b: int, steps: int, gen: torch.Generator) -> Iterator[Tensor]:
    """`steps` index batches of size b, drawn without replacement within each pass over n rows."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < b:
            order = torch.randperm(n, generator=gen)
        idx, order = order[:b], order[b:]
        yield idx


def _train(
    critic: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    score_fn: Callable[[Tensor, Tensor], float],
    s: _Split,
    steps: int,
    batch: int,
    lr: float,
    patience: int | None,
    gen: torch.Generator,
) -> dict[str, Any]:
    """Adam on the fit rows; every EVAL_EVERY steps score the stop rows and keep the best weights.

    The baseline is the constant critic (score 0 for both bounds: "no dependence"); best_step 0 in the
    returned log means no trained state beat it. Stops after `patience` checks without a new best
    (None: run all `steps`) and loads the best state.
    """
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    best, best_step, best_state, since, step = 0.0, 0, copy.deepcopy(critic.state_dict()), 0, 0
    for step, idx in enumerate(_batches(s.fit[0].shape[0], batch, steps, gen), 1):
        loss = loss_fn(s.fit[0][idx], s.fit[1][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % EVAL_EVERY and step != steps:
            continue
        with torch.no_grad():
            score = score_fn(*s.stop)
        if score > best:
            best, best_step, best_state, since = score, step, copy.deepcopy(critic.state_dict()), 0
        else:
            since += 1
        if patience is not None and since >= patience:
            break
    critic.load_state_dict(best_state)
    return {"steps_run": step, "best_step": best_step, "stop_bits": best / LN2}


def _check_neural(hidden: int, steps: int, batch: int, lr: float, patience: int | None, seed: int) -> None:
    """Shared hyper-parameter checks."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PatchlabError(f"must be an int >= 0, got {seed!r}", param="seed")
    for name, v in (("hidden", hidden), ("steps", steps), ("batch", batch)):
        _check_positive(v, name, integer=True)
    _check_positive(lr, "lr")
    if batch < 2:
        raise PatchlabError(f"must be >= 2, got {batch}", param="batch")
    if patience is not None:
        _check_positive(patience, "patience", integer=True)


# ------------------------------------------------------------------------------------------- infonce


def infonce_nats(scores: Float[Tensor, "k k"]) -> Float[Tensor, ""]:
    """Symmetric InfoNCE bound in nats of one k x k score matrix whose diagonal holds the true pairs."""
    diag = scores.diagonal()
    rows, cols = diag - scores.logsumexp(1), diag - scores.logsumexp(0)
    return math.log(scores.shape[0]) + 0.5 * (rows.mean() + cols.mean())


def blocked_infonce(scores: Float[Tensor, "m m"], k: int, seed: int) -> float:
    """Mean InfoNCE (nats) over disjoint k-blocks of EVAL_REPEATS seeded random orderings of m pairs."""
    gen, m = torch.Generator().manual_seed(seed), scores.shape[0]
    vals = []
    for _ in range(EVAL_REPEATS):
        p = torch.randperm(m, generator=gen)
        vals += [infonce_nats(scores[b][:, b]) for b in p[: m // k * k].view(-1, k)]
    return float(torch.stack(vals).mean())


def infonce_mi(
    x: ArrayX,
    y: ArrayY,
    hidden: int = 64,
    steps: int = 600,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    val_fraction: float = 0.2,
    dim: int | None = None,
    embed: int | None = None,
    patience: int | None = 4,
) -> MIEstimate:
    """InfoNCE lower bound on MI in bits, with a separable critic; deterministic for a fixed seed.

    Rows are shuffled; `val_fraction` is held out for the final read-out and STOP_FRACTION of the rest
    for early stopping; both sides are standardised (and PCA-projected to `dim` components if given)
    with fit-part statistics. The critic <f(x), g(y)>/tau (towers: linear map + two `hidden`-wide ReLU
    layers, `embed`-dim output, default `hidden`) is trained with Adam for up to `steps` batches of
    `batch` pairs, keeping the weights that score best on the stop rows (stopping after `patience`
    checks without gain), then read on the held-out rows in blocks of k = min(batch, n_held_out).
    The bound can never exceed log2(k) bits (params["cap_bits"]) and is loose as the truth nears it:
    a value near the cap means "at least this much", not an estimate. It is exactly 0.0 when no trained
    critic beats the constant one on the stop rows (params["best_step"] == 0). An undertrained or
    overfitted critic only lowers it: with a couple of thousand rows the critic cannot learn weak
    dependence spread over many dimensions (d = 64: about 0.3 of 1.9 true bits), so reduce with `dim`.
    """
    X, Y = check_pair(x, y)
    _check_dim(dim)
    _check_neural(hidden, steps, batch, lr, patience, seed)
    embed = hidden if embed is None else embed
    _check_positive(embed, "embed", integer=True)
    gen = torch.Generator().manual_seed(seed)
    s = _split(X, Y, val_fraction, dim, gen)
    b = min(batch, s.fit[0].shape[0])
    k_stop, k = min(batch, s.stop[0].shape[0]), min(batch, s.val[0].shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        critic = SeparableCritic(s.fit[0].shape[1], s.fit[1].shape[1], hidden, embed)
    log = _train(
        critic,
        lambda xb, yb: -infonce_nats(critic(xb, yb)),
        lambda xs, ys: blocked_infonce(critic(xs, ys), k_stop, seed),
        s, steps, b, lr, patience, gen,
    )  # fmt: skip
    with torch.no_grad():
        value = blocked_infonce(critic(*s.val), k, seed + 1) / LN2 if log["best_step"] else 0.0
    params = dict(hidden=hidden, embed=embed, steps=steps, batch=b, eval_k=k, lr=lr, seed=seed,
                  val_fraction=val_fraction, n_val=s.val[0].shape[0], dim=dim, patience=patience,
                  cap_bits=math.log2(k), **log)  # fmt: skip
    return MIEstimate(value, "infonce", X.shape[0], (X.shape[1], Y.shape[1]), params)


# ---------------------------------------------------------------------------------------------- mine


def _logmeanexp(t: Float[Tensor, " m"]) -> Float[Tensor, ""]:
    """log mean exp, stably."""
    return t.logsumexp(0) - math.log(t.shape[0])


def dv_nats(critic: JointCritic, x: Float[Tensor, "m dx"], y: Float[Tensor, "m dy"], seed: int) -> float:
    """Donsker-Varadhan value (nats) on m pairs; marginal pairs from EVAL_REPEATS seeded shuffles of y."""
    gen, m = torch.Generator().manual_seed(seed), x.shape[0]
    marg = torch.cat([critic(x, y[torch.randperm(m, generator=gen)]) for _ in range(EVAL_REPEATS)])
    return float(critic(x, y).mean() - _logmeanexp(marg))


class _MineLoss:
    """Negative DV objective whose log-partition gradient uses a moving average of E[e^T] (MINE)."""

    def __init__(self, critic: JointCritic, ema: float, gen: torch.Generator):
        self.critic, self.ema, self.gen, self.log_ma = critic, ema, gen, None

    def __call__(self, xb: Tensor, yb: Tensor) -> Tensor:
        lme = _logmeanexp(self.critic(xb, yb[torch.randperm(len(xb), generator=self.gen)]))
        cur = lme.detach()
        ma = self.log_ma
        self.log_ma = cur if ma is None else torch.logaddexp(ma + math.log1p(-self.ema), cur + math.log(self.ema))
        return -(self.critic(xb, yb).mean() - torch.exp(lme - self.log_ma))  # grad: grad E[e^T] / ma


def mine_mi(
    x: ArrayX,
    y: ArrayY,
    hidden: int = 64,
    steps: int = 800,
    batch: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    val_fraction: float = 0.2,
    dim: int | None = None,
    ema: float = 0.01,
    patience: int | None = 6,
) -> MIEstimate:
    """MINE (Donsker-Varadhan) MI in bits with a small joint critic; deterministic for a fixed seed.

    Same split / standardisation / `dim` / early stopping as `infonce_mi`. The critic T(x, y) is
    trained to maximise mean T(joint) - log mean exp T(x, shuffled y), with the gradient of the log
    term divided by a moving average (rate `ema`) of mean e^T instead of the batch value (Belghazi et
    al. 2018). The held-out value is not capped by the batch size but is noisier than InfoNCE, needs
    more steps as MI grows, and can overshoot at high MI (the log-mean-exp term is estimated from data).
    Like InfoNCE it is 0.0 when no trained critic beats the constant one, and it badly underestimates
    weak dependence spread over many dimensions at n of a few thousand.
    """
    X, Y = check_pair(x, y)
    _check_dim(dim)
    _check_neural(hidden, steps, batch, lr, patience, seed)
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 < ema <= 1:
        raise PatchlabError(f"must be in (0, 1], got {ema!r}", param="ema")
    gen = torch.Generator().manual_seed(seed)
    s = _split(X, Y, val_fraction, dim, gen)
    b = min(batch, s.fit[0].shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        critic = JointCritic(s.fit[0].shape[1], s.fit[1].shape[1], hidden)
    log = _train(
        critic, _MineLoss(critic, ema, gen), lambda xs, ys: dv_nats(critic, xs, ys, seed),
        s, steps, b, lr, patience, gen,
    )  # fmt: skip
    with torch.no_grad():
        value = dv_nats(critic, *s.val, seed + 1) / LN2 if log["best_step"] else 0.0
    params = dict(hidden=hidden, steps=steps, batch=b, lr=lr, seed=seed, val_fraction=val_fraction,
                  n_val=s.val[0].shape[0], dim=dim, ema=ema, patience=patience, **log)  # fmt: skip
    return MIEstimate(value, "mine", X.shape[0], (X.shape[1], Y.shape[1]), params)


# ------------------------------------------------------------------------------------------ dispatch

ESTIMATORS: dict[str, Callable[..., MIEstimate]] = {
    "gaussian": _gaussian_estimate,
    "infonce": infonce_mi,
    "mine": mine_mi,
}


def _spread(x: Tensor, y: Tensor, estimator: str, n_boot: int, kw: dict[str, Any]) -> tuple[float, str]:
    """Std of `n_boot` row-bootstrap estimates (gaussian) or of `n_boot` further seeds (neural)."""
    fn, seed = ESTIMATORS[estimator], int(kw.get("seed", 0))
    if estimator == "gaussian":
        gen = torch.Generator().manual_seed(seed)
        rows = [torch.randint(x.shape[0], (x.shape[0],), generator=gen) for _ in range(n_boot)]
        vals = [fn(x[r], y[r], **kw).value_bits for r in rows]
        return float(np.std(vals, ddof=1)), "bootstrap"
    vals = [fn(x, y, **{**kw, "seed": seed + 1 + i}).value_bits for i in range(n_boot)]
    return float(np.std(vals, ddof=1)), "seeds"


def mi(x: ArrayX, y: ArrayY, estimator: str = DEFAULT_ESTIMATOR, n_boot: int = 0, **kw: Any) -> MIEstimate:
    """Validate (x, y) and estimate their MI in bits with `estimator` ("gaussian" default, "infonce", "mine").

    `kw` goes to the estimator (`gaussian_mi`, `infonce_mi`, `mine_mi`). With `n_boot` >= 2 the result's
    `spread` is the std over `n_boot` row-bootstrap resamples (gaussian) or over `n_boot` further seeds
    seed+1.. (neural: re-split, re-initialised, re-trained); `value_bits` is always the plain estimate.
    """
    if estimator not in ESTIMATORS:
        raise PatchlabError(f"unknown estimator {estimator!r} (use {', '.join(ESTIMATORS)})", param="estimator")
    fn = ESTIMATORS[estimator]
    allowed = set(inspect.signature(fn).parameters) - {"x", "y"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise PatchlabError(
            f"unknown option(s) {', '.join(unknown)} for {estimator} (use {', '.join(sorted(allowed))})", param="mi"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0 or n_boot == 1:
        raise PatchlabError(f"must be 0 or an int >= 2, got {n_boot!r}", param="n_boot")
    X, Y = check_pair(x, y)
    est = fn(X, Y, **kw)
    if n_boot:
        est.spread, kind = _spread(X, Y, estimator, n_boot, kw)
        est.params.update(n_boot=n_boot, spread_kind=kind)
    return est


__all__ = [
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "MIEstimate",
    "as_matrix",
    "check_pair",
    "gaussian_mi",
    "infonce_mi",
    "mi",
    "mine_mi",
]
