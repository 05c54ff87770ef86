"""SparseAutoencoder: scikit-learn's conventions, model.npz in and out, workers, new images."""

from __future__ import annotations

import json
import os
import warnings
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsae.data import DataSpec, extract_patches, load_images, sample_patches
from qsae.errors import ConfigError, DataError, DataTypeError, HostsFileError, NumericalError, SaturationWarning
from qsae.estimator import SparseAutoencoder
from qsae.model import SAEConfig, cost_and_grad, init_params
from qsae.optim import minimize
from qsae.train import load_model, save_model

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is a test extra: pip install -e .[test]")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def patches():
    return sample_patches(load_images(), 2000, seed=1)


@pytest.fixture(scope="module")
def fitted(patches):
    return SparseAutoencoder(n_hidden=12, max_iter=30, random_state=3).fit(patches)


# ---------------------------------------------------------------------------- parameters


def test_init_stores_parameters_as_given_and_params_round_trip(tmp_path):
    hosts = tmp_path / "hosts.txt"
    sae = SparseAutoencoder(n_hidden=50, weight_decay=0.002, workers=hosts, random_state=np.random.RandomState(0))
    assert sae.workers is hosts and sae.n_hidden == 50
    params = sae.get_params()
    assert list(params) == ["n_hidden", "weight_decay", "sparsity_weight", "sparsity_target", "optimizer", "max_iter",
                            "protocol", "dtype", "random_state", "workers"]
    assert SparseAutoencoder(**params).get_params() == params
    assert sae.set_params(n_hidden=7, optimizer="cg") is sae and sae.n_hidden == 7 and sae.optimizer == "cg"
    with pytest.raises(ConfigError, match="Invalid parameter 'hidden'.*n_hidden"):
        sae.set_params(hidden=3)
    assert repr(SparseAutoencoder()) == "SparseAutoencoder()"
    assert repr(SparseAutoencoder(n_hidden=100, max_iter=50)) == "SparseAutoencoder(n_hidden=100, max_iter=50)"
    assert vars(SparseAutoencoder()).keys() == set(params)  # nothing else set in __init__


def test_clone_copies_parameters_not_weights(fitted):
    from sklearn.base import clone

    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params() and copy is not fitted
    assert not hasattr(copy, "components_")


def test_fit_returns_self_and_learns_the_documented_arrays(patches):
    sae = SparseAutoencoder(n_hidden=12, max_iter=20, random_state=0)
    assert sae.fit(patches) is sae
    assert sae.n_features_in_ == 64 and sae.n_iter_ == 20
    assert sae.components_.shape == (12, 64) and sae.intercept_.shape == (12,)
    assert sae.decoder_weights_.shape == (64, 12) and sae.decoder_intercept_.shape == (64,)
    assert sae.sigma_ is None and sae.data_ is None  # fitted on X, not on images


def test_fit_is_the_in_process_optimizer_from_init_params(patches):
    """A thin front: the same θ as minimize(cost_and_grad) from init_params(random_state)."""
    cfg = SAEConfig(n_hidden=12)
    ref = minimize(lambda th: cost_and_grad(th, patches, cfg), init_params(cfg, seed=5), maxiter=15).x
    sae = SparseAutoencoder(n_hidden=12, max_iter=15, random_state=5).fit(patches)
    assert np.array_equal(sae.components_, ref[: 12 * 64].reshape(12, 64))
    assert np.array_equal(sae.decoder_intercept_, ref[-64:])


def test_transform_and_inverse_transform_are_the_two_layers(fitted, patches):
    X = patches[:300]
    H = fitted.transform(X)
    assert H.shape == (300, 12) and H.dtype == np.float64
    np.testing.assert_allclose(H, sigmoid(X @ fitted.components_.T + fitted.intercept_), rtol=1e-12)
    R = fitted.inverse_transform(H)
    np.testing.assert_allclose(R, sigmoid(H @ fitted.decoder_weights_.T + fitted.decoder_intercept_), rtol=1e-12)
    assert np.mean((R - X) ** 2) < np.mean((X - X.mean()) ** 2)  # it reconstructs better than a constant
    assert np.array_equal(fitted.fit_transform(patches)[:300], H)  # same random_state: same fit
    names = fitted.get_feature_names_out()
    assert list(names[:2]) == ["sparseautoencoder0", "sparseautoencoder1"] and len(names) == 12


