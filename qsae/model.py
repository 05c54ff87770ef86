"""The sparse autoencoder: settings, parameters, cost, gradient and per-shard sums.

Patches are rows of X (m, n); the hidden layer has h sigmoid units::

    a2 = σ(X W1ᵀ + b1)            (m, h)
    a3 = σ(a2 W2ᵀ + b2)           (m, n)
    J  = 1/(2m) Σ_i ||a3_i − x_i||² + λ/2 (||W1||² + ||W2||²) + β Σ_j KL(ρ || p_j)
    p_j = 1/m Σ_i a2_ij

θ = concat(W1.ravel(), W2.ravel(), b1, b2) with W1 (h, n) and W2 (n, h).

The cost is a sum over patches except for the sparsity term, which needs the global p.
Its gradient is linear in s_j = β(−ρ/p_j + (1−ρ)/(1−p_j)), so a shard can return sums
(see ``Sums``) from which the exact cost of the whole data set is assembled:

* one round: the shard also returns Σ f'_i x_iᵀ and Σ f'_i (f' = a2 ⊙ (1 − a2)), and the
  sparsity part of ∂J/∂W1 is diag(s) Σ f' xᵀ / m (``shard_sums``);
* two rounds: the shard returns Σ a2 first (``forward``), is sent s, and folds s into its
  backward pass (``backward``).

Everything here is pure numpy on arrays; nothing knows about sockets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import ConfigError, DataError

__all__ = [
    "SAEConfig",
    "Params",
    "Sums",
    "init_params",
    "unpack",
    "cost_and_grad",
    "forward",
    "backward",
    "shard_sums",
    "sparsity_delta",
    "finish_sums",
    "minibatch_cost_and_grad",
]

BLOCK_ROWS = 384  # rows per block: measured fastest of 128–1024 (a (384, 64) block is 192 KiB, in L2)


@dataclass(frozen=True)
class SAEConfig:
    """Settings of the sparse autoencoder.

    The default learns sharp, localised edge filters on the built-in images with L-BFGS
    (patches scaled to [0.1, 0.9]); ``report()`` and ``ufldl()`` are the two published
    presets.
    """

    n_visible: int = 64  # 8×8 patches
    n_hidden: int = 30  # the report's h; enough units for a full set of orientations
    weight_decay: float = 1e-4  # λ: the report's 0.002 stops L-BFGS early with blurry filters
    sparsity_weight: float = 3.0  # β: UFLDL's; 3–4 gives clean edges
    sparsity_target: float = 0.01  # ρ: UFLDL's; 0.002–0.01 all give edges

    def __post_init__(self) -> None:
        if int(self.n_visible) != self.n_visible or self.n_visible < 1:
            raise ConfigError(f"n_visible={self.n_visible!r} must be a positive integer (64 for 8×8 patches)")
        if int(self.n_hidden) != self.n_hidden or self.n_hidden < 1:
            raise ConfigError(f"n_hidden={self.n_hidden!r} must be a positive integer, e.g. 30")
        if not np.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r} must be finite and >= 0, e.g. 1e-4")
        if not np.isfinite(self.sparsity_weight) or self.sparsity_weight < 0:
            raise ConfigError(f"sparsity_weight={self.sparsity_weight!r} must be finite and >= 0, e.g. 3")
        if not 0.0 < self.sparsity_target < 1.0:
            raise ConfigError(f"sparsity_target={self.sparsity_target!r} must lie strictly between 0 and 1, e.g. 0.01")

    @classmethod
    def report(cls) -> "SAEConfig":
        """The report's settings: h = 30, λ = 0.002, β = 4, ρ = 0.002."""
        return cls(n_hidden=30, weight_decay=0.002, sparsity_weight=4.0, sparsity_target=0.002)

    @classmethod
    def ufldl(cls) -> "SAEConfig":
        """The UFLDL exercise's settings: h = 25, λ = 1e-4, β = 3, ρ = 0.01."""
        return cls(n_hidden=25, weight_decay=1e-4, sparsity_weight=3.0, sparsity_target=0.01)

    @classmethod
    def preset(cls, name: str) -> "SAEConfig":
        """The configuration called ``name``: "default", "report" or "ufldl"."""
        presets = {"default": cls, "report": cls.report, "ufldl": cls.ufldl}
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return presets[name]()

    @property
    def n_params(self) -> int:
        """Length of θ: 2·n·h + h + n."""
        return 2 * self.n_visible * self.n_hidden + self.n_hidden + self.n_visible

    def to_dict(self) -> dict:
        """The fields as a plain dict (for model.npz and the wire)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        """Inverse of ``to_dict``; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown SAEConfig fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


