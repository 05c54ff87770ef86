"""The cost of one round against the number of workers, over a bare pyzmq CURVE echo as the floor.

A round with tiny shards (10 rows a worker) is nearly all overhead: θ (31 KB) encoded and
sent to every worker, each header decoded and checked, a tiny computation, the replies
collected and reduced, with CURVE on. The floor is the same topology with nothing else: a
ROUTER in this process sending θ to k DEALER processes that echo it back, encrypted with
CURVE like qsae's (a server key pair on the ROUTER, a client pair per DEALER), so the floor
is like for like. The echo admits any client key (no ZAP handler): authentication happens
once per connection, not per message, so it does not change the round.

``table`` keeps qsae and the echo running side by side and times them in alternating
blocks of rounds, so a noisy neighbour slows both alike and the ratio holds.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Callable

import numpy as np
import zmq

from . import best_of, markdown

__all__ = ["Echo", "echo_round_trip", "qsae_round_trip", "alternating_best", "table"]

ECHO = """
import sys, zmq
keys = sys.stdin.readline().split()  # server public, client public, client secret (z85), or none
ctx = zmq.Context()
d = ctx.socket(zmq.DEALER)
d.linger = 0
if keys:
    d.curve_serverkey, d.curve_publickey, d.curve_secretkey = (k.encode() for k in keys)  # before connect
d.connect(sys.argv[1])
d.send(b"hi")
while d.poll(30000):
    frames = d.recv_multipart(copy=False)
    if frames[0].bytes == b"stop":
        break
    d.send_multipart(frames, copy=False)
"""

BLOCKS = 10  # alternating blocks per figure in ``table``: enough turns that both sides see the same neighbours


class Echo:
    """A ROUTER in this process and k DEALER processes that echo what it sends (CURVE by default).

    ``with Echo(k) as echo: echo.round(theta)`` sends θ to every DEALER and waits for all k
    echoes. The keys reach each process on its stdin, never on its command line.
    """

    def __init__(self, k: int, curve: bool = True, timeout: float = 60.0) -> None:
        self.k, self.curve, self.timeout = k, curve, timeout
        self.idents: list[bytes] = []
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Echo":
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.rcvtimeo = int(self.timeout * 1000)
        keys = [b""] * self.k
        if self.curve:
            server_public, server_secret = zmq.curve_keypair()
            self.router.curve_server = True  # before bind
            self.router.curve_secretkey = server_secret
            self.router.curve_publickey = server_public
            keys = [b" ".join((server_public, *zmq.curve_keypair())) for _ in range(self.k)]
        try:
            port = self.router.bind_to_random_port("tcp://127.0.0.1")
            for line in keys:
                p = subprocess.Popen([sys.executable, "-c", ECHO, f"tcp://127.0.0.1:{port}"], stdin=subprocess.PIPE)
                self.procs.append(p)
                p.stdin.write(line + b"\n")
                p.stdin.close()
            self.idents = [self.router.recv_multipart()[0] for _ in range(self.k)]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def round(self, theta: np.ndarray) -> None:
        """Send θ (after a small header frame) to every DEALER and receive every echo."""
        for ident in self.idents:
            self.router.send_multipart([ident, b"header", theta], copy=False)
        for _ in self.idents:
            self.router.recv_multipart(copy=False)

    def __exit__(self, *exc: object) -> None:
        for ident in self.idents:
            self.router.send_multipart([ident, b"stop"])
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.router.close()
        self.ctx.term()


def echo_round_trip(theta: np.ndarray, k: int, repeat: int, curve: bool = True) -> float:
    """Seconds for a ROUTER to send θ to k DEALER processes and get it back from all (CURVE by default)."""
    with Echo(k, curve) as echo:
        for _ in range(20):
            echo.round(theta)
        return best_of(lambda: echo.round(theta), repeat)


def alternating_best(fs: dict[str, Callable[[], object]], repeat: int, blocks: int = BLOCKS) -> dict[str, float]:
    """Fastest single call of each callable, in seconds, timed in ``blocks`` alternating blocks
    of about ``repeat / blocks`` calls each (``repeat`` calls of each in all)."""
    per = max(1, repeat // blocks)
    best = {name: float("inf") for name in fs}
    for _ in range(blocks):
        for name, f in fs.items():
            for _ in range(per):
                t0 = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def qsae_round_trip(theta: np.ndarray, k: int, repeat: int, curve: bool = True) -> float:
    """Seconds for one exact (one-round) evaluation on k local workers holding 10 rows each."""
    from ..master import Master
    from ..model import SAEConfig

    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(10 * k, 64))
    with Master(workers=k, config=SAEConfig(), curve=curve, reducer_options={"rounds": 1}, block_rows=10,
                start_timeout=max(60.0, 2.0 * k)) as master:
        master.scatter(X)
        for _ in range(20):
            master(theta)
        return best_of(lambda: master(theta), repeat)


def table(workers: list[int], repeat: int) -> tuple[str, dict[int, float]]:
    """Markdown table of µs per round for each k in ``workers``, qsae and the CURVE echo timed in
    alternating blocks in one run; and {k: qsae seconds}."""
    from ..master import Master
    from ..model import SAEConfig, init_params

    theta = init_params(SAEConfig())
    rows, qsae = [], {}
    for k in workers:
        X = np.random.default_rng(0).uniform(0.1, 0.9, size=(10 * k, 64))
        with Master(workers=k, config=SAEConfig(), curve=True, reducer_options={"rounds": 1}, block_rows=10,
                    start_timeout=max(60.0, 2.0 * k)) as master, Echo(k) as echo:
            master.scatter(X)
            for _ in range(20):
                master(theta)
                echo.round(theta)
            t = alternating_best({"qsae": lambda: master(theta), "echo": lambda: echo.round(theta)}, repeat)
        qsae[k], floor = t["qsae"], t["echo"]
        rows.append([k, f"{qsae[k] * 1e6:.0f}", f"{floor * 1e6:.0f}", f"{(qsae[k] - floor) * 1e6:.0f}",
                     f"{qsae[k] / floor:.2f}"])
    head = ["workers", "qsae round µs", "CURVE echo µs", "overhead µs", "qsae / echo"]
    return markdown(head, rows), qsae