def test_random_state(patches):
    def W(rs, n=2):
        return SparseAutoencoder(n_hidden=8, max_iter=n, random_state=rs).fit(patches).components_

    assert np.array_equal(W(4), W(4))
    assert not np.array_equal(W(4), W(5))
    assert np.array_equal(W(np.random.RandomState(9)), W(np.random.RandomState(9)))
    assert np.array_equal(W(np.random.default_rng(9)), W(np.random.default_rng(9)))
    np.random.seed(1)
    a = W(None)
    np.random.seed(1)
    assert np.array_equal(a, W(None))  # None draws from numpy's global state, as in scikit-learn
    assert not np.array_equal(a, W(None))
    with pytest.raises(ConfigError, match="random_state='x'"):
        W("x")


# ---------------------------------------------------------------------------- validation


def test_inputs_are_validated_with_names_and_fixes(fitted, patches):
    with pytest.raises(DataError, match="X has 63 features, but SparseAutoencoder is expecting 64 features"):
        fitted.transform(patches[:5, :63])
    bad = patches[:5].copy()
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match="1 NaN or Inf"):
        fitted.transform(bad)
    with pytest.raises(DataError, match="1 NaN or Inf"):
        SparseAutoencoder().fit(bad)
    with pytest.raises(DataError, match=r"shape \(64,\); expected a 2-D array.*reshape\(1, -1\)"):
        fitted.transform(patches[0])
    with pytest.raises(DataError, match="0 sample"):
        SparseAutoencoder().fit(np.empty((0, 4)))
    with pytest.raises(DataError, match="Complex data not supported"):
        SparseAutoencoder().fit(patches[:5] + 0j)
    with pytest.raises(DataError, match="dtype <U1; pass numbers"):
        SparseAutoencoder().fit(np.array([["a", "b"]]))
    from scipy.sparse import csr_matrix

    with pytest.raises(DataError, match="sparse input is not supported"):
        SparseAutoencoder().fit(csr_matrix(patches[:5]))
    with pytest.raises(DataError, match="H has 3 hidden units, but SparseAutoencoder is expecting 12"):
        fitted.inverse_transform(np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="not fitted yet; call fit"):
        SparseAutoencoder().transform(patches)
    assert fitted.transform(patches[:4].tolist()).shape == (4, 12)  # lists and ints are fine
    assert fitted.transform((patches[:4] * 10).astype(np.int32)).shape == (4, 12)


@pytest.mark.parametrize("params, match", [
    ({"optimizer": "adam"}, "optimizer='adam'; choose one of lbfgs, cg, sgd"),
    ({"protocol": "fast"}, "unknown protocol 'fast'"),
    ({"max_iter": 0}, "max_iter=0 must be a positive integer"),
    ({"dtype": "float16"}, "float32 or float64"),
    ({"n_hidden": 0}, "n_hidden=0 must be a positive integer"),
    ({"sparsity_target": 1.5}, "sparsity_target=1.5"),
    ({"workers": 0}, "workers=0: pass None"),
    ({"workers": True}, "workers=True: pass None"),
])
def test_bad_parameters_fail_in_fit_before_any_work(params, match):
    sae = SparseAutoencoder(**params)  # __init__ checks nothing
    with pytest.raises(ConfigError, match=match):
        sae.fit(np.full((10, 4), 0.5))


@pytest.mark.parametrize("random_state", [7, 16, 17, 24])  # those that returned silently before (issue 15)
def test_unscaled_inputs_say_to_scale_them(patches, random_state):
    """A fit on inputs far outside [0, 1] ends with most units saturated: a warning with the fix in its text."""
    with pytest.warns(SaturationWarning, match=r"saturated.*X ranges over \[\d+, \d+\].*MinMaxScaler") as w:
        sae = SparseAutoencoder(max_iter=50, random_state=random_state).fit(patches * 100)
    assert len(w) == 1
    H = sae.transform(patches * 100)
    assert np.mean(np.minimum(H, 1 - H) < 1e-6) > 0.5  # the warning is true: most activations are saturated


def test_scaled_inputs_do_not_warn(patches):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even numpy's overflow warning
        SparseAutoencoder(max_iter=50, random_state=7).fit(patches)


def test_a_diverging_fit_names_the_fix_in_its_message():
    X = np.random.default_rng(0).normal(1e200, 1e199, size=(30, 3))  # Σ (a3 − x)² overflows: the cost is +inf
    with pytest.raises(NumericalError, match=r"X ranges over \[.*MinMaxScaler"):
        SparseAutoencoder(random_state=0).fit(X)


def test_values_that_are_not_numbers_are_a_type_error(patches):
    X = patches[:20].astype(object)
    X[0, 0] = {"foo": "bar"}
    with pytest.raises(DataTypeError, match="argument must be a string or a real number") as e:
        SparseAutoencoder().fit(X)
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)  # numpy's type, and qsae's DataError
    X[0, 0] = "abc"
    with pytest.raises(DataError, match="could not convert string"):
        SparseAutoencoder().fit(X)


