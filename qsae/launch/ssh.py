"""Workers over SSH (paramiko): preflight, start, log streaming and stop of remote workers."""

from __future__ import annotations

import collections
import dataclasses
import getpass
import json
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, LaunchError

from .base import WORKER_ARGS, Launcher, WorkerConfig, _blas_env, _json_line, _Worker, log
from .hosts import HostSpec, parse_hosts
from .sshcheck import INSTALL_HINT, _fingerprint, _UnknownHostKey, explain

# --------------------------------------------------------------------------------------
# Workers over SSH
# --------------------------------------------------------------------------------------

#: sshd refuses more than MaxSessions (default 10) channels per connection: open another
#: connection to the same host for every this many workers (one session is kept for kill)
SESSIONS_PER_CONNECTION = 8

_known_hosts_lock = threading.Lock()

# Run by the remote python in prepare(): reports its version and qsae's, never raises.
_PREFLIGHT_SCRIPT = """\
import sys, json
try:
    import qsae
    v, err = qsae.__version__, None
except Exception as e:
    v, err = None, '%s: %s' % (type(e).__name__, e)
sys.stdout.write('QSAE-PREFLIGHT ' + json.dumps({'python': '%d.%d.%d' % tuple(sys.version_info[:3]),
    'executable': sys.executable, 'qsae': v, 'error': err}) + '\\n')
"""


def _host_key_policy(accept_new: bool, save_to: str | None) -> Any:
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            if not accept_new:
                raise _UnknownHostKey(hostname, key.get_name(), _fingerprint(key))
            client.get_host_keys().add(hostname, key.get_name(), key)
            log.warning("accepted the new host key of %s (%s %s)%s", hostname, key.get_name(), _fingerprint(key),
                        f", added to {save_to}" if save_to else "")
            if save_to:
                with _known_hosts_lock:  # append: several hosts connect at once
                    path = Path(save_to)
                    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    with open(path, "a", encoding="ascii") as f:
                        f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")

    return Policy()


def _remote_sh(script: str) -> str:
    """A command that runs ``script`` with /bin/sh whatever the login shell is."""
    return "exec sh -c " + shlex.quote(script)


class _Host:
    """One hosts-file line resolved against ~/.ssh/config, plus its connections."""

    def __init__(self, spec: HostSpec, hostname: str, port: int, user: str, key_filenames: list[str],
                 known_hosts_files: list[str]) -> None:
        self.spec = spec
        self.hostname, self.port, self.user = hostname, port, user
        self.key_filenames = key_filenames
        self.known_hosts_files = known_hosts_files
        self.display = f"{user}@{spec.host}"
        self.clients: list[Any] = []
        self.workers: list[_Worker] = []
        self.error: str | None = None
        self.remote_python: str | None = None
        self.abandoned = False

    @property
    def where(self) -> str:
        target = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{self.display} ({target}:{self.port})" if self.hostname != self.spec.host or self.port != 22 \
            else self.display


