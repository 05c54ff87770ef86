"""Start qsae workers, on this machine or over SSH, and stop them again.

A worker is the command ``PYTHON -m qsae.worker --stdin``. Its configuration arrives as
ONE line of JSON on its stdin (never on the command line, which ``ps`` shows)::

    {"connect": "tcp://HOST:PORT", "curve": null or {...}, "name": "host#k", "threads": 1}

The launcher writes that line and keeps stdin open. Every line the worker writes to its
stderr (its log) or stdout is passed to the logger ``qsae.launch``, prefixed with the
worker's name.

Launchers
---------
:class:`LocalLauncher`
    ``n`` worker processes on this machine (``subprocess``), which die with the master
    even if it is killed with SIGKILL (Linux ``PR_SET_PDEATHSIG``).
:class:`SSHLauncher`
    workers on the hosts of a hosts file, one SSH connection per host (paramiko), one
    channel per worker.

Both follow :class:`Launcher`: ``prepare()`` (preflight), ``bind_address()``,
``start(connect, config)``, ``wait()``, ``stop()``, ``failures()``; use them as context
managers so that ``stop()`` always runs.

Hosts file format
-----------------
One host per line::

    [user@]host[:port] [workers=N] [python=/path/to/python]

- ``host`` is a name, an address, or a ``Host`` alias of ``~/.ssh/config`` (whose
  ``HostName``, ``User``, ``Port`` and ``IdentityFile`` are honoured); an IPv6 address
  with a port is written ``[::1]:22``;
- ``workers=N`` worker processes on that host (default 1, N >= 1);
- ``python=PATH`` the interpreter that has qsae installed there (default ``python3``);
- ``#`` starts a comment (a whole line, or the rest of a line after a blank);
  blank lines are ignored; values with blanks may be quoted (``python="/opt/my py/python"``).
"""

from __future__ import annotations

import abc
import atexit
import collections
import concurrent.futures
import ctypes
import ctypes.util
import dataclasses
import getpass
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Sequence, Union

from qsae.errors import ConfigError, HostsFileError, LaunchError

__all__ = [
    "HostSpec",
    "parse_hosts",
    "format_hosts_help",
    "Launcher",
    "LocalLauncher",
    "SSHLauncher",
    "WORKER_ARGS",
]

log = logging.getLogger("qsae.launch")

#: the arguments after PYTHON that start a worker
WORKER_ARGS: tuple[str, ...] = ("-m", "qsae.worker", "--stdin")

#: environment variables that cap the BLAS/OpenMP thread pools of a worker
BLAS_THREAD_VARS: tuple[str, ...] = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: per-worker configuration: one dict for all workers, or a function of the global worker index
WorkerConfig = Union[Mapping[str, Any], Callable[[int], Mapping[str, Any]]]


# --------------------------------------------------------------------------------------
# Hosts files
# --------------------------------------------------------------------------------------

_HOSTS_HELP = """\
hosts file: one host per line,
    [user@]host[:port] [workers=N] [python=/path/to/python]
e.g.
    alice@node1.example.org:2222 workers=4 python=/opt/qsae/venv/bin/python
    node2 workers=8
    [fe80::1]:22
'#' starts a comment, blank lines are ignored; host may be a Host alias of ~/.ssh/config."""


def format_hosts_help() -> str:
    """Return a short description of the hosts file format, for ``--help`` and errors.

    Returns
    -------
    str
        Several lines: the line format and an example.
    """
    return _HOSTS_HELP


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """One line of a hosts file.

    Attributes
    ----------
    user : str or None
        Login name; None means ``~/.ssh/config``'s ``User`` or the local user name.
    host : str
        Host name, address or ``~/.ssh/config`` alias.
    port : int or None
        SSH port; None means ``~/.ssh/config``'s ``Port`` or 22.
    workers : int
        Number of worker processes on this host (>= 1).
    python : str
        The remote interpreter that has qsae installed.
    """

    user: str | None
    host: str
    port: int | None = None
    workers: int = 1
    python: str = "python3"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        s = f"{self.user}@{host}" if self.user else host
        return f"{s}:{self.port}" if self.port is not None else s


