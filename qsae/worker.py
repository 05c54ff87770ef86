"""The worker: connects to the master, caches its shard, answers evaluation rounds.

    python -m qsae.worker --stdin                       # started by a launcher
    python -m qsae.worker --connect tcp://HOST:PORT     # started by hand (qsae-worker)

A launcher writes one JSON line to the worker's stdin (never the command line, which ``ps``
shows): ``{"connect": ..., "curve": null | {"server_public", "public", "secret"}, "name":
..., "threads": 1}``. The worker says HELLO, receives its shard once (the images and its row
range, from which it cuts its own patches; or the rows themselves), replies READY, then
answers every EVAL with RESULT until STOP — or until it has heard nothing from the master
for ``master_timeout`` seconds, when it exits by itself.

Large shards are computed in a thread while the main thread keeps sending PINGs, so the
master can tell a busy worker from a dead one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import traceback

__all__ = ["main", "Worker"]

log = logging.getLogger("qsae.worker")

INLINE_WORK = 100_000 * 64 * 30  # rows·n·h computed inline (~0.1 s); more runs in a thread, pinging


def _load_numerics() -> None:
    """Import numpy and the numeric modules; only after ``_set_threads`` (BLAS reads its
    thread count once, when it loads). Binds them as module globals for the methods below."""
    global np, __version__, ProtocolError, SAEConfig, OPS, ShardState, sample_patches
    global decode, encode, send, MAX_ARRAY_BYTES, EVAL, ERROR, HELLO, PING, PONG, READY, RESULT, SHARD, STOP
    import numpy as np

    from . import __version__
    from .data import sample_patches
    from .errors import ProtocolError
    from .model import SAEConfig
    from .protocol import (
        ERROR, EVAL, HELLO, MAX_ARRAY_BYTES, PING, PONG, READY, RESULT, SHARD, STOP, decode, encode, send,
    )
    from .reduce import OPS, ShardState


def _set_threads(threads: int) -> None:
    """One BLAS thread per worker (one worker per core); must run before numpy loads."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


