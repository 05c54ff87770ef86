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
* two rounds: the shard returns Σ a2 and Σ (1 − a2) first (``hidden_exp``, ``hidden_sums``),
  is sent s, and folds s into its backward pass (``backward``).

Saturation: the hidden layer is kept as u = e^−z (``hidden_exp``), from which both a2 and
1 − a2 come to full relative precision. 1 − p_j is summed as its own statistic rather than
taken as 1 − mean(a2), and f' = a2 ⊙ (1 − a2) uses it: a unit saturated on every row (inputs
far outside [0, 1]) costs a large finite amount and has a finite, exact gradient.

Precision: X may be float32 or float64 (anything else is converted to float64). The
products and elementwise passes run in X's dtype and the hidden layer is in it;
θ, the gradient and ``Sums.vec`` are always float64, each row chunk's sums being added
into float64 accumulators, so shards and chunks add without drift. float32 is about 2×
faster (``benchmarks/bench_model.py``) and holds half the memory.

Everything here is pure numpy on arrays; nothing knows about sockets.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import numpy as np

from .errors import ConfigError, DataError
from ._blas import pinned  # every BLAS-calling entry point: one BLAS thread, whatever the caller set (issue 14)

__all__ = [
    "SAEConfig",
    "Params",
    "Sums",
    "init_params",
    "unpack",
    "cost_and_grad",
    "hidden_exp",
    "forward",
    "backward",
    "activation_sums",
    "hidden_sums",
    "z_cap",
    "chunk_rows",
    "shard_sums",
    "sparsity_delta",
    "finish_sums",
    "minibatch_cost_and_grad",
    "KERNELS",
    "set_kernel",
    "kernel",
]

SMALL_GEMM = 1_000_000  # OpenBLAS multiplies M·N·K ≤ 10⁶ without packing: products slow down 1.3–1.7× past it
MIN_CHUNK_ROWS = 128  # below this the numpy calls per chunk cost more than the passes (wide models)
MAX_CHUNK_ROWS = 504  # the small-matrix limit for n = 64, h = 30; a (504, 64) float64 chunk is 252 KiB, in L2
FORWARD_CHUNKS = 4  # chunks per elementwise pass in forward: (2016, 31) float64 is 488 KiB, in L2
RATE_FLOOR = 1e-300  # p_j or 1 − p_j under this (σ under/overflowed on every row) counts as this: the KL term stays
#                      finite (about 690 a unit) and s ≤ β·1e300 stays a float64


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
          Σ a2 (h) | Σ (1 − a2) (h) | Σ f'xᵀ (h·n, one-round only) | Σ f' (h, one-round only) ]

    Σ (1 − a2) is its own statistic, summed from the pre-activations (``hidden_exp``): 1 − p_j
    is then exact where p_j rounds to 1, and a saturated unit costs a large finite amount.

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
        return config.n_params + 1 + 2 * h + (h * n + h if one_round else 0)


DTYPES = (np.float32, np.float64)  # the compute dtypes; anything else is converted to float64
KERNELS = ("numpy", "numba")  # the elementwise paths: numpy calls, or compiled one-pass kernels (numba, a dependency)
_kernels: ModuleType | None = None  # qsae._kernels when the numba path is selected
_kernel: str | None = None  # the selected path; None until first use


def set_kernel(name: str | None = None) -> str:
    """Select the elementwise path of forward/backward and return its name.

    Parameters
    ----------
    name : "numba" (compiled one-pass kernels, the default), "numpy", or
        None for the environment variable ``QSAE_KERNEL``, else "numba" if it is installed,
        else "numpy". Both paths give the same results to rounding.
    """
    global _kernel, _kernels
    chosen = name if name is not None else os.environ.get("QSAE_KERNEL", "").strip().lower() or None
    if chosen is not None and chosen not in KERNELS:
        raise ConfigError(f"unknown kernel {chosen!r} (QSAE_KERNEL or set_kernel); choose one of: {', '.join(KERNELS)}")
    if chosen in (None, "numba"):
        try:
            compiled = importlib.import_module("._kernels", __package__)
        except ImportError as e:
            if chosen == "numba":
                raise ConfigError(f"the numba kernels need numba ({e}): pip install numba (a dependency of qsae "
                                  "that this environment lacks), or choose QSAE_KERNEL=numpy") from None
            compiled = None
        chosen = "numba" if compiled is not None else "numpy"
        _kernels = compiled
    else:
        _kernels = None
    _kernel = chosen
    return chosen


