"""The model's cost and gradient against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from qsae.errors import ConfigError, DataError
from qsae.reference import textbook_cost_and_grad as textbook
from qsae.model import (
    FORWARD_CHUNKS,
    KERNELS,
    SAEConfig,
    Sums,
    activation_sums,
    backward,
    chunk_rows,
    cost_and_grad,
    finish_sums,
    forward,
    hidden_exp,
    hidden_sums,
    init_params,
    kernel,
    minibatch_cost_and_grad,
    set_kernel,
    shard_sums,
    sparsity_delta,
    unpack,
    z_cap,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, params=KERNELS)
def kernel_path(request):
    """Every test runs on both elementwise paths (the numba one where numba is installed)."""
    if request.param == "numba":
        pytest.importorskip("numba", reason="the numba path needs numba, a dependency: pip install numba")
    before = kernel()
    set_kernel(request.param)
    yield request.param
    set_kernel(before)


def problem(cfg, m, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.1, 0.9, size=(m, cfg.n_visible))
    theta = init_params(cfg, seed=seed + 1)
    theta[2 * cfg.n_visible * cfg.n_hidden :] = rng.normal(0, 0.1, cfg.n_visible + cfg.n_hidden)  # nonzero biases
    return theta, X


CONFIGS = [SAEConfig.report(), SAEConfig.ufldl(), SAEConfig(), SAEConfig(n_visible=7, n_hidden=5, weight_decay=0.01)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["report", "ufldl", "default", "odd"])
@pytest.mark.parametrize("m", [1, 3, 1000])
def test_gradient_matches_central_differences(cfg, m):
    theta, X = problem(cfg, m)
    _, grad = cost_and_grad(theta, X, cfg)
    rng = np.random.default_rng(2)
    idx = rng.choice(theta.size, size=min(60, theta.size), replace=False)
    idx[:4] = [0, 2 * cfg.n_visible * cfg.n_hidden, theta.size - 1, cfg.n_visible * cfg.n_hidden]  # one of each block
    eps = 1e-5
    num = np.empty(idx.size)
    for j, i in enumerate(idx):
        e = np.zeros_like(theta)
        e[i] = eps
        num[j] = (cost_and_grad(theta + e, X, cfg)[0] - cost_and_grad(theta - e, X, cfg)[0]) / (2 * eps)
    rel = np.linalg.norm(num - grad[idx]) / np.linalg.norm(num + grad[idx])
    assert rel < 1e-8


# Saturation: inputs far outside [0, 1] (issue 15).


def saturated_problem(cfg, m, seed=0):
    """Inputs around 100: most |z| are in the hundreds, so σ(z) rounds to 0 or 1 on most rows."""
    rng = np.random.default_rng(seed)
    theta = init_params(cfg, seed=seed + 1)
    return theta, rng.normal(100, 1, size=(m, cfg.n_visible))


@pytest.mark.parametrize("cfg", [SAEConfig(n_visible=3, n_hidden=30), CONFIGS[3]], ids=["sklearn", "odd"])
def test_saturated_units_cost_a_finite_amount_with_the_exact_gradient(cfg):
    theta, X = saturated_problem(cfg, 40)
    A = forward(theta, X, cfg)[:, : cfg.n_hidden]
    assert np.any(A.mean(axis=0) == 1.0)  # 1 − mean(a2) is 0 for some unit: the old KL term was +inf
    c, g = cost_and_grad(theta, X, cfg)
    assert np.isfinite(c) and np.all(np.isfinite(g))
    c_ref, g_ref = textbook(theta, X, cfg)  # σ(−z) by scipy's expit: an independent 1 − a2
    assert abs(c - c_ref) <= 1e-12 * abs(c_ref)
    assert np.max(np.abs(g - g_ref)) <= 1e-10 * np.max(np.abs(g_ref))
    eps = 1e-6 / 100  # z moves by eps·x ≈ 1e-6 per step
    h1 = 2 * cfg.n_visible * cfg.n_hidden  # b1's first entry: where the saturated units' KL gradient lands
    idx = np.r_[0:cfg.n_visible, h1 : h1 + cfg.n_hidden]
    num = np.empty(idx.size)
    for j, i in enumerate(idx):
        e = np.zeros_like(theta)
        e[i] = eps * (100 if i >= h1 else 1)
        num[j] = (cost_and_grad(theta + e, X, cfg)[0] - cost_and_grad(theta - e, X, cfg)[0]) / (2 * e[i])
    # central differences of a cost of ~1e4 with steps of 1e-6 in z: rounding of about 1e-16·1e4/1e-6 = 1e-6 absolute
    np.testing.assert_allclose(g[idx], num, rtol=1e-5, atol=1e-4)


def test_saturated_units_one_round_equals_two_rounds():
    cfg = SAEConfig(n_visible=3, n_hidden=30)
    theta, X = saturated_problem(cfg, 1000, seed=3)
    c, g = finish_sums(theta, shard_sums(theta, X[:400], cfg) + shard_sums(theta, X[400:], cfg), cfg, s_folded=False)
    c_ref, g_ref = cost_and_grad(theta, X, cfg)
    assert abs(c - c_ref) <= 1e-12 * abs(c_ref)
    assert np.linalg.norm(g - g_ref) <= 1e-10 * np.linalg.norm(g_ref)


@pytest.mark.filterwarnings("error")  # nor any overflow or invalid-value warning on the way
def test_float32_saturated_units_stay_finite():
    """float32's e^−z underflows past z ≈ 103: such units count at RATE_FLOOR, finite all the same."""
    cfg = SAEConfig(n_visible=3, n_hidden=30)
    theta, X = saturated_problem(cfg, 50, seed=4)
    theta *= 20  # |z| in the thousands: e^−z is 0 or ∞ in float32 and in float64
    for dtype in (np.float32, np.float64):
        c, g = cost_and_grad(theta, X.astype(dtype), cfg)
        assert np.isfinite(c) and np.all(np.isfinite(g))
        v = shard_sums(theta, X.astype(dtype), cfg)
        c1, g1 = finish_sums(theta, v, cfg, s_folded=False)
        assert np.isfinite(c1) and np.all(np.isfinite(g1))
    c_ref, g_ref = textbook(theta, X, cfg)
    assert np.isfinite(c_ref) and c == pytest.approx(c_ref, rel=1e-12)


