"""One round of an evaluation: who computes which blocks, what came back, who is late.

A ``Round`` is pure bookkeeping (the master sends and receives; this decides). Every worker
is asked for the blocks it holds. The exact protocol's ops answer with one row per node of
the summation tree (``qsae.tree``) that the worker's blocks make; the round keeps each node's
first row and is done once every block is under some kept node. When a straggler's blocks are
computed again by workers that have finished (``backups``), rows of the straggler's nodes and
of the helpers' smaller ones may both arrive: the sum is the tree's root either way, added
along the same tree, so the bits do not depend on who answered first.

"average" answers per worker (its blocks taken as one shard): there the unit is the
worker's whole group of blocks, and a backup computes the whole group.

A worker is a straggler when it has run ``STRAGGLER_FACTOR`` times its predicted seconds
(rows / measured rows per second) plus ``STRAGGLER_SLACK``; long before worker_timeout.
"""

from __future__ import annotations

import statistics
import time
from typing import Hashable

import numpy as np

from . import tree

__all__ = ["Round", "Span", "STRAGGLER_FACTOR", "STRAGGLER_SLACK"]

STRAGGLER_FACTOR = 2.0  # rounds vary by ±20% on a shared machine; twice the prediction is "well behind"
STRAGGLER_SLACK = 0.1  # seconds: below this a round's time is latency and Python, not compute


Span = tuple[int, int]  # blocks [lo, hi)


