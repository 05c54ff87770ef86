"""What the coordinator awaits: one reply from each of some workers, or a round's results.

A wait is over when it is done, lost (a worker awaited went silent or away: the
coordinator recovers and the procedure runs again) or failed with a worker's error.
"""

from __future__ import annotations

import math
from typing import Hashable

import numpy as np

from . import tree
from .errors import NumericalError, ProtocolError
from .membership import WorkerInfo
from .protocol import RESULT
from .rounds import Round

__all__ = ["Wait", "Collect", "RoundWait"]


class Wait:
    """The common part: which round, what reply, and how it ended."""

    def __init__(self, round: int, want: str) -> None:
        self.round, self.want = round, want
        self.lost = False
        self.error: Exception | None = None  # a worker's ERROR or NaN: raised by the shell

    @property
    def done(self) -> bool:
        raise NotImplementedError

    @property
    def over(self) -> bool:
        return self.lost or self.error is not None or self.done

    def waiting_on(self) -> set[Hashable]:
        """Workers whose silence or departure fails the wait."""
        raise NotImplementedError

    def poll_seconds(self, now: float, default: float) -> float:
        """Seconds until something is due (a liveness check: ``default``)."""
        return default


class Collect(Wait):
    """One reply of type ``want`` for ``round`` from each of ``idents`` (READY after SOURCE or BLOCKS)."""

    def __init__(self, round: int, want: str, idents: set[bytes]) -> None:
        super().__init__(round, want)
        self.idents, self.got = idents, set()

    @property
    def done(self) -> bool:
        return self.got >= self.idents

    def waiting_on(self) -> set[Hashable]:
        return self.idents - self.got


class RoundWait(Wait):
    """A round's RESULTs (``qsae.rounds.Round``); ``arg`` is re-sent to backups; ``width`` is
    the length of one result row (None: an op this version does not know)."""

    def __init__(self, rnd: Round, arg: np.ndarray, width: int | None) -> None:
        super().__init__(rnd.number, RESULT)
        self.rnd, self.arg, self.width = rnd, arg, width

    @property
    def done(self) -> bool:
        return self.rnd.done

    def waiting_on(self) -> set[Hashable]:
        return self.rnd.waiting_on()

    def poll_seconds(self, now: float, default: float) -> float:
        """Sleep in poll until a message, the next straggler deadline or a liveness check."""
        rnd, wait = self.rnd, default
        if rnd.idle():
            elapsed = now - rnd.started
            for k in rnd.pending - rnd.backed_up:
                d = rnd.deadline(k)
                if d is not None:
                    wait = min(wait, max(0.001, d - elapsed))
        return wait

    def take(self, w: WorkerInfo, msg, n_blocks: int, now: float) -> str | None:
        """Check a RESULT of this round (shape, finiteness, ranges, tree nodes), note the
        worker's compute time and give it to the round. Returns why it is refused (the worker
        is then dropped), or None; NaN or Inf fails the wait with ``NumericalError``. Its cost
        grows with the reply's ranges and nodes, never with its blocks."""
        rnd, spans, out = self.rnd, tree.pairs(msg["spans"]), msg.arrays[0]
        rows_expected = len(msg["nodes"]) if rnd.per_block else 1
        if self.width is not None and out.shape != (rows_expected, self.width):
            return (f"results of shape {out.shape}, this run's model needs {(rows_expected, self.width)}: another "
                    "model or qsae version")
        if spans and spans[-1][1] > n_blocks:
            return f"a reply for blocks up to {spans[-1][1] - 1}; this data set has {n_blocks}"
        if not math.isfinite(out.sum()):  # any NaN or Inf makes the sum so; one pass, no temporary
            self.error = NumericalError(
                f"worker {w.name} (pid {w.pid} on {w.host}) returned NaN or Inf in round {rnd.number} ({rnd.op}); "
                "the run stops here with the last good θ saved")
            return None
        nodes = None
        if rnd.per_block:  # rows of the summation tree's nodes: exactly the ones its blocks make
            try:
                nodes = [tree.decode(c, n_blocks) for c in msg["nodes"]]
            except ProtocolError as e:
                return str(e)
            if nodes != tree.cover_runs(spans, n_blocks):
                return (f"a reply for {len(spans)} ranges of blocks sent {len(nodes)} tree nodes, not the "
                        f"{len(tree.cover_runs(spans, n_blocks))} those blocks make")
        if spans == rnd.assignment.get(w.ident):  # its own blocks, not a backup: its time
            w.eval_rows, w.eval_seconds = msg["rows"], w.eval_seconds + msg["seconds"]
        rnd.accept(w.ident, spans, out, nodes, now=now)
        return None
