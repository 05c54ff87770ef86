"""Memory a worker holds per patch: float64 against float32, one round against two.

Run: python benchmarks/bench_memory.py [--patches 1000000] [--evals 3]

One local worker holds every block of an images source (it cuts them itself). Its resident
memory (VmRSS from /proc) is read after a few evaluations of 50K patches, then of the full
set; the difference over the difference in patches is the memory per patch held (what does
not grow with the data — Python, numpy, zmq, the images, numba's compiled kernels — drops
out). Prints a markdown table. Linux only (/proc).

The two-round protocol keeps each block's hidden activations from its forward round to its
backward round; glibc keeps their memory for the next forward round, so they count. (A fixed
mmap threshold would hand it back between evaluations, but every block's activations would
then be mapped anew each round: 25% more compute time, measured.)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: one core per process

import numpy as np  # noqa: E402

from qsae import Master, SAEConfig, init_params  # noqa: E402
from qsae.data import load_images  # noqa: E402


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def held_per_patch(m: int, dtype: str, rounds: int, evals: int, images, small: int = 50_000) -> tuple[float, int]:
    """(bytes per patch held, the worker's fixed bytes) of one worker, from two data sets in turn:
    ``small`` patches then ``m``, each after ``evals`` evaluations. The difference over the
    difference in patches leaves out what does not grow with the data (Python, numpy, zmq, the
    images, a JIT-compiled kernel)."""
    cfg = SAEConfig()
    theta = init_params(cfg)
    with Master(workers=1, config=cfg, dtype=dtype, reducer_options={"rounds": rounds}) as master:
        pid = next(iter(master._workers.values())).pid
        sizes = {}
        for k in (small, m):
            master.scatter_images(images, m=k, seed=0)
            for _ in range(evals):
                master(theta)
            sizes[k] = rss(pid)
        per = (sizes[m] - sizes[small]) / (m - small)
        return per, sizes[small] - small * per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=1_000_000, help="patches the worker holds")
    ap.add_argument("--evals", type=int, default=3, help="evaluations before reading the memory")
    args = ap.parse_args()
    images = load_images()
    cfg = SAEConfig()
    n, h = cfg.n_visible, cfg.n_hidden
    print(f"# one worker holding {args.patches} patches (n={n}, h={h}), after {args.evals} evaluations\n")
    print("| dtype | protocol | bytes per patch held | of which the rows (n × itemsize) | float32 / float64 |")
    print("|---|---|---:|---:|---:|")
    got = {}
    for rounds in (1, 2):
        for dtype in ("float64", "float32"):
            per, base = held_per_patch(args.patches, dtype, rounds, args.evals, images)
            got[(dtype, rounds)] = per
            ratio = f"{per / got[('float64', rounds)]:.2f}" if dtype == "float32" else ""
            what = "exact, one round" if rounds == 1 else "exact, two rounds (activations kept)"
            print(f"| {dtype} | {what} | {per:.0f} | {n * np.dtype(dtype).itemsize} | {ratio} |", flush=True)
    print(f"\nwhat a worker holds besides (its fixed part): {base / 2**20:.0f} MiB. The two-round protocol keeps the "
          f"hidden activations, (h + 1) × itemsize = {(h + 1) * 8} or {(h + 1) * 4} bytes a patch, only between its "
          "two rounds: they are freed by the backward round")


if __name__ == "__main__":
    main()
