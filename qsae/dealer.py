"""A worker's socket to the master: a DEALER with its CURVE keys, and its first handshake watched.

zmq connects and retries by itself and says nothing when the master refuses a worker: a
worker with no keys, or another master's, would wait forever. So the worker opens its
socket with a monitor (``open_dealer``) and waits for the first handshake
(``await_handshake``), which tells a refused key, a mechanism mismatch and an unreachable
master apart, each logged with its fix.
"""

from __future__ import annotations

import logging
import time

import zmq

__all__ = ["open_dealer", "await_handshake"]

log = logging.getLogger("qsae.worker")

_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def open_dealer(ctx: zmq.Context, connect: str, curve: dict | None, max_frame: int) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER connected to ``connect`` (CURVE with ``curve``'s keys: server_public, public,
    secret), refusing frames over ``max_frame`` bytes, and its monitor, made before it
    connects so that no event is missed."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.maxmsgsize = max_frame  # libzmq checks each frame
    if curve:
        sock.curve_serverkey = curve["server_public"].encode()  # before connect
        sock.curve_publickey = curve["public"].encode()
        sock.curve_secretkey = curve["secret"].encode()
    monitor = sock.get_monitor_socket(_EVENTS)
    sock.connect(connect)
    return sock, monitor


def await_handshake(sock: zmq.Socket, monitor: zmq.Socket, connect: str, curve: bool, handshake_timeout: float,
                    master_timeout: float) -> bool:
    """Wait for the first handshake with the master; False (logged, with the fix) when refused.

    zmq's socket monitor reports a refused CURVE key (HANDSHAKE_FAILED_AUTH) and a mechanism
    mismatch (no keys against a CURVE master, or keys against --insecure); a connection on
    which no handshake completes within ``handshake_timeout`` s is the same failure seen from
    here. Without any connection within ``master_timeout`` s the master is unreachable. The
    monitor is closed on return: later reconnections are not watched.
    """
    from zmq.utils.monitor import recv_monitor_message

    start, connected, failures = time.monotonic(), None, 0
    try:
        while True:
            now = time.monotonic()
            if connected is not None and now - connected > handshake_timeout:
                why = f"connected to the master at {connect} but no handshake completed within {handshake_timeout:.0f} s"
                break
            if connected is None and now - start > master_timeout:
                log.error("could not reach the master at %s within %.0f s: is it running, is the address right, "
                          "does a firewall block the port?", connect, master_timeout)
                return False
            if not monitor.poll(200):
                continue
            event = recv_monitor_message(monitor)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if kind == zmq.EVENT_CONNECTED:
                connected = connected or time.monotonic()
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = f"the master at {connect} refused this worker's CURVE keys (ZAP status {value})"
                break
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                why = f"the handshake with the master at {connect} failed (zmq event {kind}, {value:#x})"
                failures += 1
                if failures >= 3:  # not one connection reset by chance: every attempt fails
                    break
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    if curve:
        fix = ("the master refused its CURVE keys: pass --keys DIR/worker, where DIR is the master's --keys "
               "directory (made by `qsae-master --make-keys DIR`); keys from another DIR are refused; "
               "a master started with --insecure takes no keys (drop --keys)")
    else:
        fix = ("the master refused its CURVE keys: this worker has none and the master requires them; pass "
               "--keys DIR/worker from the master's `qsae-master --make-keys DIR` (or start the master with "
               "--insecure; a worker without --keys is insecure already)")
    log.error("%s; %s", why, fix)
    return False
