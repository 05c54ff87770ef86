"""The master and real worker processes on 127.0.0.1: exact sums, errors, clean exits.

What is compared how: the workers' cost against the in-process ``cost_and_grad`` within a
float64 tolerance (rel 1e-12, about 4500 ulps; measured differences are a few ulps), because the
two add their rows in different orders (row chunks in sequence, against blocks along the
summation tree) and one round folds the sparsity term in by another formula. Runs of the
master against each other — other worker counts, placements, backups, lost workers — are
bit-for-bit (tests/test_cluster.py, tests/test_faults.py): there the code fixes every order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import textwrap

import numpy as np
import pytest
import zmq

from qsae import Master, SAEConfig, init_params
from qsae.data import load_images, sample_patches
from qsae.errors import ConfigError, WorkerError, WorkerLost
from qsae.model import cost_and_grad
from qsae.protocol import ERROR, EVAL, HELLO, decode, encode
from qsae.reduce import AverageReducer, ShardState, serial_scatter
from tests.procs import alive, wait_gone

pytestmark = pytest.mark.timeout(60)
CFG = SAEConfig()


@pytest.fixture(scope="module")
def images():
    return load_images()


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    X = rng.uniform(0.1, 0.9, size=(1001, 64))
    theta = init_params(CFG, seed=1)
    theta[2 * 64 * 30 :] = rng.normal(0, 0.1, 94)
    return X, theta


@pytest.mark.parametrize("t", [1, 2, 3])
@pytest.mark.parametrize("rounds", [1, 2])
def test_exact_equals_one_process(problem, t, rounds):
    X, theta = problem
    c_ref, g_ref = cost_and_grad(theta, X, CFG)
    with Master(workers=t, config=CFG, reducer_options={"rounds": rounds}, block_rows=100) as master:
        master.scatter(X)
        held = [sorted(w.blocks) for w in master._workers.values()]
        assert sorted(b for bs in held for b in bs) == list(range(11)) and all(held)  # every block, once
        c, g = master(theta)
    assert abs(c - c_ref) < 1e-10 * c_ref
    assert np.linalg.norm(g - g_ref) < 1e-10 * np.linalg.norm(g_ref)


def test_average_equals_the_serial_formula(problem):
    X, theta = problem
    with Master(workers=3, config=CFG, protocol="average", block_rows=100) as master:
        master.scatter(X)
        groups = [sorted(w.blocks) for w in master._workers.values()]
        c, g = master(theta)
    shards = [ShardState(np.concatenate([X[b * 100:(b + 1) * 100] for b in bs]), CFG) for bs in groups]
    c_ref, g_ref = AverageReducer(CFG).evaluate(theta, serial_scatter(shards))
    assert c == pytest.approx(c_ref, rel=1e-13)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-16)


def test_scatter_images_is_the_same_data_set(images):
    theta = init_params(CFG, seed=2)
    X = sample_patches(images, 3000, seed=7)
    with Master(workers=2, config=CFG) as master:
        master.scatter_images(images, m=3000, seed=7)
        c, g = master(theta)
        result = master.fit(theta, maxiter=15)
    c_ref, g_ref = cost_and_grad(theta, X, CFG)
    assert abs(c - c_ref) < 1e-10 * c_ref
    assert result.fun < 0.9 * c and result.nit == 15


def test_evaluation_before_scatter_is_refused():
    with Master(workers=1, config=CFG) as master:
        with pytest.raises(ConfigError, match="scatter"):
            master(init_params(CFG))


def test_worker_error_carries_the_traceback(problem):
    X, theta = problem
    with Master(workers=1, config=CFG) as master:
        master.scatter(X)
        with pytest.raises(WorkerError, match=r"(?s)worker local#0 on .*failed.*Traceback"):
            master._scatter_op("no_such_op", theta)
        c, _ = master(theta)  # the worker goes on serving
    assert c == pytest.approx(cost_and_grad(theta, X, CFG)[0], rel=1e-12)


def test_rogue_client_is_answered_and_ignored(problem):
    X, theta = problem
    with Master(workers=1, config=CFG, curve=False) as master:
        master.scatter(X)
        ctx = zmq.Context.instance()
        rogue = ctx.socket(zmq.DEALER)
        rogue.linger = 0
        rogue.connect(master.address)
        try:
            rogue.send_multipart([b"\x93garbage", b"x"])
            rogue.send_multipart(encode(EVAL, 1, [theta], op="sums"))  # never said HELLO
            c, _ = master(theta)
            assert rogue.poll(5000)
            assert decode(rogue.recv_multipart()).type == ERROR
        finally:
            rogue.close()
    assert c == pytest.approx(cost_and_grad(theta, X, CFG)[0], rel=1e-12)


@pytest.mark.parametrize("how", ["normal", "exception", "interrupt"])
def test_exit_leaves_no_worker(problem, how):
    X, _ = problem
    pids = []
    with pytest.raises((RuntimeError, KeyboardInterrupt)) if how != "normal" else _nothing():
        with Master(workers=2, config=CFG) as master:
            master.scatter(X[:10])
            pids = [w.pid for w in master._workers.values()]
            assert all(alive(p) for p in pids)
            if how == "exception":
                raise RuntimeError("boom")
            if how == "interrupt":
                raise KeyboardInterrupt
    assert len(pids) == 2 and wait_gone(pids, 5) == []


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_lost_worker_rows_go_to_the_others(problem, sig):
    """A killed or frozen worker is dropped, its rows rebuilt elsewhere, the round run again."""
    X, theta = problem
    c_ref, g_ref = cost_and_grad(theta, X, CFG)
    with Master(workers=3, config=CFG, worker_timeout=2.0, block_rows=100) as master:
        master.scatter(X)
        assert master(theta)[0] == pytest.approx(c_ref, rel=1e-12)
        victim = list(master._workers.values())[1]
        os.kill(victim.pid, sig)
        t0 = time.monotonic()
        c, g = master(theta)
        assert time.monotonic() - t0 < 6
        assert master.n_workers == 2
        assert sorted(b for w in master._workers.values() for b in w.blocks) == list(range(11))
        if sig == signal.SIGSTOP:
            os.kill(victim.pid, signal.SIGCONT)  # back: refused as unknown, it says HELLO and joins again
            deadline = time.monotonic() + 10
            while master.n_workers < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert master(theta)[0] == c  # the same blocks, added in the same order: bit for bit
            assert master.n_workers == 3 and all(w.blocks for w in master._workers.values())
    assert abs(c - c_ref) < 1e-10 * c_ref
    assert np.linalg.norm(g - g_ref) < 1e-10 * np.linalg.norm(g_ref)


def test_last_worker_lost_is_a_clear_error(problem):
    X, theta = problem
    with Master(workers=1, config=CFG, worker_timeout=1.0) as master:
        master.scatter(X)
        os.kill(next(iter(master._workers.values())).pid, signal.SIGKILL)
        with pytest.raises(WorkerLost, match="every worker is lost"):
            master(theta)


def test_worker_exits_when_its_master_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from qsae import Master
        m = Master(workers=1, curve=False)
        m.start()
        print(list(m._workers.values())[0].pid, flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pid = int(p.stdout.readline())
        assert alive(pid)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(5)
        # PDEATHSIG ends it at once; failing that, its own timeouts (10 s without the master,
        # 10 s more if it was still waiting for its handshake): never later than 25 s
        left = wait_gone([pid], 25)
        if left:
            with open(f"/proc/{pid}/stack") as f:
                print(f.read())
        assert left == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_hand_started_worker_with_master_timeout(tmp_path):
    """A worker started by hand whose master never answers gives up by itself."""
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    silent.linger = 0
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        p = subprocess.Popen([sys.executable, "-m", "qsae.worker", "--connect", f"tcp://127.0.0.1:{port}",
                              "--master-timeout", "2"], stderr=subprocess.PIPE, text=True)
        assert silent.poll(10000)
        hello = decode(silent.recv_multipart()[1:])
        assert hello.type == HELLO and hello["pid"] == p.pid
        _, err = p.communicate(timeout=15)
        assert p.returncode == 1 and "nothing heard from the master" in err
    finally:
        silent.close()


def test_curve_refuses_null_and_unknown_keys(problem):
    X, theta = problem
    with Master(workers=1, config=CFG) as master:  # a launcher: CURVE on
        assert master.curve
        ctx = zmq.Context.instance()
        null = ctx.socket(zmq.DEALER)
        stranger = ctx.socket(zmq.DEALER)
        pub, sec = zmq.curve_keypair()
        server_public = master.server_public
        stranger.curve_serverkey, stranger.curve_publickey, stranger.curve_secretkey = server_public, pub, sec
        hello = encode(HELLO, name="intruder", host="x", pid=1, cores=64, version="0.1.0", blas="")
        try:
            for s in (null, stranger):
                s.linger = 0
                s.sndtimeo = 1000  # a refused handshake tears the pipe down: a send may then block for good
                s.connect(master.address)
                try:
                    s.send_multipart(hello)
                except zmq.Again:  # refused before HELLO could even be queued: what this test wants
                    pass
            time.sleep(1.0)
            master.scatter(X)
            assert master.n_workers == 1 and {w.name for w in master._workers.values()} == {"local#0"}
            assert not null.poll(200) and not stranger.poll(200)  # never answered either
        finally:
            null.close()
            stranger.close()


def test_hand_started_workers_with_a_key_directory(problem, tmp_path):
    from qsae.keys import make_keys
    from tests.sshd import free_port

    X, theta = problem
    keys = make_keys(tmp_path / "keys")
    other = make_keys(tmp_path / "other")  # keys the master never saw
    port = free_port()
    cmd = [sys.executable, "-m", "qsae.worker", "--connect", f"tcp://127.0.0.1:{port}", "--master-timeout", "5"]
    good = [subprocess.Popen([*cmd, "--keys", str(keys)]) for _ in range(2)]
    bad = subprocess.Popen([*cmd, "--keys", str(other)])
    try:
        with Master(workers=0, wait_for=2, port=port, keys=str(keys), config=CFG) as master:
            assert master.curve and master.n_workers == 2
            assert {w.pid for w in master._workers.values()} == {p.pid for p in good}
            master.scatter(X)
            c, _ = master(theta)
        assert c == pytest.approx(cost_and_grad(theta, X, CFG)[0], rel=1e-12)
        for p in good:
            assert p.wait(10) == 0  # STOP ends them
    finally:
        for p in (*good, bad):
            p.kill()
            p.wait()


def test_hand_started_workers_need_keys_or_insecure():
    with pytest.raises(ConfigError, match="--make-keys"):
        Master(workers=0, wait_for=1)


def test_nan_from_a_worker_names_it_and_the_round(problem):
    from qsae.errors import NumericalError

    X, theta = problem
    bad = X.copy()
    bad[700, 3] = np.nan
    with Master(workers=2, config=CFG) as master:
        with pytest.raises(ConfigError, match="NaN or Inf"):  # data is checked on the master, before any worker
            master.scatter(bad)
        master.scatter(X)
        theta = theta.copy()
        theta[0] = np.nan  # every sum it touches is NaN
        with pytest.raises(NumericalError, match=r"worker local#\d .* NaN or Inf in round \d+"):
            master(theta)


def test_shard_in_many_chunks(problem, monkeypatch):
    import qsae.layout

    X, theta = problem
    monkeypatch.setattr(qsae.layout, "CHUNK_BYTES", 100 * 64 * 8)  # one 100-row block a BLOCKS message
    with Master(workers=2, config=CFG, block_rows=100) as master:
        master.scatter(X)
        c, g = master(theta)
    c_ref, g_ref = cost_and_grad(theta, X, CFG)
    assert abs(c - c_ref) < 1e-10 * c_ref
    assert np.linalg.norm(g - g_ref) < 1e-10 * np.linalg.norm(g_ref)


def test_hello_of_another_version_is_refused():
    with Master(workers=1, config=CFG, curve=False) as master:
        ctx = zmq.Context.instance()
        other = ctx.socket(zmq.DEALER)
        other.linger = 0
        other.connect(master.address)
        try:
            other.send_multipart(encode(HELLO, name="old", host="h", pid=1, cores=1, version="0.0.1", blas=""))
            assert other.poll(5000)
            reply = decode(other.recv_multipart())
            assert reply.type == ERROR and "install the same version" in reply["message"]
            assert master.n_workers == 1 and "old" not in {w.name for w in master._workers.values()}
        finally:
            other.close()


@pytest.mark.timeout(20)
def test_missing_workers_time_out_with_the_count():
    from qsae.errors import RoundTimeout

    t0 = time.monotonic()
    with pytest.raises(RoundTimeout, match=r"0 of 2 workers said HELLO within 1.0 s on tcp://127\.0\.0\.1:\d+"):
        with Master(workers=0, wait_for=2, config=CFG, curve=False, start_timeout=1.0):
            pass
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(30)
def test_worker_exits_by_itself_when_its_master_is_killed():
    """No parent-death signal here: the worker is not the master's child, only its own timeout ends it."""
    from tests.sshd import free_port

    port = free_port()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from qsae import Master
        m = Master(workers=0, wait_for=1, port={port}, curve=False)
        m.start()
        print("ready", flush=True)
        time.sleep(600)
    """)
    master = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = subprocess.Popen([sys.executable, "-m", "qsae.worker", "--connect", f"tcp://127.0.0.1:{port}",
                               "--master-timeout", "2"], stderr=subprocess.PIPE, text=True)
    try:
        assert master.stdout.readline() == "ready\n"
        time.sleep(1.5)  # heartbeats flow both ways: the worker outlives its 2 s timeout while the master lives
        assert worker.poll() is None
        master.kill()
        master.wait(5)
        t0 = time.monotonic()
        _, err = worker.communicate(timeout=10)
        assert time.monotonic() - t0 < 2 + 2
        assert worker.returncode == 1 and "nothing heard from the master" in err
    finally:
        for p in (master, worker):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("t", [1, 2, 3])
def test_exact_in_float32_for_1_to_3_workers(problem, t):
    """Workers hold and compute float32 rows; the sums add up as the float32 local cost's."""
    X, theta = problem
    X32 = X.astype(np.float32)
    c_ref, g_ref = cost_and_grad(theta, X32, CFG)
    with Master(workers=t, config=CFG, dtype="float32", block_rows=100) as master:
        master.scatter(X)  # converted to the run's dtype on the master
        c, g = master(theta)
    assert g.dtype == np.float64
    assert abs(c - c_ref) < 1e-6 * c_ref  # float32 chunks, added in another order
    assert np.linalg.norm(g - g_ref) < 1e-5 * np.linalg.norm(g_ref)
    c64, _ = cost_and_grad(theta, X, CFG)
    assert abs(c - c64) < 1e-5 * c64


