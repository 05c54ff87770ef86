"""The compute core (``Blocks``: the blocks a process holds and the rounds it computes on
them, for a plain worker and for each of an agent's processes) and a host agent's compute
processes: forked after the SOURCE arrived, one per core.

The agent (``qsae.agent``) forks each compute process once the source is in its memory, so
the images are shared copy-on-write (numpy never writes into them: the pages stay shared
with the agent and every sibling). A compute process holds its blocks (it cuts them from
the images, or receives their rows), computes the blocks an EVAL names, adds its rows along
the summation tree (``qsae.tree.fold``) and answers with one row per tree node. It keeps the
forward round's activations per block, tagged with their evaluation, exactly as a worker does.

Agent and compute process talk over one ``socket.socketpair`` with the same framing as the
wire (a msgpack header, then raw array buffers; nothing is pickled)::

    agent → compute   HOLD  ids [rows per id: array sources]      → READY ids, seconds
                      DROP  ids                                   (no reply)
                      EVAL  op, ids, evaluation  [arg, θ?]        → ROWS nodes, rows, seconds [rows]
                            (θ: the forward round's, sent with backward rounds, so a process
                            that lost its activations — respawned, or handed a backup — can
                            compute them again for this evaluation's θ, never an older one)
    compute → agent   ERR   etype, message, traceback             (for any request it failed)

A compute process exits when its socket closes (the agent is gone or sends no more) and is
killed with the agent (``PR_SET_PDEATHSIG``): no orphan keeps computing.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
import traceback
from typing import Any, Sequence

import msgpack
import numpy as np

from . import tree
from .errors import ProtocolError
from .protocol import ALLOWED_DTYPES
from .reduce import OP_TABLE, OPS, PER_BLOCK, ShardState, run_blocks

__all__ = ["HOLD", "DROP", "EVAL", "READY", "ROWS", "ERR", "Child", "spawn", "write", "read", "rows_of", "rows_in", "Blocks"]

HOLD, DROP, EVAL, READY, ROWS, ERR = "HOLD", "DROP", "EVAL", "READY", "ROWS", "ERR"
_LEN = struct.Struct("<Q")  # every frame is preceded by its length
_COUNT = struct.Struct("<I")  # every message by its number of frames


# ---------------------------------------------------------------------- framing over the pipe
def write(sock: socket.socket, type: str, arrays: Sequence[np.ndarray] = (), **fields: Any) -> None:
    """Send one message: the frame count and every frame's length, then the frames (a msgpack
    header, raw arrays), so that the reader needs three reads, not two per frame. One
    gathering ``sendmsg`` for all the parts, the arrays' buffers as they are (not joined into
    a copy: θ goes to every compute process each round)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    head = msgpack.packb({"t": type, "a": [[a.dtype.str, list(a.shape)] for a in arrays], **fields},
                         use_bin_type=True)
    frames = [head, *(memoryview(a).cast("B") for a in arrays)]
    prefix = _COUNT.pack(len(frames)) + b"".join(_LEN.pack(len(f)) for f in frames)
    parts = [memoryview(prefix), *(memoryview(f) for f in frames)]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= parts[0].nbytes:  # a full socket buffer takes a part of it: send the rest
            sent -= parts.pop(0).nbytes
        if sent:
            parts[0] = parts[0][sent:]


def read(sock: socket.socket) -> tuple[dict, list[np.ndarray]] | None:
    """One message (header, arrays), or None when the other end closed the socket."""
    count = _recv_exact(sock, _COUNT.size)
    if count is None:
        return None
    n = _COUNT.unpack(count)[0]
    lengths = _recv_exact(sock, _LEN.size * n)
    if lengths is None:
        return None
    sizes = [_LEN.unpack_from(lengths, _LEN.size * i)[0] for i in range(n)]
    body = _recv_exact(sock, sum(sizes))
    if body is None:
        return None
    view, frames, at = memoryview(body), [], 0
    for size in sizes:
        frames.append(view[at:at + size])
        at += size
    head = msgpack.unpackb(frames[0], raw=False)
    arrays = []
    for (dt, shape), buf in zip(head.pop("a"), frames[1:]):
        dtype = ALLOWED_DTYPES.get(dt)
        if dtype is None:
            raise ProtocolError(f"{head.get('t')}: array dtype {dt!r} not allowed")
        arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return head, arrays


def _recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


