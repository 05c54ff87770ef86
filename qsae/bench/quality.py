"""How well, not how fast: the optimizers (the report's Figure 2.3.2) and the average
protocol's error (its Theorem 3.1), on real patches from the built-in images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import load_images, sample_patches
from ..model import SAEConfig, cost_and_grad, init_params
from ..optim import array_sampler, minimize
from ..reduce import AverageReducer, ShardState, serial_scatter
from . import markdown

__all__ = ["compare_optimizers", "approx_error"]


def _run(method: str, fun, X: np.ndarray, cfg: SAEConfig, seed: int, seconds: float) -> list:
    def budget(info):
        if info.seconds > seconds:
            raise StopIteration

    options = {"sampler": array_sampler(X), "config": cfg, "seed": seed} if method == "sgd" else {}
    return minimize(fun, init_params(cfg, seed=seed), method=method, maxiter=1_000_000, callback=budget,
                    **options).history


def compare_optimizers(m: int, seconds: float, seeds: int, workers: int = 0, png: Path | None = None,
                       echo=print) -> str:
    """SGD, CG and L-BFGS on the same patches for ``seconds`` each, ``seeds`` runs each.

    With ``workers`` > 0, CG and L-BFGS evaluate the cost through a Master with that many
    local workers (SGD steps on minibatches in this process either way; its full cost J is
    evaluated with its clock paused). Returns a markdown table; writes the curves to ``png``.
    """
    from ..master import Master
    from ..viz import save_cost_curves

    cfg, images = SAEConfig(), load_images()
    runs: dict[str, list] = {"sgd": [], "cg": [], "lbfgs": []}
    for seed in range(seeds):
        X = sample_patches(images, m, seed=seed)
        local = lambda th, X=X: cost_and_grad(th, X, cfg)  # noqa: E731
        runs["sgd"].append(_run("sgd", local, X, cfg, seed, seconds))
        if workers:
            with Master(workers=workers, config=cfg) as master:
                master.scatter_images(images, m=m, seed=seed)
                for method in ("cg", "lbfgs"):
                    runs[method].append(_run(method, master, X, cfg, seed, seconds))
        else:
            for method in ("cg", "lbfgs"):
                runs[method].append(_run(method, local, X, cfg, seed, seconds))
        echo(f"optimizers: seed {seed} done")
    best = min(c for hs in runs.values() for h in hs for _, _, c in h)
    rows = []
    for method, hs in runs.items():
        reach = [next((s for _, s, c in h if c <= 1.01 * best), np.nan) for h in hs]
        rows.append([method, f"{np.mean([h[-1][2] for h in hs]):.6f}", f"{np.mean([h[-1][0] for h in hs]):.0f}",
                     "never" if np.all(np.isnan(reach)) else f"{np.nanmean(reach):.1f}"])
    if png is not None:
        # only J < 0.5: the first steps (from J ≈ 60, mostly the KL term at p = 0.5) would flatten the rest
        save_cost_curves({k: [[p for p in h if p[2] < 0.5] for h in hs] for k, hs in runs.items()}, png,
                         logy=False, title=f"{m} patches, mean of {seeds} seeds (J < 0.5)")
    head = ["optimizer", "mean final cost", "mean iterations", "mean seconds to within 1% of the best"]
    return markdown(head, rows)


def approx_error(theta: np.ndarray | None, config: SAEConfig | None, sizes: list[int], shards: list[int]) -> str:
    """|C − C*|/C* and |∇C − ∇C*|/|∇C*| of the average protocol for m patches in t shards."""
    cfg = config or SAEConfig()
    theta = init_params(cfg) if theta is None else theta
    images = load_images()
    rows = []
    for m in sizes:
        X = sample_patches(images, m, patch_size=int(round(np.sqrt(cfg.n_visible))), seed=0)
        exact, g_exact = cost_and_grad(theta, X, cfg)
        cells = []
        for t in shards:
            parts = [ShardState(p, cfg) for p in np.array_split(X, t)]
            approx, g = AverageReducer(cfg).evaluate(theta, serial_scatter(parts))
            cells.append(f"{abs(approx - exact) / exact:.1e}, {np.linalg.norm(g - g_exact) / np.linalg.norm(g_exact):.1e}")
        rows.append([m, *cells])
    return markdown(["m", *(f"t={t}" for t in shards)], rows)