def test_float32_workers_train_like_a_float32_local_run(images):
    from qsae.optim import minimize

    # Not bit-for-bit: the in-process cost adds its 504-row chunks in one sequence, the workers add their
    # blocks along the summation tree — another order of float32 sums (accumulated in float64) — and with
    # one round (3000 rows) the master folds the sparsity term in as diag(s)·Σ f'xᵀ where the in-process
    # cost folds s into its backward pass: another formula. So each evaluation agrees to float32 ulps
    # (cost: rtol 16·eps; gradient: 128·eps of its norm, 26 measured), checked on every iterate of a real
    # L-BFGS run; the trajectories may then drift apart, so the trainings are compared by final cost, to 1e-4.
    eps = float(np.finfo(np.float32).eps)
    X = sample_patches(images, 3000, seed=3, dtype=np.float32)
    theta0 = init_params(CFG, seed=3)
    iterates = []
    local = minimize(lambda th: cost_and_grad(th, X, CFG), theta0, maxiter=10,
                     callback=lambda info: iterates.append(np.array(info.x)))
    assert len(iterates) == 11
    with Master(workers=2, config=CFG, dtype="float32") as master:
        master.scatter_images(images, m=3000, seed=3)
        for theta in iterates:
            (c, g), (c_ref, g_ref) = master(theta), cost_and_grad(theta, X, CFG)
            assert c == pytest.approx(c_ref, rel=16 * eps)
            assert np.linalg.norm(g - g_ref) <= 128 * eps * np.linalg.norm(g_ref)
        remote = master.fit(theta0, maxiter=10)
    assert remote.fun == pytest.approx(local.fun, rel=1e-4)


