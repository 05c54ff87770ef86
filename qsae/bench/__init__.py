"""qsae's benchmark suite: ``python -m qsae.bench [--quick] [--out DIR]``.

Every table is measured in one run on this machine, the figures that are compared taken
side by side, and written as markdown into DIR (with PNG plots) and printed:

    scaling.py    workers × patches against the in-process cost; the same workload through
                  a process pool that re-sends its data every call (Parallel Python's way)
                  and through dask.distributed with the shards scattered once
    roundtrip.py  the cost of one round against the number of workers, over a pyzmq
                  CURVE echo of the same message as the floor
    quality.py    the optimizers (the report's Figure 2.3.2) and the average protocol's
                  error (its Theorem 3.1)
    cluster.py    uneven and changing clusters: static against measured balance with one
                  worker on a shared core, workers joining and leaving an L-BFGS run, a
                  SIGSTOPped straggler

Timings are best-of-N with one BLAS thread per process: this machine is shared and noisy,
and a best time is the least disturbed one.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Sequence

__all__ = ["best_of", "markdown", "machine"]


def best_of(f: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` timed calls of ``f`` after one warm-up call, in seconds."""
    f()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; numbers right-aligned."""
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """CPU model, cores and BLAS of this machine, one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import numpy  # noqa: F401  (threadpoolctl sees only the BLAS libraries already loaded)
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})" for i in threadpool_info())
    except ImportError:
        blas = "unknown (pip install threadpoolctl)"
    forced = " ".join(f"{v}={os.environ[v]}" for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ)
    if forced:  # older OpenBLAS builds need them on some processors; a user's machine has neither
        blas += f" — forced by {forced}: unset both in this command for a user's figures"
    return f"{cpu}, {os.cpu_count()} cores, BLAS: {blas}, one BLAS thread per process"
