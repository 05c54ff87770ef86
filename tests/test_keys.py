"""Key directories (qsae-master --make-keys) and workers whose keys the master refuses."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qsae.errors import KeysError
from qsae.keys import load_server_keys, load_worker_keys, make_keys
from tests.sshd import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.timeout(120)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_keys_splits_what_a_worker_needs(tmp_path):
    d = make_keys(tmp_path / "keys")
    w = d / "worker"
    assert sorted(p.name for p in d.iterdir()) == ["server.key", "server.key_secret", "worker"]
    assert sorted(p.name for p in w.iterdir()) == ["server.key", "worker.key", "worker.key_secret"]
    assert mode(d) == mode(w) == 0o700
    assert mode(d / "server.key_secret") == mode(w / "worker.key_secret") == 0o600
    assert "secret-key" not in (w / "server.key").read_text()  # the master's public key only
    public, secret, admitted = load_server_keys(d)
    keys = load_worker_keys(w)
    assert keys["server_public"].encode() == public and admitted == {keys["public"].encode()}
    assert load_worker_keys(d) == keys  # the master's DIR still works on a worker (as before)


def test_make_keys_never_overwrites(tmp_path):
    d = make_keys(tmp_path / "keys")
    before = (d / "server.key_secret").read_bytes()
    with pytest.raises(KeysError, match="never overwritten"):
        make_keys(d)
    assert (d / "server.key_secret").read_bytes() == before


def test_a_worker_dir_is_no_master_dir(tmp_path):
    d = make_keys(tmp_path / "keys")
    with pytest.raises(KeysError, match="worker's key directory"):
        load_server_keys(d / "worker")


def test_make_keys_command_says_copy_only_the_worker_folder(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), "--make-keys", str(tmp_path / "k")],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"Copy only {tmp_path / 'k' / 'worker'}" in p.stdout and f"--keys {tmp_path / 'k' / 'worker'}" in p.stdout


def test_a_worker_with_a_missing_key_directory_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "qsae.worker", "--connect", "tcp://127.0.0.1:1", "--keys",
                        str(tmp_path / "none")], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--make-keys" in p.stderr


@pytest.fixture
def keyed_master(tmp_path):
    """A real qsae-master waiting for one hand-started worker with the keys in tmp_path/keys."""
    keys = make_keys(tmp_path / "keys")
    port = free_port()
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "qsae-master"), "--wait-for", "1", "--port", str(port),
                          "--keys", str(keys), "--patches", "2000", "--iters", "3", "--start-timeout", "90",
                          "--out", str(tmp_path / "run"), "-q"],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield p, f"tcp://127.0.0.1:{port}", keys
    finally:
        p.kill()
        p.wait(10)


def worker(connect: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qsae.worker", "--connect", connect, *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stranger(keys: Path, tmp_path: Path) -> Path:
    """A worker folder with this master's public key but a key pair the master never admitted."""
    other = make_keys(tmp_path / "other") / "worker"
    (other / "server.key").write_bytes((keys / "worker" / "server.key").read_bytes())
    return other


@pytest.mark.parametrize("how", ["no keys", "another run's keys", "an unknown key pair"])
def test_a_refused_worker_exits_saying_so(keyed_master, tmp_path, how):
    master, connect, keys = keyed_master
    if how == "no keys":
        args = []
    elif how == "another run's keys":
        args = ["--keys", str(make_keys(tmp_path / "other") / "worker")]
    else:
        args = ["--keys", str(stranger(keys, tmp_path))]
    time.sleep(1.0)  # the master is listening (a worker that cannot connect at all says so differently)
    t0 = time.monotonic()
    w = worker(connect, *args)
    try:
        _, err = w.communicate(timeout=30)
    finally:
        w.kill()
    took = time.monotonic() - t0
    assert w.returncode != 0 and took < 20, (took, err)
    assert "the master refused its CURVE keys" in err and "--keys DIR/worker" in err, err
    # the right keys still train: the master was not disturbed by the refused one
    good = worker(connect, "--keys", str(keys / "worker"))
    try:
        out, merr = master.communicate(timeout=90)
        assert master.returncode == 0, merr
        assert good.wait(30) == 0
    finally:
        good.kill()
        good.wait()
    if how == "an unknown key pair":  # refused by ZAP: the master says so
        assert "refused a worker's CURVE key" in merr, merr
    assert (tmp_path / "run" / "model.npz").exists()


def test_the_master_logs_failed_handshakes_rate_limited(caplog):
    """Handshakes that never reach ZAP (no keys, another master's key) seen by the ROUTER's monitor."""
    import logging

    import zmq

    from qsae.auth import AllowList

    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    public, secret = zmq.curve_keypair()
    server.curve_server, server.curve_secretkey, server.curve_publickey = True, secret, public  # before bind
    port = server.bind_to_random_port("tcp://127.0.0.1")
    allow = AllowList()
    allow.watch(server)
    clients = []
    try:
        with caplog.at_level(logging.WARNING, logger="qsae.master"):
            for _ in range(3):  # no keys: a NULL client against a CURVE server
                c = ctx.socket(zmq.DEALER)
                c.linger = 0
                c.connect(f"tcp://127.0.0.1:{port}")
                clients.append(c)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not caplog.records:
                time.sleep(0.05)
            time.sleep(0.5)
    finally:
        allow.unwatch()
        for c in clients:
            c.close()
        server.close()
        ctx.term()
    lines = [r.getMessage() for r in caplog.records if "handshake failed" in r.getMessage()]
    assert len(lines) == 1 and "--keys DIR/worker" in lines[0]  # three failures, one line
