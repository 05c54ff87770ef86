"""Settling before an evaluation: joiners get the source, every block a holder, moves that pay.

A procedure of the coordinator (``qsae.coordinator``), written as a generator: each step
yields the messages to send and sets the coordinator's wait (READY from the workers that got
a SOURCE or BLOCKS); the shell delivers events until the wait is over and asks for the next
step. A worker lost on the way starts the settle over (its blocks become orphans to place).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

from .errors import WorkerLost
from .layout import Send
from .membership import SPEED_SAMPLES
from .protocol import DROP, READY

if TYPE_CHECKING:
    from .coordinator import Coordinator

__all__ = ["Settle", "SETTLE_TRIES"]

SETTLE_TRIES = 4  # plans in a row while workers leave as blocks move, before the settle starts over


class Settle:
    """The settle procedure of ``coordinator`` (one at a time)."""

    def __init__(self, coordinator: "Coordinator") -> None:
        self.c = coordinator
        self.now = 0.0
        self._gen: Generator[list[Send], None, None] | None = None

    def reset(self) -> None:
        """Forget a settle in progress (a new data set, an abandoned wait)."""
        self._gen = None

    def step(self, now: float) -> list[Send] | None:
        """The next messages to send, or None once settled."""
        self.now = now
        if self._gen is None:
            self._gen = self._settle()
        try:
            return next(self._gen)
        except StopIteration:
            self._gen = None
            return None
        except BaseException:
            self._gen, self.c.wait = None, None
            raise

    def _settle(self) -> Generator[list[Send], None, None]:
        while not (yield from self._once()):
            pass

    def _once(self) -> Generator[list[Send], None, bool]:
        """One try: False when a worker was lost on the way (the caller tries again)."""
        c = self.c
        layout, members = c.layout, c.members
        if not layout.source:
            return True
        silent = c.silent([w.ident for w in members.active()], self.now)
        if silent:  # silent past the timeout, though backups kept the rounds going: lost
            c.fail(silent, c.round, "any message")
        joining = members.joining()
        if joining:
            r = c.next_round()
            c.collect([w.ident for w in joining], r, READY)
            yield [layout.source_send(w.ident, r) for w in joining]
            if not c.end_wait():
                return False
            for w in joining:
                members.activate(w)
        # measured balance looks again once the speeds are new medians (every SPEED_SAMPLES
        # evaluations): planning for a settled cluster costs 22-29 µs at 256 blocks (250 at 4,096)
        rested = layout.balance == "measured" and c.evals - c.balanced_at >= SPEED_SAMPLES
        if not (joining or rested or layout.uncovered(members.active())):
            return True
        if rested:
            c.balanced_at = c.evals
        for _ in range(SETTLE_TRIES):  # a worker may leave while blocks move: plan again until all are held
            active = members.active()
            if not active:
                raise WorkerLost("every worker is lost or gone; nothing can compute the cost: check the workers' "
                                 "logs, then resume the run from its checkpoint")
            moves = layout.plan(active, rested)
            if not moves:
                return True
            by_dst: dict[bytes, list[int]] = {}
            for mv in moves:
                by_dst.setdefault(mv.dst, []).append(mv.block)
            r, t0 = c.next_round(), self.now
            c.collect(list(by_dst), r, READY)
            yield [s for ident, ids in by_dst.items() for s in layout.blocks_sends(ident, r, sorted(ids))]
            if not c.end_wait():
                return False
            # what a move costs the run: sending or cutting, and waiting for READY (the planner's price)
            layout.priced(self.now - t0, max(len(ids) for ids in by_dst.values()))
            yield self._moved(moves, by_dst)
            if layout.uncovered(members.active()) == 0:
                return True
        c.fail([], c.round, READY, "blocks without a holder after placing them")
        return False

    def _moved(self, moves, by_dst: dict[bytes, list[int]]) -> list[Send]:
        """The destinations hold their new blocks: note it, and let the sources drop theirs."""
        c = self.c
        workers = c.workers
        for mv in moves:
            workers[mv.dst].blocks.add(mv.block)
            if mv.src is not None and mv.src in workers:
                workers[mv.src].blocks.discard(mv.block)
        sources = {mv.src for mv in moves if mv.src is not None and mv.src in workers}
        sends = [Send(src, DROP, fields={"ids": sorted(mv.block for mv in moves if mv.src == src)}) for src in sources]
        placed = sum(mv.src is None for mv in moves)
        if placed < len(moves):
            c.balanced_at = c.evals
        c.stats["blocks placed"] += placed
        c.stats["blocks moved"] += len(moves) - placed
        c.members.event("move", f"{placed} blocks placed, {len(moves) - placed} moved: " + ", ".join(
            f"{workers[i].name} +{len(ids)}" for i, ids in by_dst.items()))
        return sends
