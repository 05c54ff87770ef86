"""One evaluation of the sparse-autoencoder cost in float64 and float32, against the machine's limit and a textbook version.

Run: python benchmarks/bench_model.py [--sizes 1000,10000,100000,1000000] [--repeat 5]
     python benchmarks/bench_model.py --passes [--sizes 100000]     # where the time goes, pass by pass
     python benchmarks/bench_model.py --startup                     # a worker's start-up, cold and warm

Prints one table: for each m and each elementwise path (numpy; numba, a dependency), the CPU milliseconds of one ``cost_and_grad`` on float64 and on float32
patches (one BLAS thread), the compute limit of each dtype (the 5 products of 2·m·n·h flops
at the rate this machine reaches on a large square matmul of that dtype), a plain textbook
numpy implementation (float64), the five products alone in the same row chunks (what BLAS
reaches on these tall, thin shapes), and the ratios.

Every figure of a row is timed in the same rounds: each round times every candidate once,
in turn, and the fastest round of each is kept, so a noisy neighbour slows all of them
alike and the ratios within a row hold. Targets at m = 100K: float64 ≤ 2.0× its limit and
≤ 0.45× the textbook version; float32 ≤ 0.50× float64.

``--passes`` times each pass of one ``cost_and_grad`` (the same calls, in the same row chunks)
in both dtypes, every pass summed over the chunks: which one keeps float32 from half of float64.
``--startup`` times a worker from its process start to its HELLO (``Master(workers=1)``
started and closed), with numba's kernel cache cold (a fresh ``NUMBA_CACHE_DIR``), warm (the
same folder again), and on the numpy path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from qsae import model  # noqa: E402
from qsae.bench import machine  # noqa: E402
from qsae.model import SAEConfig, chunk_rows, cost_and_grad, init_params, set_kernel  # noqa: E402
from qsae.reference import textbook_cost_and_grad  # noqa: E402


def products_only(theta: np.ndarray, X: np.ndarray, cfg: SAEConfig) -> None:
    """The five m·n·h products of one evaluation in the same row chunks and X's dtype, nothing
    else: the floor for any numpy implementation that calls BLAS on these shapes."""
    n, h, m, dt = cfg.n_visible, cfg.n_hidden, X.shape[0], X.dtype
    B = chunk_rows(cfg)
    W1T = np.ascontiguousarray(theta[: h * n].reshape(h, n).T, dtype=dt)
    W2 = np.ascontiguousarray(theta[h * n : 2 * h * n].reshape(n, h), dtype=dt)
    W2T = np.ascontiguousarray(W2.T)
    a, o, d2 = np.empty((B, h), dt), np.empty((B, n), dt), np.empty((B, h), dt)
    for lo in range(0, m, B):
        x = X[lo : lo + B]
        k = x.shape[0]
        np.matmul(x, W1T, out=a[:k])
        np.matmul(a[:k], W2T, out=o[:k])
        o[:k].T @ a[:k]
        np.matmul(o[:k], W2, out=d2[:k])
        d2[:k].T @ x


def interleaved_best(fs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """CPU seconds of each callable: the fastest of ``rounds`` rounds, each round timing every
    callable once in turn (after one warm-up round)."""
    best = {name: float("inf") for name in fs}
    for r in range(rounds + 1):
        for name, f in fs.items():
            t0 = time.process_time()
            f()
            t = time.process_time() - t0
            if r:
                best[name] = min(best[name], t)
    return best


def square_matmul(dtype: type) -> Callable[[], object]:
    """A 1000×1000 matmul of ``dtype`` (2·10⁹ flops): the large-matmul rate of the limit."""
    rng = np.random.default_rng(0)
    A, B = rng.random((1000, 1000)).astype(dtype), rng.random((1000, 1000)).astype(dtype)
    return lambda: A @ B


HEAD = ("|       m | path  | f64 ms | f32 ms | f64 limit ms | f32 limit ms | f64 products ms | textbook ms |"
        " f64/limit | f32/limit | f64 products/limit | f64/textbook | f32/textbook | f32/f64 |")
RULE = "|--------:|:------|" + "-------:|" * 2 + "-------------:|" * 2 + "----------------:|------------:|" + "----------:|" * 2 \
    + "-------------------:|-------------:|-------------:|--------:|"


def kernels() -> list[str]:
    """The elementwise paths this machine can run: numpy, and numba if installed."""
    return ["numpy", "numba"] if importlib.util.find_spec("numba") else ["numpy"]


def on(path: str, f: Callable[[], object]) -> Callable[[], object]:
    """``f`` run on the elementwise ``path``."""
    def g() -> object:
        set_kernel(path)
        return f()
    return g


def rows(m: int, cfg: SAEConfig, theta: np.ndarray, X: np.ndarray, repeat: int) -> list[str]:
    """The table's lines for m rows of X (float64): one per elementwise path, all timed in the same rounds."""
    n, h = cfg.n_visible, cfg.n_hidden
    X32 = X.astype(np.float32)
    rounds = max(1, min(repeat, int(2e6 // m) + 1)) if m > 100_000 else repeat
    fs: dict[str, Callable[[], object]] = {}
    for path in kernels():
        fs[f"{path} f64"] = on(path, lambda: cost_and_grad(theta, X, cfg))
        fs[f"{path} f32"] = on(path, lambda: cost_and_grad(theta, X32, cfg))
    fs.update({
        "text": lambda: textbook_cost_and_grad(theta, X, cfg),
        "prod": lambda: products_only(theta, X, cfg),
        "mm64": square_matmul(np.float64),
        "mm32": square_matmul(np.float32),
    })
    t = interleaved_best(fs, rounds)
    set_kernel()
    lim64, lim32 = (5 * 2 * m * n * h / (2e9 / t[k]) for k in ("mm64", "mm32"))
    lines = []
    for path in kernels():
        f64, f32 = t[f"{path} f64"], t[f"{path} f32"]
        lines.append(
            f"| {m:7d} | {path:5s} | {f64 * 1e3:6.2f} | {f32 * 1e3:6.2f} | {lim64 * 1e3:12.2f} | {lim32 * 1e3:12.2f} |"
            f" {t['prod'] * 1e3:15.2f} | {t['text'] * 1e3:11.2f} | {f64 / lim64:9.2f} | {f32 / lim32:9.2f} |"
            f" {t['prod'] / lim64:18.2f} | {f64 / t['text']:12.2f} | {f32 / t['text']:12.2f} | {f32 / f64:7.2f} |")
    return lines


PASSES = ("z1 = x·W1ᵀ", "e^−z1", "Σa, Σ(1−a)", "a = σ(z1)", "z3 = a·W2ᵀ", "e^−z3", "δ3, Σ(a3−x)²", "δ3ᵀ·a",
          "δ3·W2", "δ2, Σδ2", "δ2ᵀ·x")


def passes(theta: np.ndarray, X: np.ndarray, cfg: SAEConfig) -> dict[str, float]:
    """CPU seconds of each pass of one ``cost_and_grad(θ, X)``, summed over the row chunks: the
    same calls as qsae.model's, one timer around each."""
    t = dict.fromkeys(PASSES, 0.0)
    clock = time.process_time

    def timed(name: str, f: Callable, *args):
        t0 = clock()
        out = f(*args)
        t[name] += clock() - t0
        return out

    n, h, m, dt = cfg.n_visible, cfg.n_hidden, X.shape[0], X.dtype
    W1, W2, b1, b2 = model.unpack(theta, cfg)
    nb, one, rows = model._compiled(), dt.type(1), chunk_rows(cfg)
    nW1T = np.zeros((n, h + 1), dt)
    nW1T[:, :h] = -W1.T
    B1, cap = np.tile(np.r_[b1, np.inf].astype(dt), (rows * model.FORWARD_CHUNKS, 1)), dt.type(model.z_cap(dt))
    U = np.empty((m, h + 1), dt)
    span = rows * model.FORWARD_CHUNKS
    for lo in range(0, m, span):
        u = U[lo : lo + span]
        for b in range(lo, min(lo + span, m), rows):
            timed("z1 = x·W1ᵀ", np.matmul, X[b : b + rows], nW1T, U[b : b + rows])
        if nb:
            timed("e^−z1", lambda: (nb.shift_clip(u, B1[: u.shape[0]], cap), np.exp(u, out=u)))
        else:
            timed("e^−z1", lambda: (np.subtract(u, B1[: u.shape[0]], out=u), np.clip(u, -cap, cap, out=u),
                                    np.exp(u, out=u)))
    s = model.sparsity_delta(timed("Σa, Σ(1−a)", model.hidden_sums, U, cfg) / m, cfg)
    nW2bT = np.empty((h + 1, n), dt)
    nW2bT[:h], nW2bT[h] = -W2.T, -b2
    W2x = np.zeros((n, h + 1), dt)
    W2x[:, :h] = W2
    S = np.zeros((rows, h + 1), dt)
    S[:, :h] = s
    o, d, a, f, d2, q = (np.empty((rows, w), dt) for w in (n, n, h + 1, h + 1, h + 1, h + 1))
    col, ones = np.zeros((4, h + 1), dt), np.ones(rows, dt)
    P1, P2 = np.empty((h, n), dt), np.empty((n, h + 1), dt)
    for lo in range(0, m - rows + 1, rows):  # whole chunks
        x, u = X[lo : lo + rows], U[lo : lo + rows]
        timed("a = σ(z1)", nb.activate if nb else model._activate, u, a, one)
        timed("z3 = a·W2ᵀ", np.matmul, a, nW2bT, o)
        timed("e^−z3", np.exp, o, o)
        timed("δ3, Σ(a3−x)²", nb.output_delta if nb else model._output_delta, o, x, d, one)
        timed("δ3ᵀ·a", np.matmul, d.T, a, P2)
        timed("δ3·W2", np.matmul, d, W2x, d2)
        if nb:
            timed("δ2, Σδ2", nb.hidden_delta, d2, a, u, S[0], f, col, False)
        else:
            timed("δ2, Σδ2", model._hidden_delta, d2, a, u, S, f, q, col, False, ones)
        timed("δ2ᵀ·x", np.matmul, d2[:, :h].T, x, P1)
    return t


def pass_table(m: int, cfg: SAEConfig, theta: np.ndarray, X: np.ndarray, repeat: int) -> list[str]:
    """One line per pass: ms in float64 and float32 on each path (best of ``repeat``, interleaved), and f32/f64."""
    X32 = X.astype(np.float32)
    best: dict[tuple[str, str], dict[str, float]] = {}
    for r in range(repeat + 1):
        for path in kernels():
            set_kernel(path)
            for name, data in (("f64", X), ("f32", X32)):
                got = passes(theta, data, cfg)
                if r:
                    old = best.setdefault((path, name), dict.fromkeys(PASSES, float("inf")))
                    for k, v in got.items():
                        old[k] = min(old[k], v)
    set_kernel()
    lines = [f"\n# each pass of one evaluation at m = {m}, CPU ms summed over the chunks (best of {repeat})\n",
             "| pass | " + " | ".join(f"{p} f64 | {p} f32 | {p} f32/f64" for p in kernels()) + " |",
             "|:--|" + "---:|---:|---:|" * len(kernels())]
    for k in (*PASSES, "all"):
        cells = []
        for p in kernels():
            a64 = sum(best[(p, "f64")].values()) if k == "all" else best[(p, "f64")][k]
            a32 = sum(best[(p, "f32")].values()) if k == "all" else best[(p, "f32")][k]
            cells.append(f"{a64 * 1e3:.2f} | {a32 * 1e3:.2f} | {a32 / a64:.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


_HELLO = """
import time
from qsae import Master
master = Master(workers=1, start_timeout=120)
t0 = time.perf_counter()
with master:  # start() launches the worker and returns at its HELLO
    print(time.perf_counter() - t0)
"""


def startup(repeat: int) -> list[str]:
    """Seconds from a worker's process start to its HELLO: numba cache cold, warm; the numpy path.

    Each run is a fresh Python process with a Master(workers=1), timed from ``start()`` (which
    launches the worker) to its return at the worker's HELLO."""
    cache = tempfile.mkdtemp(prefix="qsae-numba-cache-")
    runs = {"numba, cold cache": {"NUMBA_CACHE_DIR": cache}, "numba, warm cache": {"NUMBA_CACHE_DIR": cache},
            "numpy path": {"QSAE_KERNEL": "numpy"}}
    lines = ["\n# a worker's start-up: process start to HELLO, seconds (fresh processes; best of "
             f"{repeat} for the warm and numpy rows, the cold row once)\n", "| kernels | seconds |", "|:--|---:|"]
    for name, env in runs.items():
        best = float("inf")
        for _ in range(1 if "cold" in name else repeat):
            p = subprocess.run([sys.executable, "-c", _HELLO], env={**os.environ, **env}, capture_output=True,
                               text=True, timeout=300)
            if p.returncode:
                raise SystemExit(p.stderr)
            best = min(best, float(p.stdout.split()[-1]))
        lines.append(f"| {name} | {best:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated m")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per row (the fastest of each is kept)")
    ap.add_argument("--passes", action="store_true", help="time each pass of one evaluation instead (at --sizes)")
    ap.add_argument("--startup", action="store_true", help="time a worker's start-up to HELLO instead")
    args = ap.parse_args()
    cfg = SAEConfig()
    rng = np.random.default_rng(0)
    theta = init_params(cfg, seed=0)
    print(f"# {machine()}; n={cfg.n_visible}, h={cfg.n_hidden}, CPU ms, rows per chunk {chunk_rows(cfg)}")
    if args.startup:
        print("\n".join(startup(args.repeat)))
        return
    if args.passes:
        for m in (int(s) for s in args.sizes.split(",")):
            print("\n".join(pass_table(m, cfg, theta, rng.uniform(0.1, 0.9, size=(m, cfg.n_visible)), args.repeat)))
        return
    print(HEAD)
    print(RULE)
    for m in (int(s) for s in args.sizes.split(",")):
        print("\n".join(rows(m, cfg, theta, rng.uniform(0.1, 0.9, size=(m, cfg.n_visible)), args.repeat)), flush=True)


if __name__ == "__main__":
    main()
