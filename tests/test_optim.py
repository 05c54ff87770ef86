"""Tests of qsae.optim: every method on a real sparse-autoencoder problem, the result and
its history, the ways a run ends, and SGD's sparsity rule."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from qsae.errors import ConfigError, NumericalError
from qsae.model import SAEConfig, cost_and_grad, forward, init_params
from qsae.optim import METHODS, OptimizeResult, array_sampler, minimize

pytestmark = pytest.mark.timeout(30)

CFG = SAEConfig()


def pink_patches(m: int, seed: int = 0, size: int = 96, p: int = 8) -> np.ndarray:
    """(m, p²) patches of 1/f-noise images, normalised the UFLDL way to [0.1, 0.9].

    1/f noise has the power spectrum of natural images, so the autoencoder has real
    structure to learn; no image files are needed.
    """
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    r = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    r[0, 0] = 1.0
    images = [np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) / r).real for _ in range(4)]
    k, i, j = rng.integers(0, 4, m), rng.integers(0, size - p + 1, m), rng.integers(0, size - p + 1, m)
    X = np.stack([images[a][b : b + p, c : c + p].ravel() for a, b, c in zip(k, i, j)])
    X -= X.mean(axis=1, keepdims=True)
    s = 3 * X.std()
    return (np.clip(X, -s, s) / s + 1) * 0.4 + 0.1


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return pink_patches(2000)


def mean_patch_cost(X: np.ndarray) -> float:
    """Reconstruction cost of a model that ignores its input and outputs the mean patch."""
    return 0.5 * float(((X - X.mean(axis=0)) ** 2).sum(axis=1).mean())


def sgd_options(X: np.ndarray, **kw) -> dict:
    return {"sampler": array_sampler(X), "config": CFG, "steps_per_iter": 100, **kw}


# --- every method learns ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["lbfgs", "cg"])
def test_batch_methods_learn_features(X, method):
    fun = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731
    res = minimize(fun, init_params(CFG), method, maxiter=60)
    assert res.fun < res.history[0][2] / 50  # the KL term of the start is gone
    assert res.fun < mean_patch_cost(X) - 0.01  # and the hidden units carry information
    assert res.fun == pytest.approx(fun(res.x)[0])


@pytest.mark.parametrize("sparsity", ["bias", "kl"])
def test_sgd_reduces_cost(X, sparsity):
    fun = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731
    res = minimize(fun, init_params(CFG), "sgd", maxiter=5, **sgd_options(X, sparsity=sparsity))
    J0 = fun(init_params(CFG))[0]
    assert res.history[0][2] == pytest.approx(J0)
    assert res.fun < J0 / 50
    assert res.success and res.status == 0 and res.nit == 5


def test_sgd_kl_learns_features(X):
    """The KL variant goes below the mean-patch cost within a few hundred thousand patches."""
    fun = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731
    options = sgd_options(X, sparsity="kl", learning_rate=1.0, steps_per_iter=1000)
    res = minimize(fun, init_params(CFG), "sgd", maxiter=10, **options)
    assert res.fun < mean_patch_cost(X) - 0.01


@pytest.mark.skipif(importlib.util.find_spec("qsae.data") is None, reason="qsae.data not written yet")
def test_lbfgs_on_real_patches():
    from qsae.data import load_images, sample_patches

    X = np.asarray(sample_patches(load_images(), 3000))
    fun = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731
    res = minimize(fun, init_params(CFG), "lbfgs", maxiter=60)
    assert res.fun < mean_patch_cost(X) - 0.01


# --- against an independent reference ----------------------------------------------------


@pytest.mark.parametrize("method", ["lbfgs", "cg"])
def test_quadratic_reaches_the_known_minimum(method):
    rng = np.random.default_rng(3)
    Q = rng.standard_normal((20, 20))
    A = Q @ Q.T + 20 * np.eye(20)  # SPD, condition number ~5
    b = rng.standard_normal(20)
    res = minimize(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), np.zeros(20), method, maxiter=200)
    x_star = np.linalg.solve(A, b)
    np.testing.assert_allclose(res.x, x_star, rtol=1e-6, atol=1e-8)
    assert res.fun == pytest.approx(-0.5 * b @ x_star, rel=1e-10)


# --- the result -------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_result_fields_and_history(X, method):
    fun = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731
    theta0 = init_params(CFG)
    keep = theta0.copy()
    options = sgd_options(X) if method == "sgd" else {}
    res = minimize(fun, theta0, method, maxiter=4, **options)
    assert isinstance(res, OptimizeResult)
    np.testing.assert_array_equal(theta0, keep)  # theta0 not modified
    assert res.nit == 4 and res.x.shape == theta0.shape
    assert res.nfev >= res.nit + 1 if method != "sgd" else res.nfev == res.nit + 1
    assert [h[0] for h in res.history] == list(range(res.nit + 1))
    assert res.history[0][2] == pytest.approx(fun(theta0)[0])  # iteration 0 is the start
    seconds = [h[1] for h in res.history]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    assert res.history[-1][2] == pytest.approx(res.fun)
    assert res.jac is not None and res.jac.shape == theta0.shape
    assert isinstance(res.message, str) and res.message
    assert isinstance(res.status, int) and isinstance(res.success, bool)


def test_sgd_without_fun_records_batch_costs(X):
    infos = []
    res = minimize(None, init_params(CFG), "sgd", maxiter=3, callback=infos.append, **sgd_options(X))
    assert res.nfev == 0 and res.nit == 3 and len(res.history) == 4 and res.jac is None
    assert np.isfinite([h[2] for h in res.history]).all()
    assert np.isnan(infos[-1].grad_norm)  # no gradient at θ is known


def test_old_scipy_callback_with_x_only():
    """Scipy < 1.11 calls callback(xk); the hook takes the cost from the remembered calls."""
    from qsae.optim import _iteration_hook, _Run

    x = np.arange(3.0)
    run = _Run(lambda th: (float(th @ th), 2 * th), x, None)
    run.evaluate(x)  # iteration 0
    y = x / 2
    run.evaluate(y)
    _iteration_hook(run)(y.copy())
    assert run.history[-1][0] == 1 and run.history[-1][2] == y @ y
    np.testing.assert_array_equal(run.g, 2 * y)


@pytest.mark.parametrize("method", METHODS)
def test_callback_info(X, method):
    infos = []
    fun = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731
    options = sgd_options(X) if method == "sgd" else {}
    res = minimize(fun, init_params(CFG), method, maxiter=3, callback=infos.append, **options)
    assert [i.iteration for i in infos] == [0, 1, 2, 3]
    for info, (it, sec, cost) in zip(infos, res.history):
        assert (info.iteration, info.seconds, info.cost) == (it, sec, cost)
        c, g = fun(info.x)
        assert info.cost == pytest.approx(c)
        assert info.grad_norm == pytest.approx(np.linalg.norm(g))
    np.testing.assert_array_equal(infos[-1].x, res.x)


# --- how runs end ------------------------------------------------------------------------


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown method 'foo'; choose one of: lbfgs, cg, sgd"):
        minimize(lambda x: (0.0, x), np.zeros(2), method="foo")
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "lbfgs", "bogus": 1},
        {"method": "lbfgs", "maxiter": 0},
        {"method": "sgd"},  # no sampler
        {"method": "sgd", "sampler": lambda rng, k: np.zeros((k, 64))},  # no config
        {"method": "sgd", "sampler": lambda rng, k: np.zeros((k, 64)), "config": CFG, "sparsity": "l1"},
        {"method": "sgd", "sampler": lambda rng, k: np.zeros((k, 64)), "config": CFG, "learning_rate": -1},
    ],
)
def test_bad_options_raise_config_error(kwargs):
    fun = lambda th: (0.0, np.zeros_like(th))  # noqa: E731
    with pytest.raises(ConfigError):
        minimize(fun, init_params(CFG), **kwargs)


def test_batch_methods_need_fun():
    with pytest.raises(ConfigError, match="needs fun"):
        minimize(None, np.zeros(3), "lbfgs")


@pytest.mark.parametrize("method", METHODS)
def test_callback_stop_iteration_stops_cleanly(X, method):
    seen = []

    def callback(info):
        seen.append(info)
        if info.iteration == 2:
            raise StopIteration

    fun = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731
    options = sgd_options(X) if method == "sgd" else {}
    res = minimize(fun, init_params(CFG), method, maxiter=50, callback=callback, **options)
    assert (res.success, res.status, res.message) == (False, 99, "stopped by callback")
    assert res.nit == 2 and len(res.history) == 3
    np.testing.assert_array_equal(res.x, seen[-1].x)
    assert res.fun == seen[-1].cost


@pytest.mark.parametrize("method", ["lbfgs", "cg"])
def test_nan_from_fun_raises_numerical_error(method):
    calls = []

    def fun(x):
        calls.append(1)
        d = np.arange(1.0, 6.0) ** 3  # ill-conditioned: several iterations
        cost, grad = float(x @ (d * x)), 2 * d * x
        return (np.nan, grad) if len(calls) == 4 else (cost, grad)

    seen = []
    with pytest.raises(NumericalError, match="evaluation 4, during iteration") as info:
        minimize(fun, np.ones(5), method, maxiter=50, callback=seen.append)
    result = info.value.result  # the run so far, for the caller to save
    assert isinstance(result, OptimizeResult) and result.success is False and result.nfev == 4
    np.testing.assert_array_equal(result.x, seen[-1].x)


def test_inf_gradient_raises_numerical_error():
    with pytest.raises(NumericalError, match="gradient"):
        minimize(lambda x: (1.0, np.full_like(x, np.inf)), np.ones(3), "lbfgs")


@pytest.mark.parametrize("method", ["lbfgs", "cg"])
@pytest.mark.parametrize("k", [1, 7])
def test_keyboard_interrupt_returns_the_last_completed_iteration(X, method, k):
    calls = []
    base = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731

    def fun(th):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return base(th)

    seen = []
    theta0 = init_params(CFG)
    res = minimize(fun, theta0, method, maxiter=50, callback=seen.append)
    assert (res.success, res.status, res.message) == (False, 130, "interrupted (Ctrl-C)")
    last_x = seen[-1].x if seen else theta0
    np.testing.assert_array_equal(res.x, last_x)
    assert res.nit == (seen[-1].iteration if seen else 0)
    assert res.nfev == k - 1


def test_keyboard_interrupt_in_sgd_sampler(X):
    draws = []
    inner = array_sampler(X)

    def sampler(rng, k):
        draws.append(1)
        if len(draws) == 250:
            raise KeyboardInterrupt
        return inner(rng, k)

    seen = []
    res = minimize(None, init_params(CFG), "sgd", maxiter=10, callback=seen.append,
                   **{**sgd_options(X), "sampler": sampler})
    assert res.message == "interrupted (Ctrl-C)" and res.nit == 2  # draws 1, 2–101, 102–201
    np.testing.assert_array_equal(res.x, seen[-1].x)


# --- SGD's sparsity rule -----------------------------------------------------------------


def test_sgd_bias_update_moves_firing_rates_toward_rho(X):
    """With β > 0 the rule b1 -= αβ(p̂ − ρ) brings every unit's firing rate near ρ;
    with β = 0 (no update) the rates stay far from it."""

    def rates(config):
        res = minimize(None, init_params(config), "sgd", maxiter=3,
                       **{**sgd_options(X), "config": config, "decay": 0.0})
        return forward(res.x, X, config)[:, : config.n_hidden].mean(axis=0)

    rho = CFG.sparsity_target
    with_rule = rates(CFG)
    without = rates(SAEConfig(sparsity_weight=0.0))
    assert np.abs(with_rule - rho).max() < 0.01
    assert np.abs(without - rho).mean() > 10 * np.abs(with_rule - rho).mean()


def test_array_sampler_draws_rows():
    X = np.arange(20.0).reshape(10, 2)
    batch = array_sampler(X)(np.random.default_rng(0), 7)
    assert batch.shape == (7, 2)
    assert all(row.tolist() in X.tolist() for row in batch)
    with pytest.raises(ConfigError):
        array_sampler(np.zeros(5))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_float32_theta_is_refused_with_the_fix(dtype):
    cfg = SAEConfig(n_visible=4, n_hidden=2)
    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(20, 4))
    theta0 = init_params(cfg).astype(dtype)
    with pytest.raises(ConfigError, match=rf"{np.dtype(dtype).name}.*theta0\.astype\(np\.float64\)"):
        minimize(lambda t: cost_and_grad(t, X, cfg), theta0, maxiter=2)
    result = minimize(lambda t: cost_and_grad(t, X, cfg), theta0.astype(np.float64), maxiter=2)
    assert result.x.dtype == np.float64 and result.nit >= 1


def test_float32_patches_train_with_a_float64_theta():
    cfg = SAEConfig(n_visible=4, n_hidden=2)
    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(50, 4))
    r32 = minimize(lambda t: cost_and_grad(t, X.astype(np.float32), cfg), init_params(cfg), maxiter=20)
    r64 = minimize(lambda t: cost_and_grad(t, X.astype(np.float32).astype(np.float64), cfg), init_params(cfg),
                   maxiter=20)
    assert r32.x.dtype == np.float64
    assert r32.fun == pytest.approx(r64.fun, rel=1e-5)