ROWS = chunk_rows(SAEConfig())  # the same for the report's and UFLDL's n = 64


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["report", "ufldl"])
@pytest.mark.parametrize("m", [1, ROWS - 1, ROWS, ROWS + 1, FORWARD_CHUNKS * ROWS + 1, 5000])  # around the chunk sizes
def test_blocked_cost_equals_textbook(cfg, m):
    theta, X = problem(cfg, m, seed=m)
    c, g = cost_and_grad(theta, X, cfg)
    c_ref, g_ref = textbook(theta, X, cfg)
    assert abs(c - c_ref) <= 1e-12 * abs(c_ref)
    assert np.max(np.abs(g - g_ref)) <= 1e-12 * np.max(np.abs(g_ref))


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8])
def test_shard_sums_reduce_to_the_serial_cost(t):
    cfg = SAEConfig()
    theta, X = problem(cfg, 2003)
    cuts = np.sort(np.random.default_rng(t).choice(np.arange(1, 2003), size=t - 1, replace=False))
    total = Sums(0, 0.0)
    for part in np.split(X, cuts):
        total = total + shard_sums(theta, part, cfg)
    c, g = finish_sums(theta, total, cfg, s_folded=False)
    c_ref, g_ref = cost_and_grad(theta, X, cfg)
    assert abs(c - c_ref) <= 1e-12 * abs(c_ref)
    assert np.linalg.norm(g - g_ref) <= 1e-12 * np.linalg.norm(g_ref)


def test_minibatch_cost_has_no_sparsity_term():
    cfg = SAEConfig()
    theta, X = problem(cfg, 50)
    c, g, rates = minibatch_cost_and_grad(theta, X, cfg)
    c_ref, g_ref = textbook(theta, X, SAEConfig(sparsity_weight=0.0))
    assert c == pytest.approx(c_ref, rel=1e-12)
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-14)
    W1, _, b1, _ = unpack(theta, cfg)
    np.testing.assert_allclose(rates, (1 / (1 + np.exp(-(X @ W1.T + b1)))).mean(axis=0), rtol=1e-12)


