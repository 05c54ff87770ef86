"""``SparseAutoencoder``: the scikit-learn style front of qsae (fit, transform, save, load).

    from qsae import SparseAutoencoder
    sae = SparseAutoencoder(n_hidden=100, random_state=0).fit(X)   # X (m, n) in [0, 1]
    H = sae.transform(X)                                           # hidden activations (m, h)
    sae = SparseAutoencoder.load("runs/latest/model.npz")          # a qsae-master run
    H = sae.transform(sae.extract_patches("photos/"))              # new images, patches as in training

The estimator follows scikit-learn's conventions (``__init__`` stores its arguments,
``fit`` returns self, learned state ends with ``_``, ``get_params``/``set_params``, tags)
without importing scikit-learn: it is a test extra, not a dependency. The numbers come
from plain functions: ``model.cost_and_grad`` and ``optim.minimize`` in this process,
a ``Master`` for ``workers=N`` or a hosts file, ``model.forward`` for ``transform``.

Inputs are the model's visible units, so they belong in [0, 1] (the sigmoid's range);
scale features first, e.g. ``MinMaxScaler(feature_range=(0.1, 0.9))``. Unscaled inputs
saturate the hidden units: ``fit`` then ends with a ``SaturationWarning`` that says so.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError, DataTypeError, NumericalError, SaturationWarning

__all__ = ["SparseAutoencoder"]

log = logging.getLogger("qsae.estimator")

_SEED_MAX = 2**31 - 1  # seeds drawn from a RandomState/Generator fit in an int32, as sklearn's
SATURATED_Z = 13.8  # |z| past which a hidden unit is saturated: σ'(z) < 1e-6, its gradient all but gone
SATURATED_WARN = 0.5  # fit warns when more than this share of hidden activations ends saturated
_SCALE_HINT = "scale X into [0, 1] first, e.g. MinMaxScaler(feature_range=(0.1, 0.9))"


class SparseAutoencoder:
    """A sparse autoencoder as a scikit-learn transformer: X (m, n) -> hidden activations (m, h).

    Parameters
    ----------
    n_hidden : hidden units h.
    weight_decay : λ, the L2 penalty on W1 and W2.
    sparsity_weight : β, the weight of the KL sparsity penalty.
    sparsity_target : ρ, the target mean activation of each hidden unit.
    optimizer : "lbfgs", "cg" or "sgd" (see ``qsae.optim.minimize``).
    max_iter : optimizer iterations.
    protocol : "exact" or "average": how workers' sums are combined (``workers`` only).
    dtype : "float64" or "float32": the precision of X in the cost (θ stays float64).
    random_state : None, an int, a ``numpy.random.RandomState`` or ``Generator``: the
        initial weights (and SGD's minibatches).
    workers : None: compute in this process; an int N: N local worker processes; a path
        (str or ``os.PathLike``) to a hosts file: workers started over SSH.

    Attributes
    ----------
    n_features_in_ : n, the number of visible units.
    components_ : (h, n) W1, the encoder's weights (one filter a row).
    intercept_ : (h,) b1, the encoder's biases.
    decoder_weights_ : (n, h) W2.
    decoder_intercept_ : (n,) b2.
    n_iter_ : optimizer iterations run.
    sigma_ : σ of the training patches' normalisation (from model.npz), None when fitted
        on X directly.
    data_ : the training run's data spec (``DataSpec.to_dict()``), None when fitted on X.
    """

    def __init__(
        self,
        n_hidden: int = 30,
        weight_decay: float = 1e-4,
        sparsity_weight: float = 3.0,
        sparsity_target: float = 0.01,
        optimizer: str = "lbfgs",
        max_iter: int = 400,
        protocol: str = "exact",
        dtype: str = "float64",
        random_state: Any = None,
        workers: int | str | os.PathLike | None = None,
    ) -> None:
        self.n_hidden = n_hidden
        self.weight_decay = weight_decay
        self.sparsity_weight = sparsity_weight
        self.sparsity_target = sparsity_target
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.protocol = protocol
        self.dtype = dtype
        self.random_state = random_state
        self.workers = workers

    # ------------------------------------------------------------------ parameters

    @classmethod
    def _get_param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's parameters as a dict (``deep`` is accepted for scikit-learn)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any) -> "SparseAutoencoder":
        """Set constructor parameters by name; returns self."""
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise ConfigError(f"Invalid parameter {name!r} for estimator {type(self).__name__}; "
                                  f"valid parameters are: {valid}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if not _same(v, defaults[k])]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self):
        """scikit-learn's tags (imports scikit-learn: only scikit-learn calls this)."""
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(estimator_type="transformer", target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=[self._dtype().name]),
                    input_tags=InputTags(two_d_array=True, sparse=False, allow_nan=False))

    def _more_tags(self) -> dict[str, Any]:
        """Tags for scikit-learn before 1.6."""
        return {"preserves_dtype": [self._dtype().type], "requires_y": False, "allow_nan": False}

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "components_")

    # ------------------------------------------------------------------ fit / transform

    def fit(self, X: Any, y: Any = None) -> "SparseAutoencoder":
        """Learn the weights from X (m, n_features); ``y`` is ignored. Returns self."""
        from .model import init_params

        X = self._validate(X, n_features=None)
        cfg = self._config(X.shape[1])
        method, maxiter, seed = self._run_settings(cfg)
        _check_lbfgs_size(cfg, method)
        theta0 = init_params(cfg, seed=seed)
        result = self._minimize(X, cfg, theta0, method, maxiter, seed)
        _warn_if_saturated(result.x, X, cfg)
        self._set_weights(result.x, cfg)
        self.n_iter_ = int(result.nit)
        self.sigma_ = None  # fitted on X: no images, no σ
        self.data_ = None
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Hidden activations σ(X W1ᵀ + b1): (m, n_hidden)."""
        from .model import forward

        self._check_fitted("transform")
        X = self._validate(X, n_features=self.n_features_in_)
        cfg = self._fitted_config()
        A = forward(self._theta(), X, cfg)
        return np.ascontiguousarray(A[:, : cfg.n_hidden], dtype=X.dtype)

    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray:
        """``fit(X).transform(X)``."""
        return self.fit(X, y).transform(X)

    def inverse_transform(self, H: Any) -> np.ndarray:
        """Reconstructions σ(H W2ᵀ + b2): (m, n_features) from hidden activations H (m, n_hidden)."""
        from scipy.special import expit

        self._check_fitted("inverse_transform")
        H = self._validate(H, n_features=self.components_.shape[0], what="H", unit="hidden units")
        return expit(H @ self.decoder_weights_.T.astype(H.dtype) + self.decoder_intercept_.astype(H.dtype))

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of the output columns: sparseautoencoder0, sparseautoencoder1, ..."""
        self._check_fitted("get_feature_names_out")
        if input_features is not None and len(input_features) != self.n_features_in_:
            raise DataError(f"input_features should have length equal to number of features "
                            f"({self.n_features_in_}), got {len(input_features)}; pass one name per column of X")
        prefix = type(self).__name__.lower()
        return np.array([f"{prefix}{i}" for i in range(self.components_.shape[0])], dtype=object)

    # ------------------------------------------------------------------ files and images

    def save(self, path: str | os.PathLike) -> Path:
        """Write model.npz (θ, config, meta) readable by ``qsae.train.load_model`` and ``load``."""
        from .train import save_model

        self._check_fitted("save")
        params = self.get_params()
        params["workers"] = str(params["workers"]) if isinstance(params["workers"], os.PathLike) else params["workers"]
        if not isinstance(params["random_state"], (int, type(None))):
            params["random_state"] = None  # a RandomState object is not JSON; its draw is already in θ
        return save_model(path, self._theta(), self._fitted_config(), self.data_, optimizer=self.optimizer,
                          iteration=self.n_iter_, finished=True, sigma=self.sigma_, dtype=self._dtype().name,
                          estimator=params)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparseAutoencoder":
        """A fitted estimator from a model.npz written by qsae-master or by ``save``."""
        from .train import load_model

        theta, cfg, meta = load_model(path)
        params = {k: v for k, v in (meta.get("estimator") or {}).items() if k in cls._get_param_names()}
        data = meta.get("data")
        if "estimator" not in meta:  # a qsae-master run: its optimizer, precision and seed
            params.update(optimizer=meta.get("optimizer", "lbfgs"), dtype=meta.get("dtype", "float64"),
                          random_state=data.get("seed") if data else None)
            if meta.get("protocol") in ("exact", "average"):  # "local": trained in one process, no protocol
                params["protocol"] = meta["protocol"]
        params.update(n_hidden=cfg.n_hidden, weight_decay=cfg.weight_decay, sparsity_weight=cfg.sparsity_weight,
                      sparsity_target=cfg.sparsity_target)
        est = cls(**params)
        est._set_weights(np.asarray(theta, dtype=np.float64), cfg)
        est.n_iter_ = int(meta.get("iteration", 0))
        est.data_ = data
        est.sigma_ = meta.get("sigma")
        if est.sigma_ is None and data:
            est.sigma_ = _sigma_of(data, path)
        return est

    def extract_patches(self, images: Any, stride: int | None = None) -> np.ndarray:
        """Patches of new images, normalised like this model's training patches.

        Parameters
        ----------
        images : a source ``load_images`` reads (a folder of PNG/JPEG, one image file,
            .npy/.npz/.mat), prepared (whitened or not) as the training images were; or 2-D
            arrays already prepared.
        stride : step between patches; None: a grid of non-overlapping patches; 1: all.

        Returns
        -------
        (k, n_features) patches in this model's dtype, ready for ``transform``.
        """
        from .data import extract_patches, load_images

        self._check_fitted("extract_patches")
        if self.sigma_ is None:
            raise ConfigError("this model has no σ for patch normalisation (it was fitted on X rather than on images, "
                              "or its model.npz lacks σ and its training images could not be read); use "
                              "qsae.extract_patches(images, patch_size, sigma=...) with the σ of your data")
        side = (self.data_ or {}).get("patch_size") or int(round(np.sqrt(self.n_features_in_)))
        if isinstance(images, (str, os.PathLike)):
            images = load_images(images, whiten=(self.data_ or {}).get("whiten"))
        return extract_patches(images, patch_size=side, stride=stride, sigma=self.sigma_, dtype=self._dtype())

    # ------------------------------------------------------------------ private

    def _dtype(self) -> np.dtype:
        from .data import _check_dtype

        return _check_dtype(self.dtype)

    def _config(self, n_features: int):
        from .model import SAEConfig

        return SAEConfig(n_visible=n_features, n_hidden=self.n_hidden, weight_decay=self.weight_decay,
                         sparsity_weight=self.sparsity_weight, sparsity_target=self.sparsity_target)

    def _fitted_config(self):
        """The SAEConfig the weights were learned with (not changed by a later set_params)."""
        return self._fit_config

    def _run_settings(self, cfg) -> tuple[str, int, int]:
        """(optimizer, max_iter, seed), checked with the protocol, before any work."""
        from .optim import METHODS
        from .reduce import make_reducer

        if self.optimizer not in METHODS:
            raise ConfigError(f"optimizer={self.optimizer!r}; choose one of {', '.join(METHODS)}")
        make_reducer(self.protocol, cfg)  # an unknown protocol is an error even in this process
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ConfigError(f"max_iter={self.max_iter!r} must be a positive integer, e.g. 400")
        return self.optimizer, int(self.max_iter), _seed(self.random_state)

    def _minimize(self, X: np.ndarray, cfg, theta0: np.ndarray, method: str, maxiter: int, seed: int):
        from .model import cost_and_grad
        from .optim import array_sampler, minimize

        options = {"sampler": array_sampler(X), "config": cfg, "seed": seed} if method == "sgd" else {}
        try:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # a non-finite cost raises instead
                if self.workers is None:
                    result = minimize(lambda th: cost_and_grad(th, X, cfg), theta0, method=method, maxiter=maxiter,
                                      **options)
                else:
                    with self._master(cfg) as master:
                        master.scatter(X)
                        result = master.fit(theta0, method=method, maxiter=maxiter, **options)
        except NumericalError as e:
            lo, hi = float(X.min()), float(X.max())
            if lo < 0 or hi > 1:  # far outside [0, 1] the sigmoids saturate and the optimizer can diverge
                raise NumericalError(f"{e}; X ranges over [{lo:.3g}, {hi:.3g}] but a sparse autoencoder's inputs "
                                     f"belong in [0, 1]: {_SCALE_HINT}") from e
            raise
        if result.status == 130:
            raise KeyboardInterrupt  # minimize swallowed Ctrl-C to return a result; a fit has none
        return result

    def _master(self, cfg):
        from .master import Master

        options: dict[str, Any] = {"config": cfg, "protocol": self.protocol}
        if self._dtype() != np.float64:
            options["dtype"] = self._dtype().name  # Master takes dtype from the float32 release on
        w = self.workers
        if isinstance(w, (str, os.PathLike)):
            from .launch import SSHLauncher, parse_hosts

            return Master(launcher=SSHLauncher(parse_hosts(w)), **options)
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
            raise ConfigError(f"workers={w!r}: pass None (this process), a positive number of local workers, "
                              "or the path of a hosts file")
        return Master(workers=int(w), **options)

    def _set_weights(self, theta: np.ndarray, cfg) -> None:
        from .model import unpack

        W1, W2, b1, b2 = (np.array(a) for a in unpack(theta, cfg))  # copies: θ may be reused
        self._fit_config = cfg
        self.n_features_in_ = cfg.n_visible
        self.components_, self.intercept_ = W1, b1
        self.decoder_weights_, self.decoder_intercept_ = W2, b2

    def _theta(self) -> np.ndarray:
        return np.concatenate([self.components_.ravel(), self.decoder_weights_.ravel(), self.intercept_,
                               self.decoder_intercept_])

    def _check_fitted(self, method: str) -> None:
        if not self.__sklearn_is_fitted__():
            raise ConfigError(f"This {type(self).__name__} instance is not fitted yet; call fit(X) or "
                              f"{type(self).__name__}.load(path) before {method}()")

    def _validate(self, X: Any, n_features: int | None, what: str = "X", unit: str = "features") -> np.ndarray:
        """X as a C-contiguous 2-D finite array of this model's dtype, with ``n_features`` columns."""
        if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
            raise DataError(f"{what} is a sparse matrix; sparse input is not supported: pass {what}.toarray()")
        a = np.asarray(X)
        if np.iscomplexobj(a):
            raise DataTypeError(f"Complex data not supported: {what} is {a.dtype}; pass real numbers")
        if a.dtype.kind not in "biufO":
            raise DataTypeError(f"{what} has dtype {a.dtype}; pass numbers (int or float)")
        try:
            a = np.ascontiguousarray(a, dtype=self._dtype())
        except TypeError as e:  # a dict or another object that is no number: a TypeError, as numpy's
            raise DataTypeError(f"{what} cannot be converted to {self._dtype().name} ({e}); pass numbers") from e
        except ValueError as e:  # a string that is no number
            raise DataError(f"{what} cannot be converted to {self._dtype().name} ({e}); pass numbers") from e
        if a.ndim != 2:
            raise DataError(f"{what} has shape {a.shape}; expected a 2-D array (n_samples, n_{unit.replace(' ', '_')}): "
                            f"Reshape your data: {what}.reshape(-1, 1) for one column or {what}.reshape(1, -1) for one sample")
        if a.shape[0] == 0:
            raise DataError(f"{what} has 0 sample(s) (shape={a.shape}) while a minimum of 1 is required; pass at least one row")
        if a.shape[1] == 0:
            raise DataError(f"{what} has 0 feature(s) (shape={a.shape}) while a minimum of 1 is required; "
                            "pass at least one column")
        if n_features is not None and a.shape[1] != n_features:
            raise DataError(f"{what} has {a.shape[1]} {unit}, but {type(self).__name__} is expecting {n_features} "
                            f"{unit} as input")
        bad = a.size - int(np.count_nonzero(np.isfinite(a)))
        if bad:
            raise DataError(f"{what} has {bad} NaN or Inf values; drop or impute them first")
        return a


