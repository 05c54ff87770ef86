"""The average protocol's error |C − C*| on real patches: the report's Theorem 3.1 in numbers.

    python examples/approx_error.py [--theta runs/quick/model.npz]

For m patches split into t equal shards, the "average" protocol (the report's
ParallelAvgCostFunction) lets every shard use its own firing rates p_j in the KL term; C*
is the exact cost of the whole set. The error shrinks as m/t grows. θ is a trained model
if one is given (the sparsity term matters most there), else the initial weights.
"""

from __future__ import annotations

import argparse

import numpy as np

from qsae.data import load_images, sample_patches
from qsae.model import SAEConfig, cost_and_grad, init_params
from qsae.reduce import AverageReducer, ShardState, serial_scatter
from qsae.train import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--theta", default=None, help="model.npz of a trained run (default: initial weights)")
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated m")
    ap.add_argument("--shards", default="2,4,8,16", help="comma-separated t")
    args = ap.parse_args()
    if args.theta:
        theta, cfg, _ = load_model(args.theta)
    else:
        cfg = SAEConfig()
        theta = init_params(cfg)
    images = load_images()
    sizes = [int(s) for s in args.sizes.split(",")]
    shards = [int(s) for s in args.shards.split(",")]
    print(f"θ: {args.theta or 'initial weights'}; |C − C*| / C* (relative), and |∇C − ∇C*| / |∇C*|\n")
    print("| m | " + " | ".join(f"t={t}" for t in shards) + " |")
    print("|---:|" + "---:|" * len(shards))
    for m in sizes:
        X = sample_patches(images, m, patch_size=int(np.sqrt(cfg.n_visible)), seed=0)
        exact, g_exact = cost_and_grad(theta, X, cfg)
        cells = []
        for t in shards:
            parts = [ShardState(p, cfg) for p in np.array_split(X, t)]
            approx, g = AverageReducer(cfg).evaluate(theta, serial_scatter(parts))
            cells.append(f"{abs(approx - exact) / exact:.1e}, {np.linalg.norm(g - g_exact) / np.linalg.norm(g_exact):.1e}")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
