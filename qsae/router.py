"""The master's socket: one ROUTER, CURVE on it, and the one receive loop.

The loop (``pump``) receives what arrives, feeds it to the coordinator
(``qsae.coordinator``), sends what the coordinator answers, and tells it the time. Whoever
holds ``lock`` runs it: a call of the master while it waits for replies (``drive``), the
heartbeat thread while no call does — so workers hear from the master between calls and
while a launcher starts more. Nothing slow runs under the lock. (A lock is also the full
memory barrier zmq asks for when a socket changes threads.)
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import zmq

from .auth import CurveGate
from .coordinator import Coordinator, Send
from .errors import ConfigError, ProtocolError
from .model import SAEConfig
from .protocol import ERROR, EVAL, MAX_HEADER_BYTES, MAX_RESULT_ROWS, STOP, decode, encode, send
from .reduce import max_result_width

__all__ = ["Router", "MAX_DRAIN"]

log = logging.getLogger("qsae.master")

MAX_DRAIN = 1000  # messages handled per poll before the coordinator checks its deadlines again
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: ``int & zmq.POLLIN`` builds a PollEvent each time


def _max_inbound(config: SAEConfig, max_rows: int) -> int:
    """ZMQ_MAXMSGSIZE of the ROUTER (libzmq checks each frame): a bit above the largest frame a
    worker may send — a header (an ERROR's traceback, a RESULT's ids) or a RESULT of ``max_rows``
    rows of the longest op (``reduce.OP_TABLE``; a row per tree node)."""
    largest = max(MAX_HEADER_BYTES, 8 * max_result_width(config) * max_rows)
    return largest + largest // 4 + 4096


class Router:
    """The ROUTER socket and its receive loop, feeding ``coordinator``.

    Parameters
    ----------
    coordinator : the state machine that decides (``qsae.coordinator.Coordinator``).
    config : the model's settings (the largest frame a worker may send).
    curve : encrypt and authenticate with CURVE.
    keys : key directory for hand-started workers (``qsae.keys``), or None.
    heartbeat : seconds between PINGs (the heartbeat thread wakes at least twice as often).
    """

    def __init__(self, coordinator: Coordinator, config: SAEConfig, curve: bool, keys: str | None,
                 heartbeat: float) -> None:
        self.coordinator, self.config, self.curve, self.keys, self.heartbeat = coordinator, config, curve, keys, heartbeat
        self.lock = threading.RLock()  # the socket's: held by whoever runs the receive loop
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.gate: CurveGate | None = None
        self.server_public: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frame: tuple[np.ndarray | None, zmq.Frame | None] = (None, None)  # a round's θ, one frame

    def bind(self, host: str, port: int) -> str:
        """Open the socket (CURVE before bind) on ``host`` (``port`` 0: any free one); its address."""
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1  # sending to a vanished worker raises instead of dropping silently
        sock.maxmsgsize = _max_inbound(self.config, MAX_RESULT_ROWS)  # a larger frame drops its connection unread
        if self.curve:
            self.gate = CurveGate(self.ctx, self.keys)
            self.gate.secure(sock)  # before bind
            self.server_public = self.gate.public  # z85; workers need it to connect
        self.sock = sock  # from here close() releases it, whatever fails next (else ctx.term() waits forever)
        try:
            if port:
                sock.bind(f"tcp://{host}:{port}")
            else:
                port = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as e:
            where = f"{host}:{port}" if port else f"{host} (any free port)"
            fix = ("another process holds the port: give another --port (port=), or 0 for any free one"
                   if e.errno == zmq.EADDRINUSE else
                   f"{host!r} is not an address of this machine: give --bind (bind=) one of its addresses "
                   "(e.g. 127.0.0.1, 0.0.0.0 for all), or leave it out")
            raise ConfigError(f"the master cannot listen on tcp://{where}: {os.strerror(e.errno)}; {fix}") from None
        if self.gate is not None:
            self.gate.watch(sock)
        self._poller = zmq.Poller()  # one for the run: building one per poll costs µs a round
        self._poller.register(sock, zmq.POLLIN)
        return f"tcp://{host}:{port}"

    def start_heartbeat(self) -> None:
        """Run the receive loop in a thread whenever no call does."""
        self._thread = threading.Thread(target=self._keepalive, name="qsae-master-heartbeat", daemon=True)
        self._thread.start()

    def new_client(self) -> dict | None:
        """A CURVE key pair for one launched worker, admitted from now on (None without CURVE)."""
        return self.gate.new_client() if self.gate is not None else None

    # ------------------------------------------------------------------ the loop
    def pump(self, timeout: float) -> None:
        """The receive loop's body (hold ``lock``): wait up to ``timeout`` s for messages, feed
        each to the coordinator and send its answers; then tell it the time."""
        coord, sock = self.coordinator, self.sock
        if self._poller.poll(max(0, int(timeout * 1000))):
            # drain what is queued, boundedly (a flood must not starve the deadline checks);
            # EVENTS instead of NOBLOCK + zmq.Again saves raising an exception a message
            for _ in range(MAX_DRAIN):
                if not sock.get(_EVENTS) & _POLLIN:
                    break
                frames = sock.recv_multipart(copy=False)
                ident = frames[0].bytes
                try:
                    msg = decode(frames[1:])
                except ProtocolError as e:
                    self.deliver(coord.reject(ident, f"bad message: {e}", time.monotonic()))
                    continue
                self.deliver(coord.handle(ident, msg, time.monotonic()))
        self.deliver(coord.tick(time.monotonic()))

    def drive(self, sends: list[Send]) -> None:
        """Send, then run the receive loop until the coordinator's wait is over."""
        coord = self.coordinator
        with self.lock:
            try:
                self.deliver(sends)
                while coord.waiting:
                    self.pump(coord.poll_seconds(time.monotonic()))
            except BaseException:  # a socket error, Ctrl-C: the wait is abandoned, the heartbeat goes on
                coord.abandon()
                raise

    def deliver(self, sends: list[Send]) -> None:
        """Send the coordinator's messages. EVALs of one round share θ's frame (built once;
        libzmq shares it between the messages)."""
        for s in sends:
            if s.type == EVAL:
                arg = s.arrays[0]
                if self._frame[0] is not arg:
                    self._frame = (arg, zmq.Frame(arg))
                self._send(s.ident, (s.ident, encode(EVAL, s.round, [arg], **s.fields)[0], self._frame[1]))
            else:
                self._send(s.ident, (s.ident, *encode(s.type, s.round, s.arrays, **s.fields)), quiet=s.type == ERROR)

    def _send(self, ident: bytes, frames, quiet: bool = False) -> None:
        try:
            send(self.sock, frames)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                if quiet:  # an answer to a rejected message: best effort
                    return
                raise
            # its connection is gone (router_mandatory raises on the identity frame, so nothing
            # was half sent): the worker is lost at the next check
            self.coordinator.sent(ident, time.monotonic(), reached=False)
            return
        self.coordinator.sent(ident, time.monotonic())

    def _keepalive(self) -> None:
        """While no call runs the loop: answer PINGs and ping the workers, so both sides know
        the other lives (between calls, and while a launcher starts workers)."""
        while not self._stop.wait(min(0.2, self.heartbeat / 2)):
            if not self.lock.acquire(blocking=False):
                continue  # a call is running the loop itself
            try:
                self.pump(0)
            except zmq.ZMQError as e:
                log.debug("keepalive: %s", e)
            finally:
                self.lock.release()

    # ------------------------------------------------------------------ closing
    def stop(self, idents) -> None:
        """Stop the heartbeat and tell ``idents`` to STOP (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.sock is not None:
            for ident in idents:
                try:
                    send(self.sock, encode(STOP), (ident,))
                except zmq.ZMQError:
                    pass

    def close(self) -> None:
        """Release CURVE's threads, the socket and the context; never waits."""
        if self.gate is not None:
            self.gate.close()
        if self.sock is not None:
            self.sock.close(linger=0)
        if self.ctx is not None:
            self.ctx.destroy(linger=0)  # closes any socket still open (a failed start's): never waits
