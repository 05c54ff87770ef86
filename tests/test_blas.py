"""qsae's arithmetic runs on a set number of BLAS threads, whatever the calling process set.

On OpenBLAS's Haswell kernels a float32 cost computed on 2 BLAS threads differs from the same
cost on 1 thread (at about 3e-8); on SkylakeX kernels it does not. These tests hold on both:
they check the thread count the model really runs with, and that the cost's bits do not move.
"""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from qsae import _blas
from qsae.data import DataSpec
from qsae.model import SAEConfig, cost_and_grad, init_params

pytestmark = pytest.mark.timeout(60)


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_pinned_functions_run_on_one_thread_and_give_the_caller_its_setting_back():
    seen = []

    @_blas.pinned
    def probe():
        seen.append(_blas_threads())

    with threadpool_limits(limits=2, user_api="blas"):
        probe()
        after = _blas_threads()
    assert seen and all(n == 1 for n in seen[0])
    assert all(n == 2 for n in after)


def test_a_pinned_function_inside_another_is_not_checked_again_and_still_runs_on_one_thread():
    """The outermost pinned call checks the BLAS threads once for all the calls inside it (a
    worker's blocks); the inner ones still run on one thread, and the caller gets its setting back."""
    seen, checks = [], []

    @_blas.pinned
    def inner():
        seen.append(_blas_threads())

    @_blas.pinned
    def outer():
        inner()
        inner()

    controllers = _blas._blas_controllers()
    originals = [c.get_num_threads for c in controllers]
    for c, get in zip(controllers, originals):
        c.get_num_threads = lambda get=get: checks.append(1) or get()
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            outer()
            after = _blas_threads()
            inner()  # on its own: checked again
    finally:
        for c, get in zip(controllers, originals):
            c.get_num_threads = get
    assert len(seen) == 3 and all(n == 1 for threads in seen for n in threads)
    assert all(n == 2 for n in after)
    assert len(checks) == 2 * len(controllers)  # once for outer (and its two inner calls), once for the last


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_cost_does_not_depend_on_the_callers_blas_threads(dtype):
    cfg = SAEConfig()
    X = DataSpec(m=5000, seed=2).build(dtype=dtype)  # products past the threading threshold of OpenBLAS
    theta = init_params(cfg, seed=1)
    with threadpool_limits(limits=1, user_api="blas"):
        c1, g1 = cost_and_grad(theta, X, cfg)
    with threadpool_limits(limits=2, user_api="blas"):
        c2, g2 = cost_and_grad(theta, X, cfg)
    assert c1 == c2 and np.array_equal(g1, g2)  # bit-for-bit: the code fixes the order of every sum


def test_set_threads_is_checked():
    with pytest.raises(ValueError, match=">= 1"):
        _blas.set_threads(0)
    assert _blas.threads() == 1
    info = _blas.blas_info()
    assert info and {"api", "version", "kernel", "threads"} <= set(info[0])


def test_the_kernel_a_worker_reports_is_numpys_whatever_else_is_loaded():
    """Workers report their BLAS in HELLO and the master warns when they differ: scipy's own
    OpenBLAS, loaded in some workers and not others (or first in one, second in another), must
    not make equal workers look different (it did: 'workers run different BLAS kernels')."""
    import scipy.linalg  # noqa: F401  (scipy's wheels bring a second OpenBLAS)

    assert len(_blas.blas_info()) == 1
    assert len(_blas.blas_info(numpy_only=False)) >= 1
