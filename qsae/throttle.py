"""A log line at most every so often, with the count of the events it stands for.

Garbage on the master's port, a worker retrying with the wrong keys, a master refusing a
worker's late replies: each can come hundreds of times a second. Where they are logged,
one line per ``seconds`` says how many came since the last, so the log stays readable and
nothing is hidden.

    refused = Throttle(10.0)
    ...
    n = refused.due(time.monotonic())
    if n is not None:
        log.warning("refused a key (%d since the last such line)", n)
"""

from __future__ import annotations

import math

__all__ = ["Throttle"]


class Throttle:
    """Counts events; says when a line about them is due and how many it stands for.

    Parameters
    ----------
    seconds : the least time between two lines.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._count, self._last = 0, -math.inf

    def due(self, now: float) -> int | None:
        """Count one event at ``now`` (monotonic seconds). When a line is due, the number of
        events it stands for (this one and those since the last line), and the count starts
        again; otherwise None."""
        self._count += 1
        if now - self._last < self.seconds:
            return None
        n, self._count, self._last = self._count, 0, now
        return n
