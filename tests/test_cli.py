"""qsae-master --local end to end, in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qsae.data import DataSpec
from qsae.model import cost_and_grad
from qsae.train import load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def master(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "qsae-master"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_local_run_writes_its_files(tmp_path):
    p = master("--local", "--patches", "2000", "--iters", "30", "--seed", "3", "--out", str(tmp_path))
    out, err = p.communicate(timeout=100)
    assert p.returncode == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("iter ")]
    assert len(lines) == 31  # the start and 30 iterations
    for name in ("model.npz", "filters.png", "cost.png", "history.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    theta, cfg, meta = load_model(tmp_path / "model.npz")
    spec = DataSpec.from_dict(meta["data"])
    assert spec.m == 2000 and spec.seed == 3 and meta["optimizer"] == "lbfgs"
    history = [json.loads(ln) for ln in (tmp_path / "history.jsonl").read_text().splitlines()]
    # the saved θ really has the last recorded cost on the rebuilt patches
    assert cost_and_grad(theta, spec.build(), cfg)[0] == pytest.approx(history[-1]["cost"], rel=1e-12)
    assert history[-1]["cost"] < history[0]["cost"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 1)])
def test_signal_saves_the_last_iteration(tmp_path, sig, code):
    p = master("--local", "--patches", "5000", "--iters", "100000", "--out", str(tmp_path), "--checkpoint-every", "100000")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "history.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.5)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    theta, cfg, meta = load_model(tmp_path / "model.npz")
    assert meta["finished"] is False and meta["iteration"] > 0
    last = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
    assert cost_and_grad(theta, DataSpec.from_dict(meta["data"]).build(), cfg)[0] == pytest.approx(last["cost"], rel=1e-12)


@pytest.mark.parametrize("args, words", [
    (["--images", "/no/such/file.mat"], "/no/such/file.mat"),
    (["--patches", "0"], "m=0"),
    (["--preset", "report", "--rho", "1.5"], "sparsity_target=1.5"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, words):
    p = master("--local", "--iters", "2", "--out", str(tmp_path), *args)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert words in err and "Traceback" not in err


def test_resume_after_kill_9_of_the_master(tmp_path):
    """SIGKILL the master mid-run; --resume finishes near an uninterrupted run's cost.

    L-BFGS restarts with an empty memory on resume, so the paths differ; a restart costs a
    few iterations of progress, hence the 2% tolerance on a cost still falling ~1% an
    iteration at this stage.
    """
    common = ["--workers", "2", "--patches", "3000", "--iters", "80", "--checkpoint-every", "5", "-q"]
    whole = master(*common, "--out", str(tmp_path / "whole"))
    assert whole.wait(100) == 0, whole.stderr.read()
    run = tmp_path / "killed"
    p = master(*common, "--out", str(run))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait for a checkpoint past iteration 20
        if (run / "model.npz").exists() and load_model(run / "model.npz")[2]["iteration"] >= 20:
            break
        time.sleep(0.05)
    p.kill()
    p.wait(10)
    done = load_model(run / "model.npz")[2]["iteration"]
    assert 20 <= done < 80
    r = master(*common[:-1], "--resume", str(run))
    out, err = r.communicate(timeout=100)
    assert r.returncode == 0, err
    assert f"resuming {run} at iteration {done}" in out and "empty memory" in out
    theta, cfg, meta = load_model(run / "model.npz")
    assert meta["iteration"] == 80 and meta["data"]["m"] == 3000
    final = json.loads((tmp_path / "whole" / "history.jsonl").read_text().splitlines()[-1])["cost"]
    resumed = cost_and_grad(theta, DataSpec.from_dict(meta["data"]).build(), cfg)[0]
    assert resumed <= final * 1.02


def test_workers_follow_local_on_the_same_patches(tmp_path):
    runs = {}
    for mode in (["--local"], ["--workers", "2"]):
        out = tmp_path / mode[0].strip("-")
        p = master(*mode, "--patches", "4000", "--iters", "20", "--seed", "2", "--out", str(out), "-q")
        _, err = p.communicate(timeout=100)
        assert p.returncode == 0, err
        runs[mode[0]] = [json.loads(ln)["cost"] for ln in (out / "history.jsonl").read_text().splitlines()]
    assert len(runs["--local"]) == 21
    np.testing.assert_allclose(runs["--workers"], runs["--local"], rtol=1e-9)


def test_an_error_mid_run_keeps_the_last_good_theta(tmp_path):
    from qsae.errors import NumericalError
    from qsae.model import SAEConfig, init_params
    from qsae.train import RunSpec, train

    cfg = SAEConfig()
    X = DataSpec(m=500).build()
    calls = []

    def flaky(theta):
        calls.append(1)
        if len(calls) > 8:
            raise NumericalError("worker w#1 returned NaN or Inf in round 9")
        return cost_and_grad(theta, X, cfg)

    spec = RunSpec(config=cfg, data=DataSpec(m=500).to_dict(), maxiter=50, out=tmp_path)
    with pytest.raises(NumericalError) as e:
        train(flaky, init_params(cfg), spec, echo=lambda s: None)
    assert "--resume" in "".join(getattr(e.value, "__notes__", []))
    theta, _, meta = load_model(tmp_path / "model.npz")
    last = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
    assert meta["iteration"] == last["iteration"] > 0 and meta["finished"] is False
    assert cost_and_grad(theta, X, cfg)[0] == pytest.approx(last["cost"], rel=1e-12)
