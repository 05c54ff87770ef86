"""A training run: optimizer over an objective, progress lines, and the files a run leaves.

The objective is any f(θ) -> (cost, grad): ``cost_and_grad`` on in-process patches, or a
``Master`` whose workers hold the shards. A run writes into its output directory:

    model.npz       θ, the model settings and the data spec (checkpointed atomically)
    history.jsonl   one line per completed iteration: iteration, seconds, cost, |grad|
    filters.png     the hidden units' input weights as 8×8 tiles
    cost.png        cost against seconds, the whole run (read from history.jsonl)

Ctrl-C (SIGINT) and SIGTERM end the run after saving the last completed iteration's θ and
its history line. A resumed run appends to history.jsonl and its seconds go on from the
checkpoint's (model.npz keeps the elapsed seconds).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DataError, OutputError, QsaeError, WorkerLost
from .model import SAEConfig

__all__ = ["RunSpec", "check_size", "load_model", "lock_run", "memory_needed", "read_history", "save_model", "train"]

log = logging.getLogger("qsae.train")

Objective = Callable[[np.ndarray], "tuple[float, np.ndarray]"]


@dataclass
class RunSpec:
    """What a run trains and where its files go."""

    config: SAEConfig
    data: dict  # DataSpec.to_dict(): how the patches are made, so the run can be rebuilt
    method: str = "lbfgs"  # lbfgs | cg | sgd
    maxiter: int = 400  # optimizer iterations
    out: Path = Path("runs/latest")  # output directory
    checkpoint_every: int = 10  # iterations between model.npz checkpoints
    start_iteration: int = 0  # > 0 when resuming: iterations already done (history is appended)
    start_seconds: float = 0.0  # > 0 when resuming: seconds the run had taken (history's clock goes on)
    options: dict = field(default_factory=dict)  # extra optimizer options (sgd's sampler, ...)
    meta: dict = field(default_factory=dict)  # saved in model.npz beside the rest (sigma, dtype, ...)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temporary file in the same directory, fsync, then rename over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600: readable like the other outputs (0644)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (read without changing it where /proc says it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def save_model(path: str | os.PathLike, theta: np.ndarray, config: SAEConfig, data: dict, **meta: Any) -> Path:
    """Save θ, the config and the data spec to ``path`` (.npz) atomically."""
    path = Path(path)
    header = json.dumps({"config": config.to_dict(), "data": data, **meta})
    _atomic_write(path, lambda f: np.savez(f, theta=theta, meta=np.array(header)))
    return path


def load_model(path: str | os.PathLike) -> tuple[np.ndarray, SAEConfig, dict]:
    """Load (θ, config, meta) written by ``save_model``; meta holds "data" and the rest.

    Raises
    ------
    DataError
        The file is missing, truncated, not an .npz, or not one ``save_model`` wrote (no
        θ or settings, θ of the wrong size); one line naming the file.
    """
    path = Path(path)
    expected = "expected a model.npz written by qsae-master or SparseAutoencoder.save"
    if not path.is_file():
        raise DataError(f"{path}: no such file; {expected}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):  # a plain .npy array, not an archive
                raise ValueError("a single array, not an .npz archive")
            missing = [k for k in ("theta", "meta") if k not in z.files]
            if missing:
                raise ValueError(f"it has no {' or '.join(missing)} (it holds {sorted(z.files)})")
            theta, meta = np.asarray(z["theta"], dtype=np.float64), json.loads(str(z["meta"]))
        config = SAEConfig.from_dict(meta.pop("config"))
    except DataError:
        raise
    except Exception as e:  # BadZipFile, EOFError, pickled or text content, bad JSON, bad settings, ...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "allow_pickle" in detail or "pickled" in detail:  # numpy read a text or pickle file as a pickle
            detail = "not an .npz archive"
        raise DataError(f"cannot read {path} as a qsae model ({detail}): is it truncated or another file? "
                        f"{expected}") from None
    if theta.shape != (config.n_params,):
        raise DataError(f"{path}: θ has shape {theta.shape} but its settings need ({config.n_params},): the file is "
                        f"damaged; {expected}")
    return theta, config, meta


# ---------------------------------------------------------------------- sizes (checked before anything starts)
LBFGS_MEMORY = 10  # scipy L-BFGS-B's maxcor as optim.minimize sets it: correction pairs kept
_INT32_MAX = 2**31 - 1  # scipy's L-BFGS-B indexes its workspace with C ints: past this it writes out of bounds
WORKER_BASELINE = 160 << 20  # bytes a worker holds before any data (Python, numpy, numba): 159 MiB measured
SIGMA_SAMPLE_BYTES = 2 * 8  # per pixel of σ's reference sample: the float64 patches and their mean-free copy


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def lbfgs_limit(maxcor: int = LBFGS_MEMORY) -> int:
    """The most parameters scipy's L-BFGS-B takes: its workspace, (2·maxcor + 5)·n + 11·maxcor² +
    8·maxcor doubles, is indexed with 32-bit ints (100M parameters crashed it with SIGSEGV)."""
    return (_INT32_MAX - 11 * maxcor * maxcor - 8 * maxcor) // (2 * maxcor + 5)


def memory_needed(config: SAEConfig, m: int, dtype: str = "float64", method: str = "lbfgs",
                  workers: int | None = None, rounds: int = 1) -> tuple[int, int]:
    """(bytes per worker, bytes on the master) a run needs at least, from the sizes alone.

    A worker (``workers`` of them; None: the cost is computed in this process) holds its share
    of the m rows (n values each) and, with the exact protocol in two ``rounds``, their hidden
    activations between the rounds (h + 1 values each), besides ``WORKER_BASELINE``. In this
    process (``--local``, and SGD's sampler) the patches are built in float64 and then cast. The optimizer keeps
    vectors of θ: L-BFGS 2·maxcor + 5 of them, CG and SGD about 5.
    """
    n, h = config.n_visible, config.n_hidden
    size = np.dtype(dtype).itemsize
    sigma = 10_000 * n * SIGMA_SAMPLE_BYTES  # data.SIGMA_SAMPLE patches, once on every process
    vectors = (2 * LBFGS_MEMORY + 5) if method == "lbfgs" else 5
    master = vectors * config.n_params * 8 + sigma
    in_process = workers is None or method == "sgd"
    if in_process:
        master += m * n * 8 + (m * n * size if size != 8 else 0) + m * (h + 1) * size
    per_worker = 0
    if workers:
        kept = h + 1 if rounds == 2 else 0
        per_worker = WORKER_BASELINE + sigma + -(-m // workers) * (n + kept) * size
    return per_worker, master


def check_size(config: SAEConfig, m: int, dtype: str = "float64", method: str = "lbfgs",
               workers: int | None = None, local_workers: bool = True) -> None:
    """Refuse, before anything starts, a run that cannot work for its size alone.

    Parameters
    ----------
    config, m, dtype, method : the model, the number of patches, their dtype, the optimizer.
    workers : how many workers share the rows (None: computed in this process).
    local_workers : the workers run on this machine (their memory adds up here); for workers
        on other hosts only this process's own share is judged here (each worker checks its
        blocks against its own host's memory when it cuts them).

    Raises
    ------
    ConfigError
        Too many parameters for scipy's L-BFGS (it would crash) or for a message to the
        workers, or more memory than this machine has; the message gives the sizes and the fix.
    """
    from .errors import ConfigError
    from .protocol import MAX_ARRAY_BYTES

    side = int(round(config.n_visible ** 0.5))
    what = (f"--hidden {config.n_hidden} with --patch-size {side} makes {config.n_params:,} parameters "
            f"(2·{config.n_visible}·{config.n_hidden} + {config.n_hidden} + {config.n_visible})")
    if method == "lbfgs" and config.n_params > lbfgs_limit():
        raise ConfigError(f"{what}; scipy's L-BFGS takes at most {lbfgs_limit():,} (its workspace is indexed with "
                          "32-bit integers and it would crash): give fewer --hidden units or a smaller --patch-size")
    if workers and config.n_params * 8 > MAX_ARRAY_BYTES:
        raise ConfigError(f"{what}; θ ({_gib(config.n_params * 8)}) is over the {MAX_ARRAY_BYTES >> 20} MiB a "
                          "message to the workers carries: give fewer --hidden units or a smaller --patch-size, "
                          "or --local")
    total = physical_memory()
    if total is None:
        return
    per_worker, master = memory_needed(config, m, dtype, method, workers)
    here = master + (per_worker * workers if workers and local_workers else 0)
    if here <= total:
        return
    if workers and local_workers:
        need = f"about {_gib(per_worker)} per worker, {_gib(here)} in all on this machine ({workers} workers)"
    elif workers:
        need = f"about {_gib(master)} on the master (and {_gib(per_worker)} per worker)"
    else:
        need = f"about {_gib(master)} in this process"
    raise ConfigError(f"--patches {m:,} of {side}×{side} patches in {dtype} with {config.n_hidden} hidden units "
                      f"({method}) need {need}, but this machine has {_gib(total)} of memory: give fewer --patches"
                      + (", --dtype float32" if np.dtype(dtype).itemsize > 4 else "")
                      + ", or spread the rows over more hosts (--hosts, --slurm)")


# ---------------------------------------------------------------------- one process per run folder
LOCK_FILE = "run.lock"  # in the run folder: who writes it (pid, host, start); the OS lock dies with the process


def lock_run(out: str | os.PathLike):
    """Take the run folder's lock for this process; returns the open lock file (keep it open).

    ``fcntl.flock`` on ``DIR/run.lock``: the OS releases it when the process ends, however
    it ends (kill -9 included), so a stale file never blocks a run. The file says who holds
    the lock, for the message another process gets.

    Raises
    ------
    RunLocked
        Another process holds the lock; the message names its pid, host and start time.
    """
    import fcntl
    import socket
    from datetime import datetime, timezone

    from .errors import RunLocked

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        text = f.read()
        f.close()
        try:
            who = json.loads(text)
            holder = f"pid {who['pid']} on {who['host']}, started {who['started']}"
        except (ValueError, KeyError, TypeError):
            holder = "another process"
        raise RunLocked(f"{out} is in use: {holder} is writing this run; wait for it to end (or stop it), or give "
                        "another --out") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}) + "\n")
    f.flush()
    return f


def read_history(path: str | os.PathLike) -> list[dict]:
    """The lines of a run's history.jsonl (an empty list when there is none).

    A last line cut short (the process killed while writing it) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m: a short, readable length of time."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def train(objective: Objective | None, theta0: np.ndarray, spec: RunSpec, echo: Callable[[str], None] = print,
          dashboard=None, say: Callable[[str], None] = print):
    """Run the optimizer, printing a line per iteration and saving the run's files.

    Returns the optimizer's result; on Ctrl-C or SIGTERM the result of the last completed
    iteration (its message says so) after everything has been saved. ``finished`` in
    model.npz is true for a run that ended by itself (converged or ran its iterations).

    ``dashboard``: a started ``qsae.dashboard.Dashboard`` to feed, or an address
    ("127.0.0.1:0") to start one for this call (its URL is echoed; closed at the end).
    """
    from .optim import minimize

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    hist_path = out / "history.jsonl"
    k0, s0 = spec.start_iteration, float(spec.start_seconds)
    if k0:  # lines past the checkpoint (a kill -9 between checkpoints) are redone: drop them
        kept = [h for h in read_history(hist_path) if h["iteration"] <= k0]
        _atomic_write(hist_path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in kept)), mode="w")
    hist_file = open(hist_path, "a" if k0 else "w")
    best = {"theta": np.array(theta0, dtype=float), "iteration": None, "seconds": s0, "cost": float("nan")}
    saved = {"iteration": k0 if k0 else None}  # the iteration model.npz holds (what a failure leaves intact)
    terminated = []
    evaluating = [False]  # SIGTERM inside an evaluation stops it at once (it may take minutes)
    board, own_board = _dashboard(dashboard, echo)
    if board is not None:
        objective = board_feed(board, objective, spec, read_history(hist_path))

    def checkpoint(theta: np.ndarray, iteration: int, seconds: float, finished: bool) -> None:
        save_model(
            out / "model.npz", theta, spec.config, spec.data,
            optimizer=spec.method, iteration=iteration, seconds=seconds, finished=finished, **spec.meta,
        )
        saved["iteration"] = iteration

    def write_line(it: int, secs: float, cost: float, gnorm: float) -> None:
        hist_file.write(json.dumps({"iteration": it, "seconds": secs, "cost": cost, "grad_norm": gnorm}) + "\n")
        hist_file.flush()

    def on_iteration(info) -> None:
        if k0 and info.iteration == 0:
            return  # the resumed start point is the checkpoint's last line already
        it, cost, gnorm, secs = k0 + info.iteration, info.cost, info.grad_norm, s0 + info.seconds
        write_line(it, secs, cost, gnorm)  # first: Ctrl-C in what follows loses no line
        best.update(theta=np.array(info.x, dtype=float), iteration=it, seconds=secs, cost=cost)
        if board is not None:  # a few appends under a lock; the page renders in its own thread
            board.iteration(it, secs, cost, gnorm, best["theta"])
        eta = ""
        if info.iteration > 0 and spec.maxiter > info.iteration:
            eta = f"  eta {_duration(info.seconds / info.iteration * (spec.maxiter - info.iteration))}"
        echo(f"iter {it:5d}  cost {cost:.8f}  |grad| {gnorm:.3e}  {secs:8.2f} s{eta}")
        if spec.checkpoint_every and it % spec.checkpoint_every == 0:
            checkpoint(best["theta"], it, secs, False)
        if terminated:
            raise StopIteration  # the optimizer returns the current θ

    def on_sigterm(signum, frame) -> None:
        """Save the last good θ first (Slurm kills KillWait seconds after SIGTERM), then stop."""
        terminated.append(signum)
        if best["iteration"] is not None and saved["iteration"] != best["iteration"]:
            try:
                checkpoint(best["theta"], best["iteration"], best["seconds"], False)
            except OSError:  # the disk is full: the error comes with the next write, naming it
                pass
        if evaluating[0]:
            raise _Terminated  # the optimizer returns the last completed iteration

    def evaluate(theta):
        evaluating[0] = True
        try:
            return objective(theta)
        finally:
            evaluating[0] = False

    old = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    t0 = time.perf_counter()
    try:
        result = minimize(None if objective is None else evaluate, theta0, method=spec.method, maxiter=spec.maxiter,
                          callback=on_iteration, **spec.options)
    except QsaeError as e:  # NaN from a worker, every worker lost, ...: keep the last good θ
        if isinstance(e, WorkerLost) and _main_thread():
            _await_signal(terminated, STOP_GRACE)  # workers said BYE to a shutdown (scancel) the master hears next
        if terminated:  # a stop, not a failure: the workers left because everything is stopping
            result = _stopped_result(best, k0, s0)
        else:
            if best["iteration"] is not None and saved["iteration"] != best["iteration"]:
                try:
                    checkpoint(best["theta"], best["iteration"], best["seconds"], False)
                except OSError as w:
                    e.add_note(_intact(out, saved["iteration"], w))
            if saved["iteration"] is not None:  # none completed: nothing worth a model.npz
                e.add_note(f"the last good θ (iteration {saved['iteration']}) is saved in {out / 'model.npz'}; "
                           f"continue with --resume {out}")
            if board is not None:
                board.end(f"failed: {e}")
            raise
    except OSError as e:  # disk full, ...: model.npz is written atomically, the last checkpoint is whole
        raise OutputError(_intact(out, saved["iteration"], e)) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        try:
            hist_file.close()
        except OSError:  # its last line did not fit: the resume drops lines past the checkpoint anyway
            pass
        if own_board:
            board.close()
    if terminated:
        result.message, result.status, result.success = "stopped by SIGTERM", 99, False
    finished = result.status not in (99, 130)  # ended by itself: converged, or ran its iterations
    try:
        _complete_history(hist_path, result, k0, s0)
        checkpoint(result.x, k0 + result.nit, s0 + (result.history[-1][1] if result.history else 0.0), finished)
        _pictures(out, result, spec.config)
    except OSError as e:
        raise OutputError(_intact(out, saved["iteration"], e)) from None
    if board is not None and not own_board:
        board.end(result.message, (k0 + result.nit, np.array(result.x, dtype=float)))
    session = f" ({result.nit} in this session)" if k0 else ""  # a resumed run counts all its iterations
    say(f"{str(result.message).rstrip('.')}: {k0 + result.nit} iterations{session}, {result.nfev} evaluations, "
        f"cost {result.fun:.8f}, {time.perf_counter() - t0:.1f} s; wrote {out}/model.npz, filters.png, cost.png, "
        "history.jsonl")
    return result