def test_init_params_ranges():
    cfg = SAEConfig()
    theta = init_params(cfg, seed=3)
    W1, W2, b1, b2 = unpack(theta, cfg)
    r = np.sqrt(6 / (cfg.n_visible + cfg.n_hidden + 1))
    assert theta.shape == (cfg.n_params,)
    assert np.abs(W1).max() <= r and np.abs(W2).max() <= r and np.abs(W1).max() > 0.9 * r
    assert not b1.any() and not b2.any()
    assert np.array_equal(theta, init_params(cfg, seed=3))
    assert not np.array_equal(theta, init_params(cfg, seed=4))


def test_presets():
    assert SAEConfig.report() == SAEConfig(n_hidden=30, weight_decay=0.002, sparsity_weight=4, sparsity_target=0.002)
    assert SAEConfig.ufldl() == SAEConfig(n_hidden=25, weight_decay=1e-4, sparsity_weight=3, sparsity_target=0.01)
    assert SAEConfig.from_dict(SAEConfig.report().to_dict()) == SAEConfig.report()
    with pytest.raises(ConfigError, match="unknown preset 'x'"):
        SAEConfig.preset("x")


@pytest.mark.parametrize("field, value", [("n_hidden", 0), ("sparsity_target", 1.0), ("weight_decay", -1.0),
                                          ("sparsity_weight", float("nan")), ("n_visible", 2.5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SAEConfig(**{field: value})


def test_bad_shapes_are_named():
    cfg = SAEConfig()
    theta, X = problem(cfg, 10)
    with pytest.raises(DataError, match=r"\(10, 63\).*n_visible=64"):
        cost_and_grad(theta, X[:, :63], cfg)
    with pytest.raises(ConfigError, match="init_params"):
        cost_and_grad(theta[:-1], X, cfg)
    with pytest.raises(DataError, match="0 rows"):
        cost_and_grad(theta, X[:0], cfg)


def test_chunk_rows_stay_in_the_small_matrix_range():
    for cfg in CONFIGS + [SAEConfig(n_hidden=400), SAEConfig(n_visible=256, n_hidden=100)]:
        rows = chunk_rows(cfg)
        assert 128 <= rows <= 504 and rows % 8 == 0
        assert rows * cfg.n_visible * (cfg.n_hidden + 1) <= 1_000_000 or rows == 128
    assert chunk_rows(SAEConfig()) == 504


# float32: the products and passes run in X's dtype, the sums in float64.


def float32_problem(cfg, m, seed=0):
    """θ and float32 patches, and the same patches in float64 (the reference sees the same numbers)."""
    theta, X = problem(cfg, m, seed)
    X32 = X.astype(np.float32)
    return theta, X32, X32.astype(np.float64)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["report", "ufldl", "default", "odd"])
@pytest.mark.parametrize("m", [1, 3, ROWS + 1, 5000])
def test_float32_cost_and_gradient_match_float64(cfg, m):
    theta, X32, X64 = float32_problem(cfg, m, seed=m)
    c32, g32 = cost_and_grad(theta, X32, cfg)
    c64, g64 = cost_and_grad(theta, X64, cfg)
    assert isinstance(c32, float) and g32.dtype == np.float64
    assert c32 != c64  # really computed in float32
    assert abs(c32 - c64) <= 1e-6 * abs(c64)
    assert np.linalg.norm(g32 - g64) <= 1e-5 * np.linalg.norm(g64)


@pytest.mark.parametrize("cfg", CONFIGS[2:], ids=["default", "odd"])
def test_float32_gradient_matches_central_differences(cfg):
    """Differences of the float32 cost itself: ε = 1e-3 keeps float32's rounding (≈1e-7 of J,
    divided by 2ε) well under the tolerance, and the truncation error is O(ε²)."""
    theta, X32, _ = float32_problem(cfg, 1000)
    _, grad = cost_and_grad(theta, X32, cfg)
    rng = np.random.default_rng(5)
    idx = rng.choice(theta.size, size=min(40, theta.size), replace=False)
    idx[:4] = [0, 2 * cfg.n_visible * cfg.n_hidden, theta.size - 1, cfg.n_visible * cfg.n_hidden]
    eps = 1e-3
    num = np.empty(idx.size)
    for j, i in enumerate(idx):
        e = np.zeros_like(theta)
        e[i] = eps
        num[j] = (cost_and_grad(theta + e, X32, cfg)[0] - cost_and_grad(theta - e, X32, cfg)[0]) / (2 * eps)
    assert np.linalg.norm(num - grad[idx]) / np.linalg.norm(num + grad[idx]) < 1e-3


@pytest.mark.parametrize("t", [1, 2, 3])
def test_float32_shard_sums_equal_a_float64_reference(t):
    """The one-round sums of float32 shards, cut across chunk boundaries, reduce to the float64 cost."""
    cfg = SAEConfig.report()
    theta, X32, X64 = float32_problem(cfg, 3 * ROWS + 7)
    total = Sums(0, 0.0)
    for part in np.array_split(X32, t):
        sums = shard_sums(theta, part, cfg)
        assert sums.vec.dtype == np.float64 and sums.vec.shape == (Sums.size(cfg, one_round=True),)
        total = total + sums
    c, g = finish_sums(theta, total, cfg, s_folded=False)
    c_ref, g_ref = textbook(theta, X64, cfg)
    assert abs(c - c_ref) <= 1e-5 * abs(c_ref)
    assert np.linalg.norm(g - g_ref) <= 1e-5 * np.linalg.norm(g_ref)


def test_float32_two_round_pass_keeps_float32_activations():
    cfg = SAEConfig()
    theta, X32, X64 = float32_problem(cfg, 2 * ROWS + 3)
    A = forward(theta, X32, cfg)
    assert A.dtype == np.float32 and A.shape == (X32.shape[0], cfg.n_hidden + 1)
    assert np.all(A[:, cfg.n_hidden] == 1.0)  # the ones column, exactly
    A64 = forward(theta, X64, cfg)
    np.testing.assert_allclose(A, A64, rtol=1e-6, atol=1e-7)
    U = hidden_exp(theta, X32, cfg)
    assert U.dtype == np.float32 and np.all(U[:, cfg.n_hidden] == np.float32(np.exp(-z_cap(np.float32))))  # the bias unit
    U64 = hidden_exp(theta, X64, cfg)
    rates = hidden_sums(U, cfg) / U.shape[0]
    assert rates.dtype == np.float64
    a64 = A64[:, : cfg.n_hidden]
    np.testing.assert_allclose(rates, np.concatenate([a64.mean(axis=0), (1 - a64).mean(axis=0)]), rtol=1e-6)
    s = sparsity_delta(rates, cfg)
    v32 = backward(theta, X32, U, s, cfg).vec
    v64 = backward(theta, X64, U64, s, cfg).vec
    assert v32.dtype == np.float64
    assert np.linalg.norm(v32 - v64) <= 1e-5 * np.linalg.norm(v64)


def test_activation_sums_add_chunks_in_float64():
    """10⁶ float32 rows of 0.1: a float32 sum down the columns drifts by ~1e-2 (5e-4 by BLAS);
    chunk sums added in float64 stay within one chunk's rounding."""
    cfg = SAEConfig(n_visible=4, n_hidden=3)
    A = np.full((1_000_003, 4), 0.1, dtype=np.float32)
    exact = A.shape[0] * float(np.float32(0.1))
    naive = np.ones(A.shape[0], np.float32) @ A  # as A[:, :h].sum(0) would be done in float32
    assert abs(float(naive[0]) - exact) > 1e-4 * exact  # the drift avoided
    np.testing.assert_allclose(activation_sums(A, cfg), exact, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.float64])
def test_other_dtypes_compute_in_float64(dtype):
    cfg = SAEConfig(n_visible=7, n_hidden=5)
    theta, X = problem(cfg, 20)
    X = (X * 10).astype(dtype)
    assert forward(theta, X, cfg).dtype == np.float64
    c, g = cost_and_grad(theta, X, cfg)
    c_ref, g_ref = textbook(theta, X.astype(np.float64), cfg)
    assert abs(c - c_ref) <= 1e-12 * abs(c_ref)


def test_float32_minibatch_rates_are_float64():
    cfg = SAEConfig()
    theta, X32, X64 = float32_problem(cfg, 50)
    c, g, rates = minibatch_cost_and_grad(theta, X32, cfg)
    c_ref, g_ref, rates_ref = minibatch_cost_and_grad(theta, X64, cfg)
    assert rates.dtype == np.float64 and g.dtype == np.float64
    assert c == pytest.approx(c_ref, rel=1e-6)
    np.testing.assert_allclose(rates, rates_ref, rtol=1e-6)


def test_hidden_layer_of_another_shard_is_refused():
    cfg = SAEConfig()
    theta, X = problem(cfg, 10)
    U = hidden_exp(theta, X[:9], cfg)
    with pytest.raises(DataError, match=r"hidden layer has shape \(9, 31\).*hidden_exp\(theta, X, config\)"):
        backward(theta, X, U, None, cfg)
    with pytest.raises(DataError, match=r"hidden layer has shape \(9, 30\).*n_hidden=30.*hidden_exp"):
        hidden_sums(U[:, :30], cfg)
    with pytest.raises(DataError, match=r"rates have shape \(7,\) but n_hidden=30"):
        sparsity_delta(np.full(7, 0.1), cfg)


# The kernel switch.


def test_kernel_paths_agree(kernel_path):
    """The path under test against the numpy path, both dtypes, one and two rounds."""
    if kernel_path == "numpy":
        pytest.skip("the numpy path is the reference here")
    cfg = SAEConfig.report()
    theta, X32, X64 = float32_problem(cfg, 2 * ROWS + 5)
    for X, tol in ((X64, 1e-13), (X32, 1e-6)):
        U = hidden_exp(theta, X, cfg)
        s = sparsity_delta(hidden_sums(U, cfg) / U.shape[0], cfg)
        got = [forward(theta, X, cfg), hidden_sums(U, cfg), backward(theta, X, U, s, cfg).vec,
               shard_sums(theta, X, cfg).vec]
        set_kernel("numpy")
        ref = [forward(theta, X, cfg), hidden_sums(U, cfg), backward(theta, X, U, s, cfg).vec,
               shard_sums(theta, X, cfg).vec]
        set_kernel(kernel_path)
        for g, r in zip(got, ref):
            assert np.linalg.norm(g - r) <= tol * np.linalg.norm(r)


def test_the_weights_made_from_theta_follow_it(kernel_path):
    """The passes' matrices are made once per θ and kept (every block of a round shares θ): a θ
    changed in place, another dtype, and threads computing different θ at once get the same
    bits as a first call on a fresh copy."""
    import concurrent.futures

    from qsae import model

    cfg = SAEConfig()
    theta, X = problem(cfg, 60)
    thetas = [theta, theta * 0.5 + 0.01, np.roll(theta, 7)]

    def fresh(t, X):  # as if nothing were kept: a new thread has nothing kept yet
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(cost_and_grad, t.copy(), X, cfg).result()

    want = {(i, dt): fresh(t, X.astype(dt)) for i, t in enumerate(thetas) for dt in (np.float64, np.float32)}
    moving = theta.copy()
    for i, t in enumerate(thetas):
        moving[:] = t  # in place: the same array, new values
        for dt in (np.float64, np.float32):
            c, g = cost_and_grad(moving, X.astype(dt), cfg)
            assert c == want[i, dt][0] and np.array_equal(g, want[i, dt][1])
    assert want[1, np.float64][0] == pytest.approx(textbook(thetas[1], X, cfg)[0], rel=1e-12)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda k: (k % 3, cost_and_grad(thetas[k % 3], X, cfg)), range(30)))
    for i, (c, g) in got:
        assert c == want[i, np.float64][0] and np.array_equal(g, want[i, np.float64][1])
    bad = theta.copy()
    bad[3] = np.nan  # NaN ≠ NaN: never taken for the kept θ, and it propagates
    assert np.isnan(cost_and_grad(bad, X, cfg)[0]) and np.isnan(cost_and_grad(bad, X, cfg)[0])
    assert model.z_cap(np.dtype(np.float32)) == 86 and model.z_cap(np.dtype(np.float64)) == 707


