"""Compiled elementwise passes of the model (numba): the optional fast path of ``qsae.model``.

Each kernel does in one pass over a row chunk what the numpy path does in several calls;
the products stay in BLAS and e^u stays in numpy (its SIMD exp; numba's is scalar without
Intel's SVML). Results equal the numpy path's to rounding (sums are added in another
order). Measured by ``benchmarks/bench_model.py``: about 0.9× the numpy path's time in
float64 and in float32 at 100K patches. ``finish`` is the master's last step of every
evaluation (``model.finish_sums``) in one call instead of some 25 numpy calls, which ran
cold after each sleep in poll; it uses no fastmath, so each element is the numpy path's.

``error_model="numpy"`` lets 1/(1 + e) vectorise (numba's default checks every division
for zero, which keeps the loop scalar); ``fastmath`` is limited to reassociation (the sums
vectorise), contraction (FMA), no signed zeros and reciprocal division: NaN and ∞ still
propagate, so a diverging run is still caught. The signatures are compiled when this module
is first imported and cached on disk (``cache=True``: next to this file, else in numba's
user cache folder, ``NUMBA_CACHE_DIR`` if set), so no round pays for compiling and a
process after the first loads them in a fraction of a second; where no cache folder is
writable they are compiled without one (each process then compiles, 1–2 s).

numba is a dependency of qsae; select with ``QSAE_KERNEL=numba|numpy`` or
``qsae.model.set_kernel``.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["output_delta", "hidden_delta", "sigmoid_of_exp", "activate", "rate_sums", "shift_clip", "finish"]

_FLAGS = dict(error_model="numpy", fastmath={"reassoc", "contract", "nsz", "arcp"}, nogil=True, boundscheck=False)


def _jit(sigs, flags: dict = _FLAGS):
    """numba.njit with ``flags``, cached on disk where a cache folder is writable."""
    def deco(fn):
        try:
            return numba.njit(sigs, cache=True, **flags)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available": compile without a cache
            return numba.njit(sigs, cache=False, **flags)(fn)
    return deco


def _sigs(template: str) -> list[str]:
    return [template.replace("T", t) for t in ("float64", "float32")]


def _output_delta_sigs() -> list:
    """x may be read-only (a memory-mapped file, a zmq frame): numba types that apart."""
    out = []
    for t in (numba.float64, numba.float32):
        rw = numba.types.Array(t, 2, "C")
        for x in (rw, numba.types.Array(t, 2, "C", readonly=True)):
            out.append(t(rw, x, rw, t))
    return out


@_jit(_output_delta_sigs())
def output_delta(o, x, d, one):  # pragma: no cover (compiled)
    """o holds e^−z3 (k, n); writes δ3 = (a3 − x) ⊙ a3 ⊙ (1 − a3) into d; returns Σ (a3 − x)²."""
    sq = one - one
    of, xf, df = o.reshape(-1), x.reshape(-1), d.reshape(-1)  # one flat loop: whole vectors across rows
    for i in range(of.size):
        a = one / (one + of[i])
        r = a - xf[i]
        sq += r * r
        df[i] = r * (a - a * a)
    return sq


@_jit(_sigs("void(T[:, ::1], T[:, ::1], T[:, ::1], T[::1], T[:, ::1], T[:, ::1], boolean)"))
def hidden_delta(d2, a, u, s, f, col, one_round):  # pragma: no cover (compiled)
    """δ2 = (d2 + s) ⊙ f' in place, f' = a ⊙ q with q = 1 − a = u·a from u = e^−z (exact where
    a rounds to 1); col[0] = Σ δ2, col[1] = Σ a, col[2] = Σ q over the rows; with
    ``one_round`` also f = f' and col[3] = Σ f'."""
    k, w = d2.shape
    c0, c1, c2, c3 = col[0], col[1], col[2], col[3]
    for i in range(k):
        for j in range(w):
            aj = a[i, j]
            qj = u[i, j] * aj
            fj = aj * qj
            v = (d2[i, j] + s[j]) * fj
            d2[i, j] = v
            c0[j] += v
            c1[j] += aj
            c2[j] += qj
            if one_round:
                f[i, j] = fj
                c3[j] += fj


@_jit(_sigs("void(T[:, ::1], T)"))
def sigmoid_of_exp(u, one):  # pragma: no cover (compiled)
    """u := 1/(1 + u) in place: σ(z) from u = e^−z."""
    uf = u.reshape(-1)
    for i in range(uf.size):
        uf[i] = one / (one + uf[i])


@_jit(_sigs("void(T[:, ::1], T[:, ::1], T)"))
def activate(u, a, one):  # pragma: no cover (compiled)
    """a = 1/(1 + u): σ(z) from u = e^−z, into a."""
    uf, af = u.reshape(-1), a.reshape(-1)
    for i in range(uf.size):
        af[i] = one / (one + uf[i])


@_jit(_sigs("void(T[:, ::1], T[:, ::1], T)"))
def rate_sums(u, col, one):  # pragma: no cover (compiled)
    """col[0] += Σ a, col[1] += Σ (1 − a) over the rows, a = σ(z) from u = e^−z; 1 − a as
    u·a (exact where a rounds to 1)."""
    k, w = u.shape
    c0, c1 = col[0], col[1]
    for i in range(k):
        for j in range(w):
            uj = u[i, j]
            aj = one / (one + uj)
            c0[j] += aj
            c1[j] += uj * aj


@_jit(_sigs("void(T[:, ::1], T[:, ::1], T)"))
def shift_clip(u, B, cap):  # pragma: no cover (compiled)
    """u := u − B within ±cap, in place (B of u's shape): −z from x·(−W1ᵀ) and the tiled b1.

    One flat loop over both (same-shape, contiguous): it vectorises as numpy's subtraction does,
    where a row-by-row loop over h + 1 = 31 columns ran 3× slower in float32."""
    uf, bf = u.reshape(-1), B.reshape(-1)
    for i in range(uf.size):
        v = uf[i] - bf[i]
        if v < -cap:  # comparisons, not min/max: NaN stays NaN
            v = -cap
        elif v > cap:
            v = cap
        uf[i] = v


def _finish_sigs() -> list:
    """θ and the summed vector may each be read-only (a zmq frame, a memory-mapped model)."""
    f8 = numba.float64
    rw, ro = numba.types.Array(f8, 1, "C"), numba.types.Array(f8, 1, "C", readonly=True)
    return [f8(t, v, f8, numba.int64, numba.int64, f8, f8, f8, f8, numba.boolean, rw)
            for t in (rw, ro) for v in (rw, ro)]


# the master's reduce: no fastmath (each element computed as the numpy path computes it)
@_jit(_finish_sigs(), dict(error_model="numpy", nogil=True, boundscheck=False))
def finish(theta, v, m, h, n, lam, beta, rho, floor, one_round, grad):  # pragma: no cover (compiled)
    """``model.finish_sums`` in one call: the cost from the summed vector ``v`` of ``m`` rows
    (``Sums.vec``) and θ; the gradient into ``grad`` (n_params,). With ``one_round`` the
    sparsity delta is applied here from Σ f'xᵀ and Σ f' (else the shards folded it in).
    Elementwise the numpy path's operations in its order (same bits); the two sums (Σ W², the
    KL terms) are added in order, not pairwise."""
    nw = 2 * h * n
    P = nw + h + n
    ww = 0.0
    for i in range(nw):
        w = theta[i]
        ww += w * w
        grad[i] = v[i] / m + lam * w
    for i in range(nw, P):
        grad[i] = v[i] / m
    cost = v[P] / (2.0 * m) + 0.5 * lam * ww
    kl = 0.0
    r1 = 1.0 - rho
    for j in range(h):
        p = v[P + 1 + j] / m
        q = v[P + 1 + h + j] / m
        if p < floor:  # comparisons, not max: NaN stays NaN
            p = floor
        if q < floor:
            q = floor
        kl += rho * np.log(rho / p) + r1 * np.log(r1 / q)
        if one_round:
            sm = beta * (-rho / p + r1 / q) / m
            fx = P + 1 + 2 * h + j * n
            for i in range(n):
                grad[j * n + i] += sm * v[fx + i]
            grad[nw + j] += sm * v[P + 1 + 2 * h + h * n + j]
    return cost + beta * kl