class _Terminated(KeyboardInterrupt):
    """SIGTERM during an evaluation: ends it like Ctrl-C (the optimizer keeps the last iteration)."""


STOP_GRACE = 2.0  # seconds a "every worker is lost" waits for the SIGTERM of the same shutdown (scancel
#                   signals every step at once: the workers' BYEs can reach the master before its own signal)


def _await_signal(terminated: list, seconds: float) -> None:
    """Sleep up to ``seconds`` (signal handlers run meanwhile) unless a SIGTERM came already."""
    deadline = time.monotonic() + seconds
    while not terminated and time.monotonic() < deadline:
        time.sleep(0.05)


def _stopped_result(best: dict, k0: int, s0: float):
    """The result of a run stopped by SIGTERM while its workers left: the last completed iteration."""
    from .optim import OptimizeResult

    it = best["iteration"]
    history = [] if it is None else [(it - k0, best["seconds"] - s0, best["cost"])]
    return OptimizeResult(best["theta"], best["cost"], None, 0 if it is None else it - k0, 0, False, 99,
                          "stopped by SIGTERM", history)


def _intact(out: Path, iteration: int | None, e: OSError) -> str:
    """One line: what could not be written, why, and what is intact."""
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    kept = (f"the last checkpoint, {out / 'model.npz'} at iteration {iteration}, is intact: free some space and "
            f"continue with --resume {out}" if iteration is not None else
            "no checkpoint was written yet: free some space and start again")
    return f"cannot write the run's files{where} ({e.strerror or e}); {kept}"


