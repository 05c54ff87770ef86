"""Pictures: learned filters (the report's Figure 2.3.1), cost curves (Figure 2.3.2), speedups.

Matplotlib is imported inside the functions, so ``import qsae`` stays fast and works
without it. Figures are drawn on ``matplotlib.figure.Figure`` objects (the Agg canvas,
no pyplot, no window, no global backend switch).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError, MissingDependency
from .model import SAEConfig, unpack

__all__ = ["filter_grid", "save_filters", "save_cost_curves", "save_speedup"]

PathLike = str | os.PathLike


def _matplotlib() -> Any:
    """The matplotlib package, or MissingDependency naming the pip command."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401  (imports the Agg machinery)
    except ImportError as err:
        raise MissingDependency("plots need matplotlib: pip install matplotlib") from err
    return matplotlib


def filter_grid(theta: np.ndarray, config: SAEConfig) -> np.ndarray:
    """The rows of W1 as patch tiles in a near-square grid (UFLDL's display_network).

    Each tile is scaled by its own max |w| to [−1, 1], then mapped to [0, 1] (0.5 is a
    zero weight); tiles are separated and surrounded by 1-pixel borders of 0 (black).

    Parameters
    ----------
    theta : (n_params,) weights.
    config : the model; ``n_visible`` must be a square (64 for 8×8 patches).

    Returns
    -------
    (rows·(p+1)+1, cols·(p+1)+1) float array in [0, 1], with p = sqrt(n_visible),
    cols = ceil(sqrt(n_hidden)) and rows = ceil(n_hidden / cols).
    """
    W1 = unpack(theta, config).W1
    h, n = W1.shape
    p = math.isqrt(n)
    if p * p != n:
        raise ConfigError(f"n_visible={n} is not a square number, so W1's rows are not square patches")
    cols = math.ceil(math.sqrt(h))
    rows = math.ceil(h / cols)
    scale = np.abs(W1).max(axis=1, keepdims=True)
    scale[scale == 0] = 1.0  # an all-zero filter stays mid-grey
    tiles = 0.5 + 0.5 * (W1 / scale)
    grid = np.zeros((rows * (p + 1) + 1, cols * (p + 1) + 1))
    for k in range(h):
        r, c = divmod(k, cols)
        grid[1 + r * (p + 1) : (r + 1) * (p + 1), 1 + c * (p + 1) : (c + 1) * (p + 1)] = tiles[k].reshape(p, p)
    return grid


def save_filters(theta: np.ndarray, config: SAEConfig, path: PathLike, scale: int = 8) -> Path:
    """Write ``filter_grid(theta, config)`` as a grey PNG, each pixel a ``scale``² block.

    Returns
    -------
    The path written.
    """
    _matplotlib()
    from PIL import Image  # a dependency of matplotlib

    if int(scale) != scale or scale < 1:
        raise ConfigError(f"scale={scale!r} must be a positive integer, e.g. 8")
    grid = filter_grid(theta, config)
    big = np.kron(grid, np.ones((int(scale), int(scale))))  # nearest-neighbour enlargement
    path = Path(path)
    Image.fromarray(np.round(big * 255).astype(np.uint8)).save(path, format="png")  # 2-D uint8: grey
    return path


def _as_runs(value: Any) -> list[np.ndarray]:
    """One label's value — a history, a list of histories, or results — as (k, 3) arrays."""
    if hasattr(value, "history"):
        value = value.history
    value = list(value)
    first = value[0] if value else ()
    if hasattr(first, "history") or np.ndim(first) != 1:  # a list of runs (seeds)
        runs = [np.asarray(getattr(v, "history", v), dtype=float) for v in value]
    else:  # one run: (iteration, seconds, cost) rows
        runs = [np.asarray(value, dtype=float)]
    for run in runs:
        if run.ndim != 2 or run.shape[1] != 3 or len(run) == 0:
            raise ConfigError(f"a cost history must be (iteration, seconds, cost) rows, got shape {run.shape}")
    return runs