class SSHLauncher(Launcher):
    """Workers on remote hosts, started over SSH (paramiko).

    Parameters
    ----------
    hosts : list of HostSpec
        The hosts, e.g. from :func:`parse_hosts`.
    accept_new_host_keys : bool
        Trust hosts whose key is not yet known and append their key to the known_hosts
        file (``known_hosts`` if given, else the user's, like ``ssh -o
        StrictHostKeyChecking=accept-new``). A *changed* key is always refused.
    connect_timeout : float
        Seconds for the TCP connect, the SSH banner, authentication and the preflight
        command, each.
    min_workers : int, optional
        :meth:`prepare` succeeds if the hosts that work have at least this many workers;
        the others are logged, dropped and listed by :meth:`failures`. Default: all.
    ssh_config : str or None
        OpenSSH client configuration whose ``HostName``, ``User``, ``Port``,
        ``IdentityFile`` and ``UserKnownHostsFile`` are honoured; None for none.
    key_filename : str, optional
        A private key to try first (the ssh agent and ``~/.ssh/id_*`` are tried too).
    known_hosts : str, optional
        A known_hosts file used instead of ``~/.ssh/known_hosts`` (and of ssh_config's
        ``UserKnownHostsFile``); ``/etc/ssh/ssh_known_hosts`` is read in any case.
    args : sequence of str
        What follows the remote python on the command line; default
        ``-m qsae.worker --stdin`` (tests pass a stand-in worker script).
    agents : bool
        False (default): a line's ``workers=N`` starts N plain workers, N connections.
        True: it starts one host agent (``qsae.agent``) of N compute processes, one
        connection per host; ``n_workers`` and ``min_workers`` then count agents.

    Notes
    -----
    Each worker runs as ``exec sh -c 'echo $$; export OMP_NUM_THREADS=...; exec PYTHON
    -m qsae.worker --stdin'``: the first line of its stdout is its remote PID, which
    :meth:`stop` signals with ``kill`` over the same SSH connection (closing a channel
    does not reliably kill the remote process).
    """

    def __init__(self, hosts: Sequence[HostSpec], accept_new_host_keys: bool = False,
                 connect_timeout: float = 10.0, min_workers: int | None = None,
                 ssh_config: str | None = "~/.ssh/config", key_filename: str | None = None,
                 known_hosts: str | None = None, args: Sequence[str] = WORKER_ARGS, agents: bool = False) -> None:
        super().__init__()
        try:
            import paramiko  # noqa: F401
        except ImportError as e:  # pragma: no cover - a hard dependency
            from qsae.errors import MissingDependency

            raise MissingDependency("SSH workers need paramiko: pip install paramiko") from e
        hosts = list(hosts)
        if not hosts:
            raise ConfigError("SSHLauncher: no hosts given: pass the hosts of a hosts file (parse_hosts(path))")
        self.agents = bool(agents)
        self._procs: dict[int, int] = {}  # id of a line's spec -> its agent's compute processes
        if agents:  # one connection per host: the line's workers=N become one agent's N processes
            procs = [h.workers for h in hosts]
            hosts = [dataclasses.replace(h, workers=1) for h in hosts]
            self._procs = {id(h): n for h, n in zip(hosts, procs)}
        total = sum(h.workers for h in hosts)
        if min_workers is not None and not 1 <= min_workers <= total:
            what = f"{total} hosts, an agent each (--no-agents: a worker per process)" if agents else f"{total} workers"
            raise ConfigError(f"min_workers={min_workers}: expected 1 to {total} (the hosts list {what})")
        if connect_timeout <= 0:
            raise ConfigError(f"connect_timeout={connect_timeout}: expected a positive number of seconds")
        self.specs = hosts
        self.accept_new_host_keys = accept_new_host_keys
        self.connect_timeout = float(connect_timeout)
        self.min_workers = min_workers
        self.key_filename = os.path.expanduser(key_filename) if key_filename else None
        self.known_hosts = os.path.expanduser(known_hosts) if known_hosts else None
        self.args = tuple(args)
        self._ssh_config = self._load_ssh_config(ssh_config)
        self._hosts = [self._resolve(spec) for spec in hosts]
        displays = collections.Counter(h.display for h in self._hosts)
        for h in self._hosts:
            if displays[h.display] > 1:  # the same user@host on two ports: keep names unique
                h.display = f"{h.display}:{h.port}"
        self._good: list[_Host] = []
        self._next_host = 0  # add() places workers round-robin from here
        self._prepared = False

    @classmethod
    def from_hosts_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> SSHLauncher:
        """Build a launcher from a hosts file; ``kwargs`` as for the constructor."""
        return cls(parse_hosts(path), **kwargs)

    # -- configuration -------------------------------------------------------------

    @staticmethod
    def _load_ssh_config(path: str | None) -> Any:
        import paramiko

        if not path:
            return None
        p = Path(os.path.expanduser(path))
        if not p.exists():
            if os.path.expanduser(path) == os.path.expanduser("~/.ssh/config"):
                return None  # the default: a user without one has none
            raise ConfigError(f"ssh_config={path!r} (--ssh-config): no such file; give an OpenSSH client config, "
                              "or leave it out for ~/.ssh/config")
        try:
            return paramiko.SSHConfig.from_path(str(p))
        except Exception as e:
            raise ConfigError(f"cannot read the ssh client configuration {p}: {e}: fix it, or pass ssh_config=None") from e

    def _resolve(self, spec: HostSpec) -> _Host:
        cfg: dict[str, Any] = dict(self._ssh_config.lookup(spec.host)) if self._ssh_config else {}
        hostname = cfg.get("hostname", spec.host)
        user = spec.user or cfg.get("user") or getpass.getuser()
        try:
            port = spec.port or int(cfg.get("port", 22))
        except ValueError:
            raise ConfigError(f"ssh config: bad Port {cfg.get('port')!r} for host {spec.host}: fix ~/.ssh/config") from None
        keys = [self.key_filename] if self.key_filename else []
        for f in cfg.get("identityfile", []):
            f = os.path.expanduser(f)
            if os.path.exists(f) and f not in keys:
                keys.append(f)
        if self.known_hosts:
            known = [self.known_hosts]
        elif cfg.get("userknownhostsfile"):
            known = [os.path.expanduser(f) for f in shlex.split(cfg["userknownhostsfile"])]
        else:
            known = [os.path.expanduser("~/.ssh/known_hosts")]
        return _Host(spec, hostname, port, user, keys, known)

    @property
    def n_workers(self) -> int:
        hosts = self._good if self._prepared else self._hosts
        return sum(h.spec.workers for h in hosts)

    # -- connecting ----------------------------------------------------------------

    def _connect(self, h: _Host) -> Any:
        import paramiko

        client = paramiko.SSHClient()
        try:
            for f in ("/etc/ssh/ssh_known_hosts", *h.known_hosts_files):
                if os.path.exists(f):
                    client.load_system_host_keys(f)  # read-only: new keys are appended by the policy
            save_to = h.known_hosts_files[0] if self.accept_new_host_keys else None
            client.set_missing_host_key_policy(_host_key_policy(self.accept_new_host_keys, save_to))
            t = self.connect_timeout
            client.connect(h.hostname, port=h.port, username=h.user, key_filename=h.key_filenames or None,
                           timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t,
                           allow_agent=True, look_for_keys=True)
            transport = client.get_transport()
            transport.set_keepalive(30)
            return client
        except BaseException:
            client.close()
            raise

    def _preflight(self, h: _Host, client: Any) -> str | None:
        """Run the remote python; return None if it imports a compatible qsae, else the reason."""
        from qsae import __version__

        py = h.spec.python
        t = self.connect_timeout
        chan = client.get_transport().open_session(timeout=t)
        try:
            chan.settimeout(t)
            chan.exec_command(_remote_sh(f"exec {shlex.quote(py)} -c {shlex.quote(_PREFLIGHT_SCRIPT)}"))
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + t
            while not (chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready()):
                if time.monotonic() > deadline:
                    return (f"{h.where}: {py} -c 'import qsae' did not finish within {t:g} s: check that "
                            f"interpreter there, or raise connect_timeout")
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                else:
                    chan.status_event.wait(0.02)
            code = chan.recv_exit_status()
        finally:
            chan.close()
        stderr = err.decode("utf-8", "replace").strip()
        last = stderr.splitlines()[-1] if stderr else ""
        report = None
        for line in out.decode("utf-8", "replace").splitlines():
            if line.startswith("QSAE-PREFLIGHT "):
                try:
                    report = json.loads(line[len("QSAE-PREFLIGHT "):])
                except ValueError:
                    pass
        if report is None:
            if code == 127:
                return (f"{h.where}: python {py!r} not found ({last}): set python= in the hosts file to an "
                        f"interpreter that exists there, e.g. python=/usr/bin/python3")
            if code == 126:
                return f"{h.where}: python {py!r} is not executable ({last}): set python= in the hosts file"
            return (f"{h.where}: {py} failed (exit code {code}: {last or 'no output'}): set python= in the hosts "
                    f"file to a working Python >= 3.10")
        h.remote_python = report.get("executable") or py
        pyver = str(report.get("python", "0.0"))
        if tuple(int(x) for x in pyver.split(".")[:2]) < (3, 10):
            return (f"{h.where}: {py} is Python {pyver}, qsae needs >= 3.10: set python= in the hosts file to a "
                    f"newer interpreter")
        local_mm = __version__.split(".")[:2]
        remote = report.get("qsae")
        if remote is None:
            return (f"{h.where}: {py} cannot import qsae ({report.get('error')}): {INSTALL_HINT}, "
                    f"or set python= to an interpreter that has it")
        if str(remote).split(".")[:2] != local_mm:
            return (f"{h.where}: {py} has qsae {remote}, this master is {__version__} (major.minor must match): "
                    f"{INSTALL_HINT.replace('install it', f'install qsae {__version__}')}, or set python= to an "
                    f"interpreter that has it")
        return None

    def _prepare_host(self, h: _Host) -> None:
        client, error = None, None
        t0 = time.monotonic()
        try:
            client = self._connect(h)
            error = self._preflight(h, client)
        except BaseException as e:  # reported, never raised from a thread
            error = explain(e, h, self.connect_timeout, time.monotonic() - t0)
        if h.abandoned:  # prepare() gave up on this host already
            if client is not None:
                client.close()
            return
        h.error = error
        if error is None:
            h.clients = [client]
        elif client is not None:
            client.close()

    def prepare(self) -> None:
        """Connect to every host at once and check its python and qsae.

        Raises
        ------
        LaunchError
            One line per failed host with the reason and the fix, unless ``min_workers``
            is set and the working hosts have at least that many workers.
        """
        with self._lock:
            if self._prepared:
                return
            threads = [threading.Thread(target=self._prepare_host, args=(h,), name=f"qsae-launch preflight {h.display}",
                                        daemon=True) for h in self._hosts]
            for th in threads:
                th.start()
            # connect + banner + auth + preflight each have their own timeout
            deadline = time.monotonic() + 4 * self.connect_timeout + 5
            for th, h in zip(threads, self._hosts):
                th.join(max(0.0, deadline - time.monotonic()))
                if th.is_alive():
                    h.abandoned = True
                    h.error = f"{h.where}: no answer within {4 * self.connect_timeout + 5:g} s: check the host"
            bad = [h for h in self._hosts if h.error is not None]
            good = [h for h in self._hosts if h.error is None]
            if bad:
                have = sum(h.spec.workers for h in good)
                need = self.min_workers if self.min_workers is not None else sum(h.spec.workers for h in self._hosts)
                if not good or have < need:
                    for h in good:
                        for c in h.clients:
                            c.close()
                        h.clients = []
                    head = (f"{len(bad)} of {len(self._hosts)} hosts cannot run workers"
                            + (f" (min_workers={need}, the others have {have})" if self.min_workers else "") + ":")
                    raise LaunchError("\n".join([head, *("  " + h.error for h in bad if h.error)]))
                for h in bad:
                    log.warning("dropping host: %s", h.error)
                    self._add_failure(h.error or h.display)
            for h in good:
                log.info("%s: ready, %d worker(s), %s", h.display, h.spec.workers, h.remote_python)
            self._good = good
            self._prepared = True

    def bind_address(self) -> str:
        """The local address of the SSH connection to the first working host.

        That is the address of this machine on the route to the workers; warns if the
        hosts are reached through different local addresses.
        """
        self.prepare()
        addrs = []
        for h in self._good:
            sock = h.clients[0].get_transport().sock
            addrs.append((h.display, sock.getsockname()[0]))
        first = addrs[0][1]
        others = sorted({a for _, a in addrs if a != first})
        if others:
            log.warning("the hosts reach this machine through different local addresses (%s for %s, also %s): "
                        "binding %s; pass an explicit bind address if some workers cannot connect",
                        first, addrs[0][0], ", ".join(others), first)
        return first

    # -- starting ------------------------------------------------------------------

    def _worker_command(self, python: str, threads: int) -> str:
        env = " ".join(f"{k}={v}" for k, v in {**_blas_env(threads), "PYTHONUNBUFFERED": "1"}.items())
        argv = " ".join(shlex.quote(a) for a in (python, *self.args))
        return _remote_sh(f"echo $$; export {env}; exec {argv}")

    def _start_host(self, h: _Host, messages: list[tuple[int, dict[str, Any]]], errors: list[str]) -> None:
        # First open every channel and run every command, then collect the PIDs: sshd takes
        # ~0.1 s to run a command, so the workers of one host start in parallel.
        opened: list[tuple[_Worker, Any, dict[str, Any]]] = []
        for i, (k, message) in enumerate(messages):
            if self._stopping or self._stopped:
                break
            worker = _Worker(message["name"], k)
            worker.host = h
            t0 = time.monotonic()
            try:
                c = len(h.workers) // SESSIONS_PER_CONNECTION
                while len(h.clients) <= c:
                    h.clients.append(self._connect(h))
                opened.append((worker, self._open_channel(h, h.clients[c], worker, message), message))
            except Exception as e:
                errors.append(f"{explain(e, h, self.connect_timeout, time.monotonic() - t0)} "
                              f"({len(messages) - i} worker(s) of {h.display} not started)")
                break
        for worker, stdout, message in opened:
            try:
                self._finish_channel(h, worker, stdout, message)
            except Exception as e:
                errors.append(e.args[0] if isinstance(e, LaunchError)
                              else f"{worker.name}: {explain(e, h, self.connect_timeout)}")

    def _open_channel(self, h: _Host, client: Any, worker: _Worker, message: dict[str, Any]) -> Any:
        t = self.connect_timeout
        chan = client.get_transport().open_session(timeout=t)
        worker.channel = chan
        with self._book:
            h.workers.append(worker)
            self._workers.append(worker)
        chan.settimeout(t)
        chan.exec_command(self._worker_command(h.spec.python, message["threads"]))
        return chan.makefile("rb")

    def _finish_channel(self, h: _Host, worker: _Worker, stdout: Any, message: dict[str, Any]) -> None:
        chan = worker.channel
        first = stdout.readline().decode("ascii", "replace").strip()
        if not first.isdigit():
            raise LaunchError(f"{worker.name}: the remote shell did not report the worker's PID (got {first!r}): "
                              f"check that /bin/sh works for {h.user} there")
        worker.pid = int(first)
        chan.settimeout(None)
        chan.sendall(_json_line(message))
        self._spawn_pumps(worker, [(chan.makefile_stderr("rb"), "stderr"), (stdout, "stdout")],
                          on_eof=lambda: self._note_exit(worker, chan.recv_exit_status()))
        log.debug("%s: started, remote pid %d", worker.name, worker.pid)

    def start(self, connect: str, config: WorkerConfig) -> None:
        """Start every worker of every working host (hosts in parallel).

        Raises
        ------
        LaunchError
            Fewer workers started than required (``min_workers``, or all); the ones
            started are stopped again.
        """
        self.prepare()  # first: n_workers counts the hosts that work
        super().start(connect, config)

    def _plan(self, ks: list[int], initial: bool) -> list[tuple[_Host, list[int]]]:
        """Which host runs which new worker: each its own count at start(), round-robin after."""
        per_host: dict[int, list[int]] = {}
        if initial:
            k = 0
            for j, h in enumerate(self._good):
                per_host[j] = ks[k:k + h.spec.workers]
                k += h.spec.workers
        else:
            for k in ks:
                j = self._next_host % len(self._good)
                self._next_host += 1
                per_host.setdefault(j, []).append(k)
        return [(self._good[j], per_host[j]) for j in sorted(per_host)]

    def _launch(self, ks: list[int], connect: str, config: WorkerConfig, initial: bool) -> None:
        plan: list[tuple[_Host, list[tuple[int, dict[str, Any]]]]] = []
        for h, host_ks in self._plan(ks, initial):
            first = len(h.workers)
            plan.append((h, [(k, self._message(connect, config, k, f"{h.display}#{first + i}"))
                             for i, k in enumerate(host_ks)]))
            procs = self._procs.get(id(h.spec), 1)
            if procs > 1:  # the worker runs as the host's agent of that many compute processes
                for _, message in plan[-1][1]:
                    message["procs"] = procs
        errors: list[str] = []
        threads = [threading.Thread(target=self._start_host, args=(h, msgs, errors), daemon=True,
                                    name=f"qsae-launch start {h.display}") for h, msgs in plan]
        for th in threads:
            th.start()
        self._start_threads = threads
        for th in threads:
            th.join()
        with self._book:
            self._workers.sort(key=lambda w: w.k)
        started = sum(1 for w in self._workers if w.pid is not None and w.k in ks)
        if initial:
            need = self.min_workers if self.min_workers is not None else sum(h.spec.workers for h in self._hosts)
        else:
            need = 1
        for line in errors:
            self._add_failure(line)
        if errors:
            if started < need:
                raise LaunchError("\n".join([f"only {started} of {len(ks)} workers started, "
                                             f"{need} needed:", *("  " + e for e in errors)]))
            for line in errors:
                log.warning("%s", line)
        log.info("started %d worker(s) on %d host(s)", started, len(plan))

    # -- stopping ------------------------------------------------------------------

    def _signal(self, h: _Host, sig: str, pids: list[int]) -> None:
        """Run ``kill -SIG PIDS`` on the host over its first connection."""
        if not pids or not h.clients:
            return
        transport = h.clients[0].get_transport()
        if transport is None or not transport.is_active():
            log.warning("%s: the SSH connection is gone, cannot kill pids %s; they exit when they miss the "
                        "master's heartbeat", h.display, pids)
            return
        t = self.connect_timeout
        chan = transport.open_session(timeout=t)
        try:
            chan.settimeout(t)
            chan.exec_command(_remote_sh(f"kill -{sig} {' '.join(map(str, pids))} 2>/dev/null; exit 0"))
            chan.status_event.wait(t)
        finally:
            chan.close()

    def _is_alive(self, worker: _Worker) -> bool:
        return worker.channel is not None and not worker.channel.exit_status_ready()

    def _exit_code(self, worker: _Worker, timeout: float | None) -> int | None:
        """A worker killed by a signal reports -1 (SSH sends no code)."""
        chan = worker.channel
        if chan is None or not chan.status_event.wait(timeout):
            return worker.exit_code
        return chan.exit_status

    def _by_host(self, workers: list[_Worker]) -> dict[int, tuple[_Host, list[int]]]:
        groups: dict[int, tuple[_Host, list[int]]] = {}
        for w in workers:
            if w.pid is not None and w.host is not None:
                groups.setdefault(id(w.host), (w.host, []))[1].append(w.pid)
        return groups

    def _terminate(self, workers: list[_Worker]) -> None:
        for h, pids in self._by_host(workers).values():
            self._signal(h, "TERM", pids)

    def _kill(self, workers: list[_Worker]) -> None:
        for h, pids in self._by_host(workers).values():
            self._signal(h, "KILL", pids)

    def _start_join_timeout(self) -> float:
        return 2 * self.connect_timeout

    def _stop_host(self, h: _Host, timeout: float) -> None:
        try:
            try:
                self._terminate_grace_kill(list(h.workers), timeout, f"{h.display}: ",
                                           kill_wait=self.connect_timeout)
            except Exception as e:
                log.warning("%s: could not kill its workers (%s); they exit when they miss the master's heartbeat",
                            h.display, e)
            for w in h.workers:
                if w.channel is not None:
                    w.channel.close()
                    w.done.set()
        finally:
            for c in h.clients:
                try:
                    c.close()
                except Exception:  # pragma: no cover
                    pass
            h.clients = []

    def _stop_workers(self, timeout: float) -> None:
        """Every host at once: SIGTERM over its connection, grace, SIGKILL, close."""
        hosts = [h for h in self._hosts if h.clients or h.workers]
        threads = [threading.Thread(target=self._stop_host, args=(h, timeout), daemon=True,
                                    name=f"qsae-launch stop {h.display}") for h in hosts]
        for th in threads:
            th.start()
        deadline = time.monotonic() + timeout + 2 * self.connect_timeout + 1
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