def _dashboard(dashboard, echo: Callable[[str], None]):
    """(board, started here): a Dashboard given, or one started from an address."""
    if dashboard is None or dashboard is False:
        return None, False
    if isinstance(dashboard, str):
        from .dashboard import Dashboard

        board = Dashboard(dashboard).start()
        echo(f"dashboard: {board.url}")
        return board, True
    return dashboard, False


def board_feed(board, objective: Objective, spec: RunSpec, history: list[dict]) -> Objective:
    """Tell ``board`` of the run (settings, earlier history) and return the objective wrapped
    to count evaluations and, for a Master, to publish its workers' table now and then."""
    from .dashboard import WORKERS_EVERY

    meta = spec.meta
    board.settings(model=spec.config.to_dict(), data=spec.data, optimizer=spec.method, dtype=meta.get("dtype"),
                   protocol=getattr(getattr(objective, "reducer", None), "name", None) or meta.get("protocol"),
                   iterations=spec.start_iteration + spec.maxiter, out=str(spec.out))
    board.begin(spec.start_iteration + spec.maxiter, spec.start_iteration,
                [h for h in history if h["iteration"] <= spec.start_iteration] if spec.start_iteration else [],
                spec.config)
    status = getattr(objective, "status", None)
    count, last = [0], [0.0]

    def counted(theta: np.ndarray):
        out = objective(theta)
        count[0] += 1
        board.evaluations(count[0])
        now = time.monotonic()
        if status is not None and now - last[0] >= WORKERS_EVERY:  # ~10 µs for a few workers
            last[0] = now
            board.workers(status(), getattr(objective, "backups_by", None))
        return out

    return counted


