"""A real OpenSSH server for tests: ``/usr/sbin/sshd -D -e`` on 127.0.0.1 at a free port.

    with SSHServer(tmp_path) as server:
        server.alias                # a Host alias in server.ssh_config -> 127.0.0.1:port
        server.known_hosts          # has the server's host key for [127.0.0.1]:port
        server.client_key           # private key listed in server.authorized_keys

It runs as the current user (root in CI), with its own host key, client key,
authorized_keys, known_hosts and ssh_config in a temporary directory. Everything is
terminated and reaped on exit. :func:`require_sshd` skips a test when sshd is missing,
or fails it when ``CI=true`` (CI must install openssh-server).
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"


def require_sshd() -> None:
    """Skip (or, with CI=true, fail) the calling test if OpenSSH's sshd is not installed."""
    if os.access(SSHD, os.X_OK) and _which(SSH_KEYGEN):
        return
    reason = f"{SSHD} or {SSH_KEYGEN} not found: install openssh-server (apt-get install openssh-server)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "qsae-test") -> Path:
    """Generate an unencrypted ed25519 key pair at ``path`` (and ``path``.pub)."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return path


class SSHServer:
    """OpenSSH's sshd on 127.0.0.1 with generated keys; a context manager.

    Parameters
    ----------
    root : Path
        An empty directory for the keys, configuration files and log.
    alias : str
        The ``Host`` alias written to :attr:`ssh_config`.
    start_timeout : float
        Seconds to wait until sshd accepts connections.
    """

    def __init__(self, root: Path, alias: str = "qsae-test-host", start_timeout: float = 15.0) -> None:
        self.root = Path(root)
        self.alias = alias
        self.user = getpass.getuser()
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key = self.root / "ssh_host_ed25519_key"
        self.client_key = self.root / "id_client"
        self.authorized_keys = self.root / "authorized_keys"
        self.known_hosts = self.root / "known_hosts"
        self.ssh_config = self.root / "ssh_config"
        self.sshd_config = self.root / "sshd_config"
        self.log = self.root / "sshd.log"

    # -- setup ---------------------------------------------------------------------

    def _write_files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.host_key.exists():
            keygen(self.host_key, "qsae-test-host")
            keygen(self.client_key, "qsae-test-client")
            self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
            os.chmod(self.authorized_keys, 0o600)
        self.sshd_config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "MaxStartups 100\n"
            "LogLevel VERBOSE\n"
        )
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_public_key()}\n")
        self.ssh_config.write_text(
            f"Host {self.alias}\n"
            "    HostName 127.0.0.1\n"
            f"    Port {self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.client_key}\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
        )

    def host_public_key(self) -> str:
        """``TYPE BASE64`` of the server's host key (a known_hosts entry without the host)."""
        return " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])

    def add_alias(self, alias: str, **options: str) -> None:
        """Append another ``Host`` block for this server, e.g. with another IdentityFile."""
        lines = [f"Host {alias}", "    HostName 127.0.0.1", f"    Port {self.port}", f"    User {self.user}"]
        lines += [f"    {k} {v}" for k, v in options.items()]
        with open(self.ssh_config, "a") as f:
            f.write("\n".join(lines) + "\n")

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> SSHServer:
        """Start sshd and wait until it answers with an SSH banner."""
        require_sshd()
        if os.geteuid() == 0:  # privilege separation directory
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        last = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            self._write_files()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.sshd_config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if self._wait_ready():
                return self
            last = self.log.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"sshd did not start on 127.0.0.1 within {self.start_timeout} s; its log:\n{last}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.settimeout(2.0)
                    if s.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Terminate sshd (and so its connections) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def two_aliases(root: Path):
    """A started server reachable as ``node1`` and ``node2`` (two "hosts" of a hosts file), for
    a module-scoped fixture: ``yield from two_aliases(tmp_path_factory.mktemp("sshd"))``."""
    require_sshd()
    with SSHServer(root, alias="node1") as server:
        server.add_alias("node2", IdentityFile=str(server.client_key), UserKnownHostsFile=str(server.known_hosts))
        yield server