class Params(NamedTuple):
    """Views of θ as the model's matrices (no copies)."""

    W1: np.ndarray  # (h, n)
    W2: np.ndarray  # (n, h)
    b1: np.ndarray  # (h,)
    b2: np.ndarray  # (n,)


def unpack(theta: np.ndarray, config: SAEConfig) -> Params:
    """Split θ into (W1, W2, b1, b2) views, checking its length."""
    n, h = config.n_visible, config.n_hidden
    theta = np.asarray(theta)
    if theta.shape != (config.n_params,):
        raise ConfigError(
            f"θ has shape {theta.shape} but n_visible={n}, n_hidden={h} need ({config.n_params},); "
            "make it with init_params(config)"
        )
    W1 = theta[: h * n].reshape(h, n)
    W2 = theta[h * n : 2 * h * n].reshape(n, h)
    b1 = theta[2 * h * n : 2 * h * n + h]
    b2 = theta[2 * h * n + h :]
    return Params(W1, W2, b1, b2)


def init_params(config: SAEConfig, seed: int = 0) -> np.ndarray:
    """Random θ: W uniform in ±sqrt(6/(n+h+1)), biases zero (UFLDL's initialiseParameters)."""
    n, h = config.n_visible, config.n_hidden
    r = np.sqrt(6.0 / (n + h + 1))
    rng = np.random.default_rng(seed)
    theta = np.zeros(config.n_params)
    theta[: 2 * n * h] = rng.uniform(-r, r, size=2 * n * h)
    return theta


@dataclass
class Sums:
    """What one shard contributes: sums over its rows, additive across shards.

    ``vec`` is one float64 vector so that reducing shards is a single addition::

        [ grad (n_params: ΣW1, ΣW2, Σb1, Σb2 of the reconstruction gradient) | Σ||a3−x||² |
          Σ a2 (h) | Σ f'xᵀ (h·n, one-round only) | Σ f' (h, one-round only) ]

    ``m`` is the number of rows summed.
    """

    m: int
    vec: np.ndarray

    def __add__(self, other: "Sums") -> "Sums":
        return Sums(self.m + other.m, self.vec + other.vec)

    @staticmethod
    def size(config: SAEConfig, one_round: bool) -> int:
        """Length of ``vec`` for ``config``."""
        h, n = config.n_hidden, config.n_visible
        return config.n_params + 1 + h + (h * n + h if one_round else 0)


def _sigmoid_of_negated_(u: np.ndarray) -> np.ndarray:
    """σ(z) from u = −z, in place: 1/(1 + e^u) (3 passes over u, no temporaries).

    Callers negate the weights once instead of negating every pre-activation.
    """
    np.exp(u, out=u)
    u += 1.0
    np.reciprocal(u, out=u)
    return u


def _check_X(X: np.ndarray, config: SAEConfig) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != config.n_visible:
        raise DataError(
            f"patches have shape {X.shape} but the model has n_visible={config.n_visible}; "
            f"pass an (m, {config.n_visible}) array, one patch a row"
        )
    if X.shape[0] == 0:
        raise DataError("no patches: X has 0 rows; pass at least one patch")
    if X.dtype != np.float64 or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=np.float64)
    return X


