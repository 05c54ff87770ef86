"""The master: one ROUTER socket, the workers that join and leave, and evaluation rounds.

    with Master(workers=2, config=SAEConfig(), protocol="exact") as master:
        master.scatter_images(images, m=100_000, seed=0)   # or master.scatter(X)
        cost, grad = master(theta)                          # f(θ) -> (cost, grad)
        master.add_workers(2)                               # more at any time
        result = master.fit(method="lbfgs", maxiter=400)

Workers connect with DEALER sockets and say HELLO; only the master needs an open port. The
data set is cut into blocks of rows (``qsae.layout``); each worker gets the data's source once
and then holds a set of blocks. What to do is decided by ``qsae.coordinator.Coordinator``, a
state machine without sockets (membership, placement, rounds, recovery: events in, messages
out); this module is its shell: it owns the ROUTER socket, CURVE and the launcher (started,
with the workers' HELLOs awaited, by ``qsae.startup``), and runs one receive loop
(``qsae.router``) that feeds the coordinator what arrives and the passing of time, and sends
what it answers. The reducer's rounds (``Reducer.steps``) are driven from here: a
round the coordinator reports lost (a worker silent for ``worker_timeout`` or gone) ends the
evaluation, which settles again and runs from its first round, so the optimizer never sees
a partial sum.

Liveness: a background thread runs the receive loop while no call does, so workers stay up
between calls of an embedding script and while a launcher starts more. It shares the socket
with the calls under a lock (a lock is the full memory barrier zmq asks for when a socket
changes threads); nothing slow (a launcher, a user's callback) ever runs under it.

Security: CURVE is on by default: a server key pair per run, a client key pair per
launched worker handed over the channel that started it, and only those client keys (or a
key directory's, for hand-started workers) are admitted.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from .coordinator import Coordinator
from .errors import ConfigError
from .layout import Layout
from .membership import WorkerInfo
from .model import SAEConfig
from .reduce import make_reducer
from .router import Router
from .startup import Startup

__all__ = ["Master", "WorkerInfo"]

log = logging.getLogger("qsae.master")

DTYPES = ("float64", "float32")
BALANCES = ("measured", "static")


def _check_options(dtype, balance: str, heartbeat: float, worker_timeout: float, start_timeout: float,
                   block_rows) -> None:
    """Raise ``ConfigError`` for a Master option out of range."""
    if str(dtype) not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: workers compute in float64 or float32 (half precision loses the "
                          "small gradients of the sparsity term)")
    if balance not in BALANCES:
        raise ConfigError(f"balance={balance!r}: choose 'measured' (by each worker's speed) or 'static' (by cores)")
    for name, v in (("heartbeat", heartbeat), ("worker_timeout", worker_timeout), ("start_timeout", start_timeout)):
        if not v > 0:
            raise ConfigError(f"{name}={v!r}: expected a positive number of seconds")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int)
                                   or block_rows < 1):
        raise ConfigError(f"block_rows={block_rows!r}: expected a whole number of rows >= 1 (or None to choose)")


class Master:
    """The ROUTER side: starts or awaits workers, places blocks, runs evaluation rounds.

    Parameters
    ----------
    workers : local worker processes to start (``LocalLauncher``); 0 with ``wait_for``
        for hand-started workers. Ignored when ``launcher`` is given.
    config : the model's settings.
    protocol : "exact" or "average" (see ``qsae.reduce``).
    launcher : any ``qsae.launch.Launcher`` (local, SSH, Slurm).
    wait_for : how many hand-started workers to wait for before starting.
    min_workers : start once this many workers said HELLO (default: every launched worker,
        or ``wait_for``); more may join at any time and get blocks at the next evaluation.
    bind, port : where the ROUTER binds (default: the launcher's suggestion, any free port).
    curve : encrypt and authenticate with CURVE (default on; off only when asked, with a
        warning at every start). Launched workers get keys made for this run.
    keys : key directory from ``qsae.keys.make_keys`` (``qsae-master --make-keys``) for
        hand-started workers.
    heartbeat : seconds between PINGs.
    worker_timeout : seconds of silence after which a worker is lost.
    start_timeout : seconds to wait for ``min_workers`` HELLOs.
    reducer_options : passed to the reducer (e.g. ``{"rounds": 2}`` for the exact one).
    dtype : "float64" or "float32": what workers hold their rows in and compute with
        (θ, gradients and every block's sums stay float64).
    balance : "measured" (blocks follow each worker's measured rows per second) or "static"
        (by the cores each worker declares).
    block_rows : rows per block (default: ``placement.block_rows_for(m)``: 4096, less for
        small data sets, more for very large ones; of m alone, so the bits do not depend on
        the number of workers); smaller blocks balance finer and cost more per row.
    on_event : called with a dict for every membership or placement change (see
        ``qsae.membership.Membership``).
    """

    def __init__(self, workers: int | None = None, config: SAEConfig | None = None, protocol: str = "exact", *,
                 launcher=None, wait_for: int | None = None, min_workers: int | None = None, bind: str | None = None,
                 port: int = 0, curve: bool | None = None, keys: str | None = None, heartbeat: float = 1.0,
                 worker_timeout: float = 5.0, start_timeout: float = 60.0, reducer_options: dict | None = None,
                 dtype: str = "float64", balance: str = "measured", block_rows: int | None = None,
                 on_event: Callable[[dict], None] | None = None) -> None:
        self.config = config or SAEConfig()
        self.reducer = make_reducer(protocol, self.config, **(reducer_options or {}))
        _check_options(dtype, balance, heartbeat, worker_timeout, start_timeout, block_rows)
        self.dtype, self.balance = np.dtype(str(dtype)), balance
        self.block_rows = block_rows
        if launcher is None and workers:
            from .launch import LocalLauncher

            launcher = LocalLauncher(int(workers))
        self.launcher = launcher
        self.expected = launcher.n_workers if launcher is not None else int(wait_for or 0)
        if self.expected < 1:
            raise ConfigError("no workers: give workers=N, a launcher, or wait_for=N for hand-started workers")
        if min_workers is not None and not 1 <= min_workers <= self.expected:
            raise ConfigError(f"min_workers={min_workers}: expected 1 to {self.expected} (the workers asked for)")
        self.min_workers = min_workers or self.expected
        self.bind, self.port = bind, port
        self.keys = keys
        self.curve = True if curve is None else curve  # secure unless asked not to be
        if self.curve and launcher is None and keys is None:
            raise ConfigError("hand-started workers need CURVE keys: run `qsae-master --make-keys DIR`, copy "
                              "DIR/worker to every node, and pass --keys DIR to the master and --keys DIR/worker "
                              "to each qsae-worker (or --insecure)")
        self.heartbeat, self.worker_timeout, self.start_timeout = heartbeat, worker_timeout, start_timeout
        self.layout = Layout(self.config, self.dtype, balance, block_rows)
        self.coordinator = Coordinator(self.layout, heartbeat, worker_timeout, on_event)
        self.members = self.coordinator.members
        self.router = Router(self.coordinator, self.config, self.curve, keys, heartbeat)
        self.startup = Startup(self.router, self.members, launcher, curve=self.curve, keys=keys,
                               expected=self.expected, min_workers=self.min_workers, start_timeout=start_timeout)
        self._lock = self.router.lock
        self._closed = False

    @property
    def _sock(self):
        return self.router.sock

    @property
    def stats(self):
        """Counts of the run: rounds, backups (and of which op), blocks placed and moved."""
        return self.coordinator.stats

    @property
    def backups_by(self):
        """Worker name -> late blocks it computed too."""
        return self.coordinator.backups_by

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Master":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_workers(self) -> int:
        """Workers registered (joining or active)."""
        return len(self.members)

    @property
    def _workers(self) -> dict[bytes, WorkerInfo]:
        return self.members.workers

    def status(self) -> list[dict]:
        """One dict per worker, a host agent counting as one (name, host, pid, state, rows, blocks,
        seconds, rows_per_s, blas, procs: the agent's processes, None for a plain worker)."""
        with self._lock:
            return self.members.status()

    def start(self) -> None:
        """Bind, start the workers (if a launcher is set) and wait for ``min_workers`` HELLOs.

        Whatever fails on the way (the port is taken, the address is not this machine's, the
        workers do not come) closes what was opened before the error is raised."""
        try:
            self.startup.start(self.bind, self.port)
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str | None:
        """The bound address, tcp://HOST:PORT (None before ``start``)."""
        return self.startup.address

    @property
    def server_public(self) -> bytes | None:
        """The master's CURVE public key (None before ``start``, or without CURVE)."""
        return self.router.server_public

    def worker_command(self) -> str:
        """The ``qsae-worker`` command that joins this (started) master, for hand-started workers."""
        return self.startup.worker_command()

    def add_workers(self, n: int) -> None:
        """Start ``n`` more workers with the launcher; they get blocks at the next evaluation."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"add_workers({n!r}): expected a whole number of workers >= 1")
        if self.launcher is None:
            raise ConfigError("add_workers: this master has no launcher; start more `qsae-worker --connect "
                              f"{self.address} --keys DIR/worker` by hand instead: they join by themselves")
        if self._sock is None:
            raise ConfigError("add_workers before start(): use Master(workers=N) or call start() first")
        self.startup.add(n)  # not under the socket's lock: the heartbeat goes on while a launcher starts them

    def close(self) -> None:
        """Stop every worker and release the socket; safe to call twice, never hangs."""
        if self._closed:
            return
        self._closed = True
        self.router.stop(list(self._workers))
        if self.launcher is not None:
            self.launcher.stop()
        self.router.close()

    # ------------------------------------------------------------------ data and placement
    def scatter(self, X: np.ndarray) -> None:
        """Place the rows of X on the workers (sent in blocks) and wait until all hold them."""
        self._set_source(*self.layout.array_source(X))

    def scatter_images(self, images, m: int, patch_size: int = 8, seed: int = 0) -> None:
        """Send the (prepared) images to every worker; each cuts its own blocks of the patch set."""
        self._set_source(*self.layout.images_source(images, m, patch_size, seed))

    def _check_started(self) -> None:
        if self._sock is None or self._closed:
            raise ConfigError("this master is " + ("closed" if self._closed else "not started") +
                              ": use it as `with Master(...) as master:` (or call master.start() first, "
                              "master.close() at the end)")

    def _set_source(self, source: dict, m: int) -> None:
        """A new data set: every worker gets its source, then the blocks are placed."""
        self._check_started()
        with self._lock:
            self.layout.set_source(source, m)
            self.coordinator.reset_blocks()
            self._settle()

    def _settle(self) -> None:
        """Before an evaluation: joiners get the source, every block gets a holder, blocks move
        when the planner says it pays (the coordinator's steps, each driven to its end)."""
        while True:
            sends = self.coordinator.settle_step(time.monotonic())
            if sends is None:
                return
            self.router.drive(sends)

    # ------------------------------------------------------------------ rounds
    def _scatter_op(self, op: str, arg: np.ndarray) -> list[tuple[int, np.ndarray]] | None:
        """Run ``op`` with ``arg`` on every block: one round. None when it was lost (a worker
        silent or gone: the evaluation settles and runs again)."""
        arg = np.ascontiguousarray(arg, dtype=np.float64)
        with self._lock:  # re-entrant: __call__ already holds it; the keepalive thread must not send meanwhile
            sends = self.coordinator.begin_round(op, arg, time.monotonic())
            if sends is None:
                return None
            self.router.drive(sends)
            return self.coordinator.end_round()

    def _evaluate(self, theta: np.ndarray) -> tuple[float, np.ndarray] | None:
        """One evaluation: the reducer's rounds, each scattered; None when one was lost."""
        steps = self.reducer.steps(theta)
        replies = None
        while True:
            try:
                op, arg = steps.send(replies)
            except StopIteration as done:
                return done.value
            replies = self._scatter_op(op, arg)
            if replies is None:
                steps.close()
                return None

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Cost and gradient at θ over the whole data set: the f(θ) of scipy.optimize.

        Membership and placement are settled first. A worker lost or gone during the
        evaluation has its blocks handed to the others and the whole evaluation runs again,
        so the optimizer never sees a partial sum.
        """
        self._check_started()
        if not self.layout.source:
            raise ConfigError("no data on the workers: call master.scatter(X) or master.scatter_images(...) first")
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        with self._lock:
            while True:
                self._settle()
                self.coordinator.begin_evaluation()
                out = self._evaluate(theta)
                if out is not None:
                    self.coordinator.end_evaluation()
                    return out

    def fit(self, theta0: np.ndarray | None = None, method: str = "lbfgs", maxiter: int = 400, callback=None,
            seed: int = 0, **options):
        """Minimise the distributed cost from θ0 (default ``init_params(config, seed)``)."""
        from .model import init_params
        from .optim import minimize

        theta0 = init_params(self.config, seed=seed) if theta0 is None else theta0
        return minimize(self, theta0, method=method, maxiter=maxiter, callback=callback, **options)
