"""The textbook sparse-autoencoder cost: UFLDL's sparseAutoencoderCost written plainly.

Kept apart from ``qsae.model`` on purpose: it shares no code with the fast version, so the
tests can check one against the other, and the benchmark times the fast one against it.

One change from UFLDL: 1 − a2 is σ(−z2) (scipy's expit), not 1 − σ(z2), so a unit whose
σ rounds to 1 on every row (inputs far outside [0, 1]) has a finite KL term and the exact
f' — the cost qsae.model computes.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from .model import SAEConfig

__all__ = ["textbook_cost_and_grad"]

_FLOOR = 1e-300  # p or 1 − p below this count as this, as in qsae.model (RATE_FLOOR): a finite KL term


def textbook_cost_and_grad(theta: np.ndarray, X: np.ndarray, cfg: SAEConfig) -> tuple[float, np.ndarray]:
    """J(θ) and its gradient on X (m, n), one full-size numpy array per intermediate."""
    n, h, m = cfg.n_visible, cfg.n_hidden, X.shape[0]
    W1 = theta[: h * n].reshape(h, n)
    W2 = theta[h * n : 2 * h * n].reshape(n, h)
    b1, b2 = theta[2 * h * n : 2 * h * n + h], theta[2 * h * n + h :]
    lam, beta, rho = cfg.weight_decay, cfg.sparsity_weight, cfg.sparsity_target
    z2 = X @ W1.T + b1
    a2, q2 = expit(z2), expit(-z2)  # σ(z2) and 1 − σ(z2)
    a3 = expit(a2 @ W2.T + b2)
    p, q = np.maximum(a2.mean(axis=0), _FLOOR), np.maximum(q2.mean(axis=0), _FLOOR)
    kl = np.sum(rho * np.log(rho / p) + (1 - rho) * np.log((1 - rho) / q))
    cost = np.sum((a3 - X) ** 2) / (2 * m) + lam / 2 * (np.sum(W1**2) + np.sum(W2**2)) + beta * kl
    d3 = (a3 - X) * a3 * (1 - a3)
    d2 = (d3 @ W2 + beta * (-rho / p + (1 - rho) / q)) * a2 * q2
    grad = np.concatenate([(d2.T @ X / m + lam * W1).ravel(), (d3.T @ a2 / m + lam * W2).ravel(),
                           d2.mean(axis=0), d3.mean(axis=0)])
    return float(cost), grad