def kernel() -> str:
    """The elementwise path in use: "numba" or "numpy" (chosen by ``set_kernel`` on first use)."""
    return _kernel if _kernel is not None else set_kernel()


def _compiled() -> ModuleType | None:
    """qsae._kernels if the numba path is selected, else None."""
    if _kernel is None:
        set_kernel()
    return _kernels


def _check_X(X: np.ndarray, config: SAEConfig) -> np.ndarray:
    """X as a C-contiguous float32 or float64 array (other dtypes become float64)."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != config.n_visible:
        raise DataError(
            f"patches have shape {X.shape} but the model has n_visible={config.n_visible}; "
            f"pass an (m, {config.n_visible}) array, one patch a row"
        )
    if X.shape[0] == 0:
        raise DataError("no patches: X has 0 rows; pass at least one patch")
    dtype = X.dtype if X.dtype in DTYPES else np.float64
    if X.dtype != dtype or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=dtype)
    return X


def chunk_rows(config: SAEConfig) -> int:
    """Rows per chunk: the most that keep each product under OpenBLAS's small-matrix size.

    OpenBLAS multiplies without packing while M·N·K ≤ 10⁶; past that each product here
    gets 1.3–1.7× slower (measured on 384–1024 rows, float64 and float32 alike). Within
    the limit, bigger chunks mean fewer numpy calls: 504 rows for n = 64, h = 30. Elementwise
    passes over 2–4 chunks at once (fewer calls again) measured no faster: out of L2.
    """
    width = config.n_visible * (config.n_hidden + 1)
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, SMALL_GEMM // width // 8 * 8)))


@pinned
def hidden_exp(theta: np.ndarray, X: np.ndarray, config: SAEConfig) -> np.ndarray:
    """e^−z of the hidden layer, z = X W1ᵀ + b1, with a bias column appended: (m, h + 1), X's dtype.

    The form in which the hidden layer is kept between the two passes (and the two rounds of
    the exact protocol): both a = σ(z) = 1/(1 + u) and 1 − a = σ(−z) = u·a come out of u to
    full relative precision, so a saturated unit, whose a rounds to 1, still has its exact
    1 − p_j and f' = a(1 − a) (``hidden_sums``, ``backward``). z is taken within ±``z_cap``
    (86 in float32, 707 in float64): u, a and 1 − a are then finite normal numbers, never ∞·0
    nor a denormal, and beyond the cap every σ is 0 or 1 to the last bit anyway.

    Computed in place: −z = x·(−W1ᵀ) − b1 by row chunks, then e^−z over a few chunks at a time
    (fewer calls, still in cache). The bias column is the output layer's bias unit and comes
    out of the same passes: its weights are 0 and its bias +∞, so u = e^−cap and a = 1 exactly.
    """
    return _hidden(theta, X, config, activate=False)


@pinned
def forward(theta: np.ndarray, X: np.ndarray, config: SAEConfig) -> np.ndarray:
    """Hidden activations σ(X W1ᵀ + b1) with a column of ones appended: (m, h + 1), in X's dtype.

    What ``transform`` gives (drop the last column for the hidden layer alone); Σ a2 is
    ``activation_sums(A, config)``. The cost and the protocol keep the hidden layer as
    ``hidden_exp`` instead, from which 1 − a is exact too.
    """
    return _hidden(theta, X, config, activate=True)


def _hidden(theta: np.ndarray, X: np.ndarray, config: SAEConfig, activate: bool) -> np.ndarray:
    """e^−z (``hidden_exp``), or σ(z) with ``activate`` (``forward``), over spans of a few chunks."""
    X = _check_X(X, config)
    m, h, dt = X.shape[0], config.n_hidden, X.dtype
    rows = chunk_rows(config)
    span = rows * FORWARD_CHUNKS
    nW1T, B1 = _derived(theta, config, dt, "hidden", _hidden_weights)
    U = np.empty((m, h + 1), dtype=dt)
    nb, one, cap = _compiled(), dt.type(1), dt.type(z_cap(dt))
    for lo in range(0, m, span):
        u = U[lo : lo + span]
        for b in range(lo, min(lo + span, m), rows):
            np.matmul(X[b : b + rows], nW1T, out=U[b : b + rows])
        if nb is not None:
            nb.shift_clip(u, B1[: u.shape[0]], cap)  # −z, within ±cap, in one pass
        else:
            u -= B1[: u.shape[0]]
            np.clip(u, -cap, cap, out=u)
        np.exp(u, out=u)
        if not activate:
            continue
        if nb is not None:
            nb.sigmoid_of_exp(u, one)
        else:
            u += one
            np.divide(one, u, out=u)  # not np.reciprocal: 1.2× slower here (no SIMD loop)
    return U


def _hidden_weights(theta: np.ndarray, config: SAEConfig, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """−[W1ᵀ | 0] (n, h + 1) and [b1 | +∞] on every row of a span of chunks (a same-shape
    subtraction is 2× faster than broadcasting), in ``dt``: what ``_hidden`` multiplies by."""
    W1, _, b1, _ = unpack(theta, config)
    n, h = config.n_visible, config.n_hidden
    nW1T = np.zeros((n, h + 1), dtype=dt)
    nW1T[:, :h] = -W1.T
    b1x = np.empty(h + 1, dtype=dt)
    b1x[:h], b1x[h] = b1, np.inf
    return nW1T, np.tile(b1x, (chunk_rows(config) * FORWARD_CHUNKS, 1))


def _output_weights(theta: np.ndarray, config: SAEConfig, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """−[W2 | b2]ᵀ (h + 1, n), the output layer as one (negated) matrix, and [W2 | 0] (n, h + 1),
    in ``dt``: what ``backward`` multiplies by."""
    _, W2, _, b2 = unpack(theta, config)
    n, h = config.n_visible, config.n_hidden
    nW2bT = np.empty((h + 1, n), dtype=dt)
    nW2bT[:h], nW2bT[h] = -W2.T, -b2
    W2x = np.zeros((n, h + 1), dtype=dt)
    W2x[:, :h] = W2
    return nW2bT, W2x


_derived_of = threading.local()  # per thread: the last θ's matrices, by (which, config, dtype)


def _derived(theta: np.ndarray, config: SAEConfig, dt: np.dtype, which: str, build) -> tuple:
    """``build(θ, config, dt)``, made again only when θ's values (or the model, or the dtype)
    changed: a worker's blocks in a round share one θ, and making these matrices cost each
    block more than its passes over a few hundred rows. Read-only to the callers."""
    theta = np.asarray(theta)
    cache = _derived_of.__dict__.setdefault("cache", {})
    key = (which, config, dt)
    hit = cache.get(key)
    if hit is not None and hit[0].shape == theta.shape and (hit[0] == theta).all():  # NaN ≠ NaN: made again
        return hit[1]
    unpack(theta, config)  # checks θ's length before anything is kept
    value = build(theta, config, dt)
    cache[key] = (np.array(theta, copy=True), value)
    return value


@functools.lru_cache(maxsize=None)
def z_cap(dtype: np.dtype) -> float:
    """The |z| at which pre-activations are capped: e^±cap and σ(±cap) stay normal numbers of
    ``dtype`` (86 for float32, 707 for float64)."""
    return float(np.floor(-np.log(np.finfo(dtype).tiny)) - 1)


def _check_U(U: np.ndarray, X: np.ndarray, config: SAEConfig) -> np.ndarray:
    """The hidden layer of ``hidden_exp(θ, X)``: (m, h + 1) in X's dtype, C-contiguous."""
    U = np.asarray(U)
    if U.shape != (X.shape[0], config.n_hidden + 1):
        raise DataError(
            f"the hidden layer has shape {U.shape} but X has {X.shape[0]} rows and n_hidden={config.n_hidden}; "
            "pass U = hidden_exp(theta, X, config) for the same X"
        )
    if U.dtype != X.dtype or not U.flags.c_contiguous:
        U = np.ascontiguousarray(U, dtype=X.dtype)
    return U


