"""The worker: connects to the master, caches its shard, answers evaluation rounds.

    python -m qsae.worker --stdin                       # started by a launcher
    python -m qsae.worker --connect tcp://HOST:PORT     # started by hand (qsae-worker)

A launcher writes one JSON line to the worker's stdin (never the command line, which ``ps``
shows): ``{"connect": ..., "curve": null | {"server_public", "public", "secret"}, "name":
..., "threads": 1}``. The worker says HELLO and receives the SOURCE of the data once (the
images, from which it cuts its own rows; or only the shape of a plain array). Then BLOCKS
messages tell it which blocks of rows to hold (it cuts them, or they carry the rows), DROP
which to forget, and every EVAL which blocks to compute: its own, or a straggler's, which
it cuts from the images for the occasion. It answers until STOP, says BYE and exits 0 on
SIGTERM or Ctrl-C, and exits 1 when it has heard nothing from the master for
``master_timeout`` seconds.

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

from .throttle import Throttle

__all__ = ["main", "Worker"]

log = logging.getLogger("qsae.worker")

INLINE_WORK = 100_000 * 64 * 30  # rows·n·h computed inline (~0.1 s); more runs in a thread, pinging
ERROR_LOG_SECONDS = 10.0  # the master's ERROR replies: a warning this often at most, with the count


def _load_numerics() -> None:
    """Import numpy and the numeric modules; only after ``_set_threads`` (BLAS reads its
    thread count once, when it loads). Binds them as module globals for the methods below."""
    global np, __version__, ProtocolError, SAEConfig, OPS, OP_TABLE, PER_BLOCK, Blocks, rows_in, tree
    global decode, encode, send, MAX_ARRAY_BYTES, BLOCKS, BYE, DROP, EVAL, ERROR, HELLO, PING, PONG, READY, RESULT
    global SOURCE, STOP, MAX_RESULT_ROWS
    import numpy as np

    from . import __version__
    from .errors import ProtocolError
    from .model import SAEConfig
    from .protocol import (
        BLOCKS, BYE, DROP, ERROR, EVAL, HELLO, MAX_ARRAY_BYTES, MAX_RESULT_ROWS, PING, PONG, READY, RESULT, SOURCE,
        STOP, decode, encode, send,
    )
    from . import tree
    from .compute import Blocks, rows_in
    from .reduce import OP_TABLE, OPS, PER_BLOCK
    from .model import set_kernel

    set_kernel()  # numba's import and compile (1-2 s) before HELLO, not inside the first round


def _set_threads(threads: int) -> None:
    """One BLAS thread per worker (one worker per core); must run before numpy loads."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    from . import _blas

    _blas.set_threads(threads)  # and the model's arithmetic runs on that many, whatever the environment said