_COMMENT = re.compile(r"(^|\s)#.*$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_.%-]+$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")


def _parse_port(text: str, where: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise HostsFileError(f"{where}: bad port {text!r}: expected a number from 1 to 65535")
    return int(text)


def _parse_address(token: str, where: str) -> tuple[str | None, str, int | None]:
    user = None
    if "@" in token:
        user, _, token = token.rpartition("@")
        if not _USER.match(user):
            raise HostsFileError(f"{where}: bad user name {user!r}: expected letters, digits, '.', '_' or '-'")
    port = None
    if token.startswith("["):
        host, sep, rest = token[1:].partition("]")
        if not sep or not host:
            raise HostsFileError(f"{where}: bad host {token!r}: expected [IPv6-address]:port, e.g. [fe80::1]:22")
        if rest:
            if not rest.startswith(":"):
                raise HostsFileError(f"{where}: bad host {token!r}: expected ':port' after ']'")
            port = _parse_port(rest[1:], where)
    elif token.count(":") > 1:  # a bare IPv6 address, without a port
        host = token
    else:
        host, sep, p = token.partition(":")
        if sep:
            port = _parse_port(p, where)
    if not host or (":" not in host and not _HOSTNAME.match(host)):
        raise HostsFileError(f"{where}: bad host name {host!r}: expected [user@]host[:port], e.g. alice@node1:2222")
    return user, host, port


def _parse_line(tokens: list[str], where: str) -> HostSpec:
    user, host, port = _parse_address(tokens[0], where)
    options: dict[str, Any] = {}
    for token in tokens[1:]:
        key, sep, value = token.partition("=")
        if not sep:
            raise HostsFileError(f"{where}: unexpected {token!r}: expected key=value (workers=N or python=PATH) "
                                 f"after the host")
        if key in options:
            raise HostsFileError(f"{where}: {key}= given twice: keep one")
        if key == "workers":
            if not value.isdigit() or int(value) < 1:
                raise HostsFileError(f"{where}: bad workers={value}: expected a whole number >= 1")
            options[key] = int(value)
        elif key == "python":
            if not value:
                raise HostsFileError(f"{where}: empty python=: expected the path of a Python with qsae installed")
            options[key] = value
        else:
            raise HostsFileError(f"{where}: unknown key {key!r}: expected workers=N or python=PATH")
    return HostSpec(user=user, host=host, port=port, **options)


def parse_hosts(path: str | os.PathLike[str]) -> list[HostSpec]:
    """Read a hosts file.

    Parameters
    ----------
    path : str or path-like
        The hosts file; see :func:`format_hosts_help` for its format.

    Returns
    -------
    list of HostSpec
        One per host line, in file order.

    Raises
    ------
    HostsFileError
        The file cannot be read, has no hosts, a line is malformed (the message names the
        file, the line number, the line and what was expected) or a host is listed twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise HostsFileError(f"cannot read hosts file {path}: {e.strerror or e}: check the path") from e
    except UnicodeDecodeError as e:
        raise HostsFileError(f"hosts file {path} is not UTF-8 text: {e}") from e
    hosts: list[HostSpec] = []
    seen: dict[tuple[str, int | None], int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        where = f"{path}, line {lineno}: {raw.strip()!r}"
        try:
            tokens = shlex.split(line)
        except ValueError as e:
            raise HostsFileError(f"{where}: {e}: close the quote") from None
        spec = _parse_line(tokens, where)
        key = (spec.host, spec.port)
        if key in seen:
            raise HostsFileError(f"{where}: host {spec} is already listed on line {seen[key]}: "
                                 f"use one line with workers=N")
        seen[key] = lineno
        hosts.append(spec)
    if not hosts:
        raise HostsFileError(f"hosts file {path} lists no hosts: add lines like 'user@host workers=4'\n"
                             + format_hosts_help())
    return hosts


# --------------------------------------------------------------------------------------
# Common machinery
# --------------------------------------------------------------------------------------

_live_launchers: "weakref.WeakSet[Launcher]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    for launcher in list(_live_launchers):
        try:
            launcher.stop(timeout=2.0)
        except Exception:
            pass


def _worker_message(connect: str, config: WorkerConfig, k: int, name: str) -> dict[str, Any]:
    cfg = config(k) if callable(config) else config
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the worker configuration for worker {k} is a {type(cfg).__name__}, "
                          f"expected a dict (or a function returning one)")
    message: dict[str, Any] = {"connect": connect, "curve": None, "threads": 1, **cfg, "name": name}
    threads = message["threads"]
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads={threads!r} for worker {name}: expected a whole number >= 1")
    _json_line(message)  # fail here, before anything starts
    return message


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):  # z85 keys from zmq.curve_keypair() are ASCII bytes
        return obj.decode("ascii")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _json_line(message: Mapping[str, Any]) -> bytes:
    """The worker's configuration line: one line of JSON (bytes values as ASCII strings)."""
    try:
        return (json.dumps(message, default=_json_default) + "\n").encode("utf-8")
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"the configuration of worker {message.get('name')} cannot be sent as JSON ({e}): "
                          f"use str, int, float, bool, None, lists and dicts (bytes must be ASCII)") from e