class Worker:
    """The DEALER side of one connection to the master."""

    def __init__(self, connect: str, name: str | None = None, curve: dict | None = None,
                 heartbeat: float = 1.0, master_timeout: float = 10.0, threads: int = 1,
                 handshake_timeout: float = 10.0) -> None:
        import zmq

        _load_numerics()
        self.threads = threads  # the cores it declares: shards are balanced by them
        self.name = name or f"{socket.gethostname()}#{os.getpid()}"
        self.heartbeat, self.master_timeout = heartbeat, master_timeout
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.maxmsgsize = MAX_ARRAY_BYTES + 1  # libzmq checks each frame; decode refuses larger arrays anyway
        if curve:
            self.sock.curve_serverkey = curve["server_public"].encode()  # before connect
            self.sock.curve_publickey = curve["public"].encode()
            self.sock.curve_secretkey = curve["secret"].encode()
        self.connect_to, self.curve = connect, bool(curve)
        self.handshake_timeout = handshake_timeout
        self._monitor = self.sock.get_monitor_socket(  # before connect: no event missed (see _await_handshake)
            zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.sock.connect(connect)
        self._poller = zmq.Poller()  # one for the run: Socket.poll builds one per call
        self._poller.register(self.sock, zmq.POLLIN)
        self.state = None  # reduce.ShardState once the shard is complete
        self._chunks: list = []
        self._last_heard = time.monotonic()
        self._last_sent = 0.0

    # -- sending
    def send(self, type: str, round: int = 0, arrays=(), **fields) -> None:

        send(self.sock, encode(type, round, arrays, **fields))
        self._last_sent = time.monotonic()

    def send_error(self, exc: BaseException, round: int = 0) -> None:

        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]
        self.send(ERROR, round, etype=type(exc).__name__, message=str(exc)[:2000], traceback=tb,
                  host=f"{socket.gethostname()} ({self.name})")

    # -- the loop
    def hello(self) -> None:
        """Say who we are; the master registers us (again, after it had dropped us)."""
        self.send(HELLO, name=self.name, host=socket.gethostname(), pid=os.getpid(), cores=self.threads,
                  version=__version__)
        log.info("%s: said HELLO", self.name)

    def _await_handshake(self) -> bool:
        """Wait for the first handshake with the master; False (logged) when it was refused.

        zmq's socket monitor reports a refused CURVE key (HANDSHAKE_FAILED_AUTH) and a
        mechanism mismatch (no keys against a CURVE master, or keys against --insecure); a
        connection on which no handshake completes within ``handshake_timeout`` s is the
        same failure seen from here. Without any connection within ``master_timeout`` s the
        master is unreachable. Later reconnections are not watched (the monitor is closed).
        """
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        start, connected, failures = time.monotonic(), None, 0
        try:
            while True:
                now = time.monotonic()
                if connected is not None and now - connected > self.handshake_timeout:
                    why = (f"connected to the master at {self.connect_to} but no handshake completed within "
                           f"{self.handshake_timeout:.0f} s")
                    break
                if connected is None and now - start > self.master_timeout:
                    log.error("could not reach the master at %s within %.0f s: is it running, is the address "
                              "right, does a firewall block the port?", self.connect_to, self.master_timeout)
                    return False
                if not self._monitor.poll(200):
                    continue
                event = recv_monitor_message(self._monitor)
                kind, value = event["event"], event["value"]
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._last_heard = time.monotonic()  # the master timeout counts from here
                    return True
                if kind == zmq.EVENT_CONNECTED:
                    connected = connected or time.monotonic()
                elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    why = f"the master at {self.connect_to} refused this worker's CURVE keys (ZAP status {value})"
                    break
                elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                    why = f"the handshake with the master at {self.connect_to} failed (zmq event {kind}, {value:#x})"
                    failures += 1
                    if failures >= 3:  # not one connection reset by chance: every attempt fails
                        break
        finally:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
        if self.curve:
            fix = ("the master refused its CURVE keys: pass --keys DIR/worker, where DIR is the master's --keys "
                   "directory (made by `qsae-master --make-keys DIR`); keys from another DIR are refused; "
                   "a master started with --insecure takes no keys (drop --keys)")
        else:
            fix = ("the master refused its CURVE keys: this worker has none and the master requires them; pass "
                   "--keys DIR/worker from the master's `qsae-master --make-keys DIR` (or start both with --insecure)")
        log.error("%s; %s", why, fix)
        return False

    def run(self) -> int:
        """Serve until STOP (exit 0) or until the master is gone (exit 1)."""
        self.hello()
        try:
            if not self._await_handshake():
                return 1
            while True:
                if self._poller.poll(int(self.heartbeat * 1000)):
                    if self._handle(self.sock.recv_multipart(copy=False)):
                        return 0
                self._tick(busy=False)
                if time.monotonic() - self._last_heard > self.master_timeout:
                    log.error("%s: nothing heard from the master for %.0f s; it is gone, exiting",
                              self.name, self.master_timeout)
                    return 1
        finally:
            self.sock.close(linger=0)
            self.ctx.term()

    def _tick(self, busy: bool) -> None:

        if time.monotonic() - self._last_sent >= self.heartbeat:
            self.send(PING, busy=busy)

    def _handle(self, frames) -> bool:
        """Handle one message; True on STOP."""

        self._last_heard = time.monotonic()
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("%s: bad message: %s", self.name, e)
            self.send_error(e)
            return False
        if msg.type == STOP:
            log.info("%s: STOP from the master", self.name)
            return True
        if msg.type == PING:
            self.send(PONG)
        elif msg.type == SHARD:
            self._on_shard(msg)
        elif msg.type == EVAL:
            self._on_eval(msg)
        elif msg.type == ERROR:
            log.warning("%s: the master says: %s", self.name, msg["message"])
            if "never said HELLO" in msg["message"]:  # dropped while unreachable: join again
                self.hello()
        elif msg.type != PONG:
            self.send_error(ProtocolError(f"a worker does not take {msg.type} messages"), msg.round)
        return False

    def _on_shard(self, msg) -> None:
        try:
            if msg["kind"] == "images":
                X = self._cut_patches(msg)
            elif msg["kind"] == "array":
                X = self._add_chunk(msg)
                if X is None:
                    return  # more chunks to come
            else:
                raise ValueError(f"unknown shard kind {msg['kind']!r}; expected 'images' or 'array'")
            if X.shape[0] != msg["hi"] - msg["lo"]:
                raise ValueError(f"shard has {X.shape[0]} rows, expected {msg['hi'] - msg['lo']}")
            held, self.state = self.state, None  # a failed shard leaves the worker with none, never a stale one
            if msg["append"] and held is not None:  # a lost worker's rows, added to ours
                X = np.concatenate([held.X, X])
            self.state = ShardState(X, SAEConfig.from_dict(msg["config"]))
            log.info("%s: %s rows %d..%d, holds %d rows", self.name, "added" if msg["append"] else "holds",
                     msg["lo"], msg["hi"], self.state.m)
            self.send(READY, msg.round, rows=self.state.m)
        except Exception as e:  # a bad shard is reported; the worker keeps serving
            self.send_error(e, msg.round)

    def _add_chunk(self, msg):
        """Copy one chunk of rows into the shard being built; the whole shard after the last.

        Rows go straight into one preallocated array (the frames are zmq's buffers, so they
        are copied once, never concatenated)."""
        lo, hi, c, n = msg["lo"], msg["hi"], msg["chunk"], msg["chunks"]
        rows = msg.arrays[0] if len(msg.arrays) == 1 and msg.arrays[0].ndim == 2 else None
        if rows is None or not 0 <= lo <= hi:
            raise ValueError(f"an array shard chunk carries one 2-D array of rows and 0 <= lo <= hi; got "
                             f"{len(msg.arrays)} arrays, lo={lo}, hi={hi}")
        if c == 0:
            self._chunks = [np.empty((hi - lo, rows.shape[1])), 0, (lo, hi, n, msg.round)]
        buf, filled, key = self._chunks if self._chunks else (None, 0, None)
        if key != (lo, hi, n, msg.round) or rows.shape[1] != buf.shape[1] or filled + len(rows) > len(buf):
            self._chunks = []
            raise ValueError(f"chunk {c} of {n} for rows {lo}..{hi} does not continue the shard being received")
        buf[filled : filled + len(rows)] = rows
        self._chunks[1] = filled + len(rows)
        if c + 1 < n:
            return None
        self._chunks = []
        return buf[:filled + len(rows)]

    @staticmethod
    def _cut_patches(msg):
        return sample_patches(msg.arrays, msg["m"], patch_size=msg["patch_size"], seed=msg["seed"],
                              lo=msg["lo"], hi=msg["hi"], sigma=msg["sigma"])

    def _on_eval(self, msg) -> None:

        try:
            if self.state is None:
                raise RuntimeError("EVAL before the shard arrived: the worker holds no data")
            if msg["op"] not in OPS:
                raise ValueError(f"unknown operation {msg['op']!r}; known: {', '.join(OPS)}")
            op, arg = OPS[msg["op"]], msg.arrays[0]
            cfg = self.state.config
            if self.state.m * cfg.n_visible * cfg.n_hidden <= INLINE_WORK:
                vec = op(self.state, arg)
            else:
                vec = self._in_thread(op, arg)
            self.send(RESULT, msg.round, [vec], rows=self.state.m)
        except Exception as e:
            self.send_error(e, msg.round)

    def _in_thread(self, op, arg):
        """Run op in a thread, sending PINGs (busy) while it runs."""
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(op, self.state, arg)
            while True:
                try:
                    return fut.result(timeout=self.heartbeat)
                except concurrent.futures.TimeoutError:
                    self._tick(busy=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsae-worker", description="Serve one shard of a qsae training run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--connect", help="the master's address, tcp://HOST:PORT")
    p.add_argument("--stdin", action="store_true", help="read the configuration as one JSON line from stdin")
    p.add_argument("--keys", help="DIR/worker from the master's `qsae-master --make-keys DIR` (this worker's CURVE "
                                  "keys; copy only DIR/worker to a node)")
    p.add_argument("--name", default=None, help="name in the master's log (None: HOST#PID)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (1: one worker per core)")
    p.add_argument("--master-timeout", type=float, default=10.0, help="exit after this many seconds without the master")
    p.add_argument("--handshake-timeout", type=float, default=10.0,
                   help="exit when connected but no CURVE handshake completed within this many seconds (refused keys)")
    return p


class _DropName(logging.Filter):
    """Strip the worker's own ``NAME: `` from its messages (the launcher prefixes the name)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.prefix = f"{name}: "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.prefix):
            record.msg, record.args = message[len(self.prefix):], ()
        return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qsae-worker`` and ``python -m qsae.worker``."""
    args = _parser().parse_args(argv)
    if args.stdin:
        line = sys.stdin.readline()
        try:
            cfg = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"qsae-worker: stdin did not hold one JSON line ({e})", file=sys.stderr)
            return 2
    elif args.connect:
        from .errors import QsaeError

        try:
            curve = _load_keys(args.keys) if args.keys else None
        except QsaeError as e:
            print(f"qsae-worker: error: {e}", file=sys.stderr)
            return 2
        cfg = {"connect": args.connect, "curve": curve, "name": args.name, "threads": args.threads}
    else:
        print("qsae-worker: give --connect tcp://MASTER:PORT (or --stdin when started by a launcher)", file=sys.stderr)
        return 2
    for t, flag in ((args.master_timeout, "--master-timeout"), (args.handshake_timeout, "--handshake-timeout")):
        if not t > 0:
            print(f"qsae-worker: error: {flag} {t}: give a number of seconds > 0, e.g. 10", file=sys.stderr)
            return 2
    _set_threads(int(cfg.get("threads") or 1))
    handler = logging.StreamHandler(sys.stderr)
    if args.stdin:  # plain `LEVEL message` lines: the launcher prefixes the worker's name, once
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:  # a terminal of its own: the time, and the name the master knows it by (in the messages)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    worker = Worker(cfg["connect"], cfg.get("name"), cfg.get("curve"), master_timeout=args.master_timeout,
                    threads=int(cfg.get("threads") or 1), handshake_timeout=args.handshake_timeout)
    if args.stdin:
        handler.addFilter(_DropName(worker.name))
    try:
        return worker.run()
    except KeyboardInterrupt:
        return 130


def _load_keys(directory: str) -> dict:
    from .keys import load_worker_keys

    return load_worker_keys(directory)


if __name__ == "__main__":
    sys.exit(main())