class Round:
    """The bookkeeping of one scattered op.

    Blocks travel as ranges (``Span``: blocks [lo, hi), a worker's maximal ranges in order),
    so what a round costs the master grows with the ranges, not the blocks: sets of block ids
    are built from ranges in C (``range``), never walked in Python.

    Parameters
    ----------
    number : the round number (replies of other rounds are dropped by it).
    op : the op; ``per_block`` says whether its replies are rows of tree nodes.
    assignment : worker -> the ranges of blocks it is asked for.
    predicted : worker -> predicted compute seconds (None: unknown).
    sizes : rows of every block.
    evaluation : the evaluation this round is part of (its θ): a worker keeps a block's
        activations of the forward round only for the backward round of the same evaluation.
    started : ``time.monotonic()`` at the start (default: now). Every method that reads the
        clock takes ``now`` too, so a round can be replayed on made-up times.
    """

    def __init__(self, number: int, op: str, per_block: bool, assignment: dict[Hashable, list[Span]],
                 predicted: dict[Hashable, float | None], sizes: list[int], evaluation: int = 0,
                 started: float | None = None) -> None:
        self.number, self.op, self.per_block, self.evaluation = number, op, per_block, evaluation
        self.assignment = {k: list(v) for k, v in assignment.items() if v}
        self.predicted = predicted
        self.sizes = sizes
        self.started = time.monotonic() if started is None else started
        self.pending: set[Hashable] = set(self.assignment)  # asked and not yet answered
        self.finished: dict[Hashable, float] = {}  # worker -> seconds after the start
        self.backed_up: set[Hashable] = set()  # stragglers whose blocks were sent to others
        self.helping: set[Hashable] = set()  # workers computing a backup now
        self.asked = {k: _blocks(v) for k, v in self.assignment.items()}  # blocks each still owes
        self.n_blocks = sum(hi - lo for v in self.assignment.values() for lo, hi in v)
        # "average": a worker's ranges are one group, answered by one row
        self.groups = {} if per_block else {tuple(v): k for k, v in self.assignment.items()}
        self.results: dict[tuple, tuple[int, np.ndarray]] = {}  # tree node (per block) or group -> (rows, row)
        self.covered: set[int] = set()  # blocks under a kept row

    @property
    def done(self) -> bool:
        if self.per_block:
            return len(self.covered) == self.n_blocks
        return len(self.results) == len(self.groups)

    def accept(self, worker: Hashable, spans: list[Span], rows: np.ndarray, nodes: list | None = None,
               now: float | None = None) -> bool:
        """A reply of ``worker`` covering ``spans``: per-block ops give one row per tree node
        (``nodes``, checked by the caller to be the cover of ``spans``), "average" one row for
        its group. True if the worker had work pending in this round. A worker may answer in
        several replies; it is finished once they cover every block it was asked for."""
        now = (time.monotonic() if now is None else now) - self.started
        if self.per_block:
            B = len(self.sizes)
            for node, row in zip(nodes or [], rows):
                if node not in self.results:
                    lo, hi = tree.span(node, B)
                    self.results[node] = (sum(self.sizes[lo:hi]), row)
                    self.covered.update(range(lo, hi))
        else:
            group = tuple(spans)
            if group in self.groups and group not in self.results:
                self.results[group] = (sum(sum(self.sizes[lo:hi]) for lo, hi in spans), rows[0])
        was = worker in self.pending or worker in self.helping
        owed = self.asked.get(worker)
        if owed is not None:
            for lo, hi in spans:
                owed.difference_update(range(lo, hi))
        if not owed:
            self.pending.discard(worker)
            self.helping.discard(worker)
            self.finished.setdefault(worker, now)
        if self.done:
            self.pending.clear()
            self.helping.clear()
        return was

    def replies(self) -> list[tuple[int, np.ndarray]]:
        """What the reducer adds: per-block ops, one (rows, sum) — the tree's root over every
        block; "average", (rows, result) of every group in block order."""
        if self.per_block:
            B = len(self.sizes)
            rows = sum(sum(self.sizes[lo:hi]) for v in self.assignment.values() for lo, hi in v)
            return [(rows, tree.value(tree.root(B), {n: v for n, (_, v) in self.results.items()}, B))]
        return [self.results[g] for g in sorted(self.groups)]

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

    def stragglers(self, now: float | None = None) -> list[Hashable]:
        """Pending workers past their deadline, not backed up yet, while someone is free to help."""
        if not self.idle():
            return []
        now = (time.monotonic() if now is None else now) - self.started
        late = []
        for k in self.pending - self.backed_up:
            d = self.deadline(k)
            if d is not None and now > d and self._unanswered(k):
                late.append(k)
        return late

    def idle(self) -> list[Hashable]:
        """Workers that answered this round and are computing nothing else."""
        return [k for k in self.finished if k not in self.pending and k not in self.helping]

    def backups(self, straggler: Hashable, speeds: dict[Hashable, float]) -> dict[Hashable, list[Span]]:
        """Split ``straggler``'s unanswered blocks among the idle workers, by their speed.

        Returns worker -> ranges of blocks to compute ({} if nothing is left or nobody is idle).
        """
        idle = sorted(self.idle(), key=lambda k: -speeds.get(k, 1.0))
        blocks = self._unanswered(straggler)
        if not idle or not blocks:
            return {}
        if not self.per_block:  # a group is one unit: the fastest idle worker takes it whole
            plan = {idle[0]: list(self.assignment[straggler])}
        else:  # consecutive slices of the blocks: few tree nodes a helper
            total = sum(speeds.get(k, 1.0) for k in idle)
            plan, start = {}, 0
            for i, k in enumerate(idle):
                n = len(blocks) - start if i == len(idle) - 1 else round(len(blocks) * speeds.get(k, 1.0) / total)
                if n > 0:
                    plan[k] = tree.runs(blocks[start:start + n])
                start += n
        self.backed_up.add(straggler)
        self.helping.update(plan)
        for k, spans in plan.items():
            self.asked.setdefault(k, set()).update(_blocks(spans))
        return plan

    def _unanswered(self, worker: Hashable) -> list[int]:
        """The blocks of ``worker`` nobody has answered yet, in order (a group's: all or none)."""
        spans = self.assignment.get(worker, [])
        if not self.per_block:
            return [] if tuple(spans) in self.results else tree.blocks_of(spans)
        return [b for b in tree.blocks_of(spans) if b not in self.covered]


def _blocks(spans: list[Span]) -> set[int]:
    """The set of blocks in ``spans``, built in C."""
    return set().union(*(range(lo, hi) for lo, hi in spans))
