"""Optimizers: one entry point, ``minimize(fun, θ0, method=...)``, one result type.

``fun(θ) -> (cost, grad)`` is what ``scipy.optimize.minimize(jac=True)`` expects, whether
the cost is computed in this process (``model.cost_and_grad``) or by a cluster of workers.

Methods:

* ``"lbfgs"`` — scipy's L-BFGS-B without bounds;
* ``"cg"`` — scipy's nonlinear conjugate gradient (Polak–Ribière);
* ``"sgd"`` — ours, the report's §2.1: minibatch steps on the reconstruction +
  weight-decay cost, with sparsity enforced by nudging the hidden biases after every step,
  b1 := b1 − α β (p̂ − ρ), p̂ a running estimate of each unit's firing rate.

Every method returns an ``OptimizeResult`` with a ``history`` of (iteration, seconds,
cost), iteration 0 being the start, so runs of different methods can be plotted together
(``viz.save_cost_curves``).

How a run ends (``status``, ``message``):

====== ===================================================================
0      converged (scipy) or ran all ``maxiter`` iterations (SGD)
1–3    scipy's own codes and messages (iteration/evaluation limit, line
       search failure, NaN); 3 also for the ``err.result`` of a NumericalError
99     ``callback`` raised StopIteration (scipy's code for the same thing)
130    interrupted by Ctrl-C (KeyboardInterrupt, 128 + SIGINT as in shells)
====== ===================================================================

A NaN or Inf cost or gradient raises ``NumericalError``; the result so far is attached
to the exception as ``err.result``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from scipy.optimize import minimize as scipy_minimize

from .errors import ConfigError, NumericalError
from .model import (SAEConfig, backward, finish_sums, hidden_exp, hidden_sums, minibatch_cost_and_grad, sparsity_delta,
                    unpack)

__all__ = ["METHODS", "OptimizeResult", "IterationInfo", "minimize", "array_sampler"]

METHODS = ("lbfgs", "cg", "sgd")

# How our own runs end: name -> (status, success, message). Scipy's endings keep its own.
_ENDINGS = {
    "sgd_done": (0, True, "ran all {maxiter} iterations (SGD has no convergence test)"),
    "stopped": (99, False, "stopped by callback"),
    "interrupted": (130, False, "interrupted (Ctrl-C)"),
    "nonfinite": (3, False, "{error}"),  # only as NumericalError.result
}

# Options each method accepts besides maxiter and callback (aliases map to scipy's names).
_OPTIONS = {
    "lbfgs": ("maxcor", "memory", "ftol", "gtol", "maxfun", "maxls"),
    "cg": ("gtol", "norm", "c1", "c2"),
    "sgd": ("sampler", "config", "sparsity", "batch_fun", "batch_size", "learning_rate", "decay",
            "steps_per_iter", "tau", "seed"),
}

Fun = Callable[[np.ndarray], "tuple[float, np.ndarray]"]
History = list[tuple[int, float, float]]  # (iteration, seconds since the start, cost)


@dataclass
class OptimizeResult:
    """The outcome of ``minimize``, the same for every method.

    Attributes
    ----------
    x : (n_params,) θ at the end (for an interrupted or stopped run: the last completed
        iteration's θ).
    fun : cost at ``x`` (SGD without ``fun``: mean minibatch cost of the last iteration).
    jac : gradient at ``x``, or None when unknown (SGD without ``fun``).
    nit : completed iterations.
    nfev : calls of ``fun``.
    success, status, message : how the run ended (see the module docstring).
    history : one (iteration, seconds since the start, cost) per iteration, iteration 0
        being the starting point.
    """

    x: np.ndarray
    fun: float
    jac: np.ndarray | None
    nit: int
    nfev: int
    success: bool
    status: int
    message: str
    history: History = field(default_factory=list)


@dataclass(frozen=True)
class IterationInfo:
    """What ``callback(info)`` receives after the start point and after every iteration."""

    iteration: int  # 0 = the starting point
    cost: float
    grad_norm: float  # 2-norm of the gradient at x (nan if unknown)
    seconds: float  # since the start, callback time excluded
    x: np.ndarray  # a copy of θ


class _Stop(Exception):
    """The user's callback raised StopIteration (kept private so scipy does not handle it)."""


class _Clock:
    """Seconds since creation, excluding the intervals spent inside ``paused()``."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._paused = 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self._t0 - self._paused

    @contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t


class _Run:
    """State shared by every method: counts, clock, history, last completed iteration."""

    def __init__(self, fun: Fun | None, theta0: np.ndarray, callback: Callable | None) -> None:
        self.fun, self.callback = fun, callback
        self.clock = _Clock()
        self.nfev = self.nit = 0
        self.history: History = []
        self.x, self.f, self.g = theta0.copy(), float("nan"), None  # last completed iteration
        self._recent: OrderedDict[bytes, tuple[float, np.ndarray]] = OrderedDict()

    def evaluate(self, x: np.ndarray, start: bool = True) -> tuple[float, np.ndarray]:
        """fun(x), counted, checked and remembered; with ``start`` the first call is iteration 0."""
        cost, grad = self.fun(x)
        self.nfev += 1
        cost, grad = float(cost), np.asarray(grad, dtype=np.float64)
        if grad.shape != x.shape:
            raise ConfigError(f"fun returned a gradient of shape {grad.shape} for θ of shape {x.shape}")
        if not (np.isfinite(cost) and np.isfinite(grad).all()):
            what = "cost" if not np.isfinite(cost) else "gradient"
            raise NumericalError(
                f"fun returned a non-finite {what} (cost={cost}) at evaluation {self.nfev}, during "
                f"iteration {self.nit + 1 if self.history else 0}; the result so far is err.result"
            )
        self._recent[x.tobytes()] = (cost, grad)
        while len(self._recent) > 8:
            self._recent.popitem(last=False)
        if start and not self.history:
            self.record(x, cost, grad)
        return cost, grad

    def lookup(self, x: np.ndarray) -> tuple[float, np.ndarray | None]:
        """(cost, grad) of an x evaluated lately, else (nan, None)."""
        return self._recent.get(np.asarray(x, dtype=np.float64).tobytes(), (float("nan"), None))

    def record(self, x: np.ndarray, cost: float, grad: np.ndarray | None, seconds: float | None = None) -> None:
        """Close an iteration (the first call closes iteration 0) and call the callback."""
        if self.history:
            self.nit += 1
        seconds = self.clock() if seconds is None else seconds
        self.x, self.f, self.g = np.array(x, dtype=np.float64), float(cost), grad
        self.history.append((self.nit, seconds, self.f))
        if self.callback is not None:
            gnorm = float(np.linalg.norm(grad)) if grad is not None else float("nan")
            info = IterationInfo(self.nit, self.f, gnorm, seconds, self.x.copy())
            with self.clock.paused():
                try:
                    self.callback(info)
                except StopIteration:
                    raise _Stop from None

    def result(self, ending: str, **fmt: Any) -> OptimizeResult:
        """The last completed iteration as a result ending with ``_ENDINGS[ending]``."""
        status, success, message = _ENDINGS[ending]
        return OptimizeResult(self.x, self.f, self.g, self.nit, self.nfev, success, status,
                              message.format(**fmt), self.history)


def minimize(
    fun: Fun | None,
    theta0: np.ndarray,
    method: str = "lbfgs",
    maxiter: int = 400,
    callback: Callable[[IterationInfo], None] | None = None,
    **options: Any,
) -> OptimizeResult:
    """Minimise ``fun`` from ``theta0`` with L-BFGS, CG or SGD.

    Parameters
    ----------
    fun : ``fun(θ) -> (cost, grad)``. Required for "lbfgs" and "cg". For "sgd" it is
        optional and only monitors: if given, the full cost J is evaluated after every
        iteration for ``history`` (with the clock paused, so SGD's seconds count training
        only and its curve is comparable with L-BFGS's on the same J).
    theta0 : (n_params,) starting point; not modified.
    method : one of ``METHODS``.
    maxiter : iterations (for SGD, one iteration is ``steps_per_iter`` minibatch steps).
    callback : ``callback(info: IterationInfo)`` after the start point (iteration 0) and
        after every iteration, its time excluded from ``seconds``. Raising StopIteration
        ends the run cleanly (status 99, "stopped by callback").
    **options : per method:

        lbfgs — ``maxcor`` (alias ``memory``; 10), ``ftol`` (1e-12), ``gtol`` (1e-9),
        ``maxfun`` (max(15000, 20·maxiter), so maxiter ends the run), ``maxls`` (20).
        The tolerances are tighter than scipy's so a run does not stop early on the
        small gradients of a sparse autoencoder.

        cg — ``gtol`` (1e-9), ``norm`` (inf), ``c1``, ``c2`` (scipy's).

        sgd — ``sampler`` (required; ``sampler(rng, k) -> (k, n)`` patches, e.g.
        ``array_sampler(X)``), ``config`` (required ``SAEConfig``: ρ, β and where b1
        lies in θ), ``sparsity`` ("bias" or "kl", below), ``batch_fun``
        (``minibatch_cost_and_grad``; "bias" only), ``batch_size`` (100),
        ``learning_rate`` (α; 0.1 for "bias", 0.5 for "kl"), ``decay`` (α_t = α / (1 +
        decay·t) after t steps; 1e-4 for "bias", 0 for "kl"), ``steps_per_iter`` (1000:
        an iteration is 100K patches, one pass over the report's data set), ``tau``
        (0.05: p̂ := (1−τ) p̂ + τ·(mean a2 of the batch), p̂ starting at the first
        batch's rates), ``seed`` (0, for the sampler's generator).

        ``sparsity="bias"`` is the report's rule: step on the reconstruction +
        weight-decay cost, then b1 := b1 − α β (p̂ − ρ). On inputs in [0.1, 0.9] with a
        small λ (the default 1e-4) it holds the rates at ρ but lets W1 and b1 drift apart
        (W1 grows along the mean input, b1 falls to compensate), so J rises after some
        10⁵ steps at constant α ≥ 0.05; the default decay avoids that, and the run then
        stays near the "output the mean patch" cost. ``sparsity="kl"`` steps on the
        gradient of J itself with p̂ in place of the data set's rates in the sparsity
        delta; it leaves that plateau, learns filters like L-BFGS's and comes close to
        its cost (0.486 against 0.483 on 1/f-noise patches after 10⁵ steps).

        Without ``fun``, ``history`` records the mean minibatch cost of each iteration
        ("bias": reconstruction + weight decay only; "kl": with the batch's KL term).

    Returns
    -------
    OptimizeResult. A KeyboardInterrupt (Ctrl-C) inside ``fun`` or ``callback`` is not
    re-raised: the run ends with status 130, "interrupted (Ctrl-C)", and ``x`` is the
    last completed iteration's θ (``theta0`` if none completed).

    Raises
    ------
    ConfigError
        Unknown method or option, missing SGD option, bad ``maxiter``, a θ0 of a
        floating dtype other than float64 (float32 θ loses the small steps of L-BFGS).
    NumericalError
        ``fun`` (or SGD's ``batch_fun``) returned NaN or Inf; ``err.result`` holds the
        last completed iteration.
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    method = method.lower()
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise ConfigError(f"unknown options {unknown} for method {method!r}; valid: {', '.join(_OPTIONS[method])}")
    if int(maxiter) != maxiter or maxiter < 1:
        raise ConfigError(f"maxiter={maxiter!r} must be a positive integer, e.g. 400")
    if fun is None and method != "sgd":
        raise ConfigError(f"method {method!r} needs fun(θ) -> (cost, grad); only 'sgd' can do without")
    dtype = np.asarray(theta0).dtype
    if np.issubdtype(dtype, np.floating) and dtype != np.float64:
        raise ConfigError(
            f"θ0 is {dtype}: the optimizer keeps θ in float64 (the model computes in the patches' dtype); "
            "pass theta0.astype(np.float64)"
        )
    theta0 = np.array(theta0, dtype=np.float64).ravel()
    run = _Run(fun, theta0, callback)
    try:
        return _SOLVERS[method](run, theta0, int(maxiter), **options)
    except _Stop:
        return run.result("stopped")
    except KeyboardInterrupt:
        return run.result("interrupted")
    except NumericalError as err:
        err.result = run.result("nonfinite", error=err)
        raise


def _iteration_hook(run: _Run) -> Callable:
    """Scipy's per-iteration callback: closes an iteration in ``run``.

    Scipy >= 1.11 passes ``intermediate_result`` (with .x and .fun); older versions pass x.
    Either way the cost and gradient come from the evaluations ``run`` remembers.
    """

    def on_iteration(intermediate_result: Any) -> None:
        x = np.array(getattr(intermediate_result, "x", intermediate_result), dtype=np.float64)
        cost, grad = run.lookup(x)
        if np.isnan(cost) and hasattr(intermediate_result, "fun"):
            cost = float(intermediate_result.fun)
        run.record(x, cost, grad)

    return on_iteration


def _from_scipy(run: _Run, res: Any) -> OptimizeResult:
    return OptimizeResult(np.asarray(res.x, dtype=np.float64), float(res.fun), getattr(res, "jac", None),
                          int(res.nit), run.nfev, bool(res.success), int(res.status), str(res.message), run.history)


def _minimize_lbfgs(run: _Run, theta0: np.ndarray, maxiter: int, **options: Any) -> OptimizeResult:
    if "memory" in options:
        options["maxcor"] = options.pop("memory")
    opts = {"maxcor": 10, "ftol": 1e-12, "gtol": 1e-9, "maxfun": max(15000, 20 * maxiter), **options}
    res = scipy_minimize(run.evaluate, theta0, jac=True, method="L-BFGS-B", callback=_iteration_hook(run),
                         options={**opts, "maxiter": maxiter})
    return _from_scipy(run, res)


def _minimize_cg(run: _Run, theta0: np.ndarray, maxiter: int, **options: Any) -> OptimizeResult:
    opts = {"gtol": 1e-9, **options}
    res = scipy_minimize(run.evaluate, theta0, jac=True, method="CG", callback=_iteration_hook(run),
                         options={**opts, "maxiter": maxiter})
    return _from_scipy(run, res)


# SGD's defaults per sparsity rule, tuned on 1/f-noise patches (UFLDL-normalised, default
# SAEConfig, batch 100): "kl" reaches L-BFGS's cost (0.486 vs 0.483) and diverges from
# α = 2; "bias" stays stable with α = 0.1 only if α decays (see the notes in minimize).
_SGD_DEFAULTS = {"bias": {"learning_rate": 0.1, "decay": 1e-4}, "kl": {"learning_rate": 0.5, "decay": 0.0}}


def _minimize_sgd(
    run: _Run,
    theta0: np.ndarray,
    maxiter: int,
    *,
    sampler: Callable[[np.random.Generator, int], np.ndarray] | None = None,
    config: SAEConfig | None = None,
    sparsity: str = "bias",
    batch_fun: Callable = minibatch_cost_and_grad,
    batch_size: int = 100,
    learning_rate: float | None = None,
    decay: float | None = None,
    steps_per_iter: int = 1000,
    tau: float = 0.05,
    seed: int = 0,
) -> OptimizeResult:
    """The report's §2.1 SGD (or its KL variant); see ``minimize`` for the options."""
    if sparsity not in _SGD_DEFAULTS:
        raise ConfigError(f"unknown sparsity {sparsity!r}; choose one of: {', '.join(_SGD_DEFAULTS)}")
    learning_rate = _SGD_DEFAULTS[sparsity]["learning_rate"] if learning_rate is None else learning_rate
    decay = _SGD_DEFAULTS[sparsity]["decay"] if decay is None else decay
    _check_sgd_options(sampler, config, batch_size, learning_rate, decay, steps_per_iter, tau)
    rng = np.random.default_rng(seed)
    theta = theta0.copy()
    b1 = unpack(theta, config).b1  # a view: b1 -= ... updates θ
    rho, beta = config.sparsity_target, config.sparsity_weight
    p_hat = None

    def batch(iteration: int, step: int) -> tuple[float, np.ndarray]:
        nonlocal p_hat
        X = sampler(rng, batch_size)
        if sparsity == "bias":
            cost, grad, rate = batch_fun(theta, X, config)
            p_hat = rate if p_hat is None else (1.0 - tau) * p_hat + tau * rate
        else:
            cost, grad, p_hat = _kl_batch(theta, X, config, p_hat, tau)
        if not (np.isfinite(cost) and np.isfinite(grad).all()):
            raise NumericalError(
                f"SGD minibatch cost or gradient is not finite (cost={cost}) at iteration {iteration}, "
                f"step {step}; lower learning_rate (now {learning_rate}) or raise decay (now {decay})"
            )
        return float(cost), grad

    def close_iteration(batch_costs: list[float]) -> None:
        if run.fun is None:  # no monitor: the iteration's mean minibatch cost, no gradient at θ
            run.record(theta, float(np.mean(batch_costs)), None)
            return
        seconds = run.clock()
        with run.clock.paused():  # monitoring is not training: keep it off SGD's clock
            cost, grad = run.evaluate(theta, start=False)
        run.record(theta, cost, grad, seconds)

    cost, _ = batch(0, 0)  # iteration 0; p̂ starts at this batch's firing rates
    close_iteration([cost])
    t = 0
    for iteration in range(1, maxiter + 1):
        costs = []
        for step in range(1, steps_per_iter + 1):
            cost, grad = batch(iteration, step)
            costs.append(cost)
            alpha = learning_rate / (1.0 + decay * t)
            theta -= alpha * grad
            if sparsity == "bias":
                b1 -= alpha * beta * (p_hat - rho)
            t += 1
        close_iteration(costs)
    return run.result("sgd_done", maxiter=maxiter)


def _kl_batch(
    theta: np.ndarray, X: np.ndarray, config: SAEConfig, p_hat: np.ndarray | None, tau: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """Minibatch cost and gradient of J with the running rates p̂ in the sparsity delta.

    The gradient is the exact one of J except that s = β(−ρ/p + (1−ρ)/(1−p)) uses p̂
    (updated here with this batch's rates) instead of the firing rates of the whole data
    set; the cost is the batch's J (its KL term from the batch's own rates).
    """
    U = hidden_exp(theta, X, config)
    rate = hidden_sums(U, config)[: config.n_hidden] / U.shape[0]
    p_hat = rate if p_hat is None else (1.0 - tau) * p_hat + tau * rate
    s = sparsity_delta(np.clip(p_hat, 1e-12, 1.0 - 1e-12), config)
    cost, grad = finish_sums(theta, backward(theta, X, U, s, config), config, s_folded=True)
    return cost, grad, p_hat


def _check_sgd_options(sampler, config, batch_size, learning_rate, decay, steps_per_iter, tau) -> None:
    if sampler is None:
        raise ConfigError("method 'sgd' needs sampler=sampler(rng, k) -> (k, n) patches, e.g. array_sampler(X)")
    if not isinstance(config, SAEConfig):
        raise ConfigError("method 'sgd' needs config=SAEConfig(...) (for ρ, β and where b1 lies in θ)")
    for name, value in (("batch_size", batch_size), ("steps_per_iter", steps_per_iter)):
        if int(value) != value or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ConfigError(f"learning_rate={learning_rate!r} must be finite and > 0, e.g. 0.1")
    if not (np.isfinite(decay) and decay >= 0):
        raise ConfigError(f"decay={decay!r} must be finite and >= 0 (0 for a constant rate)")
    if not 0.0 < tau <= 1.0:
        raise ConfigError(f"tau={tau!r} must lie in (0, 1], e.g. 0.05")


def array_sampler(X: np.ndarray) -> Callable[[np.random.Generator, int], np.ndarray]:
    """A sampler for SGD drawing ``k`` rows of ``X`` (m, n) uniformly, with replacement.

    Parameters
    ----------
    X : (m, n) patches, one a row.

    Returns
    -------
    ``sampler(rng, k) -> (k, n)`` array.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ConfigError(f"array_sampler needs an (m, n) array with m >= 1, got shape {X.shape}")

    def sample(rng: np.random.Generator, k: int) -> np.ndarray:
        return X[rng.integers(0, X.shape[0], size=k)]

    return sample


_SOLVERS = {"lbfgs": _minimize_lbfgs, "cg": _minimize_cg, "sgd": _minimize_sgd}