def test_a_block_of_another_dtype_is_refused_by_the_worker():
    """A BLOCKS message whose rows are not in the run's dtype gets an ERROR that names both."""
    from qsae.protocol import BLOCKS, READY, SOURCE

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    p = subprocess.Popen([sys.executable, "-m", "qsae.worker", "--connect", f"tcp://127.0.0.1:{port}",
                          "--master-timeout", "5"], stderr=subprocess.DEVNULL)
    try:
        assert router.poll(10000)
        ident, *rest = router.recv_multipart()
        assert decode(rest).type == HELLO

        def ask(frames):
            router.send_multipart([ident, *[bytes(memoryview(f)) for f in frames]])
            while router.poll(5000):
                msg = decode(router.recv_multipart()[1:])
                if msg.type in (READY, ERROR):
                    return msg
            raise AssertionError("no answer")

        assert ask(encode(SOURCE, 1, config=CFG.to_dict(), kind="array", m=10, block_rows=10, patch_size=0, seed=0,
                          sigma=0.0, dtype="float32")).type == READY
        reply = ask(encode(BLOCKS, 2, [np.full((10, 64), 0.5)], ids=[0]))
        assert reply.type == ERROR and "float64" in reply["message"] and "float32" in reply["message"]
    finally:
        p.kill()
        p.wait()
        router.close()