def forward(theta: np.ndarray, X: np.ndarray, config: SAEConfig) -> np.ndarray:
    """Hidden activations with a column of ones appended: (m, h + 1).

    The ones column lets ``backward`` fold b2 into the output product and get Σ δ3 (the b2
    gradient) out of the W2-gradient product for free. Σ a2 is ``A[:, :h].sum(0)``.
    """
    X = _check_X(X, config)
    W1, _, b1, _ = unpack(theta, config)
    m, h = X.shape[0], config.n_hidden
    A = np.empty((m, h + 1))
    A[:, h] = 1.0
    nW1T = np.ascontiguousarray(-W1.T)
    z = np.empty((min(BLOCK_ROWS, m), h))
    for lo in range(0, m, BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, m)
        u = z[: hi - lo]
        np.matmul(X[lo:hi], nW1T, out=u)
        u -= b1  # u = −(x W1ᵀ + b1)
        np.exp(u, out=u)
        u += 1.0
        np.divide(1.0, u, out=A[lo:hi, :h])  # σ = 1/(1 + e^u), written straight into A
    return A


def backward(
    theta: np.ndarray,
    X: np.ndarray,
    A: np.ndarray,
    s: np.ndarray | None,
    config: SAEConfig,
    one_round: bool = False,
) -> Sums:
    """Sums of the shard given its hidden activations ``A`` (from ``forward``).

    Parameters
    ----------
    theta : (n_params,) weights.
    X : (m, n) patches of this shard.
    A : (m, h + 1) output of ``forward(theta, X)``.
    s : (h,) sparsity delta β(−ρ/p + (1−ρ)/(1−p)) of the global p, folded into the hidden
        deltas (two-round protocol); None for none (one-round protocol, which returns
        Σ f'xᵀ and Σ f' instead).
    one_round : also accumulate Σ f' xᵀ and Σ f' (one extra h×n product per row block).

    Returns
    -------
    Sums over the rows of X; Σ a2 is included.
    """
    X = _check_X(X, config)
    W1, W2, b1, b2 = unpack(theta, config)
    m, n, h = X.shape[0], config.n_visible, config.n_hidden
    nW2bT = np.empty((h + 1, n))  # −[W2 | b2]ᵀ: the output layer as one (negated) matrix
    nW2bT[:h] = -W2.T
    nW2bT[h] = -b2
    W2c = np.ascontiguousarray(W2)
    gW1 = np.zeros((h, n))
    gW2b = np.zeros((n, h + 1))
    gb1 = np.zeros(h)
    fx = np.zeros((h, n)) if one_round else None
    fsum = np.zeros(h) if one_round else None
    sq = 0.0
    rows = min(BLOCK_ROWS, m)
    a3, d3 = np.empty((rows, n)), np.empty((rows, n))
    f, d2 = np.empty((rows, h)), np.empty((rows, h))
    ones = np.ones(rows)
    for lo in range(0, m, BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, m)
        k = hi - lo
        x, a, o, d, fk, dk = X[lo:hi], A[lo:hi], a3[:k], d3[:k], f[:k], d2[:k]
        np.matmul(a, nW2bT, out=o)
        _sigmoid_of_negated_(o)  # a3
        np.subtract(o, x, out=d)  # a3 − x
        sq += float(np.vdot(d, d))
        d *= o  # δ3 = (a3 − x) ⊙ a3 ⊙ (1 − a3)
        np.subtract(1.0, o, out=o)
        d *= o
        gW2b += d.T @ a  # [Σ δ3 a2ᵀ | Σ δ3]
        np.subtract(1.0, a[:, :h], out=fk)
        fk *= a[:, :h]  # f' = a2 ⊙ (1 − a2)
        np.matmul(d, W2c, out=dk)
        if s is not None:
            dk += s
        dk *= fk  # δ2
        gW1 += dk.T @ x
        gb1 += ones[:k] @ dk
        if one_round:
            fx += fk.T @ x
            fsum += ones[:k] @ fk
    parts = [gW1.ravel(), gW2b[:, :h].ravel(), gb1, gW2b[:, h], [sq], np.ones(m) @ A[:, :h]]
    if one_round:
        parts += [fx.ravel(), fsum]
    return Sums(m, np.concatenate(parts))


