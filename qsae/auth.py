"""Who may talk to the master: its CURVE keys, the client keys it admits, refused handshakes.

    gate = CurveGate(ctx, keys_dir=None)    # a server key pair for this run (or DIR's)
    gate.secure(sock)                       # before bind
    gate.watch(sock)                        # after bind: log handshakes that fail
    worker_keys = gate.new_client()         # a key pair for one launched worker, admitted
    gate.close()

Keys reach launched workers over the channel that started them (never a command line);
hand-started workers use a key directory from ``qsae-master --make-keys DIR``.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from .throttle import Throttle

__all__ = ["AllowList", "CurveGate"]

log = logging.getLogger("qsae.master")


class AllowList:
    """ZAP credentials provider: admits exactly the client keys this run handed out.

    A refused key is logged, at most once every ``LOG_EVERY`` seconds with a count of the
    refusals since the last line (a worker with the wrong keys retries every 100 ms)."""

    LOG_EVERY = 10.0  # seconds between lines about refused keys

    def __init__(self) -> None:
        self.keys: set[bytes] = set()
        self._refused = Throttle(self.LOG_EVERY)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        n = self._refused.due(time.monotonic())
        if n is not None:
            log.warning("refused a worker's CURVE key %s (%d since the last such line): it is not a key of this "
                        "run; a hand-started worker needs --keys DIR/worker from this master's --keys DIR",
                        key.decode("ascii", "replace")[:12] + "...", n)
        return False

    def watch(self, sock: zmq.Socket) -> None:
        """Log handshakes that fail before ZAP is asked (no keys, another master's server key),
        rate-limited like refused keys: a thread reads ``sock``'s monitor until ``unwatch``.
        Call after bind, from the thread that owns ``sock``."""
        events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        self._monitor, self._stop = sock.get_monitor_socket(events), threading.Event()
        self._sock = sock
        self._thread = threading.Thread(target=self._read_monitor, name="qsae-master-handshakes", daemon=True)
        self._thread.start()

    def _read_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        failed = Throttle(self.LOG_EVERY)
        while not self._stop.is_set():
            try:
                if not self._monitor.poll(200):
                    continue
                recv_monitor_message(self._monitor)
            except zmq.ZMQError:
                return  # closed under us: the master is closing
            n = failed.due(time.monotonic())
            if n is not None:
                log.warning("a worker's CURVE handshake failed (%d since the last such line): it has no keys, or "
                            "another master's; hand-started workers need --keys DIR/worker from this master's "
                            "--keys DIR", n)

    def unwatch(self) -> None:
        """Stop the thread ``watch`` started and close the monitor (before the socket closes)."""
        if getattr(self, "_thread", None) is None:
            return
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._thread = None


class CurveGate:
    """The CURVE server side of the master's socket: keys, the ZAP allow list, the monitor."""

    def __init__(self, ctx: zmq.Context, keys_dir: str | None = None) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.allow = AllowList()
        if keys_dir is not None:  # hand-started workers: keys from `qsae-master --make-keys DIR`
            from .keys import load_server_keys

            self.public, self._secret, self.allow.keys = load_server_keys(keys_dir)
        else:
            self.public, self._secret = zmq.curve_keypair()
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("qsae.auth"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self.allow)

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before bind)."""
        sock.curve_server = True  # before bind
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public

    def watch(self, sock: zmq.Socket) -> None:
        """Log the handshakes on ``sock`` that fail before ZAP is asked (after bind)."""
        self.allow.watch(sock)

    def new_client(self) -> dict:
        """A key pair for one launched worker, admitted from now on (z85 text)."""
        public, secret = zmq.curve_keypair()
        self.allow.keys.add(public)
        return {"server_public": self.public.decode(), "public": public.decode(), "secret": secret.decode()}

    def close(self) -> None:
        """Stop the monitor and the authenticator (before the socket closes)."""
        self.allow.unwatch()
        self._auth.stop()
