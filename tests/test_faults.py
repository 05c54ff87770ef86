"""Faults during training: killed workers, hostile traffic on the master's port."""

from __future__ import annotations

import os
import signal
import threading

import msgpack
import numpy as np
import pytest
import zmq

from qsae import Master, SAEConfig, init_params
from qsae.data import load_images
from qsae.protocol import BLOCKS, EVAL, HELLO, PING, RESULT, SOURCE, VERSION, encode
from tests.procs import stuttering

pytestmark = pytest.mark.timeout(120)
CFG = SAEConfig()
M, ITERS = 3000, 25


@pytest.fixture(scope="module")
def images():
    return load_images()


@pytest.fixture(scope="module")
def undisturbed(images):
    with Master(workers=3, config=CFG) as master:
        master.scatter_images(images, m=M, seed=0)
        return master.fit(init_params(CFG), maxiter=ITERS)


def costs(result):
    return np.array([c for _, _, c in result.history])


def test_sigkill_mid_run_changes_nothing(images, undisturbed):
    with Master(workers=3, config=CFG, worker_timeout=2.0) as master:
        master.scatter_images(images, m=M, seed=0)
        victim = next(iter(master._workers.values())).pid

        def kill_at_5(info):
            if info.iteration == 5:
                os.kill(victim, signal.SIGKILL)

        result = master.fit(init_params(CFG), maxiter=ITERS, callback=kill_at_5)
        assert master.n_workers == 2
    assert result.nit == ITERS
    np.testing.assert_array_equal(costs(result), costs(undisturbed))


def hostile_messages(rng: np.random.Generator, theta: np.ndarray, n: int):
    """Random bytes, mutated valid messages, and valid messages that are not the sender's to send."""
    valid = [encode(EVAL, 7, [theta], op="sums", spans=[0, 1], evaluation=7),
             encode(RESULT, 3, [theta[None, :]], spans=[0, 1], nodes=[0], rows=10, seconds=0.1),
             encode(PING, busy=True), encode(HELLO, name="x", host="h", pid=1, cores=1, version="9.9.9", blas=""),
             encode(SOURCE, 1, [theta[:64].reshape(8, 8)], config={}, kind="images", m=1, block_rows=1,
                    patch_size=8, seed=0, sigma=1.0, dtype="float64"),
             encode(BLOCKS, 1, ids=[0, 1])]
    for i in range(n):
        kind = i % 5
        if kind == 0:  # random frames
            yield [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(1, 4)))]
        elif kind == 1:  # a valid message with bytes flipped
            frames = [bytearray(bytes(f)) for f in valid[int(rng.integers(len(valid)))]]
            f = frames[int(rng.integers(len(frames)))]
            for _ in range(int(rng.integers(1, 6))):
                if f:
                    f[int(rng.integers(len(f)))] = int(rng.integers(256))
            yield [bytes(f) for f in frames]
        elif kind == 2:  # valid headers with lying arrays: wrong dtype, shape, count, NaN
            yield [msgpack.packb({"t": RESULT, "v": VERSION, "r": int(rng.integers(0, 50)),
                                  "a": [[rng.choice(["<f8", "<i8", "|O", ">f8"]), [int(rng.integers(-2, 9))]]],
                                  "spans": [0, 1], "nodes": [0], "rows": 10, "seconds": 0.1}),
                   np.full(int(rng.integers(0, 9)), np.nan).tobytes()]
        elif kind == 3:  # well-formed but not allowed from this sender
            yield [bytes(f) for f in valid[int(rng.integers(len(valid)))]]
        else:  # wrong version, or a frame far too large
            if rng.random() < 0.5:
                yield [msgpack.packb({"t": PING, "v": 99, "r": 0, "a": [], "busy": False})]
            else:
                yield [b"\x80", b"\x00" * (17 * 1024 * 1024)]  # over ZMQ_MAXMSGSIZE: the connection is dropped


def test_hostile_traffic_does_not_change_the_run(images, undisturbed):
    n_msgs = 10_000
    sent = []
    with Master(workers=3, config=CFG, curve=False) as master:  # insecure, so garbage reaches the parser
        master.scatter_images(images, m=M, seed=0)
        stop = threading.Event()

        def fuzz():
            ctx = zmq.Context()
            rng = np.random.default_rng(0)
            sock = None
            try:
                for i, frames in enumerate(hostile_messages(rng, init_params(CFG), n_msgs)):
                    if sock is None or i % 500 == 0:  # new connections now and then (oversize drops them)
                        if sock is not None:
                            sock.close(linger=0)
                        sock = ctx.socket(zmq.DEALER)
                        sock.linger = 0
                        sock.sndhwm = 100_000
                        sock.connect(master.address)
                    sock.send_multipart(frames)
                    sent.append(1)
                    while sock.poll(0):  # drain the master's ERROR replies
                        sock.recv_multipart()
                    if stop.is_set():
                        break
            finally:
                if sock is not None:
                    sock.close(linger=0)
                ctx.term()

        t = threading.Thread(target=fuzz)
        t.start()
        try:
            result = master.fit(init_params(CFG), maxiter=ITERS)
            t.join(timeout=60)
        finally:
            stop.set()
            t.join()
        assert master.n_workers == 3
    assert len(sent) == n_msgs
    np.testing.assert_array_equal(result.x, undisturbed.x)


def test_stragglers_in_either_round_change_no_bit(images):
    """L-BFGS moves θ while one worker is stopped again and again (0.4 s, far below the timeout):
    it straggles in the forward round of some evaluations and in the backward round of others,
    and the others compute its blocks. Activations a backup kept from an earlier θ must never
    serve a later backward round: the whole history and θ are bit-equal to the undisturbed run's."""
    opts = dict(config=CFG, block_rows=250, reducer_options={"rounds": 2}, worker_timeout=10.0)
    iters = 60
    with Master(workers=3, **opts) as master:
        master.scatter_images(images, m=M, seed=0)
        quiet = master.fit(init_params(CFG), maxiter=iters)
    with Master(workers=3, **opts) as master:
        master.scatter_images(images, m=M, seed=0)
        for _ in range(3):  # speeds measured: stragglers are told by their predicted time
            master(init_params(CFG))
        with stuttering(next(iter(master._workers.values())).pid):
            result = master.fit(init_params(CFG), maxiter=iters)
        assert master.n_workers == 3
        assert master.stats["backups of forward"] >= 1 and master.stats["backups of backward"] >= 1, master.stats
    assert result.nit == quiet.nit == iters
    np.testing.assert_array_equal(costs(result), costs(quiet))
    np.testing.assert_array_equal(result.x, quiet.x)
