"""Membership, placement, rounds and recovery as one state machine: events in, messages out.

Like dask's ``SchedulerState`` beside its ``Scheduler``: the coordinator never touches a
socket and takes the time as an argument (only an event's record carries the wall clock).
The shell (``qsae.router``, ``qsae.master``) feeds it what arrives (``handle(ident, msg,
now)``) and the passing of time (``tick(now)``), and sends the ``Send`` records every call
returns. Two procedures run on it, each started by the shell and driven by events until
``waiting`` is False:

- ``settle_step`` (``qsae.settle``): before an evaluation, joiners get the source, every
  block gets a holder and (measured balance) blocks move when the planner says it pays;
- ``begin_round`` / ``end_round`` (``qsae.scatter``): θ (or the sparsity delta) out to every
  holder, results in, stragglers' blocks computed again by the idle (images only).

Recovery: a worker silent past ``worker_timeout`` or gone while awaited fails the wait: it
is dropped, its blocks go to the others at the next settle, and the procedure answers
"lost" (``end_round`` returns None), so the evaluation runs again — the optimizer never
sees a partial sum. Nothing is raised for that; a worker's ERROR and NaN results are
raised (``WorkerError``, ``NumericalError``) as they stop the run. Between procedures
``tick`` pings the idle workers every ``heartbeat`` seconds.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Callable

import numpy as np

from . import __version__
from .errors import WorkerError
from .layout import Layout, Send
from .membership import JOINING, LEAVING, LOST, Membership, WorkerInfo
from .protocol import BYE, ERROR, HELLO, PING, PONG, READY, RESULT
from .scatter import Scatter
from .settle import Settle
from .throttle import Throttle
from .waits import Collect, RoundWait, Wait

__all__ = ["Coordinator", "Send"]

log = logging.getLogger("qsae.master")

REJECT_LOG_SECONDS = 10.0  # at most one line this often about rejected messages (with the count)


def secs(t: float) -> str:
    """Seconds as a user gave them: 5.0, 60.0, 0.05 (not 0.1), 0.25."""
    return f"{t:.1f}" if t >= 0.95 else f"{t:.2g}"


class Coordinator:
    """The master's state: who is a member, who holds what, what is awaited.

    Parameters
    ----------
    layout : the data set's blocks (``qsae.layout.Layout``).
    heartbeat : seconds between PINGs to an idle worker.
    worker_timeout : seconds of silence after which an awaited worker is lost.
    on_event : called with a dict for every membership or placement change.
    """

    def __init__(self, layout: Layout, heartbeat: float = 1.0, worker_timeout: float = 5.0,
                 on_event: Callable[[dict], None] | None = None) -> None:
        self.layout, self.heartbeat, self.worker_timeout = layout, heartbeat, worker_timeout
        self.members = Membership(on_event)
        self.members.block_rows = layout.rows
        self.round = 0
        self.evals, self.balanced_at = 0, 0  # evaluations; the one of the last balance check
        self.wait: Wait | None = None
        self.stats: collections.Counter = collections.Counter()  # rounds, backups, blocks moved, ...
        self.backups_by: collections.Counter = collections.Counter()  # worker name -> late blocks it computed too
        self.settling = Settle(self)
        self.scatter = Scatter(self)
        self._rejected = Throttle(REJECT_LOG_SECONDS)

    @property
    def workers(self) -> dict[bytes, WorkerInfo]:
        return self.members.workers

    @property
    def waiting(self) -> bool:
        """True while the current wait still needs events."""
        return self.wait is not None and not self.wait.over

    def poll_seconds(self, now: float) -> float:
        """How long the shell may block in poll before the next ``tick`` is due."""
        wait = min(self.heartbeat, self.worker_timeout / 2)
        return self.wait.poll_seconds(now, wait) if self.wait is not None else wait

    # ------------------------------------------------------------------ events
    def handle(self, ident: bytes, msg, now: float) -> list[Send]:
        """A decoded message from ``ident``: what to send in answer."""
        w = self.members.get(ident)
        if w is not None:
            w.last_heard = now
        if msg.type == HELLO:
            return self._hello(ident, msg, now)
        if w is None:
            return self.reject(ident, f"{msg.type} from a worker that never said HELLO", now)
        if msg.type == PING:
            return [Send(ident, PONG)]
        if msg.type == BYE:  # it leaves (SIGTERM, Ctrl-C): its blocks go to the others before the next round
            self.drop(ident, LEAVING, "said BYE")
        elif msg.type in (READY, RESULT, ERROR):
            self._reply(w, msg, now)
        elif msg.type != PONG:
            return self.reject(ident, f"a master does not take {msg.type} messages", now)
        return []

    def tick(self, now: float) -> list[Send]:
        """Time passed: ping idle workers; fail a wait on the silent or gone; back up stragglers."""
        if self.wait is None:
            return [Send(w.ident, PING, fields={"busy": False}) for w in self.workers.values()
                    if now - w.last_sent >= self.heartbeat]
        if self.wait.over:
            return []
        waited = self.wait.waiting_on()
        needed = self.wait.idents if isinstance(self.wait, Collect) else waited  # a READY, then gone: lost too
        gone = [i for i in needed if i not in self.workers]
        silent = self.silent(waited, now)
        if gone or silent:
            self.fail(silent + gone, self.wait.round, self.wait.want)
            return []
        if isinstance(self.wait, RoundWait) and self.layout.source.get("kind") == "images":
            return [s for k in self.wait.rnd.stragglers(now) for s in self.scatter.back_up(k, now)]
        return []

    def sent(self, ident: bytes, now: float, reached: bool = True) -> None:
        """The shell sent to ``ident`` (``reached``: False when its connection is gone: then
        the worker is lost at the next check)."""
        w = self.workers.get(ident)
        if w is not None:
            if reached:
                w.last_sent = now
            else:
                w.last_heard = -math.inf

    def reject(self, ident: bytes, why: str, now: float) -> list[Send]:
        """Answer a message the master does not take with ERROR; log it, a line per
        ``REJECT_LOG_SECONDS`` at most with the count since the last (garbage must not flood
        the log), the sender named where it was a worker. A worker dropped while unreachable
        that comes back is told so and says HELLO again: that is logged at INFO, not warned."""
        n = self._rejected.due(now)
        if n is not None:
            gone = next((w for w in self.members.gone.values() if w.ident == ident), None)
            who = f"{gone.name} ({gone.state})" if gone is not None else f"an unknown peer ({ident.hex()[:10]})"
            if gone is not None and "never said HELLO" in why:
                log.info("%s is back and no member now: told to say HELLO again", who)
            else:
                more = f" ({n - 1} more rejected since the last such line)" if n > 1 else ""
                log.warning("rejected a message from %s: %s%s", who, why, more)
        return [Send(ident, ERROR, fields=dict(etype="ProtocolError", message=why[:2000], traceback="",
                                               host="master"))]

    def _hello(self, ident: bytes, msg, now: float) -> list[Send]:
        if msg["version"].split(".")[:2] != __version__.split(".")[:2]:
            return self.reject(ident, f"worker {msg['name']} runs qsae {msg['version']}, the master {__version__}: "
                                      "install the same version on both", now)
        if ident in self.workers:  # a second HELLO on the same connection (replies to queued errors): one join
            log.debug("%s said HELLO again; it is a member already", msg["name"])
            return []
        cores = min(max(1, msg["cores"]), 4096)  # static balance uses it: keep it sane
        self.members.join(ident, msg["name"], msg["host"], msg["pid"], cores, msg["blas"], now=now,
                          procs=msg.fields.get("procs"))
        self.members.check_kernels()
        return []

    def _reply(self, w: WorkerInfo, msg, now: float) -> None:
        """READY, RESULT or ERROR: for the current wait, or dropped."""
        wait = self.wait
        if wait is None or wait.over:
            log.debug("between rounds: dropped %s from %s", msg.type, w.name)
        elif msg.type == ERROR and msg.round in (wait.round, 0):
            wait.error = WorkerError(f"worker {w.name} on {msg['host']} failed: {msg['etype']}: {msg['message']}\n"
                                     f"{msg['traceback']}")
        elif isinstance(wait, RoundWait) and msg.type == RESULT and msg.round == wait.round:
            refused = wait.take(w, msg, len(self.layout.sizes), now)
            if refused:  # another model or version, or rows of nodes its blocks do not make
                log.error("worker %s: %s; it is dropped", w.name, refused)
                self.drop(w.ident, LOST, refused)
        elif isinstance(wait, Collect) and msg.type == wait.want and msg.round == wait.round:
            wait.got.add(w.ident)
        else:  # a straggler's answer after its backups won, or of an abandoned round
            log.debug("dropped %s of round %d from %s (round %d runs)", msg.type, msg.round, w.name, wait.round)

    # ------------------------------------------------------------------ membership and recovery
    def silent(self, idents, now: float) -> list[bytes]:
        """Those of ``idents`` silent for longer than ``worker_timeout``."""
        return [i for i in idents if i in self.workers and now - self.workers[i].last_heard > self.worker_timeout]

    def drop(self, ident: bytes, state: str, why: str) -> None:
        """It left or was lost: out of the membership; its blocks go to the others."""
        if ident in self.workers:
            self.scatter.forget(ident)
            w = self.members.remove(ident, state, why)
            if w.blocks:
                log.info("%s held %d blocks; they go to the others", w.name, len(w.blocks))

    def fail(self, idents: list[bytes], round: int, want: str, why: str = "") -> None:
        """Recovery: drop the workers a wait lost (their blocks are placed again by the next
        settle) and end the wait as lost."""
        if not idents:
            log.info("round %d runs again: %s", round, why)
        for ident in idents:
            w = self.workers.get(ident)
            if w is not None:
                how = ("its connection closed (the process died or its host went away)" if w.last_heard == -math.inf
                       else f"silent for over {secs(self.worker_timeout)} s")
                log.error("worker %s (pid %d on %s) lost: %s in round %d (%s awaited); its %d blocks go to the "
                          "others", w.name, w.pid, w.host, how, round, want, len(w.blocks))
                self.drop(ident, LOST, f"{how} in round {round}")
        if self.wait is not None:
            self.wait.lost = True

    def end_wait(self) -> bool:
        """Close the finished wait: True when it completed, False when lost; raises its error."""
        wait, self.wait = self.wait, None
        if wait is not None and wait.error is not None:
            raise wait.error
        return wait is not None and not wait.lost

    def abandon(self) -> None:
        """The shell gave up the current procedure (an exception of its own): forget the wait."""
        self.wait = None
        self.settling.reset()

    def collect(self, idents: list[bytes], r: int, want: str) -> None:
        self.wait = Collect(r, want, set(idents))

    def next_round(self) -> int:
        self.round += 1
        return self.round

    # ------------------------------------------------------------------ settling
    def settle_step(self, now: float) -> list[Send] | None:
        """The next messages of settling membership and placement before an evaluation, or
        None once settled (``qsae.settle``). After each step the shell delivers events until
        ``waiting`` is False, then asks again. Raises ``WorkerLost`` when no worker is left."""
        return self.settling.step(now)

    def reset_blocks(self) -> None:
        """A new data set: every member gets its source again and holds nothing yet."""
        self.settling.reset()
        for w in self.workers.values():
            w.state, w.blocks = JOINING, set()

    # ------------------------------------------------------------------ evaluations and rounds
    def begin_evaluation(self) -> None:
        """An evaluation starts (after settling): its rounds' compute seconds are summed per worker."""
        self.evals += 1
        for w in self.members.active():
            w.eval_rows, w.eval_seconds = 0, 0.0

    def end_evaluation(self) -> None:
        """The evaluation completed: each worker's speed sample (rows over its compute seconds)."""
        for w in self.members.active():
            if w.eval_seconds > 0:
                w.record(w.eval_rows, w.eval_seconds)

    def begin_round(self, op: str, arg: np.ndarray, now: float) -> list[Send] | None:
        """EVAL ``op`` with ``arg`` to every holder (``qsae.scatter``); None when blocks lack a
        holder (the evaluation must settle and run again)."""
        return self.scatter.begin(op, arg, now)

    def end_round(self) -> list[tuple[int, np.ndarray]] | None:
        """The finished round's (rows, result) for the reducer, or None when it was lost."""
        return self.scatter.end()