def _keep_freed_memory() -> None:
    """Let glibc keep freed memory in the heap for the next round instead of handing it back.

    A round allocates and frees each block's activations and the row chunks' buffers. By
    default glibc maps the large ones anew and trims the heap after frees, so every round
    page-faults and zeroes megabytes: with two workers computing at once on two cores, blocks
    then ran 20% slower than one contiguous shard (measured: 40 ms against 33 ms for 50K rows
    each; 35 ms with this). Memory held stays what the blocks and one round's temporaries need
    (benchmarks/bench_memory.py). Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: never give the heap's top back
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocate from the heap, where freed memory is reused
    except (OSError, AttributeError):  # not glibc
        pass


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``), once.

    Called when the blocks held change: cutting a block makes float64 temporaries (and a
    dropped block's rows are freed) that ``_keep_freed_memory`` would otherwise keep resident
    for the whole run — 26 MiB for 1M float32 patches (benchmarks/bench_memory.py). Not after
    rounds: their memory is reused by the next one. Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Worker:
    """The DEALER side of one connection to the master."""

    def __init__(self, connect: str, name: str | None = None, curve: dict | None = None,
                 heartbeat: float = 1.0, master_timeout: float = 10.0, threads: int = 1,
                 handshake_timeout: float = 10.0) -> None:
        import zmq

        from .dealer import open_dealer

        _load_numerics()
        self.threads = threads  # the cores it declares: shards are balanced by them
        self.name = name or f"{socket.gethostname()}#{os.getpid()}"
        self.heartbeat, self.master_timeout = heartbeat, master_timeout
        self.ctx = zmq.Context()
        # decode refuses larger arrays anyway; the monitor watches the first handshake (run)
        self.sock, self._monitor = open_dealer(self.ctx, connect, curve, MAX_ARRAY_BYTES + 1)
        self.connect_to, self.curve = connect, bool(curve)
        self.handshake_timeout = handshake_timeout
        self._poller = zmq.Poller()  # one for the run: Socket.poll builds one per call
        self._poller.register(self.sock, zmq.POLLIN)
        self.source: dict | None = None  # the SOURCE message: config, kind, images, dtype, ...
        self.store: "Blocks | None" = None  # the blocks held and a straggler's cut for a backup (qsae.compute)
        self._theta, self._theta_of = None, -1  # θ of the last forward round and its evaluation
        self._last_hello = 0.0
        self._errors = Throttle(ERROR_LOG_SECONDS)  # the master's ERRORs: a line at most every 10 s
        self._blas = blas_kernel()  # said in HELLO: the master warns when workers' kernels differ
        self._handlers = {PING: lambda msg: self.send(PONG), SOURCE: self._on_source, BLOCKS: self._on_blocks,
                          DROP: self._on_drop, EVAL: self._on_eval}  # by message type; built once
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
                  version=__version__, blas=self._blas)
        self._last_hello = time.monotonic()
        log.debug("%s: HELLO queued for %s", self.name, self.connect_to)  # sent once a connection exists

    def run(self) -> int:
        """Serve until STOP (exit 0), SIGTERM/SIGINT (BYE, exit 0) or the master is gone (exit 1)."""
        import signal
        import threading

        from .dealer import await_handshake

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        try:
            # the handshake first, HELLO after: zmq connects and shakes hands with no message queued, and a
            # DEALER's send blocks while it has no connection, as when the master refuses every handshake
            # (a worker without keys against a CURVE master hung in hello() every other time)
            if not await_handshake(self.sock, self._monitor, self.connect_to, self.curve, self.handshake_timeout,
                                   self.master_timeout):
                return 1
            self._last_heard = time.monotonic()  # the master timeout counts from here
            self.hello()
            log.info("%s: connected to the master at %s, said HELLO", self.name, self.connect_to)
            while True:
                if self._poller.poll(int(self.heartbeat * 1000)):
                    if self._handle(self.sock.recv_multipart(copy=False)):
                        return 0
                self._tick(busy=False)
                if time.monotonic() - self._last_heard > self.master_timeout:
                    log.error("%s: nothing heard from the master for %.0f s; it is gone, exiting",
                              self.name, self.master_timeout)
                    return 1
        except _Leave as leave:
            log.info("%s: leaving, saying BYE to the master", signal.Signals(leave.args[0]).name)
            self.bye()
            return 0
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal now just ends the process
                    signal.signal(sig, signal.SIG_DFL)
            # destroy, not term: it closes every socket of the context first (the handshake
            # monitor too, if a signal cut await_handshake short), so the exit never hangs
            self.ctx.destroy()

    def _tick(self, busy: bool) -> None:

        if time.monotonic() - self._last_sent >= self.heartbeat:
            self.send(PING, busy=busy)

    def _handle(self, frames) -> bool:
        """Handle one message; True on STOP."""
        self._last_heard = time.monotonic()
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("bad message: %s", e)
            self.send_error(e)
            return False
        if msg.type == STOP:
            log.info("STOP from the master")
            return True
        handler = self._handlers.get(msg.type)
        if handler is not None:
            try:
                handler(msg)
            except Exception as e:  # a bad request is reported; the worker keeps serving
                self.send_error(e, msg.round)
        elif msg.type == ERROR:
            self._on_error(msg)
        elif msg.type != PONG:
            self.send_error(ProtocolError(f"a worker does not take {msg.type} messages"), msg.round)
        return False


    def _on_error(self, msg) -> None:
        """The master refused something. "never said HELLO": it dropped this worker while it was
        unreachable; join again (once for a burst: every PING and late RESULT queued meanwhile
        is refused too, so it is one INFO line, not a warning each). Others: a warning at most
        every ``ERROR_LOG_SECONDS`` with the count since the last."""
        now = time.monotonic()
        if "never said HELLO" in msg["message"]:
            if now - self._last_hello > 1.0:
                self.hello()
                log.info("%s: the master had dropped this worker (unreachable for a while); said HELLO again",
                         self.name)
            return
        n = self._errors.due(now)
        if n is not None:
            more = f" ({n - 1} more since the last such line)" if n > 1 else ""
            log.warning("the master says: %s%s", msg["message"], more)

    # -- data: the source once, then blocks of it
    def _on_source(self, msg) -> None:
        """Where the run's rows come from; forget every block held (a new data set)."""
        self.source, self.store = None, None
        if msg["dtype"] not in ("float32", "float64"):
            raise ValueError(f"dtype {msg['dtype']!r}: a run computes in float32 or float64")
        if msg["kind"] not in ("images", "array"):
            raise ValueError(f"unknown source kind {msg['kind']!r}; expected 'images' or 'array'")
        if msg["block_rows"] < 1 or msg["m"] < 1:
            raise ValueError(f"block_rows={msg['block_rows']} and m={msg['m']} must be >= 1")
        config = SAEConfig.from_dict(msg["config"])
        images = [np.array(a) for a in msg.arrays]  # copies: the frames are zmq's buffers
        if msg["kind"] == "images":
            from .data import check_patches_match

            check_patches_match(msg["patch_size"], config.n_visible)
            if not images:
                raise ValueError("an images source carries at least one image")
        self.source = dict(msg.fields, config=config, images=images, dtype=np.dtype(msg["dtype"]))
        self.store = Blocks(self.source)
        self.send(READY, msg.round, ids=[], seconds=0.0)

    def _on_blocks(self, msg) -> None:
        if self.source is None:
            raise ValueError("BLOCKS before SOURCE: the worker does not know the data set yet")
        t0 = time.perf_counter()
        ids = msg["ids"]
        self.store.check_given(ids, msg.arrays)
        if self.source["kind"] == "images":
            self.store.check_room(ids)
            self._prepare(lambda: self.store.hold(ids, []))
        else:
            self.store.hold(ids, msg.arrays)  # copies: the frames are zmq's buffers
        held = self.store.held
        log.info("holds %d blocks (%d rows): +%s", len(held), sum(st.m for st in held.values()),
                 _span(ids))
        _release_freed_memory()  # the cutting's temporaries
        self.send(READY, msg.round, ids=sorted(self.store.held), seconds=time.perf_counter() - t0)

    def _prepare(self, fn):
        """Cut rows in a thread while PINGs go out: millions of rows take longer than the master's
        worker_timeout, and a silent worker is lost. The master's PONGs queued meanwhile show
        it is still there (the master timeout counts from them, not from the BLOCKS message)."""
        out = self._in_thread(fn)
        if self.sock.poll(0):
            self._last_heard = time.monotonic()
        return out

    def _on_drop(self, msg) -> None:
        if self.store is not None:
            self.store.drop(msg["ids"])
        _release_freed_memory()  # the dropped rows
        log.info("holds %d blocks: -%s", len(self.store.held) if self.store else 0, _span(msg["ids"]))

    # -- rounds
    def _begin_eval(self, msg) -> tuple:
        """(op, arg, spans, ids, evaluation) of an EVAL, checked (spans: its ranges of block ids as
        pairs, ids: their blocks); a forward round's θ kept, tagged with its evaluation (workers
        and agents alike)."""
        op, arg, evaluation = msg["op"], msg.arrays[0], msg["evaluation"]
        spans = tree.pairs(msg["spans"])
        ids = tree.blocks_of(spans)
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
        if self.source is None:
            raise RuntimeError("EVAL before the data arrived: the worker holds no data")
        if OP_TABLE[op].keeps:  # the next round's op may compute its state again: from this θ only
            self._theta, self._theta_of = np.array(arg), evaluation
        return op, arg, spans, ids, evaluation

    def _on_eval(self, msg) -> None:
        """Compute the blocks an EVAL names (``qsae.compute.Blocks.evaluate``: held ones, or a
        straggler's cut now; a backward round uses activations of this evaluation's θ only) and
        answer with a row per tree node they make (several RESULTs past ``MAX_RESULT_ROWS``)."""
        op, arg, spans, ids, evaluation = self._begin_eval(msg)
        theta = self._theta if self._theta_of == evaluation else None  # backward: never an older θ's
        src = self.source
        rows = rows_in(spans, src["m"], src["block_rows"])
        t0 = time.perf_counter()
        if rows * src["config"].n_visible * src["config"].n_hidden <= INLINE_WORK:
            codes, out = self.store.evaluate(op, ids, evaluation, arg, theta)
        else:
            codes, out = self._in_thread(self.store.evaluate, op, ids, evaluation, arg, theta)
        seconds = time.perf_counter() - t0
        if op not in PER_BLOCK:  # "average": one row for the group
            self.send(RESULT, msg.round, [out], spans=msg["spans"], nodes=[], rows=rows, seconds=seconds)
            return
        B = self.store.n_blocks
        for lo in range(0, len(codes), MAX_RESULT_ROWS):
            part = codes[lo:lo + MAX_RESULT_ROWS]
            spans = tree.node_runs([tree.decode(c, B) for c in part], B)
            self.send(RESULT, msg.round, [out[lo:lo + MAX_RESULT_ROWS]], spans=tree.flat(spans), nodes=part,
                      rows=rows_in(spans, src["m"], src["block_rows"]), seconds=seconds)

    def _in_thread(self, fn, *args):
        """Run fn(*args) in a thread, sending PINGs (busy) while it runs."""
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(fn, *args)
            while True:
                try:
                    return fut.result(timeout=self.heartbeat)
                except concurrent.futures.TimeoutError:
                    self._tick(busy=True)

    # -- leaving
    def _on_signal(self, signum, frame) -> None:
        raise _Leave(signum)

    def bye(self) -> None:
        """Tell the master we leave, so it hands our blocks to the others at once."""
        try:
            self.send(BYE)
            self.sock.linger = 1000  # let the BYE go out before the socket closes
        except Exception as e:  # pragma: no cover - the master is gone anyway
            log.debug("BYE not sent: %s", e)