def test_float32(patches):
    a = SparseAutoencoder(n_hidden=10, max_iter=10, random_state=0).fit(patches)
    b = SparseAutoencoder(n_hidden=10, max_iter=10, random_state=0, dtype="float32").fit(patches)
    Hb = b.transform(patches)
    assert Hb.dtype == np.float32
    np.testing.assert_allclose(Hb, a.transform(patches), atol=1e-3)
    np.testing.assert_allclose(b.components_, a.components_, atol=1e-3)


# ---------------------------------------------------------------------------- scikit-learn


@pytest.mark.filterwarnings("ignore:Estimator SparseAutoencoder does not inherit:UserWarning")  # by design
@pytest.mark.filterwarnings("ignore::qsae.errors.SaturationWarning")  # its checks fit on inputs around 100
@pytest.mark.timeout(300)  # 2 × 47 checks, each a few fits: 38 s on 2 busy cores
def test_check_estimator(monkeypatch):
    """scikit-learn's whole suite, every check run and passed, in both dtypes."""
    from sklearn.utils.estimator_checks import check_estimator

    # check_array_api_input is skipped unless array API dispatch may be enabled; it runs numpy inputs only here
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    for sae in (SparseAutoencoder(max_iter=20), SparseAutoencoder(max_iter=20, dtype="float32")):
        results = check_estimator(sae, on_skip=None, on_fail=None)
        failed = {r["check_name"]: f"{r['status']}: {r['exception']}" for r in results if r["status"] != "passed"}
        assert not failed
        assert len(results) >= 47


def test_pipeline_on_digits():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    X, y = load_digits(return_X_y=True)
    pipe = make_pipeline(MinMaxScaler(feature_range=(0.1, 0.9)), SparseAutoencoder(n_hidden=64, max_iter=100, random_state=0),
                         LogisticRegression(max_iter=2000))
    pipe.set_params(sparseautoencoder__sparsity_target=0.05)
    pipe.fit(X[:1200], y[:1200])
    assert pipe.score(X[1200:], y[1200:]) > 0.85  # chance is 0.1; raw pixels score about 0.92 here
    sae = pipe.named_steps["sparseautoencoder"]
    assert sae.sparsity_target == 0.05 and sae.n_features_in_ == 64


# ---------------------------------------------------------------------------- model.npz


def test_save_load_round_trip(fitted, patches, tmp_path):
    path = fitted.save(tmp_path / "m.npz")
    back = SparseAutoencoder.load(path)
    assert back.get_params() == fitted.get_params()
    assert np.array_equal(back.transform(patches), fitted.transform(patches))
    assert np.array_equal(back.inverse_transform(back.transform(patches[:9])), fitted.inverse_transform(fitted.transform(patches[:9])))
    theta, cfg, meta = load_model(path)  # the training run's reader reads it too
    assert cfg == SAEConfig(n_hidden=12) and theta.shape == (cfg.n_params,) and meta["finished"] is True
    changed = SparseAutoencoder(n_hidden=12, max_iter=2, random_state=0).fit(patches).set_params(sparsity_target=0.2)
    changed.save(tmp_path / "c.npz")
    assert load_model(tmp_path / "c.npz")[1] == SAEConfig(n_hidden=12)  # the settings it was fitted with


def test_hosts_file_path_goes_to_the_ssh_launcher(tmp_path):
    with pytest.raises(HostsFileError, match="cannot read hosts file .*nothere.txt"):
        SparseAutoencoder(workers=str(tmp_path / "nothere.txt"), max_iter=1).fit(np.full((10, 4), 0.5))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A model.npz written by `qsae-master --local --patches 2000 --iters 5 --dtype float64` (the
    tests below check float64 results to the last digits; the CLI's default is float32)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), "--local", "--patches", "2000", "--iters", "5",
                        "--hidden", "16", "--seed", "2", "--dtype", "float64", "--out", str(out), "-q"],
                       env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    return out / "model.npz"


