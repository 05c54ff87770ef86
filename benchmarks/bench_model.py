"""One evaluation of the sparse-autoencoder cost, against the machine's limit and a textbook version.

Run: python benchmarks/bench_model.py [--sizes 1000,10000,100000,1000000] [--repeat 5]

Prints a table: for each m, the seconds of one ``cost_and_grad`` (float64, one BLAS
thread), the compute limit (the 5 products of 2·m·n·h flops at the rate this machine
reaches on a large square matmul, measured in the same run), a plain textbook numpy
implementation timed in the same run, the five products alone in the same row blocks
(what BLAS reaches on these tall, thin shapes), and the ratios. Targets at m = 100K:
≤ 2.0× the limit and ≤ 0.55× the textbook version.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from qsae.model import BLOCK_ROWS, SAEConfig, cost_and_grad, init_params  # noqa: E402
from qsae.reference import textbook_cost_and_grad  # noqa: E402


def products_only(theta, X, cfg):
    """The five m·n·h products of one evaluation in the same row blocks, nothing else: the
    floor for any numpy implementation that calls BLAS on these shapes."""
    n, h, m = cfg.n_visible, cfg.n_hidden, X.shape[0]
    B = BLOCK_ROWS
    W1T = np.ascontiguousarray(theta[: h * n].reshape(h, n).T)
    W2 = np.ascontiguousarray(theta[h * n : 2 * h * n].reshape(n, h))
    W2T = np.ascontiguousarray(W2.T)
    a, o, d2 = np.empty((B, h)), np.empty((B, n)), np.empty((B, h))
    for lo in range(0, m, B):
        x = X[lo : lo + B]
        k = x.shape[0]
        np.matmul(x, W1T, out=a[:k])
        np.matmul(a[:k], W2T, out=o[:k])
        o[:k].T @ a[:k]
        np.matmul(o[:k], W2, out=d2[:k])
        d2[:k].T @ x


def best_of(f, repeat: int) -> float:
    """Fastest of ``repeat`` timed calls (after one warm-up): the least-disturbed figure."""
    f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_rate(repeat: int) -> float:
    """Flops per second of a 1000×1000 float64 matmul on one thread."""
    rng = np.random.default_rng(0)
    A, B = rng.random((1000, 1000)), rng.random((1000, 1000))
    return 2e9 / best_of(lambda: A @ B, repeat)


def blas_name() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')}" for i in threadpool_info())
    except ImportError:
        return "unknown (pip install threadpoolctl)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated m")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per figure (best is kept)")
    args = ap.parse_args()
    cfg = SAEConfig()
    n, h = cfg.n_visible, cfg.n_hidden
    rng = np.random.default_rng(0)
    theta = init_params(cfg, seed=0)
    print(f"# {platform.processor() or platform.machine()}, BLAS: {blas_name()}, n={n}, h={h}, float64, 1 thread")
    rate = matmul_rate(args.repeat)
    print(f"# large-matmul rate: {rate / 1e9:.1f} GFLOP/s")
    print("|       m |  qsae ms | limit ms | products ms | textbook ms | qsae/limit | products/limit | qsae/textbook |")
    print("|--------:|---------:|---------:|------------:|------------:|-----------:|---------------:|--------------:|")
    for m in (int(s) for s in args.sizes.split(",")):
        X = rng.uniform(0.1, 0.9, size=(m, n))
        rep = max(1, min(args.repeat, int(2e6 // m) + 1)) if m > 100_000 else args.repeat
        t_q = best_of(lambda: cost_and_grad(theta, X, cfg), rep)
        t_t = best_of(lambda: textbook_cost_and_grad(theta, X, cfg), rep)
        t_p = best_of(lambda: products_only(theta, X, cfg), rep)
        limit = 5 * 2 * m * n * h / rate
        print(
            f"| {m:7d} | {t_q * 1e3:8.2f} | {limit * 1e3:8.2f} | {t_p * 1e3:11.2f} | {t_t * 1e3:11.2f} |"
            f" {t_q / limit:10.2f} | {t_p / limit:14.2f} | {t_q / t_t:13.2f} |"
        )


if __name__ == "__main__":
    main()
