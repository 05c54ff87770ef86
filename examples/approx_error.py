"""The average protocol's error |C − C*| on real patches: the report's Theorem 3.1 in numbers.

    python examples/approx_error.py [--theta runs/quick/model.npz]

For m patches split into t equal shards, the "average" protocol (the report's
ParallelAvgCostFunction) lets every shard use its own firing rates p_j in the KL term; C*
is the exact cost of the whole set. The error shrinks as m/t grows. θ is a trained model
if one is given (the sparsity term matters most there), else the initial weights.
"""

from __future__ import annotations

import argparse

from qsae.bench.quality import approx_error
from qsae.train import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--theta", default=None, help="model.npz of a trained run (default: initial weights)")
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated m")
    ap.add_argument("--shards", default="2,4,8,16", help="comma-separated t")
    args = ap.parse_args()
    theta, cfg = (load_model(args.theta)[:2] if args.theta else (None, None))
    print(f"θ: {args.theta or 'initial weights'}; |C − C*| / C* (relative), and |∇C − ∇C*| / |∇C*|\n")
    print(approx_error(theta, cfg, [int(s) for s in args.sizes.split(",")], [int(s) for s in args.shards.split(",")]))


if __name__ == "__main__":
    main()
