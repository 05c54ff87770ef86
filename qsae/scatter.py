"""The rounds of an evaluation: θ (or the sparsity delta) out to every holder, results in, a
straggler's blocks computed again by the idle.

A procedure of the coordinator (``qsae.coordinator``), as settling is (``qsae.settle``):
``begin`` opens a round — the coordinator's wait becomes a ``RoundWait`` — and returns its
EVALs; the shell delivers events until the wait is over; ``end`` gives the reducer the
round's sums, or None when it was lost (the evaluation settles and runs again). Blocks
travel as ranges: a worker's are worked out again only when its blocks changed.
"""

from __future__ import annotations

import logging
import statistics
from typing import TYPE_CHECKING

import numpy as np

from . import tree
from .layout import Send
from .membership import WorkerInfo
from .protocol import EVAL, RESULT
from .reduce import OP_TABLE, result_width
from .rounds import Round
from .waits import RoundWait

if TYPE_CHECKING:
    from .coordinator import Coordinator

__all__ = ["Scatter"]

log = logging.getLogger("qsae.master")


class Scatter:
    """The rounds of ``coordinator`` (one at a time)."""

    def __init__(self, coordinator: "Coordinator") -> None:
        self.c = coordinator
        self._held: dict[bytes, tuple[frozenset, list[tuple[int, int]]]] = {}  # worker -> its blocks' ranges

    def begin(self, op: str, arg: np.ndarray, now: float) -> list[Send] | None:
        """EVAL ``op`` with ``arg`` to every holder; None when blocks lack a holder (the
        evaluation must settle and run again)."""
        c = self.c
        r = c.next_round()
        active = c.members.active()
        if c.layout.uncovered(active):  # never add up a partial sum: settle (place the orphans) and run again
            c.fail([], r, RESULT, "a worker left between placing and computing")
            return None
        sizes = c.layout.sizes
        assignment, predicted = {}, {}
        for w in active:
            if w.blocks:
                spans = assignment[w.ident] = self._ranges(w)
                rows = sum(sum(sizes[lo:hi]) for lo, hi in spans)
                predicted[w.ident] = rows / w.speed if w.speed else None
        rnd = Round(r, op, op in OP_TABLE and OP_TABLE[op].per_block, assignment, predicted, sizes,
                    evaluation=c.evals, started=now)
        c.stats["rounds"] += 1
        c.wait = RoundWait(rnd, arg, result_width(op, c.layout.config))
        return [Send(ident, EVAL, r, [arg], {"op": op, "spans": tree.flat(spans), "evaluation": rnd.evaluation})
                for ident, spans in assignment.items()]

    def end(self) -> list[tuple[int, np.ndarray]] | None:
        """The finished round's (rows, result) for the reducer, or None when it was lost."""
        wait = self.c.wait
        if not self.c.end_wait():
            return None
        assert isinstance(wait, RoundWait)
        return wait.rnd.replies()

    def back_up(self, straggler: bytes, now: float) -> list[Send]:
        """Ask the idle workers to compute a straggler's blocks too (they cut them from the images)."""
        c = self.c
        assert isinstance(c.wait, RoundWait)
        rnd, arg, workers = c.wait.rnd, c.wait.arg, c.workers
        active = c.members.active()
        backups = rnd.backups(straggler, {w.ident: c.layout.speed(w, active) for w in active})
        if not backups:
            return []
        w, p = workers.get(straggler), rnd.predicted.get(straggler)
        log.info("round %d: %s is late (%.2f s, %s); %s compute its blocks too", rnd.number,
                 w.name if w else "?", now - rnd.started,
                 f"predicted {p:.2f} s" if p else f"the others took {statistics.median(rnd.finished.values()):.2f} s",
                 ", ".join(workers[k].name for k in backups))
        c.stats["backups"] += 1
        c.backups_by.update({workers[k].name: sum(hi - lo for lo, hi in spans) for k, spans in backups.items()})
        c.stats[f"backups of {rnd.op}"] += 1  # which round of the evaluation straggled
        return [Send(ident, EVAL, rnd.number, [arg], {"op": rnd.op, "spans": tree.flat(spans),
                                                      "evaluation": rnd.evaluation})
                for ident, spans in backups.items()]

    def forget(self, ident: bytes) -> None:
        """A worker left: its ranges are not kept."""
        self._held.pop(ident, None)

    def _ranges(self, w: WorkerInfo) -> list[tuple[int, int]]:
        """The maximal ranges of the blocks ``w`` holds, worked out again only when they changed
        (comparing two sets is C; walking them in Python is what a round must not do)."""
        cached = self._held.get(w.ident)
        if cached is None or cached[0] != w.blocks:
            cached = self._held[w.ident] = (frozenset(w.blocks), tree.runs(sorted(w.blocks)))
        return cached[1]
