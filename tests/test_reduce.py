"""Reducers, run serially: exact equals the one-process cost; average is the report's formula."""

from __future__ import annotations

import numpy as np
import pytest

from qsae.errors import ConfigError
from qsae.model import SAEConfig, cost_and_grad, init_params
from qsae.reduce import AverageReducer, ExactReducer, ShardState, make_reducer, serial_scatter

pytestmark = pytest.mark.timeout(60)


def split(X, t, seed):
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, X.shape[0]), size=t - 1, replace=False))
    return np.split(X, cuts)


@pytest.fixture(scope="module")
def problem():
    cfg = SAEConfig()
    rng = np.random.default_rng(0)
    X = rng.uniform(0.1, 0.9, size=(3001, 64))
    theta = init_params(cfg, seed=1)
    theta[2 * 64 * 30 :] = rng.normal(0, 0.1, 94)
    return cfg, X, theta


@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("t", range(1, 9))
def test_exact_equals_one_process_for_any_split(problem, t, rounds):
    cfg, X, theta = problem
    c_ref, g_ref = cost_and_grad(theta, X, cfg)
    shards = [ShardState(p, cfg) for p in split(X, t, seed=t)]
    c, g = ExactReducer(cfg, rounds=rounds).evaluate(theta, serial_scatter(shards))
    assert abs(c - c_ref) < 1e-10 * abs(c_ref)
    assert np.linalg.norm(g - g_ref) < 1e-10 * np.linalg.norm(g_ref)


def test_average_is_the_size_weighted_mean_of_shard_costs(problem):
    cfg, X, theta = problem
    parts = split(X, 4, seed=9)
    c, g = AverageReducer(cfg).evaluate(theta, serial_scatter([ShardState(p, cfg) for p in parts]))
    pieces = [cost_and_grad(theta, p, cfg) for p in parts]  # each shard with its own p_j
    w = np.array([len(p) for p in parts]) / len(X)
    assert c == pytest.approx(sum(wi * ci for wi, (ci, _) in zip(w, pieces)), rel=1e-13)
    np.testing.assert_allclose(g, sum(wi * gi for wi, (_, gi) in zip(w, pieces)), rtol=1e-12, atol=1e-15)


def test_average_error_shrinks_as_shards_grow():
    """The report's Theorem 3.1: |C − C*| falls as m/t grows."""
    cfg = SAEConfig()
    rng = np.random.default_rng(5)
    theta = init_params(cfg, seed=2)
    errors = []
    for m in (400, 4000, 40000):
        X = rng.uniform(0.1, 0.9, size=(m, 64))
        exact, _ = cost_and_grad(theta, X, cfg)
        approx, _ = AverageReducer(cfg).evaluate(theta, serial_scatter([ShardState(p, cfg) for p in np.array_split(X, 8)]))
        errors.append(abs(approx - exact))
    assert errors[0] > errors[1] > errors[2] > 0


def test_one_round_unless_two_are_asked_for():
    """The run's choice, whatever the data set's size (it used to switch at 20,000 rows)."""
    cfg = SAEConfig()
    first = lambda r: next(r.steps(np.zeros(cfg.n_params)))[0]  # noqa: E731  (the first round's op)
    assert ExactReducer(cfg).rounds == 1 and first(ExactReducer(cfg)) == "sums"
    assert ExactReducer(cfg, rounds=2).rounds == 2 and first(ExactReducer(cfg, rounds=2)) == "forward"


def test_backward_without_forward_is_refused(problem):
    cfg, X, theta = problem
    from qsae.errors import ProtocolError
    from qsae.reduce import OPS

    with pytest.raises(ProtocolError, match="forward"):
        OPS["backward"](ShardState(X[:10], cfg), np.zeros(cfg.n_hidden))


def test_unknown_protocol_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="exact, average"):
        make_reducer("median", SAEConfig())
    with pytest.raises(ConfigError, match="rounds"):
        make_reducer("exact", SAEConfig(), rounds=3)
