"""The BLAS thread count of qsae's own arithmetic, whatever the calling process set.

A product's bits depend on how BLAS splits it over threads: with OpenBLAS's Haswell kernels
(``OPENBLAS_CORETYPE=Haswell``, set on some machines) a float32 cost computed with 2 threads
differs from the same cost with 1 thread in its 8th digit. qsae promises that a cost depends on
θ, the data and the BLAS kernel only — not on the caller's thread setting — so every public
function of ``qsae.model`` that calls BLAS runs under :func:`pinned`: the BLAS libraries of this
process use ``threads()`` threads (1 unless ``set_threads`` said otherwise) while it runs, and
get their own setting back after.

The model's products are cut into row chunks under OpenBLAS's small-matrix size, which it
runs on one thread anyway on most kernels, so one thread costs no speed (workers are one
process per core). Entering costs one ``get_num_threads`` call per BLAS library (about 1 µs);
only a process whose setting differs pays for a set and a restore (about 15 µs an evaluation).
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

__all__ = ["pinned", "threads", "set_threads", "blas_info"]

F = TypeVar("F", bound=Callable)

_threads = 1  # BLAS threads of qsae's arithmetic: one process per core, and bits that do not move
_controllers: list | None = None  # threadpoolctl's per-library controllers, found once numpy is loaded
_lock = threading.Lock()  # the thread count is process-wide: one setter at a time


def threads() -> int:
    """BLAS threads qsae's arithmetic runs with (1 by default)."""
    return _threads


def set_threads(n: int) -> None:
    """Run qsae's arithmetic with n BLAS threads (``--threads``). Bits then depend on n too."""
    global _threads
    if int(n) < 1:
        raise ValueError(f"BLAS threads must be >= 1, not {n}")
    _threads = int(n)


def _blas_controllers() -> list:
    global _controllers
    if _controllers is None:
        try:
            import numpy  # noqa: F401  (threadpoolctl sees only the libraries already loaded)
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            _controllers = []
        else:
            _controllers = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    return _controllers


def pinned(fn: F) -> F:
    """Decorate a function that calls BLAS: it runs with ``threads()`` BLAS threads."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        want = _threads
        changed = [(c, n) for c in _blas_controllers() if (n := c.get_num_threads()) != want]
        if not changed:
            return fn(*args, **kwargs)
        with _lock:
            for c, _ in changed:
                c.set_num_threads(want)
            try:
                return fn(*args, **kwargs)
            finally:
                for c, n in changed:
                    c.set_num_threads(n)

    return run  # type: ignore[return-value]


def blas_info() -> list[dict]:
    """The BLAS libraries of this process: api, version, kernel (architecture) and threads."""
    return [{"api": c.internal_api, "version": c.version, "kernel": getattr(c, "architecture", None),
             "threads": c.get_num_threads()} for c in _blas_controllers()]