def _blas_env(threads: int) -> dict[str, str]:
    return {var: str(threads) for var in BLAS_THREAD_VARS}


class _Worker:
    """Book-keeping of one started worker (local process or SSH channel)."""

    def __init__(self, name: str, k: int) -> None:
        self.name = name
        self.k = k
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Any = None  # paramiko.Channel
        self.threads: list[threading.Thread] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=5)
        self.exit_code: int | None = None
        self.done = threading.Event()


class Launcher(abc.ABC):
    """Starts and stops a set of qsae workers.

    Use as a context manager so that :meth:`stop` always runs::

        with LocalLauncher(4) as launcher:
            launcher.prepare()
            launcher.start("tcp://127.0.0.1:5555", {"curve": None, "threads": 1})
            ...

    Subclasses implement :meth:`prepare`, :meth:`bind_address`, :meth:`start`,
    :meth:`stop` and :meth:`wait`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # state changes: start/stop (re-entrant: stop() from a signal handler)
        self._book = threading.Lock()   # the worker and failure lists, touched by reader threads
        self._start_threads: list[threading.Thread] = []
        self._workers: list[_Worker] = []
        self._failures: list[str] = []
        self._started = False
        self._stopping = False
        self._stopped = False

    # -- the interface -------------------------------------------------------------

    @property
    @abc.abstractmethod
    def n_workers(self) -> int:
        """How many workers :meth:`start` starts."""

    @abc.abstractmethod
    def prepare(self) -> None:
        """Check that workers can be started (connect, find Python and qsae).

        Raises
        ------
        LaunchError
            One line per host (or worker) that cannot work, with the reason and the fix.
        """

    @abc.abstractmethod
    def bind_address(self) -> str:
        """Return the local IP address the master should bind so that workers reach it."""

    @abc.abstractmethod
    def start(self, connect: str, config: WorkerConfig) -> None:
        """Start every worker.

        Parameters
        ----------
        connect : str
            The master's ZeroMQ endpoint, e.g. ``"tcp://10.0.0.1:5555"``.
        config : dict or callable
            The rest of the worker's JSON line (``curve``, ``threads``, ...), or a function
            ``config(k) -> dict`` of the global worker index ``k`` (0 .. n_workers-1).
            ``connect`` and ``name`` are set by the launcher; ``curve`` defaults to None
            and ``threads`` to 1.
        """

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker: SIGTERM, ``timeout`` seconds of grace, then SIGKILL.

        Idempotent; safe to call from ``finally`` blocks, signal handlers and atexit.
        """

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> list[int | None]:
        """Wait until every worker has exited, or ``timeout`` seconds.

        Returns
        -------
        list of int or None
            One exit code per started worker; None for a worker still running.
        """

    # -- shared --------------------------------------------------------------------

    def failures(self) -> list[str]:
        """Return one line per host or worker that failed to start or died early."""
        with self._book:
            return list(self._failures)

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the started workers (on their own hosts), in start order."""
        return [w.pid for w in self._workers]

    @property
    def names(self) -> list[str]:
        """Names of the started workers (``local#k``, ``user@host#k``), in start order."""
        return [w.name for w in self._workers]

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _add_failure(self, line: str) -> None:
        with self._book:
            self._failures.append(line)

    def _pump(self, worker: _Worker, stream: IO[bytes], what: str, on_eof: Callable[[], None] | None) -> None:
        """Thread body: log every line of ``stream`` as ``NAME: line``."""
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if what == "stderr":
                    worker.tail.append(line)
                log.info("%s: %s", worker.name, line)
        except Exception as e:  # closed under our feet at stop()
            if not (self._stopping or self._stopped):
                log.debug("%s: reading %s failed: %r", worker.name, what, e)
        finally:
            if on_eof is not None:
                try:
                    on_eof()
                except Exception as e:  # pragma: no cover
                    log.debug("%s: exit bookkeeping failed: %r", worker.name, e)

    def _note_exit(self, worker: _Worker, code: int | None) -> None:
        """Record a worker's exit; a non-zero exit before stop() is a failure."""
        worker.exit_code = code
        worker.done.set()
        if self._stopping or self._stopped:
            return
        if code == 0:
            log.info("%s exited (code 0)", worker.name)
            return
        last = f"; its last line: {worker.tail[-1]}" if worker.tail else ""
        if worker.proc is None and code == -1:  # SSH sends no code for a signal or a dropped connection
            how = "ended without an exit code (killed by a signal, or its SSH connection dropped)"
        elif worker.proc is not None and code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        line = f"{worker.name}: {how} before stop(){last}"
        log.warning("%s", line)
        self._add_failure(line)

    def _spawn_pumps(self, worker: _Worker, streams: Iterable[tuple[IO[bytes], str]],
                     on_eof: Callable[[], None]) -> None:
        for stream, what in streams:
            t = threading.Thread(target=self._pump, args=(worker, stream, what, on_eof if what == "stderr" else None),
                                 name=f"qsae-launch {worker.name} {what}", daemon=True)
            worker.threads.append(t)
            t.start()

    def _join_pumps(self, deadline: float) -> None:
        for w in self._workers:
            for t in w.threads:
                if t is not threading.current_thread():
                    t.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------------------
# Local workers
# --------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
        prctl.restype = ctypes.c_int
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        return prctl
    except (OSError, AttributeError):  # pragma: no cover
        return None


_prctl = _load_prctl()  # resolved here, in the parent: the child only calls it

# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so every worker is
# forked from this one long-lived thread rather than from the caller's (maybe short-lived) one.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qsae-launch-spawn")


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None]:
    prctl = _prctl

    def preexec() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the master died before prctl took effect
            os._exit(1)

    return preexec