def _complete_history(path: Path, result, k0: int, s0: float) -> None:
    """Append the iterations the optimizer completed but the callback did not write (a
    Ctrl-C between closing an iteration and writing its line)."""
    written = read_history(path)
    last = written[-1]["iteration"] if written else -1
    missing = [(k0 + it, s0 + secs, cost) for it, secs, cost in result.history if k0 + it > last and (it or not k0)]
    if not missing:
        return
    gnorm = float(np.linalg.norm(result.jac)) if result.jac is not None else float("nan")
    with open(path, "a") as f:
        for it, secs, cost in missing:
            g = gnorm if it == k0 + result.nit else float("nan")
            f.write(json.dumps({"iteration": it, "seconds": secs, "cost": cost, "grad_norm": g}) + "\n")


def _pictures(out: Path, result, config: SAEConfig) -> None:
    try:
        from .viz import save_cost_curves, save_filters
    except ImportError as e:  # pictures are a convenience; the model is already saved
        log.warning("no pictures: %s", e)
        return
    save_filters(result.x, config, out / "filters.png")
    history = [(h["iteration"], h["seconds"], h["cost"]) for h in read_history(out / "history.jsonl")]
    history = history or result.history
    if not history:  # stopped before its first iteration closed: no curve to draw
        return
    save_cost_curves({"run": history}, out / "cost.png", above_best=len(history) > 1,
                     title=f"cost above the run's lowest, {min(h[2] for h in history):.6g}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