def test_finish_kernel_equals_the_numpy_path(kernel_path):
    """The master's reduce in one compiled call: the gradient's bits are the numpy path's, the
    cost within an ulp or two (its two sums are added in another order); NaN still
    propagates; read-only inputs (zmq frames) are taken; a vector of another length is
    refused as the numpy path refuses it."""
    from qsae.model import _finish_sums

    cfg = SAEConfig.report()
    theta, X = problem(cfg, 300)
    for one_round in (True, False):
        s = None if one_round else sparsity_delta(hidden_sums(hidden_exp(theta, X, cfg), cfg) / 300, cfg)
        total = (shard_sums(theta, X[:140], cfg) + shard_sums(theta, X[140:], cfg) if one_round else
                 backward(theta, X, hidden_exp(theta, X, cfg), s, cfg))
        c, g = finish_sums(theta, total, cfg, s_folded=not one_round)
        c_ref, g_ref = _finish_sums(theta, total, cfg, s_folded=not one_round)
        assert np.array_equal(g, g_ref)
        assert c == pytest.approx(c_ref, rel=4e-16, abs=0)
        assert c == pytest.approx(textbook(theta, X, cfg)[0], rel=1e-12)
        frozen_theta, frozen = theta.copy(), total.vec.copy()
        frozen_theta.setflags(write=False)
        frozen.setflags(write=False)
        assert finish_sums(frozen_theta, Sums(total.m, frozen), cfg, s_folded=not one_round)[0] == c
        bad = total.vec.copy()
        bad[cfg.n_params + 1] = np.nan  # a firing rate: the KL term and (one round) the delta
        c_nan, g_nan = finish_sums(theta, Sums(total.m, bad), cfg, s_folded=not one_round)
        assert np.isnan(c_nan) and np.isnan(g_nan).any() == one_round
    with pytest.raises(ValueError):
        finish_sums(theta, Sums(300, total.vec[:-5]), cfg, s_folded=True)
    with pytest.raises(ConfigError, match=r"θ has shape \(10,\)"):
        finish_sums(theta[:10], total, cfg, s_folded=True)


