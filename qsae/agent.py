"""One agent per host: the host's one connection to the master and its P compute processes.

    qsae-worker --connect tcp://HOST:PORT --procs 16    # by hand: one agent, 16 processes
    python -m qsae.worker --stdin                       # by a launcher: {"procs": 16, ...}

To the master an agent is one worker with P cores (HELLO says ``cores=P·threads`` and
``procs=P``): the planner gives it about P times a one-core worker's blocks, by measured
speed, and the master's work per evaluation grows with hosts, not cores. The agent receives
the SOURCE once and then forks its compute processes (``qsae.compute``), which share the
images copy-on-write. It splits its blocks among them as contiguous ranges, so each adds
its own along the summation tree; it gathers their rows and adds them along the same tree
(``qsae.tree.value``) into the rows of the nodes its blocks make: one RESULT a round
(several only past ``MAX_RESULT_ROWS`` nodes). The bits are those of any other placement.

Its processes are a ``qsae.pool.Pool``: balanced by their measured speed as the master
balances hosts (exact protocol; between evaluations, never between the two rounds of one),
forked again when one dies or stalls mid-round — the master never hears of it and no partial
sum leaves the host. The agent answers the host's heartbeats while they compute. An agent
that dies or stops is, to the master, a lost or late worker (its existing paths).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from . import tree
from .compute import rows_in
from .errors import ProtocolError
from .pool import Pool, split
from .protocol import HELLO, MAX_RESULT_ROWS, READY, RESULT
from .reduce import OP_TABLE, PER_BLOCK
from .worker import Worker, _release_freed_memory, _span

__all__ = ["Agent", "split"]

log = logging.getLogger("qsae.agent")


class Agent(Worker):
    """A worker whose blocks are computed by ``procs`` forked compute processes (``self.pool``).

    Parameters
    ----------
    connect, name, curve, heartbeat, master_timeout, threads, handshake_timeout : as ``Worker``.
    procs : compute processes on this host (>= 1), usually one per core.
    """

    def __init__(self, connect: str, name: str | None = None, curve: dict | None = None, *, procs: int,
                 **options) -> None:
        if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
            raise ValueError(f"procs={procs!r}: give a whole number of compute processes >= 1")
        super().__init__(connect, name, curve, **options)
        self.procs = procs
        self.pool = Pool(procs, self.name, self._while_computing, self.heartbeat)

    # -- the connection
    def hello(self) -> None:
        """HELLO as one worker with P·threads cores and P processes."""
        from . import __version__
        import socket

        self.send(HELLO, name=self.name, host=socket.gethostname(), pid=os.getpid(), cores=self.procs * self.threads,
                  version=__version__, blas=self._blas, procs=self.procs)
        self._last_hello = time.monotonic()

    def run(self) -> int:
        """Serve as ``Worker.run``; the compute processes end with it."""
        try:
            return super().run()
        finally:
            self.pool.stop()

    def pids(self) -> list[int]:
        """The compute processes' pids, by slot."""
        return self.pool.pids()

    def _while_computing(self) -> None:
        """The pool waits for its processes: PING the master (busy), and count the PONGs queued
        meanwhile as hearing from it."""
        self._tick(busy=True)
        if self._poller.poll(0):
            self._last_heard = time.monotonic()

    # -- data
    def _on_source(self, msg) -> None:
        """Keep the source (``Worker._on_source``), then fork the processes that share it."""
        self.pool.stop()
        super()._on_source(msg)
        self.pool.start(self.source)

    def _on_blocks(self, msg) -> None:
        """Hold new blocks: contiguous runs to the processes holding the fewest rows."""
        if self.source is None:
            raise ValueError("BLOCKS before SOURCE: the worker does not know the data set yet")
        t0 = time.perf_counter()
        self.store.check_given(msg["ids"], msg.arrays)
        rows = {b: np.array(X) for b, X in zip(msg["ids"], msg.arrays)}  # copies: the frames are zmq's buffers
        self.pool.hold(msg["ids"], rows)
        log.info("holds %d blocks in %d processes: +%s", len(self.pool.owner), self.procs, _span(msg["ids"]))
        _release_freed_memory()
        self.send(READY, msg.round, ids=sorted(self.pool.owner), seconds=time.perf_counter() - t0)

    def _on_drop(self, msg) -> None:
        self.pool.drop(msg["ids"])
        log.info("holds %d blocks: -%s", len(self.pool.owner), _span(msg["ids"]))

    # -- rounds
    def _on_eval(self, msg) -> None:
        """Compute an EVAL's blocks in the processes and add their rows along the tree into the
        rows of the nodes the EVAL's ranges make: one RESULT (several past ``MAX_RESULT_ROWS``)."""
        op, arg, spans, ids, evaluation = self._begin_eval(msg)
        first = OP_TABLE[op].after  # a second round: its processes may need the first round's θ
        if first and self._theta_of != evaluation:
            raise ProtocolError(f"{op} round of evaluation {evaluation}, but this agent's last {first} round was "
                                f"of evaluation {self._theta_of}: it holds no θ for it")
        t0 = time.perf_counter()
        replies = self.pool.evaluate(op, [arg, self._theta] if first else [arg], ids, evaluation)
        seconds = time.perf_counter() - t0
        rows = sum(head["rows"] for head, _ in replies.values())
        if op not in PER_BLOCK:  # "average": each process's blocks are one shard; their m·J, m·∇J add up
            out = sum(replies[s][1][0] for s in sorted(replies))
            self.send(RESULT, msg.round, [out], spans=msg["spans"], nodes=[], rows=rows, seconds=seconds)
            return
        B = -(-self.source["m"] // self.source["block_rows"])
        known = {tree.decode(c, B): row for head, (out,) in replies.values() for c, row in zip(head["nodes"], out)}
        nodes = tree.cover_runs(spans, B)
        out = np.stack([tree.value(n, known, B) for n in nodes])  # along the tree: the bits of any placement
        for lo in range(0, len(nodes), MAX_RESULT_ROWS):
            part = nodes[lo:lo + MAX_RESULT_ROWS]
            spans = tree.node_runs(part, B)
            self.send(RESULT, msg.round, [out[lo:lo + MAX_RESULT_ROWS]], spans=tree.flat(spans),
                      nodes=[tree.code(n) for n in part],
                      rows=rows_in(spans, self.source["m"], self.source["block_rows"]),
                      seconds=seconds)
        if not OP_TABLE[op].keeps:  # moves never between the rounds of one evaluation
            self.pool.balance()
