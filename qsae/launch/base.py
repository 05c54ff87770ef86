"""What every launcher shares: the Launcher interface, the worker message, log pumps."""

from __future__ import annotations

import abc
import atexit
import collections
import json
import logging
import signal
import subprocess
import threading
import time
import weakref
from typing import IO, Any, Callable, Iterable, Mapping, Union

from ..errors import ConfigError, LaunchError



log = logging.getLogger("qsae.launch")
_LEVELS = {name: getattr(logging, name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}

#: the arguments after PYTHON that start a worker
WORKER_ARGS: tuple[str, ...] = ("-m", "qsae.worker", "--stdin")

#: environment variables that cap the BLAS/OpenMP thread pools of a worker
BLAS_THREAD_VARS: tuple[str, ...] = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: per-worker configuration: one dict for all workers, or a function of the global worker index
WorkerConfig = Union[Mapping[str, Any], Callable[[int], Mapping[str, Any]]]


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
    """Book-keeping of one started worker (local process, srun step or SSH channel)."""

    def __init__(self, name: str, k: int) -> None:
        self.name = name
        self.k = k
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Any = None  # paramiko.Channel
        self.host: Any = None  # the SSH host that runs it
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
            launcher.add(2, "tcp://127.0.0.1:5555", config)   # two more, later
            ...

    Subclasses implement :attr:`n_workers`, :meth:`prepare`, :meth:`bind_address`,
    :meth:`_launch` (start some workers) and the hooks :meth:`_terminate`, :meth:`_kill`,
    :meth:`_is_alive` and :meth:`_exit_code`; this class keeps the books and owns the
    life cycle: start once, add any time after, stop (SIGTERM, grace, SIGKILL, reap) once.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # state changes: start/add/stop (re-entrant: stop() from a signal handler)
        self._book = threading.Lock()   # the worker and failure lists, touched by reader threads
        self._start_threads: list[threading.Thread] = []
        self._workers: list[_Worker] = []
        self._failures: list[str] = []
        self._next_k = 0  # the global index of the next worker: start() takes 0..n_workers-1, add() the rest
        self._started = False
        self._stopping = False
        self._stopped = False

    # -- the interface -------------------------------------------------------------

    @property
    @abc.abstractmethod
    def n_workers(self) -> int:
        """How many workers :meth:`start` starts."""

    @property
    def n_started(self) -> int:
        """How many workers :meth:`start` and :meth:`add` have launched so far (the next global index)."""
        return self._next_k

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

        Raises
        ------
        LaunchError
            Called twice or after :meth:`stop`, or the workers could not be started (the
            ones started are stopped again).
        """
        with self._lock:
            what = type(self).__name__
            if self._stopped:
                raise LaunchError(f"{what}.start() after stop(): create a new launcher")
            if self._started:
                raise LaunchError(f"{what}.start() called twice: create a new launcher for a new set of workers, "
                                  f"or add(n, ...) to start more")
            self._started = True
            _live_launchers.add(self)
            n = self.n_workers
            self._next_k = n
        try:
            self._launch(list(range(n)), connect, config, initial=True)
        except BaseException:
            self.stop()
            raise

    def add(self, n: int, connect: str, config: WorkerConfig) -> list[str]:
        """Start ``n`` more workers after :meth:`start`.

        Their global indices continue from :attr:`n_started`, and ``config(k)`` is called
        for each as in :meth:`start` (so each new worker can get fresh keys).

        Returns
        -------
        list of str
            The names of the workers started, in index order.

        Raises
        ------
        ConfigError
            ``n`` is not a whole number >= 1.
        LaunchError
            Before :meth:`start` or after :meth:`stop`, or there is no room for them (Slurm).
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"add(n={n!r}): expected a whole number of workers >= 1")
        with self._lock:
            what = type(self).__name__
            if self._stopped or self._stopping:
                raise LaunchError(f"{what}.add() after stop(): create a new launcher")
            if not self._started:
                raise LaunchError(f"{what}.add() before start(): start() the first workers first")
            ks = list(range(self._next_k, self._next_k + n))
            self._check_room(n)
            before = len(self._workers)
            self._next_k += n
            self._launch(ks, connect, config, initial=False)
            with self._book:
                return [w.name for w in self._workers[before:] if w.k in ks]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker: SIGTERM, ``timeout`` seconds of grace, then SIGKILL; reap them.

        Idempotent; safe to call from ``finally`` blocks, signal handlers and atexit.
        """
        with self._lock:
            if self._stopped or self._stopping:
                return
            self._stopping = True
            try:
                # start() may be running in other threads (stop() from a signal handler): they
                # check _stopping before each worker, so they end soon; then nothing is missed
                deadline = time.monotonic() + self._start_join_timeout()
                for th in self._start_threads:
                    if th is not threading.current_thread():
                        th.join(max(0.0, deadline - time.monotonic()))
                self._stop_workers(timeout)
                self._join_pumps(time.monotonic() + 2.0)
                self._release()
            finally:
                self._stopped = True
                self._stopping = False
                _live_launchers.discard(self)

    def wait(self, timeout: float | None = None) -> list[int | None]:
        """Wait until every worker has exited, or ``timeout`` seconds.

        Returns
        -------
        list of int or None
            One exit code per started worker; None for a worker still running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        codes: list[int | None] = []
        for w in list(self._workers):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            codes.append(self._exit_code(w, left))
        return codes

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
        """Names of the started workers (``local#k``, ``user@host#k``, ``slurm#k``), in start order."""
        return [w.name for w in self._workers]

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what each launcher does its own way -----------------------------------------

    @abc.abstractmethod
    def _launch(self, ks: list[int], connect: str, config: WorkerConfig, initial: bool) -> None:
        """Start the workers of global indices ``ks`` (all of start()'s when ``initial``).

        Called with the books already advanced; appends a :class:`_Worker` per worker to
        ``self._workers``; raises LaunchError when the launcher's own minimum is not met.
        """

    def _check_room(self, n: int) -> None:
        """Raise LaunchError if ``n`` more workers cannot be started (Slurm: the allocation)."""

    @abc.abstractmethod
    def _is_alive(self, worker: _Worker) -> bool:
        """Whether the worker still runs (as far as this side can tell, without blocking)."""

    @abc.abstractmethod
    def _exit_code(self, worker: _Worker, timeout: float | None) -> int | None:
        """Wait up to ``timeout`` seconds for the worker's exit code; None if it still runs."""

    @abc.abstractmethod
    def _terminate(self, workers: list[_Worker]) -> None:
        """Ask these workers to stop (SIGTERM); must not block for long."""

    @abc.abstractmethod
    def _kill(self, workers: list[_Worker]) -> None:
        """Kill these workers (SIGKILL) after they ignored :meth:`_terminate`."""

    def _start_join_timeout(self) -> float:
        return 10.0

    def _stop_workers(self, timeout: float) -> None:
        """SIGTERM every live worker, ``timeout`` s of grace, SIGKILL the rest, reap."""
        self._terminate_grace_kill(list(self._workers), timeout, "")

    def _release(self) -> None:
        """Close what the workers left open (pipes, connections); called once, at the end of stop()."""

    # -- shared machinery ------------------------------------------------------------

    def _terminate_grace_kill(self, workers: list[_Worker], timeout: float, where: str,
                              kill_wait: float = 5.0) -> None:
        """The stop sequence for one group of workers (all, or one host's)."""
        alive = [w for w in workers if w.pid is not None and self._is_alive(w)]
        if alive:
            self._terminate(alive)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            alive = [w for w in alive if self._is_alive(w)]
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if alive:
            log.warning("%s%s ignored SIGTERM for %.1f s: SIGKILL", where,
                        ", ".join(f"{w.name} (pid {w.pid})" for w in alive), timeout)
            self._kill(alive)
            deadline = time.monotonic() + kill_wait
            while any(self._is_alive(w) for w in alive) and time.monotonic() < deadline:
                time.sleep(0.02)
        for w in workers:
            code = self._exit_code(w, 0.0)
            if code is not None:
                w.exit_code = code
            w.done.set()

    def _add_failure(self, line: str) -> None:
        with self._book:
            self._failures.append(line)

    def _message(self, connect: str, config: WorkerConfig, k: int, name: str) -> dict[str, Any]:
        return _worker_message(connect, config, k, name)

    def _pump(self, worker: _Worker, stream: IO[bytes], what: str, on_eof: Callable[[], None] | None) -> None:
        """Thread body: log every line of ``stream`` as ``NAME: line``, at the level a worker's
        ``LEVEL message`` line names (INFO for any other line: a traceback, a print)."""
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if what == "stderr":
                    worker.tail.append(line)
                head, _, rest = line.partition(" ")
                level = _LEVELS.get(head)
                log.log(level or logging.INFO, "%s: %s", worker.name, rest if level else line)
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