def _warn_if_saturated(theta: np.ndarray, X: np.ndarray, cfg) -> None:
    """A SaturationWarning, with the fix in its message, when most hidden activations of X
    end saturated (|z| > SATURATED_Z): what unscaled inputs do to a sparse autoencoder."""
    from .model import hidden_exp

    u = hidden_exp(theta, X, cfg)[:, : cfg.n_hidden]  # e^−z
    share = float(np.count_nonzero((u < np.exp(-SATURATED_Z)) | (u > np.exp(SATURATED_Z)))) / u.size
    if share > SATURATED_WARN:
        lo, hi = float(X.min()), float(X.max())
        where = (f"X ranges over [{lo:.3g}, {hi:.3g}], but a sparse autoencoder's inputs belong in [0, 1]"
                 if lo < 0 or hi > 1 else f"X ranges over [{lo:.3g}, {hi:.3g}]")
        warnings.warn(f"{share:.1%} of the hidden activations ended saturated (σ within 1e-6 of 0 or 1, where "
                      f"they no longer learn): {where}; {_SCALE_HINT}", SaturationWarning, stacklevel=3)


def _same(a: Any, b: Any) -> bool:
    """Whether a parameter value is its default (for the repr)."""
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError):
        return False


def _seed(random_state: Any) -> int:
    """An int seed from scikit-learn's random_state conventions."""
    if random_state is None:
        return int(np.random.randint(0, _SEED_MAX))  # the global RandomState, as sklearn's None
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ConfigError(f"random_state={random_state} must be >= 0")
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, _SEED_MAX))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, _SEED_MAX))
    raise ConfigError(f"random_state={random_state!r}: pass None, an int, a numpy RandomState or Generator")


def _sigma_of(data: dict, path: Any) -> float | None:
    """σ recomputed from a saved data spec (model.npz files from before σ was saved)."""
    from .data import DataSpec

    try:
        return DataSpec.from_dict(data).sigma()
    except DataError as e:
        log.warning("%s has no sigma and its training images cannot be read (%s); extract_patches() will "
                    "need qsae.extract_patches(..., sigma=...) instead", path, e)
        return None


def _check_lbfgs_size(cfg, method: str) -> None:
    """scipy's L-BFGS indexes its workspace with 32-bit integers: past its limit it crashes the
    process (signal 11) instead of raising, so a model that large is refused here, by name."""
    from .train import lbfgs_limit

    if method == "lbfgs" and cfg.n_params > lbfgs_limit():
        raise ConfigError(f"n_hidden={cfg.n_hidden} on {cfg.n_visible} features makes {cfg.n_params:,} parameters; "
                          f"scipy's L-BFGS takes at most {lbfgs_limit():,} (it would crash): give a smaller n_hidden, "
                          "fewer features, or optimizer='cg'")
