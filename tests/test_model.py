"""The model's cost and gradient against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from qsae.errors import ConfigError, DataError
from qsae.reference import textbook_cost_and_grad as textbook
from qsae.model import (
    SAEConfig,
    Sums,
    cost_and_grad,
    finish_sums,
    init_params,
    minibatch_cost_and_grad,
    shard_sums,
    unpack,
)

pytestmark = pytest.mark.timeout(60)


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


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["report", "ufldl"])
@pytest.mark.parametrize("m", [1, 383, 384, 385, 5000])  # around the row-block size
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