def test_load_a_qsae_master_run(cli_run):
    theta, cfg, meta = load_model(cli_run)
    spec = DataSpec.from_dict(meta["data"])
    sae = SparseAutoencoder.load(cli_run)
    assert sae.n_hidden == 16 and sae.random_state == 2 and sae.optimizer == "lbfgs" and sae.n_iter_ == 5
    assert sae.data_ == spec.to_dict() and sae.sigma_ == spec.sigma()
    X = spec.build()
    W1, b1 = theta[: 16 * 64].reshape(16, 64), theta[2 * 16 * 64 : 2 * 16 * 64 + 16]
    np.testing.assert_allclose(sae.transform(X), sigmoid(X @ W1.T + b1), rtol=1e-12)
    # refitting the loaded estimator on the run's patches repeats the run: same start, same optimizer
    again = SparseAutoencoder(**sae.get_params()).set_params(max_iter=5).fit(X)
    np.testing.assert_allclose(again.components_, sae.components_, rtol=0, atol=1e-9)


def test_load_recomputes_a_missing_sigma(cli_run, tmp_path):
    theta, cfg, meta = load_model(cli_run)
    meta.pop("sigma", None)
    old = save_model(tmp_path / "old.npz", theta, cfg, **meta)
    assert "sigma" not in json.loads(str(np.load(old)["meta"]))
    assert SparseAutoencoder.load(old).sigma_ == DataSpec.from_dict(meta["data"]).sigma()
    meta["data"] = {**meta["data"], "source": str(tmp_path / "gone")}  # and without its images: a warning, no σ
    gone = SparseAutoencoder.load(save_model(tmp_path / "gone.npz", theta, cfg, **meta))
    assert gone.sigma_ is None
    with pytest.raises(ConfigError, match="no σ for patch normalisation"):
        gone.extract_patches(np.zeros((16, 16)))


def test_patches_of_new_images_are_normalised_like_the_training_set(cli_run, tmp_path):
    sae = SparseAutoencoder.load(cli_run)
    spec = DataSpec.from_dict(sae.data_)
    images = spec.images()
    P = sae.extract_patches(images[:2], stride=4)
    assert np.array_equal(P, extract_patches(images[:2], 8, stride=4, sigma=spec.sigma()))
    assert sae.transform(P).shape == (len(P), 16)
    import matplotlib.image

    folder = tmp_path / "photos"
    folder.mkdir()
    raw = load_images(whiten=False)[0][:64, :96]
    matplotlib.image.imsave(folder / "a.png", raw, cmap="gray", vmin=0, vmax=1)
    from_path = sae.extract_patches(folder)  # a folder of photographs is whitened, as the builtin ones were
    assert from_path.shape == ((64 // 8) * (96 // 8), 64)
    assert np.array_equal(from_path, extract_patches(load_images(folder), sigma=spec.sigma()))


# ---------------------------------------------------------------------------- workers


@pytest.mark.parametrize("dtype, atol", [("float64", 1e-6), ("float32", 1e-5)])
def test_two_local_workers_learn_what_one_process_learns(patches, dtype, atol):
    one = SparseAutoencoder(n_hidden=12, max_iter=6, random_state=0, dtype=dtype).fit(patches)
    two = SparseAutoencoder(n_hidden=12, max_iter=6, random_state=0, dtype=dtype, workers=2).fit(patches)
    np.testing.assert_allclose(two.components_, one.components_, rtol=0, atol=atol)
    np.testing.assert_allclose(two.transform(patches), one.transform(patches), rtol=0, atol=atol)
    assert two.n_iter_ == one.n_iter_ == 6


def test_a_hosts_file_trains_over_a_real_sshd(tmp_path, monkeypatch, patches):
    """workers=PATH starts workers over SSH with the user's ~/.ssh/config, as qsae-master --hosts does."""
    from tests.sshd import SSHServer, require_sshd

    require_sshd()
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(f"node1 workers=2 python={sys.executable}\n")
    with SSHServer(tmp_path / "sshd", alias="node1") as server:
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "config").write_text(server.ssh_config.read_text())  # alias, key and known_hosts
        monkeypatch.setenv("HOME", str(home))
        remote = SparseAutoencoder(n_hidden=12, max_iter=4, random_state=0, workers=str(hosts)).fit(patches)
    local = SparseAutoencoder(n_hidden=12, max_iter=4, random_state=0).fit(patches)
    np.testing.assert_allclose(remote.components_, local.components_, rtol=0, atol=1e-6)


def test_a_model_too_large_for_lbfgs_is_refused_by_name():
    """scipy's L-BFGS crashes the process (SIGSEGV) past ~86M parameters: fit refuses first,
    naming n_hidden. Run in a child process, so that a crash fails this test, not the suite."""
    import subprocess
    import sys

    code = ("import numpy as np\nfrom qsae import SparseAutoencoder\n"
            "SparseAutoencoder(n_hidden=700_000, max_iter=1).fit(np.full((3, 64), 0.5))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "ConfigError" in p.stderr and "n_hidden=700000" in p.stderr and "optimizer='cg'" in p.stderr
