"""SGD, CG and L-BFGS on the same patches: the report's Figure 2.3.2, at a scale that runs here.

    python examples/compare_optimizers.py                       # writes runs/compare_optimizers.png
    python examples/compare_optimizers.py --out docs/compare_optimizers.png   # the README's picture

Each optimizer trains from the same initial weights for the same wall-clock budget, three
seeds each; the plot shows the full cost J against seconds, averaged over the seeds, and
the table the mean final cost and the time to get within 1% of the best cost any run
reached. SGD steps on the reconstruction + weight-decay cost and nudges the hidden biases
for sparsity (report §2.1); its J is evaluated with the clock paused. ``--workers 2``
evaluates CG's and L-BFGS's cost through two local workers (``python -m qsae.bench`` does).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core per process, as in the report

from qsae.bench.quality import compare_optimizers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--patches", type=int, default=10_000, help="patches m")
    ap.add_argument("--seconds", type=float, default=15.0, help="wall-clock budget of each run, seconds")
    ap.add_argument("--seeds", type=int, default=3, help="runs per optimizer")
    ap.add_argument("--workers", type=int, default=0, help="local workers for CG and L-BFGS (0: in process)")
    ap.add_argument("--out", type=Path, default=Path("runs/compare_optimizers.png"),
                    help="PNG to write (docs/compare_optimizers.png is the README's: write it only on purpose)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(compare_optimizers(args.patches, args.seconds, args.seeds, args.workers, png=args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
