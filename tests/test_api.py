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
