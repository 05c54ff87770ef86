"""What can go wrong with an SSH host, each in one line: what happened, after how long, the fix.

Used by :mod:`qsae.launch.ssh` for every host that fails to connect, authenticate or start
a worker; :data:`INSTALL_HINT` is shared with the Slurm launcher's preflight.
"""

from __future__ import annotations

import socket
from typing import Any

#: how to put qsae on a node (qsae is on no package index): from a checkout, or a wheel built here
INSTALL_HINT = ("install it there from a checkout (pip install /path/to/qsae) or a wheel (pip wheel --no-deps . "
                "here, copy qsae-*.whl, pip install qsae-*.whl there)")


class _UnknownHostKey(Exception):
    def __init__(self, hostname: str, key_type: str, fingerprint: str) -> None:
        super().__init__(hostname)
        self.hostname, self.key_type, self.fingerprint = hostname, key_type, fingerprint


def _fingerprint(key: Any) -> str:
    fp = getattr(key, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    import base64
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def explain(e: BaseException, h: Any, connect_timeout: float, elapsed: float | None = None) -> str:
    """One line: what went wrong with host ``h`` (an ssh ``_Host``), after how long, and the fix."""
    import errno

    import paramiko

    where, t = h.where, connect_timeout
    after = f" after {elapsed:.2f} s" if elapsed is not None else ""
    if isinstance(e, _UnknownHostKey):
        return (f"{where}: unknown host key ({e.key_type} {e.fingerprint} for {e.hostname}): "
                f"ssh to it once to add it to known_hosts (or trust new hosts: qsae-master --accept-new-host-keys, "
                f"SSHLauncher(accept_new_host_keys=True) in Python)")
    if isinstance(e, paramiko.BadHostKeyException):
        return (f"{where}: host key CHANGED (got {_fingerprint(e.key)}, known_hosts has "
                f"{_fingerprint(e.expected_key)}): a reinstalled host or a man in the middle; if it is "
                f"expected, remove the old key with ssh-keygen -R {e.hostname}")
    if isinstance(e, paramiko.AuthenticationException) or (
            isinstance(e, paramiko.SSHException) and "no authentication methods" in str(e).lower()):
        keys = ", ".join(h.key_filenames) or "the ssh agent and ~/.ssh/id_*"
        return (f"{where}: authentication refused for user {h.user} (tried {keys}): add your public key to "
                f"~{h.user}/.ssh/authorized_keys there (ssh-copy-id), load the key into ssh-agent, or set "
                f"IdentityFile/User for it in ~/.ssh/config")
    if isinstance(e, socket.gaierror):
        return f"{where}: cannot resolve host name {h.hostname!r} ({e.strerror}): check the spelling or ~/.ssh/config"
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        codes = {getattr(x, "errno", None) for x in e.errors.values()}
        if codes == {errno.ECONNREFUSED}:
            return (f"{where}: connection refused on port {h.port}{after}: is sshd running there, and is the "
                    f"port right (host:port in the hosts file, Port in ~/.ssh/config)?")
        return f"{where}: unreachable{after} ({e}): check that the host is up and the network/firewall lets you in"
    if isinstance(e, ConnectionRefusedError):
        return f"{where}: connection refused on port {h.port}{after}: is sshd running there, and is the port right?"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return (f"{where}: timed out{after or f' after {t:g} s'} (connect_timeout {t:g} s): the host is down, "
                f"firewalled or slow; check it, or raise connect_timeout")
    text = str(e).lower()
    handshake = ("banner", "no existing session", "negotiation")
    if isinstance(e, paramiko.SSHException) and any(s in text for s in handshake):
        return _explain_handshake(e, h, connect_timeout, elapsed)
    if isinstance(e, (ConnectionResetError, EOFError)):
        return (f"{where}: the connection was {'reset' if isinstance(e, ConnectionResetError) else 'closed'} "
                f"by the server{after}: is port {h.port} an SSH server that accepts this client? Check its log")
    if isinstance(e, OSError):
        return f"{where}: unreachable{after} ({e.strerror or e}): check that the host is up and reachable"
    return f"{where}: SSH failed{after}: {type(e).__name__}: {e}"


def _explain_handshake(e: BaseException, h: Any, connect_timeout: float, elapsed: float | None) -> str:
    """A failed SSH banner/key exchange: reset, closed, garbage or silence, told apart by cause and time."""
    where, t, text = h.where, connect_timeout, str(e)
    cause = e.__cause__ or e.__context__
    after = f" after {elapsed:.2f} s" if elapsed is not None else ""
    reset = isinstance(cause, ConnectionResetError) or "reset by peer" in text.lower()
    closed = isinstance(cause, EOFError) or text.strip().lower() in ("error reading ssh protocol banner",
                                                                     "no existing session")
    if reset:
        return (f"{where}: the server reset the connection during the SSH handshake{after} ({text}): is port "
                f"{h.port} an SSH server that accepts this client (MaxStartups, AllowUsers, a firewall)? "
                f"Check its log")
    if elapsed is None or elapsed >= 0.9 * t:
        # paramiko reports a silent server as "No existing session" when the handshake times out
        return (f"{where}: no SSH banner/handshake within {t:g} s ({text}): is port {h.port} an SSH server, "
                f"and is the host not overloaded? Check the port, or raise connect_timeout")
    if closed:
        return (f"{where}: the server closed the connection during the SSH handshake{after} ({text}): is port "
                f"{h.port} an SSH server that accepts this client? Check its log")
    return (f"{where}: the SSH handshake failed{after} ({text}): is port {h.port} an SSH server? Check the port "
            f"and the server's log")
