"""The BLAS thread count of qsae's own arithmetic, whatever the calling process set.

A product's bits depend on how BLAS splits it over threads: with OpenBLAS's Haswell kernels
(``OPENBLAS_CORETYPE=Haswell``, set on some machines) a float32 cost computed with 2 threads
differs from the same cost with 1 thread in its 8th digit. qsae promises that a cost depends on
θ, the data and the BLAS kernel only — not on the caller's thread setting — so every public
function of ``qsae.model`` that calls BLAS runs under :func:`pinned`: the BLAS libraries of this
process use ``threads()`` threads (1 unless ``set_threads`` said otherwise) while it runs, and
get their own setting back after. A pinned function called by another (a worker's blocks, each
block's passes) is not checked again: the outermost call checked for all of them.

The model's products are cut into row chunks under OpenBLAS's small-matrix size, which it
runs on one thread anyway on most kernels, so one thread costs no speed (workers are one
process per core). Entering costs one ``get_num_threads`` call per BLAS library (about 1 µs);
only a process whose setting differs pays for a set and a restore (about 15 µs an evaluation).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Callable, TypeVar

__all__ = ["pinned", "threads", "set_threads", "blas_info"]

F = TypeVar("F", bound=Callable)

_threads = 1  # BLAS threads of qsae's arithmetic: one process per core, and bits that do not move
_controllers: list | None = None  # threadpoolctl's per-library controllers, found once numpy is loaded
_lock = threading.Lock()  # the thread count is process-wide: one setter at a time
_inside = threading.local()  # depth > 0 in a thread running a pinned function: the count is set already


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
        if getattr(_inside, "depth", 0):  # called by a pinned function: checked there, once for all its calls
            return fn(*args, **kwargs)
        want = _threads
        changed = [(c, n) for c in _blas_controllers() if (n := c.get_num_threads()) != want]
        _inside.depth = 1
        try:
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
        finally:
            _inside.depth = 0

    return run  # type: ignore[return-value]


def _numpys(controllers: list) -> list:
    """The controllers of numpy's own BLAS (the one the model's products run on): the libraries
    inside numpy's folder or the wheel's ``numpy.libs``; all of them where none is (a system
    BLAS). scipy brings its own OpenBLAS, loaded or not depending on what a process imported."""
    import numpy

    home = os.path.dirname(os.path.abspath(numpy.__file__))
    own = [c for c in controllers if os.path.abspath(c.filepath).startswith((home + os.sep, home + ".libs" + os.sep))]
    return own or sorted(controllers, key=lambda c: c.filepath)


def blas_info(numpy_only: bool = True) -> list[dict]:
    """This process's BLAS: api, version, kernel (architecture) and threads of numpy's library
    (of every library loaded, with ``numpy_only=False``)."""
    try:
        import numpy  # noqa: F401
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return []
    found = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]  # those loaded now
    libs = _numpys(found) if numpy_only else found
    return [{"api": c.internal_api, "version": c.version, "kernel": getattr(c, "architecture", None),
             "threads": c.get_num_threads()} for c in libs]
