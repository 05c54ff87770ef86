"""qsae: sparse autoencoders trained by a ZeroMQ master and long-lived workers.

    from qsae import Master, SAEConfig, load_images, init_params
    with Master(workers=2, config=SAEConfig(), protocol="exact") as master:
        master.scatter_images(load_images(), m=100_000, seed=0)
        result = master.fit(method="lbfgs", maxiter=400)

    from qsae import SparseAutoencoder                 # a trained model, scikit-learn style
    sae = SparseAutoencoder.load("runs/latest/model.npz")
    H = sae.transform(sae.extract_patches("photos/"))     # new images, cut and normalised alike

The names below are loaded on first use (PEP 562), so ``import qsae`` stays cheap and a
worker can set its BLAS thread count before numpy is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SAEConfig": "qsae.model",
    "init_params": "qsae.model",
    "cost_and_grad": "qsae.model",
    "forward": "qsae.model",
    "load_images": "qsae.data",
    "sample_patches": "qsae.data",
    "extract_patches": "qsae.data",
    "DataSpec": "qsae.data",
    "SparseAutoencoder": "qsae.estimator",
    "load_model": "qsae.train",
    "minimize": "qsae.optim",
    "OptimizeResult": "qsae.optim",
    "make_reducer": "qsae.reduce",
    "Master": "qsae.master",
    "LocalLauncher": "qsae.launch",
    "SSHLauncher": "qsae.launch",
    "SlurmLauncher": "qsae.launch",
    "parse_hosts": "qsae.launch",
    "QsaeError": "qsae.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: __getattr__ runs once per name
        return value
    raise AttributeError(f"module 'qsae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
