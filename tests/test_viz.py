"""Tests of qsae.viz: the filter grid's layout and normalisation, and the PNG writers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qsae.errors import ConfigError, MissingDependency
from qsae.model import SAEConfig, init_params, unpack
from qsae.viz import filter_grid, save_cost_curves, save_filters, save_speedup

pytestmark = pytest.mark.timeout(30)

CFG = SAEConfig(n_visible=64, n_hidden=30)


def tile(grid: np.ndarray, k: int, p: int = 8, cols: int = 6) -> np.ndarray:
    r, c = divmod(k, cols)
    return grid[1 + r * (p + 1) : 1 + r * (p + 1) + p, 1 + c * (p + 1) : 1 + c * (p + 1) + p]


def test_filter_grid_layout():
    theta = init_params(CFG, seed=1)
    grid = filter_grid(theta, CFG)
    assert grid.shape == (5 * 9 + 1, 6 * 9 + 1)  # 30 tiles of 8×8 in 5 rows × 6 columns
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    assert (grid[::9, :] == 0).all() and (grid[:, ::9] == 0).all()  # 1-pixel borders
    W1 = unpack(theta, CFG).W1
    for k in (0, 7, 29):
        expected = 0.5 + 0.5 * W1[k].reshape(8, 8) / np.abs(W1[k]).max()
        np.testing.assert_allclose(tile(grid, k), expected)


def test_filter_grid_normalises_each_tile():
    theta = init_params(CFG, seed=2)
    W1 = unpack(theta, CFG).W1
    W1[3] = 5.0 * W1[4]  # same pattern, 5× the contrast
    W1[5] = 0.0  # an empty filter is mid-grey, not a division by zero
    grid = filter_grid(theta, CFG)
    np.testing.assert_allclose(tile(grid, 3), tile(grid, 4))
    assert tile(grid, 4).min() == 0.0 or tile(grid, 4).max() == 1.0  # full range used
    np.testing.assert_array_equal(tile(grid, 5), 0.5)


def test_filter_grid_needs_square_patches():
    cfg = SAEConfig(n_visible=60, n_hidden=4)
    with pytest.raises(ConfigError, match="square"):
        filter_grid(init_params(cfg), cfg)


def test_save_filters_writes_a_grey_png(tmp_path):
    import matplotlib.image

    theta = init_params(CFG, seed=3)
    path = save_filters(theta, CFG, tmp_path / "filters.png", scale=4)
    image = matplotlib.image.imread(path)
    assert image.shape == (46 * 4, 55 * 4)  # grey: one channel
    grid = filter_grid(theta, CFG)
    np.testing.assert_allclose(image[::4, ::4], grid, atol=1 / 255)
    np.testing.assert_array_equal(image[1::4, 2::4], image[::4, ::4])  # nearest neighbour


def history(seed: int, rate: float, n: int = 30) -> list[tuple[int, float, float]]:
    rng = np.random.default_rng(seed)
    seconds = np.cumsum(rng.uniform(0.05, 0.15, n + 1)) - 0.05
    return [(i, float(s), float(60 * np.exp(-rate * i) + 0.5)) for i, s in enumerate(seconds)]


@pytest.mark.parametrize("x", ["seconds", "iteration"])
def test_save_cost_curves_with_seeds(tmp_path, x):
    import matplotlib.image

    runs = {"L-BFGS": [history(s, 0.3) for s in range(3)], "SGD": [history(10 + s, 0.1) for s in range(3)]}
    path = save_cost_curves(runs, tmp_path / "curves.png", x=x, title="test")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something was drawn


def test_save_cost_curves_single_runs_and_results(tmp_path):
    from qsae.optim import OptimizeResult

    result = OptimizeResult(np.zeros(2), 0.5, None, 30, 31, True, 0, "ok", history(1, 0.2))
    path = save_cost_curves({"one": history(0, 0.3), "result": result}, tmp_path / "c.png", logy=False)
    assert path.exists() and path.stat().st_size > 0


def test_save_cost_curves_rejects_bad_input(tmp_path):
    with pytest.raises(ConfigError):
        save_cost_curves({"a": history(0, 0.3)}, tmp_path / "c.png", x="minutes")
    with pytest.raises(ConfigError):
        save_cost_curves({"a": [(0, 1.0)]}, tmp_path / "c.png")


def test_save_speedup(tmp_path):
    import matplotlib.image

    workers = [1, 2, 4, 8]
    path = save_speedup(workers, [[1, 1.9, 3.5, 6.0], [1, 1.8, 3.1, 5.2]], tmp_path / "s.png",
                        labels=["one round", "two rounds"])
    assert matplotlib.image.imread(path).shape[0] > 100
    assert save_speedup(workers, [1, 2, 3, 4], tmp_path / "t.png").exists()
    with pytest.raises(ConfigError):
        save_speedup(workers, [1, 2], tmp_path / "u.png")


def test_missing_matplotlib_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(MissingDependency, match="pip install matplotlib"):
        save_speedup([1, 2], [1, 2], tmp_path / "s.png")


def test_import_does_not_load_matplotlib():
    code = "import sys, qsae.viz, qsae.optim; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