def save_cost_curves(
    runs: Mapping[str, Any],
    path: PathLike,
    x: str = "seconds",
    logy: bool = True,
    title: str = "cost against time",
    above_best: bool = False,
) -> Path:
    """Plot cost against time (or iteration) for several runs, one line per label.

    Parameters
    ----------
    runs : label -> one history (a list of (iteration, seconds, cost), e.g.
        ``OptimizeResult.history``) or a list of histories (several seeds). For several
        seeds the mean over seeds is drawn, interpolated onto a common grid spanning the
        stretch every seed covers, with a light band from the min to the max.
    path : PNG to write.
    x : "seconds" or "iteration".
    logy : logarithmic cost axis.
    title : figure title.
    above_best : plot J − J_best, J_best the lowest cost of any run drawn (its value in the
        axis label), instead of J. On a log axis the whole run is then readable: J falls
        from ~60 to ~0.4 in the first few iterations, and the remaining progress, a few
        hundredths, is a flat line on an axis of J itself. Points at J_best are not drawn.

    Returns
    -------
    The path written.
    """
    _matplotlib()
    from matplotlib.figure import Figure

    columns = {"iteration": 0, "seconds": 1}
    if x not in columns:
        raise ConfigError(f"x={x!r}; choose one of: {', '.join(columns)}")
    col = columns[x]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    every = {label: _as_runs(value) for label, value in runs.items()}
    best = min(float(np.nanmin(c[:, 2])) for curves in every.values() for c in curves) if above_best else 0.0

    def y(cost: np.ndarray) -> np.ndarray:
        if not above_best:
            return cost
        gap = cost - best
        return np.where(gap > 0, gap, np.nan)  # the best point itself is 0: off a log axis

    for label, curves in every.items():
        if len(curves) == 1:
            ax.plot(curves[0][:, col], y(curves[0][:, 2]), label=label)
            continue
        lo = max(c[0, col] for c in curves)
        hi = min(c[-1, col] for c in curves)
        grid = np.linspace(lo, hi, 200)
        ys = np.array([np.interp(grid, c[:, col], c[:, 2]) for c in curves])
        (line,) = ax.plot(grid, y(ys.mean(axis=0)), label=f"{label} (mean of {len(curves)})")
        ax.fill_between(grid, y(ys.min(axis=0)), y(ys.max(axis=0)), color=line.get_color(), alpha=0.2, linewidth=0)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("seconds" if x == "seconds" else "iteration")
    ax.set_ylabel(f"J − {best:.6g} (the lowest J)" if above_best else "cost J")
    ax.set_title(title)
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def save_speedup(
    workers: Sequence[int],
    speedups: Sequence[float] | Sequence[Sequence[float]],
    path: PathLike,
    labels: Sequence[str] | None = None,
    title: str = "speedup",
) -> Path:
    """Plot speedup against the number of workers, with the ideal line y = x.

    Parameters
    ----------
    workers : numbers of workers (the x values).
    speedups : one curve (same length as ``workers``) or several (one row per curve).
    path : PNG to write.
    labels : one label per curve (default "measured", or "run 1", "run 2", ...).
    title : figure title.

    Returns
    -------
    The path written.
    """
    _matplotlib()
    from matplotlib.figure import Figure

    w = np.asarray(workers, dtype=float)
    s = np.atleast_2d(np.asarray(speedups, dtype=float))
    if w.ndim != 1 or s.shape[1] != len(w):
        raise ConfigError(f"speedups {s.shape} do not match workers ({len(w)},): one value per worker count")
    if labels is None:
        labels = ["measured"] if len(s) == 1 else [f"run {i + 1}" for i in range(len(s))]
    if len(labels) != len(s):
        raise ConfigError(f"{len(labels)} labels for {len(s)} speedup curves")
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    top = max(w.max(), 1.0)
    ax.plot([1, top], [1, top], "k--", linewidth=1, label="ideal")
    for row, label in zip(s, labels):
        ax.plot(w, row, "o-", label=label)
    ax.set_xlabel("workers")
    ax.set_ylabel("speedup")
    ax.set_title(title)
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
