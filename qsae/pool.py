"""A host's compute processes, as one agent runs them: forked, asked, recovered, balanced.

The agent (``qsae.agent``) is the host's connection to the master; a ``Pool`` is what it
computes its blocks on. The pool forks its processes once the source is in the agent's
memory (``qsae.compute.spawn``: the images shared copy-on-write), gives each a contiguous
run of the host's blocks, and asks them (``ask``): every request written, one reply each
gathered through one poll. While it waits it calls the agent back (``on_wait``), so the
host's heartbeats go on.

Recovery inside the host: a process that dies before, while or after it computes is forked
again, given its blocks again (cut from the images, or the rows kept here for an array
source) and asked again; one that stalls — ``STALL_FACTOR`` times its predicted time, at
least ``STALL_SECONDS``, while another process has answered — is killed and treated alike.
No partial sum leaves the host.

Balance inside the host: each process's rows per second are measured every round; once every
busy process has ``SPEED_SAMPLES`` of them, the master's own planner (``qsae.placement.plan``,
its hysteresis and payback) may move blocks from a slower process to a faster one. The tree
adds a block's row wherever it is computed: the bits do not change.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import statistics
import time
from typing import Callable

import numpy as np

from .compute import DROP, EVAL, ERR, HOLD, Child, read, spawn, write
from .compute import bounds as block_bounds
from .errors import WorkerError
from .membership import MIN_SAMPLE_SECONDS, SPEED_SAMPLES
from .placement import WorkerView, plan

__all__ = ["Pool", "split", "MAX_RESPAWNS", "STALL_FACTOR", "STALL_SECONDS", "STALL_CHECK"]

log = logging.getLogger("qsae.agent")

MAX_RESPAWNS = 3  # a compute process dying this often in one request is no accident: the request fails
# A compute process that has run this many times its predicted seconds (its measured speed), and
# at least STALL_SECONDS, while another of the host's processes has answered, is stalled (stopped,
# frozen, hung): it is killed and forked again, and its blocks computed by the new one. The
# master's backups cannot do this where the agent is the only worker (a single machine).
STALL_FACTOR = 4.0
STALL_SECONDS = 2.0
STALL_CHECK = 0.25  # seconds between looks for stalls (not at every reply: a round stays O(P))

Replies = dict[int, tuple[dict, list]]  # slot -> (header, arrays) of its reply


def split(ids: list[int], parts: int) -> list[list[int]]:
    """``ids`` sorted and cut into ``parts`` contiguous runs of near-equal length (some may be empty)."""
    ids = sorted(ids)
    n = len(ids)
    return [ids[n * k // parts:n * (k + 1) // parts] for k in range(parts)]


class Pool:
    """``size`` forked compute processes holding a host's blocks.

    Parameters
    ----------
    size : compute processes (>= 1), usually one per core.
    name : the agent's name, for the log.
    on_wait : called whenever a wait for replies wakes (at least every ``heartbeat`` s).
    heartbeat : seconds between those calls while nothing arrives.
    """

    def __init__(self, size: int, name: str, on_wait: Callable[[], None], heartbeat: float) -> None:
        self.size, self.name, self.on_wait, self.heartbeat = size, name, on_wait, heartbeat
        self.source: dict | None = None
        self.children: list[Child] = []
        self.owner: dict[int, int] = {}  # block id -> slot of the compute process holding it
        self.rows: dict[int, np.ndarray] = {}  # an array source's rows: given again to a respawned process
        # balance between the processes: each one's last rounds' rows per second, rounds since the
        # last moves, and what moving one block cost (the planner's price), as the master keeps them
        self.samples: dict[int, collections.deque] = {}
        self.rounds_since_moves = 0
        self.move_seconds = 0.0
        self.balancing = True  # until a move fails

    # -- the processes
    def start(self, source: dict) -> None:
        """Fork the processes for a new source (those of an earlier one stopped first)."""
        self.stop()
        self.source, self.samples, self.rounds_since_moves = source, {}, 0
        t0 = time.perf_counter()
        for slot in range(self.size):
            self.children.append(spawn(slot, source, self.children))
        log.info("%s: %d compute processes forked in %.3f s (the source shared copy-on-write)", self.name,
                 self.size, time.perf_counter() - t0)

    def stop(self) -> None:
        """End every process; the pool holds nothing."""
        for c in self.children:
            c.close()
        self.children, self.owner, self.rows = [], {}, {}

    def pids(self) -> list[int]:
        """The compute processes' pids, by slot."""
        return [c.pid for c in self.children]

    # -- blocks
    def hold(self, ids: list[int], rows: dict[int, np.ndarray]) -> None:
        """Hold new blocks (``rows``: an array source's, by id; empty for images): contiguous runs
        to the processes holding the fewest."""
        self.rows.update(rows)
        ids = [b for b in ids if b not in self.owner]
        load = sorted(self.children, key=lambda c: len(c.blocks))
        requests = {}
        for child, part in zip(load, split(ids, len(load))):
            if part:
                requests[child.slot] = (HOLD, [self.rows[b] for b in part if b in self.rows], {"ids": part})
                child.blocks.update(part)
                self.owner.update({b: child.slot for b in part})
        self.ask(requests)

    def drop(self, ids: list[int]) -> None:
        """Forget blocks (no reply is awaited)."""
        by_slot: dict[int, list[int]] = {}
        for b in ids:
            slot = self.owner.pop(b, None)
            self.rows.pop(b, None)
            if slot is not None:
                by_slot.setdefault(slot, []).append(b)
        for slot, part in by_slot.items():
            self._drop(slot, part)

    def _drop(self, slot: int, ids: list[int]) -> None:
        self.children[slot].blocks.difference_update(ids)
        try:
            write(self.children[slot].sock, DROP, ids=sorted(ids))
        except OSError:  # it died: forked again at the next request, without these blocks
            pass

    # -- rounds
    def evaluate(self, op: str, arrays: list[np.ndarray], ids: list[int], evaluation: int) -> Replies:
        """Compute ``op`` on the blocks ``ids`` (held here, or a straggler's): each process's reply."""
        assigned = self._assign(ids)
        replies = self.ask({slot: (EVAL, arrays, {"op": op, "ids": part, "evaluation": evaluation})
                            for slot, part in assigned.items()}, self._predicted(assigned))
        self._measure(replies)  # every op: the stall times; moves only in ``balance``
        return replies

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

    def ask(self, requests: dict[int, tuple], predicted: dict[int, float] | None = None) -> Replies:
        """Send each slot its request (type, arrays, fields); gather one reply each, calling
        ``on_wait`` meanwhile. A process that dies (before, while or after it computes) is forked
        again, given its blocks again and asked again; so is one that stalls (``predicted``:
        seconds each slot should take, from its measured speed; see ``STALL_FACTOR``)."""
        tries: dict[int, int] = {}
        for slot in requests:
            self._post(slot, requests[slot], tries)
        replies: Replies = {}
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
            self.on_wait()
            now = time.monotonic()
            if stall and replies and now >= next_check:  # stalls are told only while another process answers
                next_check = now + STALL_CHECK
                self._kill_stalled(stall, replies, t0, now)
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

    # -- recovery
    def _kill_stalled(self, stall: dict[int, float], replies: Replies, t0: float, now: float) -> None:
        """SIGKILL every process past its stall time that has not answered: its socket then says EOF
        and ``ask`` forks it again and asks again, as for a process that died."""
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

    def _respawn(self, slot: int) -> None:
        """Fork slot's process again and give it the blocks it held."""
        old = self.children[slot]
        try:
            os.waitpid(old.pid, 0)  # reaped: its socket said EOF, it is gone
        except ChildProcessError:
            pass
        old.sock.close()
        new = spawn(slot, self.source, [c for c in self.children if c is not old])
        new.blocks = old.blocks
        self.children[slot] = new
        log.warning("%s: compute process %d (pid %d) died; forked pid %d, cutting its %d blocks again", self.name,
                    slot, old.pid, new.pid, len(new.blocks))
        if new.blocks:
            ids = sorted(new.blocks)
            self.ask({slot: (HOLD, [self.rows[b] for b in ids if b in self.rows], {"ids": ids})})

    # -- balance
    def _predicted(self, assigned: dict[int, list[int]]) -> dict[int, float]:
        """Seconds each slot should take for its blocks at the slowest of its measured speeds (full
        blocks: an upper bound, cheap at 64 processes a round; slots not measured yet: none)."""
        rows = self.source["block_rows"]
        return {slot: len(ids) * rows / min(self.samples[slot]) for slot, ids in assigned.items()
                if self.samples.get(slot)}

    def _measure(self, replies: Replies) -> None:
        """A speed sample (rows per compute second) of every process that answered a round long
        enough to time (``MIN_SAMPLE_SECONDS``)."""
        self.rounds_since_moves += 1
        for slot, (head, _) in replies.items():
            if head.get("seconds", 0.0) >= MIN_SAMPLE_SECONDS and head.get("rows"):
                self.samples.setdefault(slot, collections.deque(maxlen=SPEED_SAMPLES)).append(
                    head["rows"] / head["seconds"])

    def balance(self) -> None:
        """Move blocks from slower processes to faster ones where the master's planner says it pays:
        only once every process holding blocks has ``SPEED_SAMPLES`` rounds measured since the last
        moves. Call it between evaluations only. A move that fails (a process out of memory) is
        logged and balancing stops."""
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
            self.ask({slot: (HOLD, [self.rows[b] for b in sorted(ids) if b in self.rows], {"ids": sorted(ids)})
                      for slot, ids in gets.items()})
        except WorkerError as e:  # the source process still holds them all: nothing changed but the try
            log.warning("%s: blocks not moved between its processes (%s); it stops balancing them", self.name, e)
            self.balancing = False
            return
        for slot, ids in gets.items():
            self.children[slot].blocks.update(ids)
            self.owner.update({b: slot for b in ids})
        for slot, ids in gives.items():
            self._drop(slot, ids)
        per_block = (time.perf_counter() - t0) / max(len(ids) for ids in gets.values())
        self.move_seconds = per_block if self.move_seconds == 0 else 0.5 * (self.move_seconds + per_block)
        self.samples, self.rounds_since_moves = {}, 0
        log.info("%s: %d blocks moved between its processes by measured speed (%s); blocks now %s", self.name,
                 len(moves), ", ".join(f"{v.key}: {v.speed:,.0f} rows/s" for v in views),
                 ", ".join(f"{c.slot}: {len(c.blocks)}" for c in self.children))