@pinned
def activation_sums(A: np.ndarray, config: SAEConfig) -> np.ndarray:
    """Σ a2 over the rows of ``forward``'s A: (h,) float64, each chunk's sum added in float64.

    Use this rather than ``A[:, :h].sum(0)``: a float32 sum over a whole shard loses digits.
    """
    h, rows, m = config.n_hidden, chunk_rows(config), A.shape[0]
    ones = np.ones(min(rows, m), dtype=A.dtype)
    sums = np.empty((-(-m // rows), A.shape[1]), dtype=A.dtype)
    for i, lo in enumerate(range(0, m, rows)):
        a = A[lo : lo + rows]
        np.matmul(ones[: a.shape[0]], a, out=sums[i])
    return sums.sum(axis=0, dtype=np.float64)[:h]


def _activate(u: np.ndarray, a: np.ndarray, one: np.floating) -> None:
    """The numpy path of ``_kernels.activate``: a = 1/(1 + u)."""
    np.add(u, one, out=a)
    np.divide(one, a, out=a)


def _complement(u: np.ndarray, a: np.ndarray, q: np.ndarray, one: np.floating) -> None:
    """q = 1 − a = σ(−z) = u·a from u = e^−z and a = σ(z): exact where a rounds to 1 (u is finite: ``z_cap``)."""
    np.multiply(u, a, out=q)


@pinned
def hidden_sums(U: np.ndarray, config: SAEConfig) -> np.ndarray:
    """[Σ a2 | Σ (1 − a2)] over the rows of ``hidden_exp``'s U: (2h,) float64.

    Σ (1 − a2) is summed as its own statistic from u = e^−z, so 1 − p_j is exact even where
    every σ(z) rounds to 1 (inputs far outside [0, 1]); each chunk's sums are added in float64.
    Divided by m they are the ``rates`` of ``sparsity_delta`` and the KL term.
    """
    U = np.asarray(U)
    if U.ndim != 2 or U.shape[1] != config.n_hidden + 1 or U.dtype not in DTYPES:
        raise DataError(f"the hidden layer has shape {U.shape} and dtype {U.dtype} but n_hidden={config.n_hidden}; "
                        "pass U = hidden_exp(theta, X, config)")
    U = np.ascontiguousarray(U)
    h, rows, m, dt = config.n_hidden, chunk_rows(config), U.shape[0], U.dtype
    k0 = min(rows, m)
    col = np.zeros((-(-m // rows), 2, U.shape[1]), dtype=dt)
    nb, one = _compiled(), dt.type(1)
    if nb is None:
        a, q, ones = np.empty((k0, U.shape[1]), dt), np.empty((k0, U.shape[1]), dt), np.ones(k0, dt)
    for i, lo in enumerate(range(0, m, rows)):
        u = U[lo : lo + rows]
        if nb is not None:
            nb.rate_sums(u, col[i], one)
        else:
            k = u.shape[0]
            _activate(u, a[:k], one)
            _complement(u, a[:k], q[:k], one)
            np.matmul(ones[:k], a[:k], out=col[i, 0])
            np.matmul(ones[:k], q[:k], out=col[i, 1])
    cs = col.sum(axis=0, dtype=np.float64)
    return np.concatenate([cs[0, :h], cs[1, :h]])


def _output_delta(o: np.ndarray, x: np.ndarray, d: np.ndarray, one: np.floating) -> float:
    """The numpy path of ``_kernels.output_delta``: o = e^−z3 in (overwritten); δ3 into d;
    returns Σ (a3 − x)²."""
    o += one
    np.divide(one, o, out=o)  # a3 = 1/(1 + e^−z3)
    np.subtract(o, x, out=d)  # a3 − x
    sq = np.vdot(d, d)
    d *= o
    np.subtract(one, o, out=o)
    d *= o  # δ3 = (a3 − x) ⊙ a3 ⊙ (1 − a3)
    return sq


def _hidden_delta(d2: np.ndarray, a: np.ndarray, u: np.ndarray, S: np.ndarray | None, f: np.ndarray,
                  q: np.ndarray, col: np.ndarray, one_round: bool, ones: np.ndarray) -> None:
    """The numpy path of ``_kernels.hidden_delta``: δ2 = (d2 + S) ⊙ f' in place, f = f' = a ⊙ q
    with q = 1 − a exact (``_complement``); col[0] = Σ δ2, col[1] = Σ a, col[2] = Σ q (and
    col[3] = Σ f' with ``one_round``)."""
    one = a.dtype.type(1)
    _complement(u, a, q, one)
    np.multiply(a, q, out=f)  # f' = a2 ⊙ (1 − a2)
    if S is not None:
        d2 += S
    d2 *= f  # δ2
    np.matmul(ones, d2, out=col[0])
    np.matmul(ones, a, out=col[1])
    np.matmul(ones, q, out=col[2])
    if one_round:
        np.matmul(ones, f, out=col[3])


@pinned
def backward(
    theta: np.ndarray,
    X: np.ndarray,
    U: np.ndarray,
    s: np.ndarray | None,
    config: SAEConfig,
    one_round: bool = False,
) -> Sums:
    """Sums of the shard given its hidden layer ``U`` (from ``hidden_exp``).

    Parameters
    ----------
    theta : (n_params,) weights.
    X : (m, n) patches of this shard, float32 or float64: the products and elementwise
        passes run in this dtype.
    U : (m, h + 1) output of ``hidden_exp(theta, X)``: e^−z of the hidden layer.
    s : (h,) sparsity delta ``sparsity_delta`` of the global rates, folded into the hidden
        deltas (two-round protocol); None for none (one-round protocol, which returns
        Σ f'xᵀ and Σ f' instead).
    one_round : also accumulate Σ f' xᵀ and Σ f' (one extra h×n product per row chunk).

    Returns
    -------
    Sums over the rows of X (float64: each row chunk's sums are added in float64); Σ a2 and
    Σ (1 − a2) are included.

    Per row chunk, a = 1/(1 + u) first (one pass, in cache), then the output layer and the
    deltas; f' = a ⊙ (1 − a) with 1 − a from u, so it is exact where a rounds to 1. The
    hidden side works on whole rows of (h + 1) columns: W2's extra column and s's extra
    entry are 0 and the ones column has f' = 0, so the extra column of every hidden
    quantity is 0 and is dropped at the end.
    """
    X = _check_X(X, config)
    U = _check_U(U, X, config)
    m, n, h, dt = X.shape[0], config.n_visible, config.n_hidden, X.dtype
    nW2bT, W2x = _derived(theta, config, dt, "output", _output_weights)
    rows = chunk_rows(config)
    k0 = min(rows, m)
    S = np.zeros((k0, h + 1), dtype=dt)  # [s | 0] on every row: a same-shape addition is 2× faster than broadcasting
    if s is not None:
        big = np.finfo(dt).max / 16  # s of a unit whose 1 − p underflowed meets f' = 0 there: keep ∞·0 out
        S[:, :h] = np.clip(s, -big, big)
    nc = -(-m // rows)
    gW1, gW2b, fx = np.zeros((h, n)), np.zeros((n, h + 1)), np.zeros((h, n))  # float64 accumulators
    col = np.zeros((nc, 4, h + 1), dtype=dt)  # per chunk: Σ δ2, Σ a2, Σ (1 − a2), Σ f'
    sq = np.empty(nc, dtype=dt)  # per chunk: Σ ||a3 − x||²
    P1, P2 = np.empty((h, n), dtype=dt), np.empty((n, h + 1), dtype=dt)  # one chunk's products
    full = (np.empty((k0, n), dtype=dt), np.empty((k0, n), dtype=dt), np.empty((k0, h + 1), dtype=dt),
            np.empty((k0, h + 1), dtype=dt), np.empty((k0, h + 1), dtype=dt), np.empty((k0, h + 1), dtype=dt),
            np.ones(k0, dtype=dt), S)
    nb, one = _compiled(), dt.type(1)
    with np.errstate(over="ignore"):  # e^−z3 = ∞: a3 = 0, as it is
        for i, lo in enumerate(range(0, m, rows)):
            x, u = X[lo : lo + rows], U[lo : lo + rows]
            o, d, a, f, d2, q, ones, Sk = full if x.shape[0] == k0 else (v[: x.shape[0]] for v in full)
            if nb is not None:
                nb.activate(u, a, one)
            else:
                _activate(u, a, one)
            np.matmul(a, nW2bT, out=o)  # −z3
            np.exp(o, out=o)
            if nb is not None:
                sq[i] = nb.output_delta(o, x, d, one)
            else:
                sq[i] = _output_delta(o, x, d, one)
            np.matmul(d.T, a, out=P2)
            gW2b += P2  # [Σ δ3 a2ᵀ | Σ δ3]
            np.matmul(d, W2x, out=d2)
            if nb is not None:
                nb.hidden_delta(d2, a, u, S[0], f, col[i], one_round)
            else:
                _hidden_delta(d2, a, u, Sk if s is not None else None, f, q, col[i], one_round, ones)
            np.matmul(d2[:, :h].T, x, out=P1)  # h rows, not h + 1: an odd width is 1.3× slower here
            gW1 += P1
            if one_round:
                np.matmul(f[:, :h].T, x, out=P1)
                fx += P1
    cs = col.sum(axis=0, dtype=np.float64)
    parts = [gW1.ravel(), gW2b[:, :h].ravel(), cs[0, :h], gW2b[:, h], [sq.sum(dtype=np.float64)],
             cs[1, :h], cs[2, :h]]
    if one_round:
        parts += [fx.ravel(), cs[3, :h]]
    return Sums(m, np.concatenate(parts))


@pinned
def shard_sums(theta: np.ndarray, X: np.ndarray, config: SAEConfig) -> Sums:
    """One-round sums of a shard: everything the exact cost needs, in one pass."""
    return backward(theta, X, hidden_exp(theta, X, config), None, config, one_round=True)


def _rates(rates: np.ndarray, config: SAEConfig) -> tuple[np.ndarray, np.ndarray]:
    """(p, 1 − p) from ``rates``: p (h,), or [p | 1 − p] (2h,); each at least ``RATE_FLOOR``."""
    h = config.n_hidden
    rates = np.asarray(rates, dtype=np.float64)
    if rates.shape == (2 * h,):
        p, q = rates[:h], rates[h:]
    elif rates.shape == (h,):
        p, q = rates, 1.0 - rates
    else:
        raise DataError(f"firing rates have shape {rates.shape} but n_hidden={h}; pass p ({h},) or "
                        f"[p | 1 − p] ({2 * h},), hidden_sums(U, config) / m")
    return np.maximum(p, RATE_FLOOR), np.maximum(q, RATE_FLOOR)


def sparsity_delta(rates: np.ndarray, config: SAEConfig) -> np.ndarray:
    """s = β(−ρ/p + (1−ρ)/(1−p)), the derivative of β Σ KL(ρ||p_j) in p, per hidden unit.

    ``rates`` is p (h,) — then 1 − p is computed here — or [p | 1 − p] (2h,), as
    ``hidden_sums(U, config) / m`` gives them: exact 1 − p where p rounds to 1.
    """
    p, q = _rates(rates, config)
    rho, beta = config.sparsity_target, config.sparsity_weight
    return beta * (-rho / p + (1.0 - rho) / q)


def _kl(rates: np.ndarray, config: SAEConfig) -> float:
    """Σ_j KL(ρ || p_j), from p and 1 − p as ``sparsity_delta`` takes them."""
    p, q = _rates(rates, config)
    rho = config.sparsity_target
    return float(np.sum(rho * np.log(rho / p) + (1.0 - rho) * np.log((1.0 - rho) / q)))


def _reconstruction_and_decay(theta: np.ndarray, total: Sums, config: SAEConfig) -> tuple[float, np.ndarray]:
    """The reconstruction + weight-decay part of (cost, grad) from summed shard results.

    W1 and W2 are θ's first 2·n·h entries, so the decay is one dot product and one update
    (this runs on the master every round).
    """
    unpack(theta, config)  # checks θ's length
    P, m, lam = config.n_params, total.m, config.weight_decay
    W = np.asarray(theta)[: 2 * config.n_visible * config.n_hidden]
    cost = total.vec[P] / (2 * m) + 0.5 * lam * np.vdot(W, W)
    grad = total.vec[:P] / m
    grad[: W.size] += lam * W
    return float(cost), grad


def finish_sums(theta: np.ndarray, total: Sums, config: SAEConfig, s_folded: bool) -> tuple[float, np.ndarray]:
    """Cost and gradient of the whole data set from the sum of every shard's ``Sums``.

    ``s_folded`` says whether the shards already folded the sparsity delta into their
    backward pass (two rounds); otherwise ``total`` must carry Σ f'xᵀ and Σ f' (one round).
    The master runs this every evaluation: the numba path does it in one compiled call
    (``_kernels.finish``), where the numpy path makes some 25 calls — after each sleep in
    poll those ran cold, 0.13 ms an evaluation.
    """
    kernels = _compiled()
    v = total.vec
    if kernels is not None and type(v) is np.ndarray and v.dtype == np.float64 and v.flags.c_contiguous \
            and v.shape == (Sums.size(config, one_round=not s_folded),):
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        if theta.shape != (config.n_params,):
            unpack(theta, config)  # raises, naming the length θ needs
        grad = np.empty(config.n_params)
        cost = kernels.finish(theta, v, float(total.m), config.n_hidden, config.n_visible, config.weight_decay,
                              config.sparsity_weight, config.sparsity_target, RATE_FLOOR, not s_folded, grad)
        return cost, grad
    return _finish_sums(theta, total, config, s_folded)


@pinned
def _finish_sums(theta: np.ndarray, total: Sums, config: SAEConfig, s_folded: bool) -> tuple[float, np.ndarray]:
    """The numpy path of ``finish_sums`` (``_kernels.finish``)."""
    h, n, P, m = config.n_hidden, config.n_visible, config.n_params, total.m
    v = total.vec
    rates = v[P + 1 : P + 1 + 2 * h] / m  # [p | 1 − p]
    cost, grad = _reconstruction_and_decay(theta, total, config)
    cost += config.sparsity_weight * _kl(rates, config)
    if not s_folded:
        g = unpack(grad, config)
        sm = sparsity_delta(rates, config) / m
        fx = v[P + 1 + 2 * h : P + 1 + 2 * h + h * n].reshape(h, n)
        fsum = v[P + 1 + 2 * h + h * n :]
        g.W1[...] += sm[:, None] * fx
        g.b1[...] += sm * fsum
    return cost, grad


@pinned
def cost_and_grad(theta: np.ndarray, X: np.ndarray, config: SAEConfig) -> tuple[float, np.ndarray]:
    """Cost J(θ) and its gradient on the patches X (m, n), in this process.

    Two passes over X in cache-sized row chunks: the hidden layer of every row first (for
    the global firing rates p and 1 − p), then the output layer and the backward pass with
    the sparsity delta folded in — five m·n·h products in all, no temporaries of size m·n.
    """
    U = hidden_exp(theta, X, config)
    s = sparsity_delta(hidden_sums(U, config) / U.shape[0], config)
    return finish_sums(theta, backward(theta, X, U, s, config), config, s_folded=True)


@pinned
def minibatch_cost_and_grad(
    theta: np.ndarray, X: np.ndarray, config: SAEConfig
) -> tuple[float, np.ndarray, np.ndarray]:
    """Reconstruction + weight-decay cost and gradient of a minibatch, and its firing rates.

    The report's SGD (§2.1) steps on this cost and enforces sparsity separately, by nudging
    b1 with the returned per-unit mean activation (h,).
    """
    sums = backward(theta, X, hidden_exp(theta, X, config), None, config)
    cost, grad = _reconstruction_and_decay(theta, sums, config)
    P, h = config.n_params, config.n_hidden
    return cost, grad, sums.vec[P + 1 : P + 1 + h] / sums.m
