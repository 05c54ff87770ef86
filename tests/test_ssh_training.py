"""Training with workers started over SSH by a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsae import Master, SAEConfig, init_params
from qsae.data import load_images, sample_patches
from qsae.errors import LaunchError
from qsae.launch import SSHLauncher, parse_hosts
from qsae.model import cost_and_grad
from qsae.optim import minimize
from tests.sshd import two_aliases
from tests.procs import wait_gone

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    yield from two_aliases(tmp_path_factory.mktemp("sshd"))


def hosts_file(tmp_path, text):
    path = tmp_path / "hosts.txt"
    path.write_text(text)
    return path


def test_training_over_ssh_equals_local(sshd, tmp_path):
    cfg = SAEConfig()
    images = load_images()
    X = sample_patches(images, 4000, seed=1)
    theta0 = init_params(cfg, seed=1)
    local = minimize(lambda th: cost_and_grad(th, X, cfg), theta0, maxiter=20)
    path = hosts_file(tmp_path, f"# two 'machines' behind ssh_config aliases\nnode1 workers=1 python={sys.executable}\n"
                                f"node2 workers=2 python={sys.executable}\n")
    launcher = SSHLauncher(parse_hosts(path), ssh_config=str(sshd.ssh_config), connect_timeout=5)
    with Master(launcher=launcher, config=cfg) as master:
        assert master.curve and master.n_workers == 3
        pids = [w.pid for w in master._workers.values()]
        master.scatter_images(images, m=4000, seed=1)
        remote = master.fit(theta0, maxiter=20)
    costs = np.array([c for _, _, c in remote.history])
    ref = np.array([c for _, _, c in local.history])
    # A tolerance, not bits: the reference is the in-process cost, which adds its row chunks in another
    # order than the workers' summation tree, and sshd gives the remote workers its own environment (on a
    # machine that sets OPENBLAS_CORETYPE here, another BLAS kernel). float64 rounding of that order,
    # carried through 20 L-BFGS iterations, stays far under 1e-9.
    np.testing.assert_allclose(costs, ref, rtol=1e-9)
    assert wait_gone(pids, 10) == []  # no remote worker outlives the master


def test_unreachable_host_fails_fast_with_one_line_per_host(sshd, tmp_path):
    path = hosts_file(tmp_path, f"node1 python={sys.executable}\nnode2 python=/no/such/python\n"
                                f"127.0.0.1:1 python={sys.executable}\n")
    launcher = SSHLauncher(parse_hosts(path), ssh_config=str(sshd.ssh_config), connect_timeout=3)
    with pytest.raises(LaunchError) as e:
        with Master(launcher=launcher):
            pass
    text = str(e.value)
    assert "node2" in text and "python=" in text and "127.0.0.1" in text


def test_cli_trains_over_ssh(sshd, tmp_path):
    path = hosts_file(tmp_path, f"node1 workers=2 python={sys.executable}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), "--hosts", str(path), "--ssh-config",
                        str(sshd.ssh_config), "--patches", "2000", "--iters", "10", "--out", str(out), "-q"],
                       env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    assert "2000 patches on 1 agent of 2 processes" in p.stdout  # workers=2: one agent, one connection, by default
    assert len((out / "history.jsonl").read_text().splitlines()) == 11


def test_cli_min_workers_goes_on_without_a_dead_host(sshd, tmp_path):
    """A good host with 2 workers and a dead one; --min-workers 2 starts the run on the two."""
    path = hosts_file(tmp_path, f"node1 workers=2 python={sys.executable}\n127.0.0.1:1 python={sys.executable}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), "--hosts", str(path), "--ssh-config",
                        str(sshd.ssh_config), "--connect-timeout", "3", "--min-workers", "2", "--patches", "2000",
                        "--iters", "5", "--out", str(out), "-q"], env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    assert "2000 patches on 2 workers" in p.stdout and "127.0.0.1:1" in p.stderr  # the dropped host is named
    assert len((out / "history.jsonl").read_text().splitlines()) == 6
    # without --min-workers the same hosts are one clear error, at once
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), "--hosts", str(path), "--ssh-config",
                        str(sshd.ssh_config), "--connect-timeout", "3", "--patches", "2000", "--iters", "5",
                        "--out", str(tmp_path / "run2")], env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 2 and "127.0.0.1:1" in p.stderr and "Traceback" not in p.stderr