def shard_sums(theta: np.ndarray, X: np.ndarray, config: SAEConfig) -> Sums:
    """One-round sums of a shard: everything the exact cost needs, in one pass."""
    return backward(theta, X, forward(theta, X, config), None, config, one_round=True)


def sparsity_delta(p: np.ndarray, config: SAEConfig) -> np.ndarray:
    """s = β(−ρ/p + (1−ρ)/(1−p)), the derivative of β Σ KL(ρ||p_j) in p, per hidden unit."""
    rho, beta = config.sparsity_target, config.sparsity_weight
    return beta * (-rho / p + (1.0 - rho) / (1.0 - p))


def _kl(p: np.ndarray, config: SAEConfig) -> float:
    rho = config.sparsity_target
    return float(np.sum(rho * np.log(rho / p) + (1.0 - rho) * np.log((1.0 - rho) / (1.0 - p))))


def _reconstruction_and_decay(theta: np.ndarray, total: Sums, config: SAEConfig) -> tuple[float, np.ndarray]:
    """The reconstruction + weight-decay part of (cost, grad) from summed shard results."""
    W1, W2, _, _ = unpack(theta, config)
    P, m, lam = config.n_params, total.m, config.weight_decay
    cost = total.vec[P] / (2 * m) + 0.5 * lam * (np.vdot(W1, W1) + np.vdot(W2, W2))
    grad = total.vec[:P] / m
    g = unpack(grad, config)
    g.W1[...] += lam * W1
    g.W2[...] += lam * W2
    return float(cost), grad


def finish_sums(theta: np.ndarray, total: Sums, config: SAEConfig, s_folded: bool) -> tuple[float, np.ndarray]:
    """Cost and gradient of the whole data set from the sum of every shard's ``Sums``.

    ``s_folded`` says whether the shards already folded the sparsity delta into their
    backward pass (two rounds); otherwise ``total`` must carry Σ f'xᵀ and Σ f' (one round).
    """
    h, n, P, m = config.n_hidden, config.n_visible, config.n_params, total.m
    v = total.vec
    p = v[P + 1 : P + 1 + h] / m
    cost, grad = _reconstruction_and_decay(theta, total, config)
    cost += config.sparsity_weight * _kl(p, config)
    if not s_folded:
        g = unpack(grad, config)
        s = sparsity_delta(p, config)
        fx = v[P + 1 + h : P + 1 + h + h * n].reshape(h, n)
        fsum = v[P + 1 + h + h * n :]
        g.W1[...] += s[:, None] * fx / m
        g.b1[...] += s * fsum / m
    return cost, grad


def cost_and_grad(theta: np.ndarray, X: np.ndarray, config: SAEConfig) -> tuple[float, np.ndarray]:
    """Cost J(θ) and its gradient on the patches X (m, n), in this process.

    Two passes over X in cache-sized row blocks: the hidden layer of every row first (for
    the global firing rates p), then the output layer and the backward pass with the
    sparsity delta folded in — five m·n·h products in all, no temporaries of size m·n.
    """
    A = forward(theta, X, config)
    m, h = A.shape[0], config.n_hidden
    p = A[:, :h].sum(axis=0) / m
    return finish_sums(theta, backward(theta, X, A, sparsity_delta(p, config), config), config, s_folded=True)


def minibatch_cost_and_grad(
    theta: np.ndarray, X: np.ndarray, config: SAEConfig
) -> tuple[float, np.ndarray, np.ndarray]:
    """Reconstruction + weight-decay cost and gradient of a minibatch, and its firing rates.

    The report's SGD (§2.1) steps on this cost and enforces sparsity separately, by nudging
    b1 with the returned per-unit mean activation (h,).
    """
    A = forward(theta, X, config)
    cost, grad = _reconstruction_and_decay(theta, backward(theta, X, A, None, config), config)
    return cost, grad, A[:, : config.n_hidden].mean(axis=0)
