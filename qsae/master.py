"""The master: one ROUTER socket, a registry of workers, and evaluation rounds.

    with Master(workers=2, config=SAEConfig(), protocol="exact") as master:
        master.scatter_images(images, m=100_000, seed=0)   # or master.scatter(X)
        cost, grad = master(theta)                          # f(θ) -> (cost, grad)
        result = master.fit(method="lbfgs", maxiter=400)

Workers connect with DEALER sockets and say HELLO; only the master needs an open port.
Shards are contiguous row ranges of the data set, balanced by the cores each worker
declares, and sent once. A round sends θ (or the sparsity delta) once to every worker and
collects one RESULT from each; the reducer (``qsae.reduce``) turns them into (cost, grad).

Liveness: a background thread answers the workers' PINGs and pings them while no round
runs, so workers stay up between calls of an embedding script. It shares the socket with
the round code under a lock (a lock is the full memory barrier zmq asks for when a socket
changes threads), and the round path keeps the socket for itself: no extra hop. A worker
silent for ``worker_timeout`` seconds during a round is declared lost.

Security: with a launcher, CURVE is on by default: a server key pair per run, a client key
pair per worker handed over the channel that started it, and only those client keys are
admitted (NULL clients are refused by the CURVE server itself).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

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
from .model import SAEConfig, Sums
from .protocol import (
    ERROR, EVAL, HELLO, MAX_ARRAY_BYTES, MAX_HEADER_BYTES, PING, PONG, READY, RESULT, SHARD, STOP, decode, encode, send,
)
from .reduce import make_reducer

__all__ = ["Master"]

log = logging.getLogger("qsae.master")

CHUNK_BYTES = 8 * 1024 * 1024  # rows per SHARD message of a plain array
MAX_DRAIN = 1000  # messages handled per poll before the round checks its deadlines again


def _max_inbound(config: SAEConfig) -> int:
    """ZMQ_MAXMSGSIZE of the ROUTER (libzmq checks each frame): a bit above the largest frame a
    worker may send — a header (an ERROR's traceback) or the one-round Sums vector, the longest
    result of the ops in reduce.OPS. A new op with a longer result must raise this."""
    largest = max(MAX_HEADER_BYTES, 8 * Sums.size(config, one_round=True), 8 * (config.n_params + 1))
    return largest + largest // 4 + 4096


@dataclass
class WorkerInfo:
    """What the master knows of one worker."""

    ident: bytes
    name: str
    host: str
    pid: int
    cores: int
    last_heard: float
    last_sent: float = 0.0
    ranges: list = field(default_factory=list)  # the (lo, hi) row ranges it holds


class _Lost(Exception):
    """Workers silent past the timeout during a round (internal: the master recovers)."""

    def __init__(self, idents: list[bytes], round: int, want: str) -> None:
        super().__init__(f"{len(idents)} workers lost in round {round}")
        self.idents, self.round, self.want = idents, round, want


class _AllowList:
    """ZAP credentials provider: admits exactly the client keys this run handed out.

    A refused key is logged, at most once every ``LOG_EVERY`` seconds with a count of the
    refusals since the last line (a worker with the wrong keys retries every 100 ms)."""

    LOG_EVERY = 10.0  # seconds between lines about refused keys

    def __init__(self) -> None:
        self.keys: set[bytes] = set()
        self.refused = 0  # refusals since the last log line
        self._last_log = float("-inf")

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log >= self.LOG_EVERY:
            log.warning("refused a worker's CURVE key %s (%d refusal(s) in the last %.0f s): it is not a key of "
                        "this run; a hand-started worker needs --keys DIR/worker from this master's --keys DIR",
                        key.decode("ascii", "replace")[:12] + "...", self.refused, self.LOG_EVERY)
            self.refused, self._last_log = 0, now
        return False


class Master:
    """The ROUTER side: starts or awaits workers, sends shards, runs evaluation rounds.

    Parameters
    ----------
    workers : local worker processes to start (``LocalLauncher``); 0 with ``wait_for``
        for hand-started workers. Ignored when ``launcher`` is given.
    config : the model's settings.
    protocol : "exact" or "average" (see ``qsae.reduce``).
    launcher : any ``qsae.launch.Launcher`` (e.g. an ``SSHLauncher``).
    wait_for : how many hand-started workers to wait for.
    bind, port : where the ROUTER binds (default: the launcher's suggestion, any free port).
    curve : encrypt and authenticate with CURVE (default on; off only when asked, with a
        warning at every start). Launched workers get keys made for this run.
    keys : key directory from ``qsae.keys.make_keys`` (``qsae-master --make-keys``) for
        hand-started workers.
    heartbeat : seconds between PINGs.
    worker_timeout : seconds of silence after which a worker is lost.
    start_timeout : seconds to wait for every worker's HELLO.
    reducer_options : passed to the reducer (e.g. ``{"rounds": 2}`` for the exact one).
    """

    def __init__(self, workers: int | None = None, config: SAEConfig | None = None, protocol: str = "exact", *,
                 launcher=None, wait_for: int | None = None, bind: str | None = None, port: int = 0,
                 curve: bool | None = None, keys: str | None = None, heartbeat: float = 1.0, worker_timeout: float = 5.0,
                 start_timeout: float = 60.0, reducer_options: dict | None = None) -> None:
        self.config = config or SAEConfig()
        self.reducer = make_reducer(protocol, self.config, **(reducer_options or {}))
        if launcher is None and workers:
            from .launch import LocalLauncher

            launcher = LocalLauncher(int(workers))
        self.launcher = launcher
        self.expected = launcher.n_workers if launcher is not None else int(wait_for or 0)
        if self.expected < 1:
            raise ConfigError("no workers: give workers=N, a launcher, or wait_for=N for hand-started workers")
        self.bind, self.port = bind, port
        self.keys = keys
        self.curve = True if curve is None else curve  # secure unless asked not to be
        if self.curve and launcher is None and keys is None:
            raise ConfigError("hand-started workers need CURVE keys: run `qsae-master --make-keys DIR`, copy DIR to "
                              "every node, and pass --keys DIR to the master and each qsae-worker (or --insecure)")
        self.heartbeat, self.worker_timeout, self.start_timeout = heartbeat, worker_timeout, start_timeout
        self.address: str | None = None
        self.server_public: bytes | None = None
        self._workers: dict[bytes, WorkerInfo] = {}
        self._order: list[bytes] = []  # workers holding shards, in row order
        self._m = 0
        self._source: dict = {}  # what was scattered, kept to re-send a lost worker's rows
        self._round = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._auth = None
        self._closed = False
        self._last_reject_log = 0.0

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
        """Workers registered."""
        return len(self._workers)

    def start(self) -> None:
        """Bind, start the workers (if a launcher is set) and wait for their HELLOs."""
        if self.launcher is not None:
            self.launcher.prepare()
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1  # sending to a vanished worker raises instead of dropping silently
        sock.maxmsgsize = _max_inbound(self.config)  # a larger frame drops its connection unread
        worker_keys = []
        if self.curve:
            from zmq.auth.thread import ThreadAuthenticator

            allow = _AllowList()
            if self.keys is not None:  # hand-started workers: keys from `qsae-master --make-keys DIR`
                from .keys import load_server_keys

                server_public, server_secret, allow.keys = load_server_keys(self.keys)
            else:
                server_public, server_secret = zmq.curve_keypair()
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("qsae.auth"))
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=allow)
            self.server_public = server_public  # z85; workers need it to connect
            sock.curve_server = True  # before bind
            sock.curve_secretkey = server_secret
            sock.curve_publickey = server_public
            for _ in range(self.launcher.n_workers if self.launcher is not None else 0):
                public, secret = zmq.curve_keypair()  # one pair per launched worker, handed over its channel
                allow.keys.add(public)
                worker_keys.append({"server_public": server_public.decode(), "public": public.decode(),
                                    "secret": secret.decode()})
        host = self.bind or (self.launcher.bind_address() if self.launcher is not None else "127.0.0.1")
        if self.port:
            sock.bind(f"tcp://{host}:{self.port}")
            port = self.port
        else:
            port = sock.bind_to_random_port(f"tcp://{host}")
        self._sock = sock
        self._poller = zmq.Poller()  # one for the run: building one per poll costs µs a round
        self._poller.register(sock, zmq.POLLIN)
        self.address = f"tcp://{host}:{port}"
        if self.curve:
            log.info("master listening on %s (CURVE)", self.address)
        else:  # every start, not once per process: each run opens a new port
            log.warning("running without encryption: anyone who can reach %s can join and read the weights "
                        "(drop curve=False / --insecure to encrypt)", self.address)
        if self.launcher is not None:
            self.launcher.start(self.address, lambda k: {"curve": worker_keys[k] if worker_keys else None, "threads": 1})
        self._await_hellos()
        self._thread = threading.Thread(target=self._keepalive, name="qsae-master-heartbeat", daemon=True)
        self._thread.start()

    def _await_hellos(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while len(self._workers) < self.expected:
            left = deadline - time.monotonic()
            failed = self.launcher.failures() if self.launcher is not None else []
            if left <= 0 or (failed and len(self._workers) + len(failed) >= self.expected):
                why = "".join(f"\n  {f}" for f in failed)
                raise (LaunchError if failed else RoundTimeout)(
                    f"{len(self._workers)} of {self.expected} workers said HELLO within "
                    f"{self.start_timeout - max(left, 0):.0f} s on {self.address}{why}")
            self._receive(min(left, 0.2))

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
        if self._auth is not None:
            self._auth.stop()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

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
            elif msg.type in (READY, RESULT, ERROR):
                out.append((w, msg))
            else:
                self._reject(ident, f"a master does not take {msg.type} messages")
        return out

    def _reject(self, ident: bytes, why: str) -> None:
        now = time.monotonic()
        if now - self._last_reject_log > 1.0:  # rate-limited: garbage must not flood the log
            log.warning("rejected a message from %s: %s", ident.hex()[:16], why)
            self._last_reject_log = now
        try:
            self._send(ident, ERROR, etype="ProtocolError", message=why[:2000], traceback="", host="master")
        except zmq.ZMQError:
            pass

    def _hello(self, ident: bytes, msg) -> None:
        if msg["version"].split(".")[:2] != __version__.split(".")[:2]:
            self._reject(ident, f"worker {msg['name']} runs qsae {msg['version']}, the master {__version__}: "
                                "install the same version on both")
            return
        if ident in self._workers or len(self._workers) >= self.expected:
            self._reject(ident, f"worker {msg['name']} is not needed: {len(self._workers)} already joined")
            return
        cores = min(max(1, msg["cores"]), 4096)  # shards are balanced by it: keep it sane
        self._workers[ident] = WorkerInfo(ident, msg["name"], msg["host"], msg["pid"], cores,
                                          time.monotonic())
        log.info("worker %s joined (host %s, pid %d, %d cores)", msg["name"], msg["host"], msg["pid"], msg["cores"])

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

    # ------------------------------------------------------------------ rounds
    def _collect(self, idents: list[bytes], round: int, want: str) -> dict[bytes, object]:
        """One reply of type ``want`` for ``round`` from each of ``idents``.

        Raises ``_Lost`` naming every worker silent for longer than ``worker_timeout``.
        """
        got: dict[bytes, object] = {}
        while len(got) < len(idents):
            for w, msg in self._receive(min(self.heartbeat, self.worker_timeout / 2)):
                if msg.type == ERROR and msg.round in (round, 0):
                    raise WorkerError(f"worker {w.name} on {msg['host']} failed: {msg['etype']}: "
                                      f"{msg['message']}\n{msg['traceback']}")
                if msg.type != want or msg.round != round:
                    log.debug("dropped %s of round %d from %s (waiting for round %d)", msg.type, msg.round, w.name, round)
                    continue
                got[w.ident] = msg
            now = time.monotonic()
            silent = [i for i in idents if i not in got and now - self._workers[i].last_heard > self.worker_timeout]
            if silent:
                raise _Lost(silent, round, want)
        return got

    def _next_round(self) -> int:
        self._round += 1
        return self._round

    def _send_rows(self, r: int, ident: bytes, lo: int, hi: int, append: bool) -> None:
        """SHARD message(s) giving ``ident`` rows lo..hi of the data set."""
        src, cfg = self._source, self.config.to_dict()
        if src["kind"] == "images":
            self._send(ident, SHARD, r, src["images"], kind="images", config=cfg, lo=lo, hi=hi, m=self._m,
                       patch_size=src["patch_size"], seed=src["seed"], sigma=src["sigma"], chunk=0, chunks=1,
                       append=append)
            return
        X = src["X"]
        per_chunk = max(1, min(CHUNK_BYTES, MAX_ARRAY_BYTES) // (8 * X.shape[1]))
        n = max(1, -(-(hi - lo) // per_chunk))
        for c in range(n):
            a, b = lo + c * per_chunk, min(hi, lo + (c + 1) * per_chunk)
            self._send(ident, SHARD, r, [X[a:b]], kind="array", config=cfg, lo=lo, hi=hi, m=self._m,
                       patch_size=0, seed=0, sigma=0.0, chunk=c, chunks=n, append=append)

    def _distribute(self, source: dict, m: int) -> None:
        """Give every worker a range of the data set balanced by cores, and wait for READY."""
        from .data import shard_ranges

        with self._lock:
            self._source, self._m = source, m
            self._order = list(self._workers)
            ranges = shard_ranges(m, [self._workers[i].cores for i in self._order])
            r = self._next_round()
            for ident, (lo, hi) in zip(self._order, ranges):
                self._workers[ident].ranges = [(lo, hi)]
                self._send_rows(r, ident, lo, hi, append=False)
            try:
                self._collect(self._order, r, READY)
            except _Lost as lost:
                self._recover(lost)

    def _recover(self, lost: "_Lost") -> None:
        """Drop the lost workers and hand their ranges to the living, until all hold them."""
        from .data import shard_ranges

        while True:
            orphans = []
            for ident in lost.idents:
                w = self._workers.pop(ident)
                self._order.remove(ident)
                orphans += w.ranges
                log.error("worker %s (pid %d on %s) lost: silent for over %.1f s in round %d (%s awaited); "
                          "its rows %s go to the others", w.name, w.pid, w.host, self.worker_timeout, lost.round,
                          lost.want, ", ".join(f"{a}..{b}" for a, b in w.ranges))
            if not self._order:
                raise WorkerLost(f"every worker is lost (the last in round {lost.round}); nothing can compute the "
                                 "cost: check the workers' logs, then resume the run from its checkpoint")
            r = self._next_round()
            cores = [self._workers[i].cores for i in self._order]
            for lo, hi in orphans:
                for ident, (a, b) in zip(self._order, shard_ranges(hi - lo, cores)):
                    if b > a:
                        self._workers[ident].ranges.append((lo + a, lo + b))
                        self._send_rows(r, ident, lo + a, lo + b, append=True)
            try:
                self._collect(self._order, r, READY)
                return
            except _Lost as again:
                lost = again

    def scatter(self, X: np.ndarray) -> None:
        """Send each worker its rows of X (in chunks) and wait until all hold them."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.config.n_visible:
            raise ConfigError(f"X has shape {X.shape}; the model needs (m, {self.config.n_visible})")
        self._distribute({"kind": "array", "X": X}, X.shape[0])

    def scatter_images(self, images, m: int, patch_size: int = 8, seed: int = 0) -> None:
        """Send the (prepared) images to every worker; each cuts its own rows of the patch set."""
        from .data import check_patches_match, patch_sigma

        check_patches_match(patch_size, self.config.n_visible)
        images = [np.ascontiguousarray(img, dtype=np.float64) for img in images]
        sigma = patch_sigma(images, patch_size, seed)  # once here, so every worker normalises alike
        self._distribute({"kind": "images", "images": images, "patch_size": patch_size, "seed": seed,
                          "sigma": sigma}, m)

    def _scatter_op(self, op: str, arg: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Run ``op`` with ``arg`` on every shard: the ``scatter`` a reducer calls."""
        arg = np.ascontiguousarray(arg, dtype=np.float64)
        with self._lock:  # re-entrant: __call__ already holds it; the keepalive thread must not send meanwhile
            r = self._next_round()
            head, data = encode(EVAL, r, [arg], op=op)
            data = zmq.Frame(data)  # built once (one copy below 64 KB); libzmq shares it between the messages
            for ident in self._order:
                self._send_frames(ident, (ident, head, data))
            got = self._collect(self._order, r, RESULT)
        out = []
        for ident in self._order:
            msg, w = got[ident], self._workers[ident]
            vec = msg.arrays[0]
            if not np.isfinite(vec).all():
                raise NumericalError(f"worker {w.name} (pid {w.pid} on {w.host}) returned NaN or Inf in round {r} "
                                     f"({op}); the run stops here with the last good θ saved")
            out.append((msg["rows"], vec))
        return out

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Cost and gradient at θ over the whole data set: the f(θ) of scipy.optimize.

        A worker lost during the evaluation has its rows handed to the others and the whole
        evaluation runs again, so the optimizer never sees a partial sum.
        """
        if not self._order:
            raise ConfigError("no data on the workers: call master.scatter(X) or master.scatter_images(...) first")
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        with self._lock:
            while True:
                try:
                    return self.reducer.evaluate(theta, self._scatter_op, rows_per_shard=self._m / len(self._order))
                except _Lost as lost:
                    self._recover(lost)

    def fit(self, theta0: np.ndarray | None = None, method: str = "lbfgs", maxiter: int = 400, callback=None,
            seed: int = 0, **options):
        """Minimise the distributed cost from θ0 (default ``init_params(config, seed)``)."""
        from .model import init_params
        from .optim import minimize

        theta0 = init_params(self.config, seed=seed) if theta0 is None else theta0
        return minimize(self, theta0, method=method, maxiter=maxiter, callback=callback, **options)