def blas_kernel() -> str:
    """This process's BLAS: library, version and kernel, e.g. "openblas 0.3.27 Haswell".

    A block's sums have the same bits on two workers with the same kernel; different kernels
    (another build, or OPENBLAS_CORETYPE) round products differently. From threadpoolctl where
    it is importable, else from numpy's build configuration (no kernel there)."""
    try:
        from ._blas import blas_info

        libs = blas_info()
    except Exception:  # threadpoolctl missing or failing: numpy's own record
        libs = []
    if libs:
        return "; ".join(f"{d['api']} {d['version']} {d['kernel'] or '?'}" for d in libs)
    try:
        import numpy

        dep = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{dep.get('name', '?')} {dep.get('version', '?')} (kernel unknown)"
    except Exception:
        return "unknown"


class _Leave(BaseException):
    """SIGTERM or SIGINT: say BYE and exit 0 (BaseException: no handler swallows it)."""


def _span(ids: list) -> str:
    return f"{len(ids)} blocks" if len(ids) > 8 else ",".join(map(str, ids))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsae-worker", description="Serve one shard of a qsae training run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from . import __version__ as version  # cheap: qsae's __init__ loads no numpy

    p.add_argument("--version", action="version", version=f"qsae {version}")
    p.add_argument("--connect", help="the master's address, tcp://HOST:PORT")
    p.add_argument("--stdin", action="store_true", help="read the configuration as one JSON line from stdin")
    p.add_argument("--keys", help="DIR/worker from the master's `qsae-master --make-keys DIR` (this worker's CURVE "
                                  "keys; copy only DIR/worker to a node)")
    p.add_argument("--name", default=None, help="name in the master's log (None: HOST#PID)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (1: one worker per core)")
    p.add_argument("--procs", type=int, default=1,
                   help="compute processes: more than 1 runs a host agent (qsae.agent), one connection for all")
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
    from .errors import QsaeError

    if args.stdin:
        line = sys.stdin.readline()
        try:
            cfg = _stdin_config(line)
        except QsaeError as e:
            print(f"qsae-worker: error: {e}", file=sys.stderr)
            return 2
    elif args.connect:
        try:
            connect = parse_connect(args.connect)
            curve = _load_keys(args.keys) if args.keys else None
        except QsaeError as e:
            print(f"qsae-worker: error: {e}", file=sys.stderr)
            return 2
        cfg = {"connect": connect, "curve": curve, "name": args.name, "threads": args.threads, "procs": args.procs}
    else:
        print("qsae-worker: give --connect tcp://MASTER:PORT (or --stdin when started by a launcher)", file=sys.stderr)
        return 2
    for t, flag in ((args.master_timeout, "--master-timeout"), (args.handshake_timeout, "--handshake-timeout")):
        if not t > 0:
            print(f"qsae-worker: error: {flag} {t}: give a number of seconds > 0, e.g. 10", file=sys.stderr)
            return 2
    _set_threads(int(cfg.get("threads") or 1))
    _keep_freed_memory()
    handler = logging.StreamHandler(sys.stderr)
    if args.stdin:  # plain `LEVEL message` lines: the launcher prefixes the worker's name, once
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:  # a terminal of its own: the time, and the name the master knows it by (in the messages)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    procs = 1 if cfg.get("procs") is None else cfg["procs"]
    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
        print(f"qsae-worker: error: --procs {procs!r}: give a whole number of compute processes >= 1", file=sys.stderr)
        return 2
    options = dict(master_timeout=args.master_timeout, threads=int(cfg.get("threads") or 1),
                   handshake_timeout=args.handshake_timeout)
    if procs > 1:  # a host agent: one connection, `procs` forked compute processes (imported after _set_threads)
        from .agent import Agent

        worker = Agent(cfg["connect"], cfg.get("name"), cfg.get("curve"), procs=procs, **options)
    else:
        worker = Worker(cfg["connect"], cfg.get("name"), cfg.get("curve"), **options)
    if args.stdin:
        handler.addFilter(_DropName(worker.name))
    try:
        return worker.run()
    except KeyboardInterrupt:
        return 130


