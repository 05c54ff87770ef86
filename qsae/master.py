"""The master: one ROUTER socket, the workers that join and leave, and evaluation rounds.

    with Master(workers=2, config=SAEConfig(), protocol="exact") as master:
        master.scatter_images(images, m=100_000, seed=0)   # or master.scatter(X)
        cost, grad = master(theta)                          # f(θ) -> (cost, grad)
        master.add_workers(2)                               # more at any time
        result = master.fit(method="lbfgs", maxiter=400)

Workers connect with DEALER sockets and say HELLO; only the master needs an open port. The
data set is cut into blocks of rows (``qsae.placement``); each worker gets the data's source
once (the images, from which it cuts its blocks, or the shape of a plain array whose rows the
master sends) and then holds a set of blocks. Before every evaluation the master settles the
membership (``qsae.membership``: joins, BYEs, losses) and the placement: blocks nobody holds
are placed, and with ``balance="measured"`` blocks move from slow workers to fast ones when
the planner predicts a clearly shorter round. A round (``qsae.rounds``) sends θ (or the
sparsity delta) to every worker with the blocks to compute and adds the per-block results in
block order, so the sums are the same whatever the placement; a straggler's blocks are
computed again by the workers that finished (images only), and the first answer counts.

Liveness: a background thread answers the workers' PINGs and pings them while no round
runs, so workers stay up between calls of an embedding script. It shares the socket with
the round code under a lock (a lock is the full memory barrier zmq asks for when a socket
changes threads). A worker silent for ``worker_timeout`` seconds during a round is lost;
one that says BYE leaves at once. Either way its blocks go to the others and the
evaluation runs again, so the optimizer never sees a partial sum.

Security: CURVE is on by default: a server key pair per run, a client key pair per
launched worker handed over the channel that started it, and only those client keys (or a
key directory's, for hand-started workers) are admitted.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import statistics
import threading
import time
from typing import Callable

import numpy as np
import zmq

from . import __version__
from .errors import (
    ConfigError,
    LaunchError,
    NumericalError,
    ProtocolError,
    RoundTimeout,
    WorkerError,
    WorkerLost,
)
from .auth import CurveGate
from .membership import JOINING, LEAVING, LOST, SPEED_SAMPLES, Membership, WorkerInfo
from .model import SAEConfig, Sums, chunk_rows
from .placement import MAX_BLOCKS, WorkerView, block_bounds, block_rows_for, plan
from .protocol import (
    BLOCKS, BYE, DROP, ERROR, EVAL, HELLO, MAX_ARRAY_BYTES, MAX_ARRAYS, MAX_HEADER_BYTES, MAX_RESULT_ROWS, PING, PONG,
    READY, RESULT, SOURCE, STOP, decode, encode, send,
)
from .reduce import PER_BLOCK, make_reducer
from .rounds import Round
from . import tree

__all__ = ["Master", "WorkerInfo"]

log = logging.getLogger("qsae.master")

CHUNK_BYTES = 8 * 1024 * 1024  # rows of an array source per BLOCKS message
MAX_DRAIN = 1000  # messages handled per poll before the round checks its deadlines again
REJECT_LOG_SECONDS = 10.0  # at most one line this often about rejected messages (with the count)
DTYPES = ("float64", "float32")
BALANCES = ("measured", "static")


def _max_inbound(config: SAEConfig, max_rows: int) -> int:
    """ZMQ_MAXMSGSIZE of the ROUTER (libzmq checks each frame): a bit above the largest frame a
    worker may send — a header (an ERROR's traceback, a RESULT's ids) or a RESULT of ``max_rows``
    one-round Sums rows (the longest result of the ops in reduce.OPS; a row per tree node). A
    new op with a longer result must raise this."""
    row = max(Sums.size(config, one_round=True), config.n_params + 1)
    largest = max(MAX_HEADER_BYTES, 8 * row * max_rows)
    return largest + largest // 4 + 4096


def _secs(t: float) -> str:
    """Seconds as a user gave them: 5.0, 60.0, 0.05 (not 0.1), 0.25."""
    return f"{t:.1f}" if t >= 0.95 else f"{t:.2g}"


class _Lost(Exception):
    """Workers lost or gone during a round (internal: the master recovers)."""

    def __init__(self, idents: list[bytes], round: int, want: str, why: str = "") -> None:
        super().__init__(f"{len(idents)} workers lost in round {round}")
        self.idents, self.round, self.want, self.why = idents, round, want, why


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
        if str(dtype) not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: workers compute in float64 or float32 (half precision loses the "
                              "small gradients of the sparsity term)")
        if balance not in BALANCES:
            raise ConfigError(f"balance={balance!r}: choose 'measured' (by each worker's speed) or 'static' (by cores)")
        for name, v in (("heartbeat", heartbeat), ("worker_timeout", worker_timeout), ("start_timeout", start_timeout)):
            if not v > 0:
                raise ConfigError(f"{name}={v!r}: expected a positive number of seconds")
        self.dtype, self.balance = np.dtype(str(dtype)), balance
        if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int)
                                       or block_rows < 1):
            raise ConfigError(f"block_rows={block_rows!r}: expected a whole number of rows >= 1 (or None to choose)")
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
        self.address: str | None = None
        self.server_public: bytes | None = None
        self.members = Membership(on_event)
        self.members.block_rows = lambda b: self._sizes[b] if 0 <= b < len(self._sizes) else 0
        self._m = 0
        self._sizes: list[int] = []  # rows of each block
        self._source: dict = {}  # what was scattered: re-sent to joiners, cut or sliced for moves
        self._move_seconds = 0.0  # measured cost of moving one block (READY's seconds), for the planner
        self._evals, self._balanced_at = 0, 0  # evaluations; the one of the last balance check
        self._round = 0
        self.stats: collections.Counter = collections.Counter()  # rounds, backups, blocks moved, ...
        self.backups_by: collections.Counter = collections.Counter()  # worker name -> late blocks it computed too
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._gate: CurveGate | None = None
        self._closed = False
        self._last_reject_log = -math.inf
        self._rejects = 0  # rejected since the last line about them
        self._kernels_warned = False  # the differing-BLAS warning is given once a run

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
        """One dict per worker (name, host, pid, state, rows, blocks, seconds, rows_per_s, blas)."""
        with self._lock:
            return self.members.status()

    def start(self) -> None:
        """Bind, start the workers (if a launcher is set) and wait for ``min_workers`` HELLOs.

        Whatever fails on the way (the port is taken, the address is not this machine's, the
        workers do not come) closes what was opened before the error is raised."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        if self.launcher is not None:
            self.launcher.prepare()
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1  # sending to a vanished worker raises instead of dropping silently
        sock.maxmsgsize = _max_inbound(self.config, MAX_RESULT_ROWS)  # a larger frame drops its connection unread
        if self.curve:
            self._gate = CurveGate(self._ctx, self.keys)
            self._gate.secure(sock)  # before bind
            self.server_public = self._gate.public  # z85; workers need it to connect
        self._sock = sock  # from here close() releases it, whatever fails next (else ctx.term() waits forever)
        host = self.bind or (self.launcher.bind_address() if self.launcher is not None else "127.0.0.1")
        try:
            if self.port:
                sock.bind(f"tcp://{host}:{self.port}")
                port = self.port
            else:
                port = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as e:
            where = f"{host}:{self.port}" if self.port else f"{host} (any free port)"
            fix = ("another process holds the port: give another --port (port=), or 0 for any free one"
                   if e.errno == zmq.EADDRINUSE else
                   f"{host!r} is not an address of this machine: give --bind (bind=) one of its addresses "
                   "(e.g. 127.0.0.1, 0.0.0.0 for all), or leave it out")
            raise ConfigError(f"the master cannot listen on tcp://{where}: {os.strerror(e.errno)}; {fix}") from None
        if self._gate is not None:
            self._gate.watch(sock)
        self._poller = zmq.Poller()  # one for the run: building one per poll costs µs a round
        self._poller.register(sock, zmq.POLLIN)
        self.address = f"tcp://{host}:{port}"
        if self.curve:
            log.info("master listening on %s (CURVE)", self.address)
        else:  # every start, not once per process: each run opens a new port
            log.warning("running without encryption: anyone who can reach %s can join and read the weights "
                        "(drop curve=False / --insecure to encrypt)", self.address)
        # the heartbeat first: workers that said HELLO hear from the master while the launcher
        # is still starting the others (64 on 2 cores take longer than a worker's 10 s timeout)
        self._thread = threading.Thread(target=self._keepalive, name="qsae-master-heartbeat", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        if self.launcher is not None:
            self.launcher.start(self.address, self._worker_config(self.launcher.n_workers))
        else:
            log.info("waiting up to %s s for %d hand-started workers; on each node run\n  %s", _secs(self.start_timeout),
                     self.min_workers, self.worker_command())
        self._await_hellos(t0)

    def worker_command(self) -> str:
        """The ``qsae-worker`` command that joins this (started) master, for hand-started workers."""
        import socket as _socket

        host, _, port = (self.address or "tcp://MASTER:PORT")[len("tcp://"):].rpartition(":")
        if host in ("0.0.0.0", "*", "[::]", "::"):  # bound to every interface: name this host
            host = _socket.getfqdn() or "MASTER"
        keys = f" --keys {self.keys.rstrip('/')}/worker" if self.curve and self.keys else ""
        return f"qsae-worker --connect tcp://{host}:{port}{keys}"

    def _worker_config(self, n: int) -> Callable[[int], dict]:
        """The launch configuration of n new workers: a CURVE key pair each, admitted from now on."""
        keys = {i: self._gate.new_client() for i in range(n)} if self._gate is not None else {}
        order: list[int] = []

        def config(k: int) -> dict:  # k is the launcher's global index; keys are handed out in call order
            if k not in order:
                order.append(k)
            return {"curve": keys.get(order.index(k)) if keys else None, "threads": 1}

        return config

    def _await_hellos(self, t0: float) -> None:
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
            with self._lock:  # the heartbeat thread uses the socket too
                self._receive(min(left, 0.2))

    def add_workers(self, n: int) -> None:
        """Start ``n`` more workers with the launcher; they get blocks at the next evaluation."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"add_workers({n!r}): expected a whole number of workers >= 1")
        if self.launcher is None:
            raise ConfigError("add_workers: this master has no launcher; start more `qsae-worker --connect "
                              f"{self.address} --keys DIR/worker` by hand instead: they join by themselves")
        if self._sock is None:
            raise ConfigError("add_workers before start(): use Master(workers=N) or call start() first")
        with self._lock:
            self.launcher.add(n, self.address, self._worker_config(n))

    def close(self) -> None:
        """Stop every worker and release the socket; safe to call twice, never hangs."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            for ident in list(self._workers):
                try:
                    self._send(ident, STOP)
                except zmq.ZMQError:
                    pass
        if self.launcher is not None:
            self.launcher.stop()
        if self._gate is not None:
            self._gate.close()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # closes any socket still open (a failed start's): never waits

    # ------------------------------------------------------------------ messages
    def _send(self, ident: bytes, type: str, round: int = 0, arrays=(), **fields) -> None:
        self._send_frames(ident, encode(type, round, arrays, **fields), prefix=(ident,))

    def _send_frames(self, ident: bytes, frames, prefix=()) -> None:
        try:
            send(self._sock, frames, prefix)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            # its connection is gone (router_mandatory raises on the identity frame, so nothing
            # was half sent): the worker is lost at the next check
            w = self._workers.get(ident)
            if w is not None:
                w.last_heard = float("-inf")
            return
        w = self._workers.get(ident)
        if w is not None:
            w.last_sent = time.monotonic()

    def _receive(self, timeout: float) -> list[tuple[WorkerInfo, object]]:
        """Receive what arrives within ``timeout`` s; handle control messages, return the rest."""
        out: list = []
        sock = self._sock
        if not self._poller.poll(max(0, int(timeout * 1000))):
            return out
        # drain what is queued, boundedly (a flood must not starve the round's deadline checks);
        # EVENTS instead of NOBLOCK + zmq.Again saves raising an exception a message
        for _ in range(MAX_DRAIN):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                break
            frames = sock.recv_multipart(copy=False)
            ident = frames[0].bytes
            try:
                msg = decode(frames[1:])
            except ProtocolError as e:
                self._reject(ident, f"bad message: {e}")
                continue
            w = self._workers.get(ident)
            if w is not None:
                w.last_heard = time.monotonic()
            if msg.type == HELLO:
                self._hello(ident, msg)
            elif w is None:
                self._reject(ident, f"{msg.type} from a worker that never said HELLO")
            elif msg.type == PING:
                self._send(ident, PONG)
            elif msg.type == PONG:
                pass
            elif msg.type == BYE:
                self._bye(w)
            elif msg.type in (READY, RESULT, ERROR):
                out.append((w, msg))
            else:
                self._reject(ident, f"a master does not take {msg.type} messages")
        return out

    def _reject(self, ident: bytes, why: str) -> None:
        """Answer a message the master does not take with ERROR; log it, a line per
        ``REJECT_LOG_SECONDS`` at most with the count since the last (garbage must not flood
        the log), the sender named where it was a worker. A worker dropped while unreachable
        that comes back is told so and says HELLO again: that is logged at INFO, not warned."""
        now = time.monotonic()
        self._rejects += 1
        gone = next((w for w in self.members.gone.values() if w.ident == ident), None)
        who = f"{gone.name} ({gone.state})" if gone is not None else f"an unknown peer ({ident.hex()[:10]})"
        if gone is not None and "never said HELLO" in why:
            if now - self._last_reject_log > REJECT_LOG_SECONDS:
                log.info("%s is back and no member now: told to say HELLO again", who)
                self._last_reject_log, self._rejects = now, 0
        elif now - self._last_reject_log > REJECT_LOG_SECONDS:
            more = f" ({self._rejects - 1} more rejected since the last such line)" if self._rejects > 1 else ""
            log.warning("rejected a message from %s: %s%s", who, why, more)
            self._last_reject_log, self._rejects = now, 0
        try:
            self._send(ident, ERROR, etype="ProtocolError", message=why[:2000], traceback="", host="master")
        except zmq.ZMQError:
            pass

    def _hello(self, ident: bytes, msg) -> None:
        if msg["version"].split(".")[:2] != __version__.split(".")[:2]:
            self._reject(ident, f"worker {msg['name']} runs qsae {msg['version']}, the master {__version__}: "
                                "install the same version on both")
            return
        if ident in self._workers:  # a second HELLO on the same connection (replies to queued errors): one join
            log.debug("%s said HELLO again; it is a member already", msg["name"])
            return
        cores = min(max(1, msg["cores"]), 4096)  # static balance uses it: keep it sane
        self.members.join(ident, msg["name"], msg["host"], msg["pid"], cores, msg["blas"])
        self._check_kernels()

    def _check_kernels(self) -> None:
        """Warn once a run when the workers' BLAS kernels differ: bits then depend on placement."""
        kernels = collections.Counter(w.blas for w in self._workers.values())
        if len(kernels) > 1 and not self._kernels_warned:
            self._kernels_warned = True
            log.warning("workers run different BLAS kernels (%s): a block's sums round differently on each, so "
                        "the cost depends on which worker computes which block (to float precision, not bit for "
                        "bit); give every host the same numpy/OpenBLAS build and OPENBLAS_CORETYPE for equal bits",
                        "; ".join(f"{k or 'unknown'} on {n} workers" for k, n in kernels.items()))

    def _bye(self, w: WorkerInfo) -> None:
        """A worker leaves (SIGTERM, Ctrl-C): its blocks go to the others before the next round."""
        self._drop([w.ident], LEAVING, "said BYE")

    def _drop(self, idents: list[bytes], state: str, why: str) -> None:
        for ident in idents:
            if ident in self._workers:
                w = self.members.remove(ident, state, why)
                if w.blocks:
                    log.info("%s held %d blocks; they go to the others", w.name, len(w.blocks))

    def _keepalive(self) -> None:
        """Between rounds: answer PINGs and ping the workers, so both sides know the other lives."""
        while not self._stop.wait(min(0.2, self.heartbeat / 2)):
            if not self._lock.acquire(blocking=False):
                continue  # a round is running and handles the socket itself
            try:
                for w, msg in self._receive(0):
                    log.debug("between rounds: dropped %s from %s", msg.type, w.name)
                now = time.monotonic()
                for w in list(self._workers.values()):
                    if now - w.last_sent >= self.heartbeat:
                        self._send(w.ident, PING, busy=False)
            except zmq.ZMQError as e:
                log.debug("keepalive: %s", e)
            finally:
                self._lock.release()

    # ------------------------------------------------------------------ collecting replies
    def _raise_error(self, w: WorkerInfo, msg) -> None:
        raise WorkerError(f"worker {w.name} on {msg['host']} failed: {msg['etype']}: {msg['message']}\n"
                          f"{msg['traceback']}")

    def _silent(self, idents) -> list[bytes]:
        now = time.monotonic()
        return [i for i in idents if i in self._workers and now - self._workers[i].last_heard > self.worker_timeout]

    def _collect(self, idents: list[bytes], round: int, want: str) -> dict[bytes, object]:
        """One reply of type ``want`` for ``round`` from each of ``idents``.

        Raises ``_Lost`` naming every worker silent for longer than ``worker_timeout`` or gone.
        """
        got: dict[bytes, object] = {}
        while len(got) < len(idents):
            for w, msg in self._receive(min(self.heartbeat, self.worker_timeout / 2)):
                if msg.type == ERROR and msg.round in (round, 0):
                    self._raise_error(w, msg)
                if msg.type != want or msg.round != round:
                    log.debug("dropped %s of round %d from %s (waiting for round %d)", msg.type, msg.round, w.name, round)
                    continue
                got[w.ident] = msg
            gone = [i for i in idents if i not in self._workers]
            silent = self._silent(i for i in idents if i not in got)
            if gone or silent:
                raise _Lost(silent + gone, round, want)
        return got

    def _next_round(self) -> int:
        self._round += 1
        return self._round

    # ------------------------------------------------------------------ data and placement
    def scatter(self, X: np.ndarray) -> None:
        """Place the rows of X on the workers (sent in blocks) and wait until all hold them."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.config.n_visible:
            raise ConfigError(f"X has shape {X.shape}; the model needs (m, {self.config.n_visible})")
        if X.shape[0] < 1:
            raise ConfigError("X has no rows: pass at least one patch")
        X = np.ascontiguousarray(X, dtype=self.dtype)  # the run's dtype: what the workers hold
        if not np.isfinite(X).all():
            raise ConfigError("X holds NaN or Inf: clean the data (np.nan_to_num) before training")
        rows = self.block_rows or block_rows_for(X.shape[0], chunk=chunk_rows(self.config))
        if rows * X.shape[1] * X.itemsize > MAX_ARRAY_BYTES:
            raise ConfigError(f"{X.shape[0]} rows make blocks of {rows} rows, over the {MAX_ARRAY_BYTES >> 20} MB a "
                              "message carries: use scatter_images (workers cut their own rows) for data this large")
        self._set_source({"kind": "array", "X": X}, X.shape[0])

    def scatter_images(self, images, m: int, patch_size: int = 8, seed: int = 0) -> None:
        """Send the (prepared) images to every worker; each cuts its own blocks of the patch set."""
        from .data import check_patches_match, patch_sigma

        check_patches_match(patch_size, self.config.n_visible)
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ConfigError(f"m={m!r}: the number of patches must be a whole number >= 1")
        images = [np.ascontiguousarray(img, dtype=np.float64) for img in images]
        if len(images) > MAX_ARRAYS:
            raise ConfigError(f"{len(images)} images: a run takes at most {MAX_ARRAYS}; tile smaller ones together")
        sigma = patch_sigma(images, patch_size, seed)  # once here, so every worker normalises alike
        self._set_source({"kind": "images", "images": images, "patch_size": patch_size, "seed": seed,
                          "sigma": sigma}, int(m))

    def _check_started(self) -> None:
        if self._sock is None or self._closed:
            raise ConfigError("this master is " + ("closed" if self._closed else "not started") +
                              ": use it as `with Master(...) as master:` (or call master.start() first, "
                              "master.close() at the end)")

    def _set_source(self, source: dict, m: int) -> None:
        """A new data set: every worker gets its source, then the blocks are placed."""
        self._check_started()
        with self._lock:
            self._source, self._m = source, m
            rows = self.block_rows or block_rows_for(m, chunk=chunk_rows(self.config))
            self._sizes = [hi - lo for lo, hi in block_bounds(m, rows)]
            if len(self._sizes) > MAX_BLOCKS:
                raise ConfigError(f"block_rows={self._sizes[0]} cuts {m} rows into {len(self._sizes)} blocks; at most "
                                  f"{MAX_BLOCKS}: give larger blocks (or leave block_rows=None)")
            for w in self._workers.values():
                w.state, w.blocks = JOINING, set()
            while True:
                try:
                    self._settle()
                    return
                except _Lost as lost:
                    self._lost(lost)

    def _source_message(self, r: int, ident: bytes) -> None:
        src = self._source
        self._send(ident, SOURCE, r, src.get("images", []), config=self.config.to_dict(), kind=src["kind"], m=self._m,
                   block_rows=self._sizes[0], patch_size=src.get("patch_size", 0), seed=src.get("seed", 0),
                   sigma=float(src.get("sigma", 0.0)), dtype=self.dtype.name)

    def _settle(self) -> None:
        """Before an evaluation: joiners get the source, every block gets a holder, and (measured
        balance) blocks move when the planner says it pays. Raises ``_Lost``."""
        if not self._source:
            return
        silent = self._silent([w.ident for w in self.members.active()])
        if silent:  # silent past the timeout, though backups kept the rounds going: lost
            self._lost(_Lost(silent, self._round, "any message"))
        joining = self.members.joining()
        if joining:
            r = self._next_round()
            for w in joining:
                self._source_message(r, w.ident)
            self._collect([w.ident for w in joining], r, READY)
            for w in joining:
                self.members.activate(w)
        # measured balance looks again once the speeds are new medians (every SPEED_SAMPLES
        # evaluations): planning costs ~50 µs, a tenth of a tiny round
        rested = self.balance == "measured" and self._evals - self._balanced_at >= SPEED_SAMPLES
        if not (joining or rested or self._uncovered()):
            return
        if rested:
            self._balanced_at = self._evals
        for _ in range(4):  # a worker may leave while blocks move: plan again until every block has a holder
            active = self.members.active()
            if not active:
                raise WorkerLost("every worker is lost or gone; nothing can compute the cost: check the workers' "
                                 "logs, then resume the run from its checkpoint")
            moves = plan([WorkerView(w.ident, self._speed(w, active), tuple(sorted(w.blocks))) for w in active],
                         self._sizes, move_seconds=self._move_seconds if self.balance == "measured" else 0.0,
                         balance=rested)
            if not moves:
                return
            self._carry_out(moves)
            if self._uncovered() == 0:
                return
        raise _Lost([], self._round, READY, "blocks without a holder after placing them")

    def _uncovered(self) -> int:
        """Blocks no active worker holds."""
        return len(self._sizes) - len(set().union(*(w.blocks for w in self.members.active())))

    def _speed(self, w: WorkerInfo, active: list[WorkerInfo]) -> float:
        """Rows/s the planner uses: measured (balance="measured"), else by declared cores."""
        if self.balance == "static":
            return float(w.cores)
        if w.speed is not None:
            return w.speed
        per_core = [v.speed / v.cores for v in active if v.speed is not None]
        return w.cores * statistics.median(per_core) if per_core else float(w.cores)

    def _carry_out(self, moves) -> None:
        """Give each destination its new blocks, wait for READY, then let the sources drop theirs."""
        by_dst: dict[bytes, list[int]] = {}
        for mv in moves:
            by_dst.setdefault(mv.dst, []).append(mv.block)
        r = self._next_round()
        t0 = time.perf_counter()
        for ident, ids in by_dst.items():
            self._send_blocks(r, ident, sorted(ids))
        self._collect(list(by_dst), r, READY)
        # what a move costs the run: sending or cutting, and waiting for READY (the planner's price)
        per_block = (time.perf_counter() - t0) / max(len(ids) for ids in by_dst.values())
        self._move_seconds = per_block if self._move_seconds == 0 else 0.5 * (self._move_seconds + per_block)
        for mv in moves:
            self._workers[mv.dst].blocks.add(mv.block)
            if mv.src is not None and mv.src in self._workers:
                self._workers[mv.src].blocks.discard(mv.block)
        for src in {mv.src for mv in moves if mv.src is not None and mv.src in self._workers}:
            self._send(src, DROP, ids=sorted(mv.block for mv in moves if mv.src == src))
        placed = sum(mv.src is None for mv in moves)
        if placed < len(moves):
            self._balanced_at = self._evals
        self.stats["blocks placed"] += placed
        self.stats["blocks moved"] += len(moves) - placed
        self.members.event("move", f"{placed} blocks placed, {len(moves) - placed} moved: " + ", ".join(
            f"{self._workers[i].name} +{len(ids)}" for i, ids in by_dst.items()))

    def _send_blocks(self, r: int, ident: bytes, ids: list[int]) -> None:
        """BLOCKS message(s): ids only for images (the worker cuts them), rows for an array."""
        if self._source["kind"] == "images":
            self._send(ident, BLOCKS, r, ids=ids)
            return
        X, br = self._source["X"], self._sizes[0]
        per_msg = max(1, min(MAX_ARRAYS, CHUNK_BYTES // (br * X.shape[1] * X.itemsize)))
        for i in range(0, len(ids), per_msg):
            part = ids[i:i + per_msg]
            self._send(ident, BLOCKS, r if i + per_msg >= len(ids) else 0, [X[b * br:(b + 1) * br] for b in part],
                       ids=part)

    def _lost(self, lost: _Lost) -> None:
        """Drop the workers a round lost; their blocks are placed again by the next settle."""
        if not lost.idents:
            log.info("round %d runs again: %s", lost.round, lost.why)
        for ident in lost.idents:
            w = self._workers.get(ident)
            if w is not None:
                why = ("its connection closed (the process died or its host went away)" if w.last_heard == -math.inf
                       else f"silent for over {_secs(self.worker_timeout)} s")
                log.error("worker %s (pid %d on %s) lost: %s in round %d (%s awaited); its %d blocks go to the "
                          "others", w.name, w.pid, w.host, why, lost.round, lost.want, len(w.blocks))
                self._drop([ident], LOST, f"{why} in round {lost.round}")

    # ------------------------------------------------------------------ rounds
    def _scatter_op(self, op: str, arg: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Run ``op`` with ``arg`` on every block: the ``scatter`` a reducer calls."""
        arg = np.ascontiguousarray(arg, dtype=np.float64)
        with self._lock:  # re-entrant: __call__ already holds it; the keepalive thread must not send meanwhile
            r = self._next_round()
            active = self.members.active()
            assignment = {w.ident: sorted(w.blocks) for w in active if w.blocks}
            predicted = {w.ident: (sum(self._sizes[b] for b in w.blocks) / w.speed if w.speed else None)
                         for w in active}
            if self._uncovered():  # never add up a partial sum: settle (place the orphans) and run again
                raise _Lost([], r, RESULT, "a worker left between placing and computing")
            rnd = Round(r, op, op in PER_BLOCK, assignment, predicted, self._sizes, evaluation=self._evals)
            self.stats["rounds"] += 1
            data = zmq.Frame(arg)  # built once (one copy below 64 KB); libzmq shares it between the messages
            for ident, ids in assignment.items():
                head = encode(EVAL, r, [arg], op=op, ids=ids, evaluation=rnd.evaluation)[0]
                self._send_frames(ident, (ident, head, data))
            self._run_round(rnd, arg, data)
        return rnd.replies()

    def _run_round(self, rnd: Round, arg: np.ndarray, data) -> None:
        """Collect a round's replies; back up stragglers; raise ``_Lost`` for the silent or gone."""
        width = self._result_width(rnd.op)
        while not rnd.done:
            for w, msg in self._receive(self._poll_seconds(rnd)):
                if msg.type == ERROR and msg.round in (rnd.number, 0):
                    self._raise_error(w, msg)
                if msg.type != RESULT:
                    log.debug("dropped %s of round %d from %s", msg.type, msg.round, w.name)
                    continue
                self._take_result(w, msg, rnd, width)
            gone = [i for i in rnd.waiting_on() if i not in self._workers]
            silent = self._silent(rnd.waiting_on())
            if (gone or silent) and not rnd.done:
                raise _Lost(silent + gone, rnd.number, RESULT)
            if self._source.get("kind") == "images":
                for k in rnd.stragglers():
                    self._back_up(rnd, k, arg, data)

    def _poll_seconds(self, rnd: Round) -> float:
        """Sleep in poll until a message, the next straggler deadline or a liveness check."""
        wait = min(self.heartbeat, self.worker_timeout / 2)
        if rnd.idle():
            now = time.monotonic() - rnd.started
            for k in rnd.pending - rnd.backed_up:
                d = rnd.deadline(k)
                if d is not None:
                    wait = min(wait, max(0.001, d - now))
        return wait

    def _result_width(self, op: str) -> int | None:
        """Length of one result row of ``op`` (None: not an op the master knows; the worker says so)."""
        cfg = self.config
        return {"sums": Sums.size(cfg, one_round=True), "backward": Sums.size(cfg, one_round=False),
                "forward": 2 * cfg.n_hidden, "average": cfg.n_params + 1}.get(op)

    def _take_result(self, w: WorkerInfo, msg, rnd: Round, width: int | None) -> None:
        """Check a RESULT (round, shape, finiteness), note the worker's compute time, give it to the round."""
        if msg.round != rnd.number:  # a straggler's answer after its backups won, or of an abandoned round
            log.debug("dropped a late RESULT of round %d from %s (round %d runs)", msg.round, w.name, rnd.number)
            return
        ids, out = msg["ids"], msg.arrays[0]
        rows_expected = len(msg["nodes"]) if rnd.per_block else 1
        if width is not None and out.shape != (rows_expected, width):
            log.error("worker %s returned results of shape %s, this run's model needs %s: another model or qsae "
                      "version; it is dropped", w.name, out.shape, (rows_expected, width))
            self._drop([w.ident], LOST, f"results of shape {out.shape}, expected {(rows_expected, width)}")
            return
        if not math.isfinite(out.sum()):  # any NaN or Inf makes the sum so; one pass, no temporary
            raise NumericalError(f"worker {w.name} (pid {w.pid} on {w.host}) returned NaN or Inf in round "
                                 f"{rnd.number} ({rnd.op}); the run stops here with the last good θ saved")
        nodes = None
        if rnd.per_block:  # rows of the summation tree's nodes: exactly the ones its blocks make
            try:
                nodes = [tree.decode(c, len(self._sizes)) for c in msg["nodes"]]
                tree.check_cover(nodes, ids, len(self._sizes))
            except ProtocolError as e:
                log.error("worker %s: %s; it is dropped", w.name, e)
                self._drop([w.ident], LOST, str(e))
                return
        if len(ids) == len(w.blocks) and w.blocks.issuperset(ids):  # its own blocks, not a backup: its time
            w.eval_rows, w.eval_seconds = msg["rows"], w.eval_seconds + msg["seconds"]
        rnd.accept(w.ident, ids, out, nodes)

    def _back_up(self, rnd: Round, straggler: bytes, arg: np.ndarray, data) -> None:
        """Ask the idle workers to compute a straggler's blocks too (they cut them from the images)."""
        active = self.members.active()
        speeds = {w.ident: self._speed(w, active) for w in active}
        backups = rnd.backups(straggler, speeds)
        if not backups:
            return
        w = self._workers.get(straggler)
        p = rnd.predicted.get(straggler)
        log.info("round %d: %s is late (%.2f s, %s); %s compute its blocks too", rnd.number,
                 w.name if w else "?", time.monotonic() - rnd.started,
                 f"predicted {p:.2f} s" if p else f"the others took {statistics.median(rnd.finished.values()):.2f} s",
                 ", ".join(self._workers[k].name for k in backups))
        self.stats["backups"] += 1
        self.backups_by.update({self._workers[k].name: len(ids) for k, ids in backups.items()})
        self.stats[f"backups of {rnd.op}"] += 1  # which round of the evaluation straggled
        for ident, ids in backups.items():
            self._send_frames(ident, (ident, encode(EVAL, rnd.number, [arg], op=rnd.op, ids=ids,
                                                           evaluation=rnd.evaluation)[0], data))

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Cost and gradient at θ over the whole data set: the f(θ) of scipy.optimize.

        Membership and placement are settled first. A worker lost or gone during the
        evaluation has its blocks handed to the others and the whole evaluation runs again,
        so the optimizer never sees a partial sum.
        """
        self._check_started()
        if not self._source:
            raise ConfigError("no data on the workers: call master.scatter(X) or master.scatter_images(...) first")
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        with self._lock:
            while True:
                try:
                    self._settle()
                    self._evals += 1
                    active = self.members.active()
                    for w in active:
                        w.eval_rows, w.eval_seconds = 0, 0.0
                    out = self.reducer.evaluate(theta, self._scatter_op, m=self._m)
                    for w in active:  # a speed sample: rows over the compute seconds of all the evaluation's rounds
                        if w.eval_seconds > 0:
                            w.record(w.eval_rows, w.eval_seconds)
                    return out
                except _Lost as lost:
                    self._lost(lost)

    def fit(self, theta0: np.ndarray | None = None, method: str = "lbfgs", maxiter: int = 400, callback=None,
            seed: int = 0, **options):
        """Minimise the distributed cost from θ0 (default ``init_params(config, seed)``)."""
        from .model import init_params
        from .optim import minimize

        theta0 = init_params(self.config, seed=seed) if theta0 is None else theta0
        return minimize(self, theta0, method=method, maxiter=maxiter, callback=callback, **options)
