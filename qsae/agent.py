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

Within the host it balances as the master does between hosts: each process's rows per second
are measured every round, and once every process has ``SPEED_SAMPLES`` of them the master's own
planner (``qsae.placement.plan``, the same hysteresis and payback) may move blocks from a slow
process to a faster one (exact protocol; between evaluations, never between the two rounds
of one). A moved block is added along the same tree wherever it is: the bits do not change.

It answers the host's heartbeats while its processes compute. A compute process that dies
mid-round is forked again from the agent, given its blocks again (cut from the images) and
asked again: the master never hears of it and no partial sum leaves the host. An agent that
dies or stops is, to the master, a lost or late worker (its existing paths).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import statistics
import time

import numpy as np

from . import tree
from .compute import DROP as C_DROP
from .compute import EVAL as C_EVAL
from .compute import ERR, HOLD, Child, read, rows_in, spawn, write
from .compute import bounds as block_bounds
from .errors import ProtocolError, WorkerError
from .membership import MIN_SAMPLE_SECONDS, SPEED_SAMPLES
from .placement import WorkerView, plan
from .protocol import HELLO, MAX_RESULT_ROWS, READY, RESULT
from .reduce import OP_TABLE, PER_BLOCK
from .worker import Worker, _release_freed_memory, _span

__all__ = ["Agent", "split"]

log = logging.getLogger("qsae.agent")

MAX_RESPAWNS = 3  # a compute process dying this often in one request is no accident: the request fails
# A compute process that has run this many times its predicted seconds (its measured speed), and
# at least STALL_SECONDS, while another of the host's processes has answered, is stalled (stopped,
# frozen, hung): it is killed and forked again, and its blocks computed by the new one. The
# master's backups cannot do this where this agent is the only one (a single machine).
STALL_FACTOR = 4.0
STALL_SECONDS = 2.0
STALL_CHECK = 0.25  # seconds between looks for stalls (not at every reply: a round stays O(P))


