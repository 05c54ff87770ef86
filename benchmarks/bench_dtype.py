"""Does L-BFGS train as well in float32 as in float64?

Run: python benchmarks/bench_dtype.py [--report]

Trains in this process (one BLAS thread) from the same θ0 on the same patches, once with the
patches in float64 and once in float32 (θ, the gradient and every row chunk's sums stay
float64), on the quick start (10K patches, 400 iterations) and, with --report, on the
report's workload (100K patches, 500 iterations). Prints a markdown table: final cost (and
the float32 run's θ evaluated in float64), iterations, evaluations, seconds, and how alike the
learned filters are (for each float32 filter, the largest |cosine| with a float64 filter; the
mean over filters).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: one core

import numpy as np  # noqa: E402

from qsae import SAEConfig, cost_and_grad, init_params, load_images, sample_patches  # noqa: E402
from qsae.bench import machine  # noqa: E402
from qsae.model import unpack  # noqa: E402
from qsae.optim import minimize  # noqa: E402


def filter_match(theta_a: np.ndarray, theta_b: np.ndarray, cfg: SAEConfig) -> float:
    """Mean over a's filters of the largest |cosine| with any of b's."""
    a, b = unpack(theta_a, cfg).W1, unpack(theta_b, cfg).W1
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.abs(a @ b.T).max(axis=1).mean())


def compare(m: int, iters: int, images) -> list[list]:
    cfg = SAEConfig()
    X64 = sample_patches(images, m, seed=0)
    X32 = X64.astype(np.float32)
    theta0 = init_params(cfg, seed=0)
    runs = {}
    for name, X in (("float64", X64), ("float32", X32)):
        t0 = time.perf_counter()
        res = minimize(lambda th, X=X: cost_and_grad(th, X, cfg), theta0, maxiter=iters)
        runs[name] = (res, time.perf_counter() - t0)
    rows = []
    for name, (res, secs) in runs.items():
        in64 = cost_and_grad(res.x, X64, cfg)[0]
        rows.append([f"{m} patches, {iters} iterations", name, f"{res.fun:.6f}", f"{in64:.6f}", res.nit, res.nfev,
                     f"{secs:.1f}", f"{secs / runs['float64'][1]:.2f}",
                     f"{filter_match(res.x, runs['float64'][0].x, cfg):.3f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="also the report's workload: 100K patches, 500 iterations")
    args = ap.parse_args()
    images = load_images()
    rows = compare(10_000, 400, images)
    if args.report:
        rows += compare(100_000, 500, images)
    print(f"# {machine()}\n")
    print("| workload | dtype | final cost | its θ's cost in float64 | iterations | evaluations | seconds "
          "| / float64 | filters like float64's |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")


if __name__ == "__main__":
    main()