def test_kernel_from_the_environment(monkeypatch):
    monkeypatch.setenv("QSAE_KERNEL", "numpy")
    assert set_kernel() == "numpy" and kernel() == "numpy"
    monkeypatch.setenv("QSAE_KERNEL", "fortran")
    with pytest.raises(ConfigError, match="unknown kernel 'fortran'.*numpy, numba"):
        set_kernel()
    with pytest.raises(ConfigError, match="unknown kernel 'c'"):
        set_kernel("c")


def test_numba_kernel_without_numba_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "qsae._kernels", None)  # as if numba were not installed
    monkeypatch.delenv("QSAE_KERNEL", raising=False)
    with pytest.raises(ConfigError, match=r"pip install numba.*QSAE_KERNEL=numpy"):
        set_kernel("numba")
    assert set_kernel() == "numpy"  # the default falls back quietly
    cfg = SAEConfig()
    theta, X = problem(cfg, 30)
    c, g = cost_and_grad(theta, X, cfg)
    assert c == pytest.approx(textbook(theta, X, cfg)[0], rel=1e-12)


@pytest.mark.timeout(180)
def test_kernels_compile_without_a_writable_cache(kernel_path):
    """Where numba finds no writable cache folder (a read-only install, no home), the kernels
    are compiled without a cache instead of failing the import."""
    if kernel_path == "numpy":
        pytest.skip("the numba path's import")
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import numba.core.caching as c; c.CacheImpl._locator_classes = []  # what numba finds with no folder\n"
            "import numpy as np\n"
            "from qsae import _kernels\n"
            "from qsae.model import SAEConfig, cost_and_grad, init_params, set_kernel\n"
            "assert type(_kernels.hidden_delta._cache).__name__ == 'NullCache'\n"
            "assert set_kernel() == 'numba'\n"
            "cfg = SAEConfig(n_visible=7, n_hidden=5)\n"
            "print(repr(cost_and_grad(init_params(cfg), np.full((9, 7), 0.3), cfg)[0]))\n")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=170, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr
    cfg = SAEConfig(n_visible=7, n_hidden=5)
    assert float(p.stdout) == pytest.approx(textbook(init_params(cfg), np.full((9, 7), 0.3), cfg)[0], rel=1e-12)


def test_nan_propagates_through_both_paths():
    """fastmath keeps NaN: a diverged θ must reach the optimizer's NaN check."""
    cfg = SAEConfig()
    theta, X = problem(cfg, 30)
    theta[5] = np.nan
    for dtype in (np.float64, np.float32):
        c, g = cost_and_grad(theta, X.astype(dtype), cfg)
        assert np.isnan(c) and np.isnan(g).any()