def _qsae_root() -> str:
    """The directory that holds the ``qsae`` package this process imported."""
    return str(Path(__file__).resolve().parent.parent)


class LocalLauncher(Launcher):
    """Workers as child processes of this one.

    Parameters
    ----------
    n : int
        Number of workers (>= 1).
    python : str
        The interpreter; default the one running the master.
    env : dict, optional
        Extra environment variables for the workers, on top of a copy of ``os.environ``.
        ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` are set to
        the worker's ``threads`` (default 1), ``PYTHONUNBUFFERED=1``, and ``PYTHONPATH`` is
        prefixed with the directory of this qsae so the workers import the same code.
    args : sequence of str
        What follows ``python`` on the command line; default ``-m qsae.worker --stdin``
        (tests pass a stand-in worker script).

    Notes
    -----
    On Linux every worker gets ``PR_SET_PDEATHSIG = SIGTERM``, so it dies with the master
    even if the master is killed with SIGKILL. Workers stay in the master's process group,
    so a Ctrl-C in the terminal reaches them too.
    """

    def __init__(self, n: int, python: str = sys.executable, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = WORKER_ARGS) -> None:
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"LocalLauncher(n={n!r}): expected a whole number of workers >= 1")
        self._n = n
        self.python = python
        self.env = dict(env or {})
        self.args = tuple(args)
        self._prepared = False

    @property
    def n_workers(self) -> int:
        return self._n

    def prepare(self) -> None:
        """Check that ``python`` runs and imports qsae at this version.

        Raises
        ------
        LaunchError
            The interpreter is missing or does not import this qsae.
        """
        if self._prepared:
            return
        script = "import qsae, sys; sys.stdout.write(qsae.__version__)"
        try:
            r = subprocess.run([self.python, "-c", script], env=self._env(1), stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60)
        except FileNotFoundError:
            raise LaunchError(f"local workers: python {self.python!r} not found: pass an existing interpreter "
                              f"(python=sys.executable by default)") from None
        except PermissionError:
            raise LaunchError(f"local workers: python {self.python!r} is not executable: fix its permissions "
                              f"or pass another interpreter") from None
        except subprocess.TimeoutExpired:
            raise LaunchError(f"local workers: {self.python} -c 'import qsae' did not finish in 60 s: "
                              f"check that interpreter") from None
        if r.returncode != 0:
            err = r.stderr.decode("utf-8", "replace").strip().splitlines()
            raise LaunchError(f"local workers: {self.python} cannot import qsae ({err[-1] if err else r.returncode}): "
                              f"pip install -e . in that environment, or pass another python")
        self._prepared = True

    def bind_address(self) -> str:
        return "127.0.0.1"

    def _env(self, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(_blas_env(threads))
        env["PYTHONUNBUFFERED"] = "1"
        root = _qsae_root()
        parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        env["PYTHONPATH"] = os.pathsep.join(parts)
        return env

    def start(self, connect: str, config: WorkerConfig) -> None:
        with self._lock:
            if self._stopped:
                raise LaunchError("LocalLauncher.start() after stop(): create a new launcher")
            if self._started:
                raise LaunchError("LocalLauncher.start() called twice: create a new launcher for a new set of workers")
            self._started = True
            _live_launchers.add(self)
            messages = [_worker_message(connect, config, k, f"local#{k}") for k in range(self._n)]
            parent = os.getpid()
            try:
                for k, message in enumerate(messages):
                    if self._stopping or self._stopped:  # stop() ran from a signal handler meanwhile
                        break
                    self._start_one(k, message, parent)
            except BaseException:
                self.stop()
                raise

    def _start_one(self, k: int, message: dict[str, Any], parent: int) -> None:
        worker = _Worker(message["name"], k)
        cmd = [self.python, *self.args]
        try:
            proc = _spawner.submit(
                subprocess.Popen, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self._env(message["threads"]), close_fds=True, preexec_fn=_pdeathsig_preexec(parent),
            ).result()
        except OSError as e:
            raise LaunchError(f"{worker.name}: cannot run {shlex.join(cmd)}: {e.strerror or e}: "
                              f"check python={self.python!r}") from e
        worker.proc, worker.pid = proc, proc.pid
        if self._stopping or self._stopped:  # stop() ran meanwhile (a signal handler): not ours to keep
            proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
            return
        with self._book:
            self._workers.append(worker)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self._spawn_pumps(worker, [(proc.stderr, "stderr"), (proc.stdout, "stdout")],
                          on_eof=lambda: self._note_exit(worker, proc.wait()))
        try:
            proc.stdin.write(_json_line(message))
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            log.warning("%s: could not write its configuration (%s); it has exited", worker.name, e)
        log.debug("%s: started, pid %d", worker.name, proc.pid)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._stopped or self._stopping:
                return
            self._stopping = True
            try:
                procs = [w.proc for w in self._workers if w.proc is not None]
                for p in procs:
                    if p.poll() is None:
                        try:
                            p.terminate()
                        except OSError:  # pragma: no cover
                            pass
                deadline = time.monotonic() + max(0.0, timeout)
                for p in procs:
                    try:
                        p.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                for p in procs:
                    if p.poll() is None:
                        log.warning("local worker pid %d ignored SIGTERM for %.1f s: SIGKILL", p.pid, timeout)
                        p.kill()
                        p.wait()
                for w in self._workers:
                    if w.proc is not None:
                        for f in (w.proc.stdin,):
                            try:
                                if f is not None:
                                    f.close()
                            except OSError:
                                pass
                        w.exit_code = w.proc.returncode
                        w.done.set()
                self._join_pumps(time.monotonic() + 2.0)
                for w in self._workers:
                    if w.proc is not None:
                        for f in (w.proc.stdout, w.proc.stderr):
                            try:
                                if f is not None:
                                    f.close()
                            except OSError:
                                pass
            finally:
                self._stopped = True
                self._stopping = False
                _live_launchers.discard(self)

    def wait(self, timeout: float | None = None) -> list[int | None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        codes: list[int | None] = []
        for w in self._workers:
            assert w.proc is not None
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                codes.append(w.proc.wait(left))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes


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
                 known_hosts: str | None = None, args: Sequence[str] = WORKER_ARGS) -> None:
        super().__init__()
        try:
            import paramiko  # noqa: F401
        except ImportError as e:  # pragma: no cover - a hard dependency
            from qsae.errors import MissingDependency

            raise MissingDependency("SSH workers need paramiko: pip install paramiko") from e
        hosts = list(hosts)
        if not hosts:
            raise ConfigError("SSHLauncher: no hosts given: pass the hosts of a hosts file (parse_hosts(path))")
        total = sum(h.workers for h in hosts)
        if min_workers is not None and not 1 <= min_workers <= total:
            raise ConfigError(f"min_workers={min_workers}: expected 1 to {total} (the hosts list {total} workers)")
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
            return None
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

    def _explain(self, e: BaseException, h: _Host) -> str:
        import errno

        import paramiko

        where, t = h.where, self.connect_timeout
        if isinstance(e, _UnknownHostKey):
            return (f"{where}: unknown host key ({e.key_type} {e.fingerprint} for {e.hostname}): "
                    f"pass --accept-new-host-keys or ssh to it once to add it to known_hosts")
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
                return (f"{where}: connection refused on port {h.port}: is sshd running there, and is the port "
                        f"right (host:port in the hosts file, Port in ~/.ssh/config)?")
            return f"{where}: unreachable ({e}): check that the host is up and the network/firewall lets you in"
        if isinstance(e, ConnectionRefusedError):
            return f"{where}: connection refused on port {h.port}: is sshd running there, and is the port right?"
        if isinstance(e, (socket.timeout, TimeoutError)):
            return (f"{where}: timed out after {t:g} s: the host is down, firewalled or slow; check it, or raise "
                    f"connect_timeout")
        if isinstance(e, paramiko.SSHException) and any(
                s in str(e).lower() for s in ("banner", "no existing session", "negotiation")):
            # paramiko reports a silent server as "No existing session" when the handshake times out
            return (f"{where}: no SSH banner/handshake within {t:g} s ({e}): is port {h.port} an SSH server, and "
                    f"is the host not overloaded? Check the port, or raise connect_timeout")
        if isinstance(e, OSError):
            return f"{where}: unreachable ({e.strerror or e}): check that the host is up and reachable"
        return f"{where}: SSH failed: {type(e).__name__}: {e}"

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
            return (f"{h.where}: {py} cannot import qsae ({report.get('error')}): pip install qsae=={__version__} "
                    f"there, or set python= to an interpreter that has it")
        if str(remote).split(".")[:2] != local_mm:
            return (f"{h.where}: {py} has qsae {remote}, this master is {__version__} (major.minor must match): "
                    f"pip install qsae=={__version__} there, or set python= to an interpreter that has it")
        return None

    def _prepare_host(self, h: _Host) -> None:
        client, error = None, None
        try:
            client = self._connect(h)
            error = self._preflight(h, client)
        except BaseException as e:  # reported, never raised from a thread
            error = self._explain(e, h)
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
            try:
                c = i // SESSIONS_PER_CONNECTION
                while len(h.clients) <= c:
                    h.clients.append(self._connect(h))
                opened.append((worker, self._open_channel(h, h.clients[c], worker, message), message))
            except Exception as e:
                errors.append(f"{self._explain(e, h)} ({len(messages) - i} worker(s) of {h.display} not started)")
                break
        for worker, stdout, message in opened:
            try:
                self._finish_channel(h, worker, stdout, message)
            except Exception as e:
                reason = e.args[0] if isinstance(e, LaunchError) else f"{worker.name}: {self._explain(e, h)}"
                errors.append(reason)

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
        self.prepare()
        with self._lock:
            if self._stopped:
                raise LaunchError("SSHLauncher.start() after stop(): create a new launcher")
            if self._started:
                raise LaunchError("SSHLauncher.start() called twice: create a new launcher for a new set of workers")
            self._started = True
            _live_launchers.add(self)
            plan: list[tuple[_Host, list[tuple[int, dict[str, Any]]]]] = []
            k = 0
            for h in self._good:
                msgs = []
                for i in range(h.spec.workers):
                    msgs.append((k, _worker_message(connect, config, k, f"{h.display}#{i}")))
                    k += 1
                plan.append((h, msgs))
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
        started = sum(1 for w in self._workers if w.pid is not None)
        need = self.min_workers if self.min_workers is not None else sum(h.spec.workers for h in self._hosts)
        for line in errors:
            self._add_failure(line)
        if errors:
            if started < need:
                self.stop()
                raise LaunchError("\n".join([f"only {started} of {self.n_workers} workers started, "
                                             f"{need} needed:", *("  " + e for e in errors)]))
            for line in errors:
                log.warning("%s", line)
        log.info("started %d worker(s) on %d host(s)", started, len(self._good))

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

    def _stop_host(self, h: _Host, timeout: float) -> None:
        try:
            alive = lambda: [w for w in h.workers if w.pid is not None and not w.channel.exit_status_ready()]
            try:
                self._signal(h, "TERM", [w.pid for w in alive()])
                deadline = time.monotonic() + max(0.0, timeout)
                while alive() and time.monotonic() < deadline:
                    time.sleep(0.02)
                left = alive()
                if left:
                    log.warning("%s: pids %s ignored SIGTERM for %.1f s: SIGKILL", h.display,
                                [w.pid for w in left], timeout)
                    self._signal(h, "KILL", [w.pid for w in left])
                    deadline = time.monotonic() + self.connect_timeout
                    while alive() and time.monotonic() < deadline:
                        time.sleep(0.02)
            except Exception as e:
                log.warning("%s: could not kill its workers (%s); they exit when they miss the master's heartbeat",
                            h.display, e)
            for w in h.workers:
                if w.channel is not None:
                    if w.channel.exit_status_ready():
                        w.exit_code = w.channel.exit_status
                    w.channel.close()
                    w.done.set()
        finally:
            for c in h.clients:
                try:
                    c.close()
                except Exception:  # pragma: no cover
                    pass
            h.clients = []

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._stopped or self._stopping:
                return
            self._stopping = True
            try:
                # start() may be running in other threads (stop() from a signal handler): they
                # check _stopping before each worker, so they end soon; then nothing is missed
                deadline = time.monotonic() + 2 * self.connect_timeout
                for th in self._start_threads:
                    if th is not threading.current_thread():
                        th.join(max(0.0, deadline - time.monotonic()))
                hosts = [h for h in self._hosts if h.clients or h.workers]
                threads = [threading.Thread(target=self._stop_host, args=(h, timeout), daemon=True,
                                            name=f"qsae-launch stop {h.display}") for h in hosts]
                for th in threads:
                    th.start()
                deadline = time.monotonic() + timeout + 2 * self.connect_timeout + 1
                for th in threads:
                    th.join(max(0.0, deadline - time.monotonic()))
                self._join_pumps(time.monotonic() + 2.0)
            finally:
                self._stopped = True
                self._stopping = False
                _live_launchers.discard(self)

    def wait(self, timeout: float | None = None) -> list[int | None]:
        """Wait for the workers' exit; a worker killed by a signal reports -1 (SSH sends no code)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        codes: list[int | None] = []
        for w in self._workers:
            chan = w.channel
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if chan is None or not chan.status_event.wait(left):
                codes.append(w.exit_code)
            else:
                codes.append(chan.exit_status)
        return codes
