"""Memory of a worker, whole-process RSS: before any data, holding its rows, after evaluations.

Run: python benchmarks/bench_memory.py [--patches 1000000] [--evals 3]

One local worker holds every block of an images source (it cuts them itself). Its resident
memory (VmRSS from /proc, the whole process: Python, numpy, numba, zmq, the images, the rows
and whatever the heap keeps) is read three times: after its HELLO (the baseline), once it
holds the ``--patches`` rows, and after ``--evals`` evaluations. Prints a markdown table for
float64 and float32, one round and two rounds of the exact protocol. Linux only (/proc).

Targets (issue 15), at 1M patches: after the evaluations ≤ 1.3 × (the rows + the baseline),
and float32 / float64 of the whole RSS after the evaluations ≤ 0.60.

The two-round protocol (``rounds=2``) keeps each block's hidden layer (h + 1 values a row)
from its forward round to its backward round; the one-round protocol, the default, keeps
nothing between rounds.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: one core per process

import numpy as np  # noqa: E402

from qsae import Master, SAEConfig, init_params  # noqa: E402
from qsae.bench import machine  # noqa: E402
from qsae.data import load_images  # noqa: E402

MiB = 2**20


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def worker_rss(m: int, dtype: str, rounds: int, evals: int, images) -> tuple[int, int, int]:
    """(baseline, holding the rows, after the evaluations): one worker's whole RSS in bytes."""
    cfg = SAEConfig()
    theta = init_params(cfg)
    with Master(workers=1, config=cfg, dtype=dtype, reducer_options={"rounds": rounds}) as master:
        pid = next(iter(master._workers.values())).pid
        base = rss(pid)
        master.scatter_images(images, m=m, seed=0)
        held = rss(pid)
        for _ in range(evals):
            master(theta)
        return base, held, rss(pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=1_000_000, help="patches the worker holds")
    ap.add_argument("--evals", type=int, default=3, help="evaluations before the last reading")
    args = ap.parse_args()
    images = load_images()
    cfg = SAEConfig()
    n, h = cfg.n_visible, cfg.n_hidden
    print(f"# {machine()}\n# one worker holding {args.patches} patches (n={n}, h={h}), whole-process RSS in MiB\n")
    print("| protocol | dtype | baseline | holding the rows | after evaluations | the rows | "
          "after / (rows + baseline) | float32 / float64 after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for rounds in (1, 2):
        after64 = None
        for dtype in ("float64", "float32"):
            base, held, after = worker_rss(args.patches, dtype, rounds, args.evals, images)
            rows = args.patches * n * np.dtype(dtype).itemsize
            what = "exact, two rounds" if rounds == 2 else "exact, one round (the default)"
            ratio = f"{after / after64:.2f}" if after64 else ""
            after64 = after64 or after
            print(f"| {what} | {dtype} | {base / MiB:.0f} | {held / MiB:.0f} | {after / MiB:.0f} | {rows / MiB:.0f} | "
                  f"{after / (rows + base):.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
