"""Who may hold blocks: the workers the master knows, their state, speed and events.

A worker is ``joining`` from its HELLO until it holds the data's source, then ``active``;
``leaving`` once it said BYE (its blocks go to the others before the next round), and
``lost`` when it went silent past the timeout. A lost worker that says HELLO again comes
back as a new member ("return"). None of this knows of sockets: the master feeds it
events and asks it questions.

Speeds are rows per second of a worker's own compute (each RESULT carries its seconds),
smoothed by the median of the last ``SPEED_SAMPLES`` rounds, so one slow round (a page
fault storm, a SIGSTOP) does not move blocks.
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["ACTIVE", "JOINING", "LEAVING", "LOST", "SPEED_SAMPLES", "WorkerInfo", "Membership", "processes"]

log = logging.getLogger("qsae.master")

ACTIVE, JOINING, LEAVING, LOST = "active", "joining", "leaving", "lost"
SPEED_SAMPLES = 5  # rounds in a worker's speed median: one outlier in five never moves blocks
# an evaluation shorter than this times scheduling noise, not the worker's speed: not a sample
# (a context switch costs ~1 ms on a loaded node; with 10K patches on 2 workers, 3 ms samples
# moved blocks back and forth, each move dearer than what it saved)
MIN_SAMPLE_SECONDS = 0.01
KEEP_GONE = 64  # departed and lost workers kept for status()


def processes(procs) -> int:
    """A worker's compute processes from the ``procs`` of its status (or of a workers.jsonl line):
    an agent's count, or the length of its list; 1 for a plain worker (None) or anything else."""
    if isinstance(procs, list):
        return len(procs)
    return procs if isinstance(procs, int) and not isinstance(procs, bool) and procs > 0 else 1


@dataclass
class WorkerInfo:
    """What the master knows of one worker."""

    ident: bytes
    name: str
    host: str
    pid: int
    cores: int
    last_heard: float
    blas: str = ""  # library, version and kernel (HELLO): sums' bits depend on it
    procs: int | list | None = None  # a host agent's compute processes (HELLO's optional field)
    last_sent: float = 0.0
    state: str = JOINING
    blocks: set = field(default_factory=set)  # block ids it holds
    seconds: float | None = None  # compute seconds of its last evaluation (all its rounds)
    eval_rows: int = 0  # rows and compute seconds of the evaluation running now
    eval_seconds: float = 0.0
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SPEED_SAMPLES))

    @property
    def speed(self) -> float | None:
        """Rows per second, the median of the last rounds; None before any."""
        return statistics.median(self.samples) if self.samples else None

    def record(self, rows: int, seconds: float) -> None:
        """An evaluation of ``rows`` rows that took ``seconds`` of compute (every round of it)."""
        self.seconds = seconds
        if seconds >= MIN_SAMPLE_SECONDS:
            self.samples.append(rows / seconds)


class Membership:
    """The registry of workers and the events that change it.

    ``on_event(event)`` is called for every change with a dict: time (unix seconds), event
    ("join", "return", "leave", "lost", "move"), detail (one line) and workers (the
    ``status()`` after the change).
    """

    def __init__(self, on_event: Callable[[dict], None] | None = None) -> None:
        self.workers: dict[bytes, WorkerInfo] = {}
        self.gone: collections.OrderedDict[str, WorkerInfo] = collections.OrderedDict()
        self.on_event = on_event
        self.block_rows: Callable[[int], int] = lambda b: 0  # rows of block b, set by the master
        self.kernels_warned = False  # the differing-BLAS warning is given once a run

    def __len__(self) -> int:
        return len(self.workers)

    def get(self, ident: bytes) -> WorkerInfo | None:
        return self.workers.get(ident)

    def active(self) -> list[WorkerInfo]:
        """Workers that may hold blocks and compute, in the order they joined."""
        return [w for w in self.workers.values() if w.state == ACTIVE]

    def joining(self) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.state == JOINING]

    def join(self, ident: bytes, name: str, host: str, pid: int, cores: int, blas: str = "", *,
             now: float | None = None, procs: int | list | None = None) -> WorkerInfo:
        """A HELLO: a new member, or one lost earlier that came back (``procs``: an agent's
        compute processes, a count or a list of small dicts, shown by ``status()``)."""
        back = self.gone.pop(name, None)
        w = WorkerInfo(ident, name, host, pid, cores, time.monotonic() if now is None else now, blas=blas,
                       procs=procs)
        self.workers[ident] = w
        agent = f", {procs if isinstance(procs, int) else len(procs)} processes" if procs else ""
        self.event("return" if back is not None and back.state == LOST else "join",
                   f"{name} (host {host}, pid {pid}, {cores} cores{agent})")
        return w

    def check_kernels(self) -> None:
        """Warn once a run when the workers' BLAS kernels differ: bits then depend on placement."""
        kernels = collections.Counter(w.blas for w in self.workers.values())
        if len(kernels) > 1 and not self.kernels_warned:
            self.kernels_warned = True
            log.warning("workers run different BLAS kernels (%s): a block's sums round differently on each, so "
                        "the cost depends on which worker computes which block (to float precision, not bit for "
                        "bit); give every host the same numpy/OpenBLAS build and OPENBLAS_CORETYPE for equal bits",
                        "; ".join(f"{k or 'unknown'} on {n} workers" for k, n in kernels.items()))

    def activate(self, w: WorkerInfo) -> None:
        """It holds the data's source: it may be given blocks."""
        w.state = ACTIVE

    def remove(self, ident: bytes, state: str, why: str) -> WorkerInfo:
        """It left (BYE) or was lost: drop it, keep its record for status()."""
        w = self.workers.pop(ident)
        w.state = state
        self.gone[w.name] = w
        while len(self.gone) > KEEP_GONE:
            self.gone.popitem(last=False)
        self.event("leave" if state == LEAVING else "lost", f"{w.name}: {why}")
        return w

    def status(self) -> list[dict]:
        """One dict per worker (a host agent counts as one): name, host, pid, state, rows, blocks,
        seconds, rows_per_s, blas, procs (an agent's processes; None for a plain worker)."""
        out = []
        for w in [*self.workers.values(), *self.gone.values()]:
            held = sorted(w.blocks) if w.state in (ACTIVE, JOINING) else []
            out.append({"name": w.name, "host": w.host, "pid": w.pid, "state": w.state,
                        "rows": sum(self.block_rows(b) for b in held), "blocks": len(held),
                        "seconds": w.seconds, "rows_per_s": w.speed, "blas": w.blas, "procs": w.procs})
        return out

    def event(self, kind: str, detail: str) -> None:
        """Log a membership or placement change and tell ``on_event``."""
        log.info("%s: %s", kind, detail)
        if self.on_event is not None:
            try:
                self.on_event({"time": time.time(), "event": kind, "detail": detail, "workers": self.status()})
            except Exception as e:  # a reporting hook must not stop the run
                log.warning("on_event(%s) failed: %r", kind, e)
