"""One round of an evaluation: who computes which blocks, what came back, who is late.

A ``Round`` is pure bookkeeping (the master sends and receives; this decides). Every worker
is asked for the blocks it holds. A reply covers blocks; each block's first complete answer
is kept and later duplicates are dropped, so when a straggler's blocks are computed again by
workers that have finished (``backups``), whichever answer comes first counts and the sums
the optimizer sees are the same either way (up to the rounding of their order: they are
added in block order).

The exact protocol's ops answer per block. "average" answers per worker (its blocks taken
as one shard): there the unit is the worker's whole group of blocks, and a backup computes
the whole group.

A worker is a straggler when it has run ``STRAGGLER_FACTOR`` times its predicted seconds
(rows / measured rows per second) plus ``STRAGGLER_SLACK``; long before worker_timeout.
"""

from __future__ import annotations

import statistics
import time
from typing import Hashable

import numpy as np

__all__ = ["Round", "STRAGGLER_FACTOR", "STRAGGLER_SLACK"]

STRAGGLER_FACTOR = 2.0  # rounds vary by ±20% on a shared machine; twice the prediction is "well behind"
STRAGGLER_SLACK = 0.1  # seconds: below this a round's time is latency and Python, not compute


class Round:
    """The bookkeeping of one scattered op.

    Parameters
    ----------
    number : the round number (replies of other rounds are dropped by it).
    op : the op; ``per_block`` says whether its replies are one row per block.
    assignment : worker -> the blocks it is asked for.
    predicted : worker -> predicted compute seconds (None: unknown).
    sizes : rows of every block.
    evaluation : the evaluation this round is part of (its θ): a worker keeps a block's
        activations of the forward round only for the backward round of the same evaluation.
    """

    def __init__(self, number: int, op: str, per_block: bool, assignment: dict[Hashable, list[int]],
                 predicted: dict[Hashable, float | None], sizes: list[int], evaluation: int = 0) -> None:
        self.number, self.op, self.per_block, self.evaluation = number, op, per_block, evaluation
        self.assignment = {k: list(v) for k, v in assignment.items() if v}
        self.predicted = predicted
        self.sizes = sizes
        self.started = time.monotonic()
        self.pending: set[Hashable] = set(self.assignment)  # asked and not yet answered
        self.finished: dict[Hashable, float] = {}  # worker -> seconds after the start
        self.backed_up: set[Hashable] = set()  # stragglers whose blocks were sent to others
        self.helping: set[Hashable] = set()  # workers computing a backup now
        # units: a block (per-block ops) or a worker's group of blocks ("average")
        self.units = {(b,): k for k, ids in self.assignment.items() for b in ids} if per_block else \
            {tuple(ids): k for k, ids in self.assignment.items()}
        self.results: dict[tuple, tuple[int, np.ndarray]] = {}

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.units)

    def accept(self, worker: Hashable, ids: list[int], rows: np.ndarray) -> bool:
        """A reply of ``worker`` covering ``ids`` (rows: its result array); True if the worker
        had work pending in this round. Blocks already answered are ignored."""
        now = time.monotonic() - self.started
        if self.per_block:
            for b, row in zip(ids, rows):
                if (b,) in self.units and (b,) not in self.results:
                    self.results[(b,)] = (self.sizes[b], row)
        else:
            unit = tuple(ids)
            if unit in self.units and unit not in self.results:
                self.results[unit] = (sum(self.sizes[b] for b in ids), rows[0])
        was = worker in self.pending or worker in self.helping
        self.pending.discard(worker)
        self.helping.discard(worker)
        self.finished.setdefault(worker, now)
        if self.done:
            self.pending.clear()
            self.helping.clear()
        return was

    def replies(self) -> list[tuple[int, np.ndarray]]:
        """(rows, result) of every unit, in block order: what the reducer adds."""
        return [self.results[u] for u in sorted(self.units)]

    def waiting_on(self) -> set[Hashable]:
        """Workers whose answer the round still needs (a backed-up straggler no longer is needed
        once its helpers answer, but may still answer first)."""
        return self.pending | self.helping

    def deadline(self, worker: Hashable) -> float | None:
        """Seconds after the start at which ``worker`` counts as a straggler (None: unknown)."""
        p = self.predicted.get(worker)
        if p is None and self.finished:
            p = statistics.median(self.finished.values())  # as long as those that finished took
        return None if p is None else STRAGGLER_FACTOR * p + STRAGGLER_SLACK

    def stragglers(self) -> list[Hashable]:
        """Pending workers past their deadline, not backed up yet, while someone is free to help."""
        if not self.idle():
            return []
        now = time.monotonic() - self.started
        late = []
        for k in self.pending - self.backed_up:
            d = self.deadline(k)
            if d is not None and now > d and any(u not in self.results for u in self._units_of(k)):
                late.append(k)
        return late

    def idle(self) -> list[Hashable]:
        """Workers that answered this round and are computing nothing else."""
        return [k for k in self.finished if k not in self.pending and k not in self.helping]

    def backups(self, straggler: Hashable, speeds: dict[Hashable, float]) -> dict[Hashable, list[int]]:
        """Split ``straggler``'s unanswered blocks among the idle workers, by their speed.

        Returns worker -> blocks to compute ({} if nothing is left or nobody is idle).
        """
        idle = sorted(self.idle(), key=lambda k: -speeds.get(k, 1.0))
        units = [u for u in self._units_of(straggler) if u not in self.results]
        if not idle or not units:
            return {}
        if not self.per_block:  # a group is one unit: the fastest idle worker takes it whole
            plan = {idle[0]: list(units[0])}
        else:
            blocks = [u[0] for u in units]
            total = sum(speeds.get(k, 1.0) for k in idle)
            plan, start = {}, 0
            for i, k in enumerate(idle):
                n = len(blocks) - start if i == len(idle) - 1 else round(len(blocks) * speeds.get(k, 1.0) / total)
                if n > 0:
                    plan[k] = blocks[start:start + n]
                start += n
        self.backed_up.add(straggler)
        self.helping.update(plan)
        return plan

    def _units_of(self, worker: Hashable) -> list[tuple]:
        return [u for u, k in self.units.items() if k == worker]
