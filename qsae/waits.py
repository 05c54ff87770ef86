"""What the coordinator awaits: one reply from each of some workers, or a round's results.

A wait is over when it is done, lost (a worker awaited went silent or away: the
coordinator recovers and the procedure runs again) or failed with a worker's error.
"""

from __future__ import annotations

from typing import Hashable

import numpy as np

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
