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

from .errors import QsaeError
from .model import SAEConfig

__all__ = ["RunSpec", "save_model", "load_model", "read_history", "train"]

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
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(path: str | os.PathLike, theta: np.ndarray, config: SAEConfig, data: dict, **meta: Any) -> Path:
    """Save θ, the config and the data spec to ``path`` (.npz) atomically."""
    path = Path(path)
    header = json.dumps({"config": config.to_dict(), "data": data, **meta})
    _atomic_write(path, lambda f: np.savez(f, theta=theta, meta=np.array(header)))
    return path


def load_model(path: str | os.PathLike) -> tuple[np.ndarray, SAEConfig, dict]:
    """Load (θ, config, meta) written by ``save_model``; meta holds "data" and the rest."""
    with np.load(Path(path), allow_pickle=False) as z:
        theta, meta = z["theta"], json.loads(str(z["meta"]))
    return theta, SAEConfig.from_dict(meta.pop("config")), meta


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
          dashboard=None):
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
    best = {"theta": np.array(theta0, dtype=float), "iteration": None, "seconds": s0}
    terminated = []
    board, own_board = _dashboard(dashboard, echo)
    if board is not None:
        objective = board_feed(board, objective, spec, read_history(hist_path))

    def checkpoint(theta: np.ndarray, iteration: int, seconds: float, finished: bool) -> None:
        save_model(
            out / "model.npz", theta, spec.config, spec.data,
            optimizer=spec.method, iteration=iteration, seconds=seconds, finished=finished, **spec.meta,
        )

    def write_line(it: int, secs: float, cost: float, gnorm: float) -> None:
        hist_file.write(json.dumps({"iteration": it, "seconds": secs, "cost": cost, "grad_norm": gnorm}) + "\n")
        hist_file.flush()

    def on_iteration(info) -> None:
        if k0 and info.iteration == 0:
            return  # the resumed start point is the checkpoint's last line already
        it, cost, gnorm, secs = k0 + info.iteration, info.cost, info.grad_norm, s0 + info.seconds
        write_line(it, secs, cost, gnorm)  # first: Ctrl-C in what follows loses no line
        best.update(theta=np.array(info.x, dtype=float), iteration=it, seconds=secs)
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
        terminated.append(signum)

    old = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    t0 = time.perf_counter()
    try:
        result = minimize(objective, theta0, method=spec.method, maxiter=spec.maxiter, callback=on_iteration, **spec.options)
    except QsaeError as e:  # NaN from a worker, every worker lost, ...: keep the last good θ
        if best["iteration"] is not None:  # none completed: nothing worth a model.npz
            checkpoint(best["theta"], best["iteration"], best["seconds"], False)
            e.add_note(f"the last good θ (iteration {best['iteration']}) is saved in {out / 'model.npz'}; "
                       f"continue with --resume {out}")
        if board is not None:
            board.end(f"failed: {e}")
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        hist_file.close()
        if own_board:
            board.close()
    _complete_history(hist_path, result, k0, s0)
    if terminated:
        result.message = "stopped by SIGTERM"
    finished = result.status not in (99, 130)  # ended by itself: converged, or ran its iterations
    checkpoint(result.x, k0 + result.nit, s0 + (result.history[-1][1] if result.history else 0.0), finished)
    _pictures(out, result, spec.config)
    if board is not None and not own_board:
        board.end(result.message, (k0 + result.nit, np.array(result.x, dtype=float)))
    print(f"{result.message}: {result.nit} iterations, {result.nfev} evaluations, cost {result.fun:.8f}, "
         f"{time.perf_counter() - t0:.1f} s; wrote {out}/model.npz, filters.png, cost.png, history.jsonl")
    return result


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
    save_cost_curves({"run": history or result.history}, out / "cost.png")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
