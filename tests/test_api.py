"""The package's public names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qsae

pytestmark = pytest.mark.timeout(60)


def test_every_exported_name_resolves():
    for name in qsae.__all__:
        assert getattr(qsae, name) is not None, name
    assert {"Master", "SAEConfig", "load_images", "init_params"} <= set(qsae.__all__)


def test_exports_are_complete_and_real():
    import importlib

    for name, module in qsae._EXPORTS.items():
        assert name in importlib.import_module(module).__all__, f"{module}.__all__ lacks {name}"


def test_import_does_not_load_numpy():
    """Workers set their BLAS thread count before numpy loads; `import qsae` must not load it."""
    code = "import sys, qsae, qsae.worker; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qsae.nope


def test_a_trained_model_is_usable_from_the_top_level():
    """Issue 11 item 12: the estimator, load_model, forward and the patch helper are exported."""
    assert {"SparseAutoencoder", "load_model", "forward", "extract_patches"} <= set(qsae.__all__)
    from qsae.estimator import SparseAutoencoder
    from qsae.train import load_model

    assert qsae.SparseAutoencoder is SparseAutoencoder and qsae.load_model is load_model


def test_the_estimator_does_not_need_scikit_learn():
    """scikit-learn is a test extra: fitting and transforming must not import it."""
    code = ("import sys, numpy as np, qsae\n"
            "X = np.random.default_rng(0).random((50, 6))\n"
            "H = qsae.SparseAutoencoder(n_hidden=4, max_iter=3, random_state=0).fit_transform(X)\n"
            "print(H.shape, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "(50, 4) False", out.stderr
