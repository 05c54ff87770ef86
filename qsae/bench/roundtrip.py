"""The cost of one round against the number of workers, over a bare pyzmq echo as the floor.

A round with tiny shards (10 rows a worker) is nearly all overhead: θ (31 KB) encoded and
sent to every worker, each header decoded and checked, a tiny computation, the replies
collected and reduced, with CURVE on. The floor is the same topology with nothing else: a
ROUTER in this process sending θ to k DEALER processes that echo it back.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import zmq

from . import best_of, markdown

__all__ = ["echo_round_trip", "qsae_round_trip", "table"]

ECHO = """
import sys, zmq
ctx = zmq.Context()
d = ctx.socket(zmq.DEALER)
d.linger = 0
d.connect(sys.argv[1])
d.send(b"hi")
while d.poll(30000):
    frames = d.recv_multipart(copy=False)
    if frames[0].bytes == b"stop":
        break
    d.send_multipart(frames, copy=False)
"""


def echo_round_trip(theta: np.ndarray, k: int, repeat: int) -> float:
    """Seconds for a ROUTER to send θ to k DEALER processes and get it back from all."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    procs = [subprocess.Popen([sys.executable, "-c", ECHO, f"tcp://127.0.0.1:{port}"]) for _ in range(k)]
    idents: list[bytes] = []
    try:
        router.rcvtimeo = 60_000
        idents = [router.recv_multipart()[0] for _ in range(k)]

        def once() -> None:
            for ident in idents:
                router.send_multipart([ident, b"header", theta], copy=False)
            for _ in idents:
                router.recv_multipart(copy=False)

        for _ in range(20):
            once()
        return best_of(once, repeat)
    finally:
        for ident in idents:
            router.send_multipart([ident, b"stop"])
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        router.close()
        ctx.term()


def qsae_round_trip(theta: np.ndarray, k: int, repeat: int, curve: bool = True) -> float:
    """Seconds for one exact (one-round) evaluation on k local workers holding 10 rows each."""
    from ..master import Master
    from ..model import SAEConfig

    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(10 * k, 64))
    with Master(workers=k, config=SAEConfig(), curve=curve, reducer_options={"rounds": 1},
                start_timeout=max(60.0, 2.0 * k)) as master:
        master.scatter(X)
        for _ in range(20):
            master(theta)
        return best_of(lambda: master(theta), repeat)


def table(workers: list[int], repeat: int) -> tuple[str, dict[int, float]]:
    """Markdown table of µs per round for each k in ``workers``; and {k: qsae seconds}."""
    from ..model import SAEConfig, init_params

    theta = init_params(SAEConfig())
    rows, qsae = [], {}
    for k in workers:
        floor = echo_round_trip(theta, k, repeat)
        qsae[k] = qsae_round_trip(theta, k, repeat)
        rows.append([k, f"{qsae[k] * 1e6:.0f}", f"{floor * 1e6:.0f}", f"{(qsae[k] - floor) * 1e6:.0f}",
                     f"{qsae[k] / floor:.2f}"])
    head = ["workers", "qsae round µs", "bare echo µs", "overhead µs", "qsae / echo"]
    return markdown(head, rows), qsae