def rows_of(ids: Sequence[int], m: int, block_rows: int) -> int:
    """Rows in blocks ``ids`` of a data set of ``m`` rows: every block is full but the last."""
    last = -(-m // block_rows) - 1
    return len(ids) * block_rows - (last + 1) * block_rows + m if last in ids else len(ids) * block_rows


def rows_in(spans: Sequence[tuple[int, int]], m: int, block_rows: int) -> int:
    """``rows_of`` the blocks of ``spans`` (ranges [lo, hi) of block ids), without listing them."""
    return sum(min(hi * block_rows, m) - lo * block_rows for lo, hi in spans)


# ---------------------------------------------------------------------- the blocks a process holds
class Blocks:
    """The blocks one process holds (a worker, or an agent's compute process) and the rounds
    it computes on them.

    Parameters
    ----------
    source : the agent's copy of the SOURCE (``config``, ``kind``, ``images``, ``m``,
        ``block_rows``, ``patch_size``, ``seed``, ``sigma``, ``dtype``).
    """

    def __init__(self, source: dict) -> None:
        self.source = source
        self.held: dict[int, ShardState] = {}  # block id -> rows (and kept activations)
        self.extra: dict[int, ShardState] = {}  # a straggler's blocks cut for a backup, kept for one evaluation
        self.evaluation = -1  # the evaluation of the last EVAL

    @property
    def n_blocks(self) -> int:
        """B: the blocks of the data set (the summation tree's leaves)."""
        return -(-self.source["m"] // self.source["block_rows"])

    def bounds(self, b: int) -> tuple[int, int]:
        """(lo, hi): the rows of block ``b``."""
        return bounds(self.source, b)

    def cut(self, b: int) -> ShardState:
        """Block ``b`` cut from the images (patch i is a pure function of the images, seed and i)."""
        from .data import sample_patches

        src = self.source
        lo, hi = self.bounds(b)
        X = sample_patches(src["images"], src["m"], patch_size=src["patch_size"], seed=src["seed"], lo=lo, hi=hi,
                           sigma=src["sigma"])
        return ShardState(X.astype(src["dtype"], copy=False), src["config"])

    def hold(self, ids: list[int], arrays: list[np.ndarray]) -> None:
        """Hold ``ids`` from now on: cut from the images, or the rows given (array sources)."""
        if self.source["kind"] == "images":
            for b in ids:
                if b not in self.held:  # asked again after a respawn: held already
                    self.held[b] = self.extra.pop(b, None) or self.cut(b)
            return
        for b, X in zip(ids, arrays, strict=True):
            if b not in self.held:
                self.held[b] = ShardState(np.array(X), self.source["config"])

    def check_given(self, ids: list[int], arrays: Sequence[np.ndarray]) -> None:
        """Check a BLOCKS message's rows against the source: none for images (cut here), else
        one array per id, in the run's dtype and of its block's shape."""
        src = self.source
        if src["kind"] == "images":
            if arrays:
                raise ValueError("blocks of an images source are cut by the worker: BLOCKS carries no rows")
            return
        if len(arrays) != len(ids):
            raise ValueError(f"BLOCKS names {len(ids)} blocks but carries {len(arrays)} arrays of rows")
        for b, X in zip(ids, arrays):
            lo, hi = self.bounds(b)
            if X.dtype != src["dtype"]:
                raise ValueError(f"block {b} came as {X.dtype}, but this run computes in {src['dtype']}: "
                                 "the master must send the run's dtype")
            if X.shape != (hi - lo, src["config"].n_visible):
                raise ValueError(f"block {b} has shape {X.shape}; expected {(hi - lo, src['config'].n_visible)}")

    def check_room(self, ids: list[int]) -> None:
        """Refuse blocks this host cannot hold before cutting them: their rows and those held
        against its memory (a two-round run's hidden layer kept between the rounds, 0.48 of the
        rows more, is the master's check: ``train.check_size``; a process does not know the
        rounds). An agent's processes are not checked: the launcher sized them to the host."""
        from .errors import ConfigError

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        src, cfg = self.source, self.source["config"]
        rows = sum(st.m for st in self.held.values()) + sum(
            hi - lo for lo, hi in (self.bounds(b) for b in ids if b not in self.held))
        need = rows * cfg.n_visible * src["dtype"].itemsize
        if need > total:
            raise ConfigError(f"{rows:,} rows of {cfg.n_visible} values in {src['dtype']} need about "
                              f"{need / 2**30:,.1f} GiB on this worker, but its host has {total / 2**30:,.1f} GiB of "
                              "memory: give fewer --patches or spread them over more hosts")

    def drop(self, ids: list[int]) -> None:
        """Forget ``ids``."""
        for b in ids:
            self.held.pop(b, None)

    def states(self, op: str, ids: list[int], evaluation: int, theta: np.ndarray | None) -> list[ShardState]:
        """The blocks to compute: held ones, or a straggler's cut now (kept for this evaluation);
        for a backward round, activations of this evaluation's θ only — computed again otherwise
        (its forward round ran elsewhere, as a backup, or they are a backup's of an earlier θ)."""
        if evaluation != self.evaluation:  # a new θ: the backup blocks cut for the last one go
            self.extra = {b: st for b, st in self.extra.items() if b in ids}
            self.evaluation = evaluation
        first = OP_TABLE[op].after  # a second round: needs the first round's state of each block
        out = []
        for b in ids:
            st = self.held.get(b) or self.extra.get(b)
            if st is None:
                if self.source["kind"] != "images":
                    raise ValueError(f"block {b} is not held here and an array source cannot be cut again")
                st = self.extra[b] = self.cut(b)
            if first and (st.A is None or st.evaluation != evaluation):
                if theta is None:
                    raise ProtocolError(f"{op} round of evaluation {evaluation} without the {first} round's θ")
                OPS[first](st, theta)  # never an older θ's activations
                st.evaluation = evaluation
            out.append(st)
        return out

    def evaluate(self, op: str, ids: list[int], evaluation: int, arg: np.ndarray,
                 theta: np.ndarray | None) -> tuple[list[int], np.ndarray]:
        """(node codes, rows): this process's blocks added along the tree (no codes for "average")."""
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
        states = self.states(op, ids, evaluation, theta)
        if OP_TABLE[op].keeps:
            for st in states:  # tagged before computing: a failed forward leaves A None (never a stale one)
                st.evaluation, st.A = evaluation, None
        out = run_blocks(op, arg, states)
        if op not in PER_BLOCK:
            return [], out
        nodes, out = tree.fold(ids, out, self.n_blocks)
        return [tree.code(n) for n in nodes], out


# ---------------------------------------------------------------------- the process
class Child:
    """The agent's handle on one compute process: its pid, its socket, the blocks it holds."""

    def __init__(self, slot: int, pid: int, sock: socket.socket) -> None:
        self.slot, self.pid, self.sock = slot, pid, sock
        self.blocks: set[int] = set()  # held (the agent's record: re-sent to a respawned process)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, timeout: float = 2.0) -> None:
        """Close its socket (it exits on EOF), reap it; SIGKILL after ``timeout`` s."""
        self.sock.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return
            time.sleep(0.01)


def spawn(slot: int, source: dict, others: Sequence[Child] = ()) -> Child:
    """Fork a compute process that holds a copy-on-write view of ``source``; call only from
    the agent's main thread, between messages (no other Python thread holds a lock)."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the compute process: never returns
        code = 1
        try:
            mine.close()
            for c in others:  # siblings' agent ends: an agent's death must close every child's socket
                c.sock.close()
            code = _serve(theirs, source)
        except BaseException:  # pragma: no cover - logged by the agent as the child's death
            traceback.print_exc()
        finally:
            os._exit(code)  # no atexit, no zmq context destructor: those belong to the agent
    theirs.close()
    return Child(slot, pid, mine)


def _die_with_parent() -> None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the socket's EOF still ends it
        pass


def _serve(sock: socket.socket, source: dict) -> int:
    """The compute process's loop: requests in, replies out, until the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the agent, which stops its processes
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() == 1:  # the agent died before prctl: nobody to serve
        return 1
    blocks = Blocks(source)
    while True:
        got = read(sock)
        if got is None:
            return 0
        head, arrays = got
        t, t0 = head["t"], time.perf_counter()
        try:
            if t == HOLD:
                blocks.hold(head["ids"], arrays)
                write(sock, READY, ids=sorted(blocks.held), seconds=time.perf_counter() - t0)
            elif t == DROP:
                blocks.drop(head["ids"])
            elif t == EVAL:
                theta = arrays[1] if len(arrays) > 1 else None
                nodes, out = blocks.evaluate(head["op"], head["ids"], head["evaluation"], arrays[0], theta)
                write(sock, ROWS, [out], nodes=nodes, seconds=time.perf_counter() - t0,
                      rows=rows_of(head["ids"], blocks.source["m"], blocks.source["block_rows"]))
            else:
                raise ProtocolError(f"a compute process does not take {t} messages")
        except Exception as e:  # reported to the agent, which reports it to the master; the process goes on
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-8000:]
            write(sock, ERR, etype=type(e).__name__, message=str(e)[:2000], traceback=tb)


def bounds(source: dict, b: int) -> tuple[int, int]:
    """(lo, hi): the rows of block ``b`` of a SOURCE's data set (m rows in blocks of block_rows)."""
    lo = b * source["block_rows"]
    if not 0 <= lo < source["m"]:
        raise ValueError(f"block {b} does not exist: the data set has {source['m']} rows in blocks of "
                         f"{source['block_rows']}")
    return lo, min(lo + source["block_rows"], source["m"])