def split(ids: list[int], parts: int) -> list[list[int]]:
    """``ids`` sorted and cut into ``parts`` contiguous runs of near-equal length (some may be empty)."""
    ids = sorted(ids)
    n = len(ids)
    return [ids[n * k // parts:n * (k + 1) // parts] for k in range(parts)]


class Agent(Worker):
    """A worker whose blocks are computed by ``procs`` forked compute processes.

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
        self.children: list[Child] = []
        self.owner: dict[int, int] = {}  # block id -> slot of the compute process holding it
        self.rows: dict[int, np.ndarray] = {}  # an array source's rows: given again to a respawned process
        self.respawns = 0  # compute processes forked again after they died
        # balance between the processes: each one's last rounds' rows per second, rounds since the
        # last moves, and what moving one block cost (the planner's price), as the master keeps them
        self.samples: dict[int, collections.deque] = {}
        self.rounds_since_moves = 0
        self.move_seconds = 0.0
        self.balancing = True  # until a move fails

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
            self._stop_children()

    def pids(self) -> list[int]:
        """The compute processes' pids, by slot."""
        return [c.pid for c in self.children]

    # -- the processes
    def _stop_children(self) -> None:
        for c in self.children:
            c.close()
        self.children, self.owner, self.rows = [], {}, {}

    def _on_source(self, msg) -> None:
        """Keep the source (``Worker._on_source``), then fork the processes that share it."""
        self._stop_children()
        self.samples, self.rounds_since_moves = {}, 0
        super()._on_source(msg)
        t0 = time.perf_counter()
        for slot in range(self.procs):
            self.children.append(spawn(slot, self.source, self.children))
        log.info("%s: %d compute processes forked in %.3f s (the source shared copy-on-write)", self.name,
                 self.procs, time.perf_counter() - t0)

    def _respawn(self, slot: int) -> None:
        """Fork slot's process again and give it the blocks it held."""
        old = self.children[slot]
        try:
            os.waitpid(old.pid, 0)  # reaped: its socket said EOF, it is gone
        except ChildProcessError:
            pass
        old.sock.close()
        self.respawns += 1
        new = spawn(slot, self.source, [c for c in self.children if c is not old])
        new.blocks = old.blocks
        self.children[slot] = new
        log.warning("%s: compute process %d (pid %d) died; forked pid %d, cutting its %d blocks again", self.name,
                    slot, old.pid, new.pid, len(new.blocks))
        if new.blocks:
            ids = sorted(new.blocks)
            self._ask({slot: (HOLD, [self.rows[b] for b in ids if b in self.rows], {"ids": ids})})

    def _ask(self, requests: dict[int, tuple],
             predicted: dict[int, float] | None = None) -> dict[int, tuple[dict, list]]:
        """Send each slot its request (type, arrays, fields); gather one reply each, pinging the
        master meanwhile. A process that dies (before, while or after it computes) is forked
        again, given its blocks again and asked again; so is one that stalls (``predicted``:
        seconds each slot should take, from its measured speed; see ``STALL_FACTOR``)."""
        tries: dict[int, int] = {}
        for slot in requests:
            self._post(slot, requests[slot], tries)
        replies: dict[int, tuple[dict, list]] = {}
        errors = []
        poller, slot_of = select.poll(), {}  # registered once: a round costs O(P), not a select of P per reply
        for slot in requests:
            slot_of[self.children[slot].fileno()] = slot
            poller.register(self.children[slot].fileno(), select.POLLIN)
        t0 = time.monotonic()
        stall = {slot: t0 + max(STALL_FACTOR * sec, STALL_SECONDS) for slot, sec in (predicted or {}).items()}
        next_check = t0 + STALL_SECONDS
        while len(replies) < len(requests):
            ready = poller.poll(self.heartbeat * 1000)
            self._tick(busy=True)
            now = time.monotonic()
            if stall and replies and now >= next_check:  # stalls are told only while another process answers
                next_check = now + STALL_CHECK
                self._kill_stalled(stall, replies, t0, now)
            if self._poller.poll(0):  # the master's PONGs queued meanwhile: it is still there
                self._last_heard = time.monotonic()
            for fd, _ in ready:  # readable, or hung up (POLLHUP): the read tells
                slot = slot_of.pop(fd)
                poller.unregister(fd)
                try:
                    got = read(self.children[slot].sock)
                except OSError:  # ECONNRESET: it died with our request unread
                    got = None
                if got is None:
                    self._died(slot, tries)
                    self._post(slot, requests[slot], tries)
                    slot_of[self.children[slot].fileno()] = slot  # forked again: its new socket
                    poller.register(self.children[slot].fileno(), select.POLLIN)
                    continue
                if got[0]["t"] == ERR:
                    errors.append(got[0])
                replies[slot] = got
        if errors:  # every reply gathered first: none is left to be read as the next request's
            e = errors[0]
            raise WorkerError(f"compute process: {e['etype']}: {e['message']}\n{e['traceback']}")
        return replies

    def _kill_stalled(self, stall: dict[int, float], replies: dict, t0: float, now: float) -> None:
        """SIGKILL every process past its stall time that has not answered: its socket then says EOF
        and ``_ask`` forks it again and asks again, as for a process that died."""
        for slot, deadline in list(stall.items()):
            if slot in replies or now < deadline:
                continue
            del stall[slot]  # once a request: the new process has its blocks to cut first
            pid = self.children[slot].pid
            log.warning("%s: compute process %d (pid %d) stalled: no answer in %.1f s, %.0f× its predicted time; "
                        "killed, to be forked again", self.name, slot, pid, now - t0, STALL_FACTOR)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # gone already: its EOF is on the way
                pass

    def _post(self, slot: int, request: tuple, tries: dict[int, int]) -> None:
        """Write one request to slot's process, forking it again first if it is gone."""
        t, arrays, fields = request
        while True:
            try:
                write(self.children[slot].sock, t, arrays, **fields)
                return
            except OSError:  # EPIPE: it died since its last reply
                self._died(slot, tries)

    def _died(self, slot: int, tries: dict[int, int]) -> None:
        tries[slot] = tries.get(slot, 0) + 1
        if tries[slot] > MAX_RESPAWNS:
            raise WorkerError(f"compute process {slot} died {MAX_RESPAWNS + 1} times in one request")
        self._respawn(slot)

    # -- blocks
    def _check_memory(self, ids: list) -> None:
        """Nothing: the processes hold the rows (the launcher sized P to the host)."""

    def _on_blocks(self, msg) -> None:
        """Hold new blocks: contiguous runs to the processes holding the fewest rows."""
        if self.source is None:
            raise ValueError("BLOCKS before SOURCE: the worker does not know the data set yet")
        t0 = time.perf_counter()
        ids, src = [b for b in msg["ids"] if b not in self.owner], self.source
        if src["kind"] == "images" and msg.arrays:
            raise ValueError("blocks of an images source are cut by the worker: BLOCKS carries no rows")
        if src["kind"] != "images":
            if len(msg.arrays) != len(msg["ids"]):
                raise ValueError(f"BLOCKS names {len(msg['ids'])} blocks but carries {len(msg.arrays)} arrays")
            for b, X in zip(msg["ids"], msg.arrays):
                lo, hi = block_bounds(self.source, b)
                if X.shape != (hi - lo, src["config"].n_visible) or X.dtype != src["dtype"]:
                    raise ValueError(f"block {b} came as {X.dtype}{X.shape}; expected {src['dtype']}"
                                     f"{(hi - lo, src['config'].n_visible)}")
                self.rows[b] = np.array(X)  # a copy: the frame is zmq's buffer
        load = sorted(self.children, key=lambda c: len(c.blocks))
        requests = {}
        for child, part in zip(load, split(ids, len(load))):
            if part:
                requests[child.slot] = (HOLD, [self.rows[b] for b in part if b in self.rows], {"ids": part})
                child.blocks.update(part)
                self.owner.update({b: child.slot for b in part})
        self._ask(requests)
        log.info("holds %d blocks in %d processes: +%s", len(self.owner), self.procs, _span(msg["ids"]))
        _release_freed_memory()
        self.send(READY, msg.round, ids=sorted(self.owner), seconds=time.perf_counter() - t0)

    def _on_drop(self, msg) -> None:
        by_slot: dict[int, list[int]] = {}
        for b in msg["ids"]:
            slot = self.owner.pop(b, None)
            self.rows.pop(b, None)
            if slot is not None:
                by_slot.setdefault(slot, []).append(b)
        for slot, ids in by_slot.items():
            self.children[slot].blocks.difference_update(ids)
            try:
                write(self.children[slot].sock, C_DROP, ids=ids)
            except OSError:  # it died: forked again at the next request, without these blocks
                pass
        log.info("holds %d blocks: -%s", len(self.owner), _span(msg["ids"]))

    # -- rounds
    def _assign(self, ids: list[int]) -> dict[int, list[int]]:
        """slot -> the blocks it computes: its own, and a straggler's (not held here) in contiguous runs."""
        if len(ids) == len(self.owner) and self.owner.keys() >= set(ids):  # every round but backups: set ops in C
            return {c.slot: sorted(c.blocks) for c in self.children if c.blocks}
        out: dict[int, list[int]] = {}
        extra = []
        for b in ids:
            slot = self.owner.get(b)
            if slot is None:
                extra.append(b)
            else:
                out.setdefault(slot, []).append(b)
        for slot, part in enumerate(split(extra, len(self.children))):
            if part:
                out.setdefault(slot, []).extend(part)
        return out

    def _on_eval(self, msg) -> None:
        op, arg, spans, ids, evaluation = self._begin_eval(msg)
        first = OP_TABLE[op].after  # a second round: its processes may need the first round's θ
        if first and self._theta_of != evaluation:
            raise ProtocolError(f"{op} round of evaluation {evaluation}, but this agent's last {first} round was "
                                f"of evaluation {self._theta_of}: it holds no θ for it")
        arrays = [arg, self._theta] if first else [arg]
        t0 = time.perf_counter()
        assigned = self._assign(ids)
        replies = self._ask({slot: (C_EVAL, arrays, {"op": op, "ids": part, "evaluation": evaluation})
                             for slot, part in assigned.items()}, self._predicted(assigned))
        seconds = time.perf_counter() - t0
        self._measure(replies)  # every op: the stall times; moves only where the tree adds the rows (below)
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
        if not OP_TABLE[op].keeps:  # never between the rounds of one evaluation
            self._balance()

    # -- balance between the host's processes
    def _predicted(self, assigned: dict[int, list[int]]) -> dict[int, float]:
        """Seconds each slot should take for its blocks at the slowest of its measured speeds (full
        blocks: an upper bound, cheap at 64 processes a round; slots not measured yet: none)."""
        rows = self.source["block_rows"]
        return {slot: len(ids) * rows / min(self.samples[slot]) for slot, ids in assigned.items()
                if self.samples.get(slot)}

    def _measure(self, replies: dict[int, tuple[dict, list]]) -> None:
        """A speed sample (rows per compute second) of every process that answered a round long
        enough to time (``MIN_SAMPLE_SECONDS``)."""
        self.rounds_since_moves += 1
        for slot, (head, _) in replies.items():
            if head.get("seconds", 0.0) >= MIN_SAMPLE_SECONDS and head.get("rows"):
                self.samples.setdefault(slot, collections.deque(maxlen=SPEED_SAMPLES)).append(
                    head["rows"] / head["seconds"])

    def _balance(self) -> None:
        """Move blocks from slower processes to faster ones where the master's planner says it pays:
        only once every process holding blocks has ``SPEED_SAMPLES`` rounds measured since the last
        moves. The tree adds a block's row wherever it is computed, so the bits stay those of any
        placement. A move that fails (a process out of memory) is logged and balancing stops."""
        busy = [c for c in self.children if c.blocks]
        if (not self.balancing or len(busy) < 2 or self.rounds_since_moves < SPEED_SAMPLES
                or any(len(self.samples.get(c.slot, ())) < SPEED_SAMPLES for c in busy)):
            return
        own = sorted(b for c in busy for b in c.blocks)  # numbered 0..k-1 for the planner, in block order
        local = {b: i for i, b in enumerate(own)}
        sizes = [hi - lo for lo, hi in (block_bounds(self.source, b) for b in own)]
        views = [WorkerView(c.slot, statistics.median(self.samples[c.slot]), tuple(sorted(local[b] for b in c.blocks)))
                 for c in busy]
        moves = plan(views, sizes, move_seconds=self.move_seconds)
        if not moves:
            return
        gets: dict[int, list[int]] = {}
        gives: dict[int, list[int]] = {}
        for mv in moves:
            gets.setdefault(mv.dst, []).append(own[mv.block])
            gives.setdefault(mv.src, []).append(own[mv.block])
        t0 = time.perf_counter()
        try:
            self._ask({slot: (HOLD, [self.rows[b] for b in sorted(ids) if b in self.rows], {"ids": sorted(ids)})
                       for slot, ids in gets.items()})
        except WorkerError as e:  # the source process still holds them all: nothing changed but the try
            log.warning("%s: blocks not moved between its processes (%s); it stops balancing them", self.name, e)
            self.balancing = False
            return
        for slot, ids in gets.items():
            self.children[slot].blocks.update(ids)
            self.owner.update({b: slot for b in ids})
        for slot, ids in gives.items():
            self.children[slot].blocks.difference_update(ids)
            try:
                write(self.children[slot].sock, C_DROP, ids=sorted(ids))
            except OSError:  # it died: forked again at the next request, without these blocks
                pass
        per_block = (time.perf_counter() - t0) / max(len(ids) for ids in gets.values())
        self.move_seconds = per_block if self.move_seconds == 0 else 0.5 * (self.move_seconds + per_block)
        self.samples, self.rounds_since_moves = {}, 0
        log.info("%s: %d blocks moved between its processes by measured speed (%s); blocks now %s", self.name,
                 len(moves), ", ".join(f"{v.key}: {v.speed:,.0f} rows/s" for v in views),
                 ", ".join(f"{c.slot}: {len(c.blocks)}" for c in self.children))

