"""Local workers: child processes in their own session that die with the master (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError, LaunchError

from .base import WORKER_ARGS, Launcher, WorkerConfig, _blas_env, _json_line, _Worker, log

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
    return str(Path(__file__).resolve().parents[2])  # qsae/launch/local.py -> the folder holding qsae/


class ChildProcessLauncher(Launcher):
    """Workers as child processes of this one, each fed its JSON line on its stdin.

    The machinery shared by :class:`LocalLauncher` (the child is the worker) and
    ``SlurmLauncher`` (the child is the ``srun`` that runs the worker): subclasses give
    :meth:`_command` and :meth:`_name`.

    Every child runs in its own session (``start_new_session``), so a Ctrl-C in the
    terminal reaches only the master, which then stops the workers itself; and on Linux
    it gets ``PR_SET_PDEATHSIG = SIGTERM``, so it dies with the master even if the master
    is killed with SIGKILL.
    """

    def __init__(self, python: str = sys.executable, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = WORKER_ARGS) -> None:
        super().__init__()
        self.python = python
        self.env = dict(env or {})
        self.args = tuple(args)

    def _command(self, message: dict[str, Any]) -> list[str]:
        """The argv of the child that runs the worker of ``message``."""
        return [self.python, *self.args]

    def _name(self, k: int) -> str:
        """The name of worker ``k`` (its log prefix)."""
        return f"local#{k}"

    def _env(self, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(_blas_env(threads))
        env["PYTHONUNBUFFERED"] = "1"
        root = _qsae_root()
        parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        env["PYTHONPATH"] = os.pathsep.join(parts)
        return env

    def _launch(self, ks: list[int], connect: str, config: WorkerConfig, initial: bool) -> None:
        messages = [self._message(connect, config, k, self._name(k)) for k in ks]  # all checked before any starts
        parent = os.getpid()
        for k, message in zip(ks, messages):
            if self._stopping or self._stopped:  # stop() ran from a signal handler meanwhile
                break
            self._start_one(k, message, parent)

    def _start_one(self, k: int, message: dict[str, Any], parent: int) -> None:
        worker = _Worker(message["name"], k)
        cmd = self._command(message)
        try:
            proc = _spawner.submit(
                subprocess.Popen, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self._env(message["threads"]), close_fds=True, start_new_session=True,
                preexec_fn=_pdeathsig_preexec(parent),
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

    # -- stopping --------------------------------------------------------------------

    def _is_alive(self, worker: _Worker) -> bool:
        return worker.proc is not None and worker.proc.poll() is None

    def _exit_code(self, worker: _Worker, timeout: float | None) -> int | None:
        assert worker.proc is not None
        try:
            return worker.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _terminate(self, workers: list[_Worker]) -> None:
        for w in workers:
            try:
                assert w.proc is not None
                w.proc.terminate()
            except OSError:  # pragma: no cover - gone meanwhile
                pass

    def _kill(self, workers: list[_Worker]) -> None:
        for w in workers:
            try:
                assert w.proc is not None
                w.proc.kill()
            except OSError:  # pragma: no cover
                pass

    def _stop_workers(self, timeout: float) -> None:
        super()._stop_workers(timeout)
        for w in self._workers:  # stdin last: a worker reads EOF on it as "stop" too
            _close(w.proc.stdin if w.proc is not None else None)

    def _release(self) -> None:
        for w in self._workers:
            if w.proc is not None:
                _close(w.proc.stdout)
                _close(w.proc.stderr)


def _close(f: Any) -> None:
    try:
        if f is not None:
            f.close()
    except OSError:
        pass


class LocalLauncher(ChildProcessLauncher):
    """Workers as child processes of this one.

    Parameters
    ----------
    n : int
        Number of workers :meth:`start` starts (>= 1); :meth:`add` starts more.
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
    procs : int
        Compute processes of each of the ``n``: 1 (default) starts plain workers, more starts
        ``n`` host agents (``qsae.agent``) of ``procs`` forked processes each, one connection
        to the master per agent. ``LocalLauncher(1, procs=P)`` is one machine's agent.

    Notes
    -----
    Each worker runs in its own session, so a Ctrl-C in the terminal reaches only the
    master, which stops the workers with SIGTERM (they say goodbye and exit 0). On Linux
    every worker gets ``PR_SET_PDEATHSIG = SIGTERM``, so it dies with the master even if
    the master is killed with SIGKILL.
    """

    def __init__(self, n: int, python: str = sys.executable, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = WORKER_ARGS, procs: int = 1) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"LocalLauncher(n={n!r}): expected a whole number of workers >= 1")
        if not isinstance(procs, int) or isinstance(procs, bool) or procs < 1:
            raise ConfigError(f"LocalLauncher(procs={procs!r}): expected a whole number of processes >= 1")
        super().__init__(python, env, args)
        self._n, self.procs = n, procs
        self._prepared = False

    @property
    def n_workers(self) -> int:
        return self._n

    def _message(self, connect: str, config: WorkerConfig, k: int, name: str) -> dict[str, Any]:
        message = super()._message(connect, config, k, name)
        if self.procs > 1:  # the worker runs as an agent of that many compute processes
            message["procs"] = self.procs
        return message

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