def test_workers_say_their_blas_and_differing_kernels_are_warned_once(caplog):
    """status() shows each worker's BLAS (library, version, kernel); a worker with another
    kernel joining makes the master warn, once a run, that the bits then depend on placement."""
    from qsae import __version__
    from qsae.worker import blas_kernel

    caplog.set_level(logging.WARNING, logger="qsae.master")
    with Master(workers=1, config=CFG, curve=False) as master:
        (local,) = master.status()
        # numpy's library, as this process sees it (which may hold scipy's too, after a "; ")
        assert local["blas"] not in ("", "unknown") and blas_kernel().split("; ")[0] in local["blas"]
        assert not [r for r in caplog.records if "BLAS" in r.getMessage()]
        ctx = zmq.Context.instance()
        others = []
        try:
            for i, kernel in enumerate(["otherblas 9.9 Fancy", "thirdblas 1.0 Plain"]):
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.connect(master.address)
                s.send_multipart(encode(HELLO, name=f"other#{i}", host="h", pid=1, cores=1, version=__version__,
                                        blas=kernel))
                others.append(s)
                deadline = time.monotonic() + 10
                while master.n_workers < 2 + i and time.monotonic() < deadline:  # the heartbeat thread takes it
                    time.sleep(0.05)
            assert {s["name"]: s["blas"] for s in master.status()}["other#1"] == "thirdblas 1.0 Plain"
        finally:
            for s in others:
                s.close()
    warned = [r.getMessage() for r in caplog.records if "different BLAS kernels" in r.getMessage()]
    assert len(warned) == 1 and "otherblas 9.9 Fancy" in warned[0] and local["blas"] in warned[0]
