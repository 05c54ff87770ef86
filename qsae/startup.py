"""Bringing workers to a master: its socket bound, its workers started and their HELLOs awaited.

``Startup`` is the part of a master's lifecycle that runs before the first evaluation and
whenever more workers are asked for: it binds the ROUTER (``qsae.router``) where the workers
can reach it, starts the heartbeat before anything slow, starts the workers with the launcher
(a CURVE key pair each, handed over the channel that starts it) or tells the user how to start
them by hand, and waits until ``min_workers`` said HELLO — or raises, naming each launch
failure and the fix. ``qsae.master.Master`` owns one and asks it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .coordinator import secs as _secs
from .errors import LaunchError, RoundTimeout
from .membership import Membership
from .router import Router

__all__ = ["Startup", "launch_config"]

log = logging.getLogger("qsae.master")


def launch_config(keys: dict[int, dict]) -> Callable[[int], dict]:
    """A launcher's ``config(k)`` handing out ``keys`` (CURVE key pairs; {} without) in call order."""
    order: list[int] = []

    def config(k: int) -> dict:  # k is the launcher's global index; keys are handed out in call order
        if k not in order:
            order.append(k)
        return {"curve": keys.get(order.index(k)) if keys else None, "threads": 1}

    return config


class Startup:
    """Binds a master's socket, starts its workers and waits for their HELLOs.

    Parameters
    ----------
    router : the master's socket shell (bound here).
    members : the master's membership (its count of HELLOs is what is awaited).
    launcher : a ``qsae.launch.Launcher``, or None for hand-started workers.
    curve, keys : CURVE on, and the key directory of hand-started workers (for the command shown).
    expected, min_workers : workers asked for, and how many must say HELLO before a run starts.
    start_timeout : seconds to wait for them.
    """

    def __init__(self, router: Router, members: Membership, launcher, *, curve: bool, keys: str | None,
                 expected: int, min_workers: int, start_timeout: float) -> None:
        self.router, self.members, self.launcher = router, members, launcher
        self.curve, self.keys = curve, keys
        self.expected, self.min_workers, self.start_timeout = expected, min_workers, start_timeout
        self.address: str | None = None

    def start(self, bind: str | None, port: int) -> str:
        """Bind (``bind``: the launcher's suggestion by default), start the heartbeat and the workers,
        and wait for ``min_workers`` HELLOs. Returns the bound address."""
        if self.launcher is not None:
            self.launcher.prepare()
        host = bind or (self.launcher.bind_address() if self.launcher is not None else "127.0.0.1")
        self.address = self.router.bind(host, port)
        if self.curve:
            log.info("master listening on %s (CURVE)", self.address)
        else:  # every start, not once per process: each run opens a new port
            log.warning("running without encryption: anyone who can reach %s can join and read the weights "
                        "(drop curve=False / --insecure to encrypt)", self.address)
        # the heartbeat first: workers that said HELLO hear from the master while the launcher
        # is still starting the others (64 on 2 cores take longer than a worker's 10 s timeout)
        self.router.start_heartbeat()
        t0 = time.monotonic()
        if self.launcher is not None:
            self.launcher.start(self.address, self.config(self.launcher.n_workers))
        else:
            n = self.min_workers
            log.info("waiting up to %s s for %d hand-started worker%s; on each node run\n  %s",
                     _secs(self.start_timeout), n, "" if n == 1 else "s", self.worker_command())
        self.await_hellos(t0)
        return self.address

    def worker_command(self) -> str:
        """The ``qsae-worker`` command that joins this (started) master, for hand-started workers."""
        import socket as _socket

        host, _, port = (self.address or "tcp://MASTER:PORT")[len("tcp://"):].rpartition(":")
        if host in ("0.0.0.0", "*", "[::]", "::"):  # bound to every interface: name this host
            host = _socket.getfqdn() or "MASTER"
        keys = f" --keys {self.keys.rstrip('/')}/worker" if self.curve and self.keys else ""
        return f"qsae-worker --connect tcp://{host}:{port}{keys}"

    def config(self, n: int) -> Callable[[int], dict]:
        """The launch configuration of n new workers: a CURVE key pair each, admitted from now on."""
        return launch_config({i: self.router.new_client() for i in range(n)} if self.curve else {})

    def await_hellos(self, t0: float) -> None:
        """Wait until ``min_workers`` said HELLO, ``start_timeout`` s from ``t0`` at most."""
        deadline = t0 + self.start_timeout
        while len(self.members) < self.min_workers:
            left = deadline - time.monotonic()
            failed = self.launcher.failures() if self.launcher is not None else []
            possible = self.expected - len(failed)  # each failure line stands for at least one worker
            if left <= 0 or (failed and possible < self.min_workers):
                why = "".join(f"\n  {f}" for f in failed)
                fix = ("" if failed else
                       f"; start them with `{self.worker_command()}`" if self.launcher is None else
                       "; see each worker's lines in the log")
                raise (LaunchError if failed else RoundTimeout)(
                    f"{len(self.members)} of {self.min_workers} workers said HELLO within "
                    f"{_secs(time.monotonic() - t0)} s on {self.address}{fix}; a longer start_timeout "
                    f"(--start-timeout) waits longer, a smaller min_workers (--min-workers) goes on with fewer{why}")
            with self.router.lock:  # the heartbeat thread uses the socket too
                self.router.pump(min(left, 0.2))

    def add(self, n: int) -> None:
        """Start ``n`` more workers with the launcher (not under the socket's lock: a launcher may take
        many seconds — an SSH host that does not answer, a Slurm queue — and the heartbeat thread
        must keep pinging the workers meanwhile, else they quit after their --master-timeout while
        ``status()`` still calls them active)."""
        self.launcher.add(n, self.address, self.config(n))
