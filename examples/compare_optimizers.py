"""SGD, CG and L-BFGS on the same patches: the report's Figure 2.3.2, at a scale that runs here.

    python examples/compare_optimizers.py --out docs/compare_optimizers.png

Each optimizer trains from the same initial weights for the same wall-clock budget, three
seeds each; the plot shows the full cost J (with the sparsity term) against seconds,
averaged over the seeds, and the table the mean final cost and the time to get within 1%
of the best cost any run reached. SGD steps on the reconstruction + weight-decay cost and
nudges the hidden biases for sparsity (report §2.1); its J is evaluated with the clock
paused, so every curve counts training time only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core per run, as in the report

import numpy as np  # noqa: E402

from qsae.data import load_images, sample_patches  # noqa: E402
from qsae.model import SAEConfig, cost_and_grad, init_params  # noqa: E402
from qsae.optim import array_sampler, minimize  # noqa: E402
from qsae.viz import save_cost_curves  # noqa: E402


def run(method: str, X: np.ndarray, cfg: SAEConfig, seed: int, seconds: float) -> list[tuple[int, float, float]]:
    """History (iteration, seconds, cost) of one run, stopped after ``seconds``."""
    f = lambda th: cost_and_grad(th, X, cfg)  # noqa: E731

    def budget(info):
        if info.seconds > seconds:
            raise StopIteration

    options = {"sampler": array_sampler(X), "config": cfg, "seed": seed} if method == "sgd" else {}
    res = minimize(f, init_params(cfg, seed=seed), method=method, maxiter=100_000, callback=budget, **options)
    return res.history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=10_000, help="patches m")
    ap.add_argument("--seconds", type=float, default=20.0, help="wall-clock budget of each run")
    ap.add_argument("--seeds", type=int, default=3, help="runs per optimizer")
    ap.add_argument("--out", type=Path, default=Path("docs/compare_optimizers.png"), help="PNG to write")
    args = ap.parse_args()
    cfg = SAEConfig()
    images = load_images()
    runs: dict[str, list] = {}
    for method in ("sgd", "cg", "lbfgs"):
        runs[method] = []
        for seed in range(args.seeds):
            X = sample_patches(images, args.patches, seed=seed)
            runs[method].append(run(method, X, cfg, seed, args.seconds))
            print(f"{method} seed {seed}: final cost {runs[method][-1][-1][2]:.6f}", flush=True)
    best = min(c for hs in runs.values() for h in hs for _, _, c in h)
    print(f"\n{args.patches} patches, {args.seconds:g} s per run, {args.seeds} seeds, best cost {best:.6f}\n")
    print("| optimizer | mean final cost | mean iterations | mean seconds to within 1% of best |")
    print("|---|---:|---:|---:|")
    for method, hs in runs.items():
        final = np.mean([h[-1][2] for h in hs])
        iters = np.mean([h[-1][0] for h in hs])
        reach = [next((s for _, s, c in h if c <= 1.01 * best), np.nan) for h in hs]
        reach_s = "never" if np.all(np.isnan(reach)) else f"{np.nanmean(reach):.1f}"
        print(f"| {method} | {final:.6f} | {iters:.0f} | {reach_s} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # only J < 0.5: the first steps (from J ≈ 60, mostly the KL term at p = 0.5) would flatten the rest
    save_cost_curves({k: [[p for p in h if p[2] < 0.5] for h in hs] for k, hs in runs.items()}, args.out,
                     logy=False, title=f"{args.patches} patches, mean of {args.seeds} seeds (J < 0.5)")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
