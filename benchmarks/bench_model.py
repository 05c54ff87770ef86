"""One evaluation of the sparse-autoencoder cost in float64 and float32, against the machine's limit and a textbook version.

Run: python benchmarks/bench_model.py [--sizes 1000,10000,100000,1000000] [--repeat 5]

Prints one table: for each m and each elementwise path (numpy; numba where installed, the
qsae[fast] extra), the CPU milliseconds of one ``cost_and_grad`` on float64 and on float32
patches (one BLAS thread), the compute limit of each dtype (the 5 products of 2·m·n·h flops
at the rate this machine reaches on a large square matmul of that dtype), a plain textbook
numpy implementation (float64), the five products alone in the same row chunks (what BLAS
reaches on these tall, thin shapes), and the ratios.

Every figure of a row is timed in the same rounds: each round times every candidate once,
in turn, and the fastest round of each is kept, so a noisy neighbour slows all of them
alike and the ratios within a row hold. Targets at m = 100K: float64 ≤ 2.0× its limit and
≤ 0.45× the textbook version; float32 ≤ 0.50× float64.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from typing import Callable

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

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


def blas_name() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')}" for i in threadpool_info())
    except ImportError:
        return "unknown (pip install threadpoolctl)"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated m")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per row (the fastest of each is kept)")
    args = ap.parse_args()
    cfg = SAEConfig()
    rng = np.random.default_rng(0)
    theta = init_params(cfg, seed=0)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, BLAS: {blas_name()}, "
          f"n={cfg.n_visible}, h={cfg.n_hidden}, 1 thread, CPU ms, rows per chunk {chunk_rows(cfg)}")
    print(HEAD)
    print(RULE)
    for m in (int(s) for s in args.sizes.split(",")):
        print("\n".join(rows(m, cfg, theta, rng.uniform(0.1, 0.9, size=(m, cfg.n_visible)), args.repeat)), flush=True)


if __name__ == "__main__":
    main()