def parse_connect(address: str) -> str:
    """The master's zmq endpoint from ``tcp://HOST:PORT`` or ``HOST:PORT`` (tcp:// added).

    Raises ConfigError naming the address and the form expected: a missing port, another
    scheme (http://, ...), a port outside 1..65535, or an empty host.
    """
    from .errors import ConfigError

    text = str(address).strip()
    form = "give --connect tcp://HOST:PORT (e.g. tcp://10.0.0.5:5555), the master's --bind address and --port"
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    if scheme != "tcp":
        raise ConfigError(f"--connect {text}: {scheme}:// is not how workers reach a master; {form}")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port:
        raise ConfigError(f"--connect {text}: no port; {form}")
    if host.startswith("[") and host.endswith("]"):  # [::1]:5555
        host = host[1:-1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--connect {text}: port {port!r} is not a number from 1 to 65535; {form}")
    if not host or any(c in host for c in "/ ?#@"):
        raise ConfigError(f"--connect {text}: {host!r} is not a host name or address; {form}")
    return f"tcp://{rest}"


def _stdin_config(line: str) -> dict:
    """The launcher's JSON line, checked: a ConfigError naming what is missing or wrong."""
    from .errors import ConfigError

    try:
        cfg = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--stdin: stdin did not hold one JSON line ({e}); a launcher writes "
                          '{"connect": "tcp://HOST:PORT", "curve": null, ...}') from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"--stdin: the JSON line is a {type(cfg).__name__}, not an object with \"connect\"")
    if "connect" not in cfg:
        raise ConfigError('--stdin: the JSON line has no "connect" (the master\'s tcp://HOST:PORT); '
                          "start workers with a launcher, or by hand with --connect")
    cfg["connect"] = parse_connect(cfg["connect"])
    curve = cfg.get("curve")
    if curve is not None and not (isinstance(curve, dict)
                                  and all(isinstance(curve.get(k), str) for k in ("server_public", "public", "secret"))):
        raise ConfigError('--stdin: "curve" must be null or {"server_public", "public", "secret"} (z85 strings)')
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f'--stdin: "threads" is {threads!r}; give a whole number >= 1')
    procs = cfg.get("procs")
    if procs is not None and (isinstance(procs, bool) or not isinstance(procs, int) or procs < 1):
        raise ConfigError(f'--stdin: "procs" is {procs!r}; give a whole number >= 1 (compute processes of an agent)')
    if cfg.get("name") is not None and not isinstance(cfg["name"], str):
        raise ConfigError(f'--stdin: "name" is {cfg["name"]!r}; give a string or null')
    return cfg


def _load_keys(directory: str) -> dict:
    from .keys import load_worker_keys

    return load_worker_keys(directory)


if __name__ == "__main__":
    sys.exit(main())
