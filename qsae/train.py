"""A training run: optimizer over an objective, progress lines, and the files a run leaves.

The objective is any f(θ) -> (cost, grad): ``cost_and_grad`` on in-process patches, or a
``Master`` whose workers hold the shards. A run writes into its output directory:

    model.npz       θ, the model settings and the data spec (checkpointed atomically)
    history.jsonl   one line per iteration: iteration, seconds, cost, |grad|
    filters.png     the hidden units' input weights as 8×8 tiles
    cost.png        cost against seconds

Ctrl-C (SIGINT) and SIGTERM end the run after saving the last completed iteration's θ.
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

__all__ = ["RunSpec", "save_model", "load_model", "train"]

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
    options: dict = field(default_factory=dict)  # extra optimizer options (sgd's sampler, ...)


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


class _Stop(Exception):
    """Raised inside the optimizer's callback when SIGTERM arrived."""


def train(objective: Objective | None, theta0: np.ndarray, spec: RunSpec, echo: Callable[[str], None] = print):
    """Run the optimizer, printing a line per iteration and saving the run's files.

    Returns the optimizer's result; on Ctrl-C or SIGTERM the result of the last completed
    iteration (its message says so) after everything has been saved.
    """
    from .optim import minimize

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    hist_path = out / "history.jsonl"
    k0 = spec.start_iteration
    hist_file = open(hist_path, "a" if k0 else "w")
    best = {"theta": np.array(theta0, dtype=float), "iteration": k0}
    terminated = []

    def checkpoint(theta: np.ndarray, iteration: int, finished: bool) -> None:
        save_model(
            out / "model.npz", theta, spec.config, spec.data,
            optimizer=spec.method, iteration=iteration, finished=finished,
        )

    def on_iteration(info) -> None:
        if k0 and info.iteration == 0:
            return  # the resumed start point is the checkpoint's last line already
        it, cost, gnorm, secs = k0 + info.iteration, info.cost, info.grad_norm, info.seconds
        best["theta"], best["iteration"] = np.array(info.x, dtype=float), it
        echo(f"iter {it:5d}  cost {cost:.8f}  |grad| {gnorm:.3e}  {secs:8.2f} s")
        hist_file.write(json.dumps({"iteration": it, "seconds": secs, "cost": cost, "grad_norm": gnorm}) + "\n")
        hist_file.flush()
        if spec.checkpoint_every and it % spec.checkpoint_every == 0:
            checkpoint(best["theta"], it, False)
        if terminated:
            raise StopIteration  # the optimizer returns the current θ

    def on_sigterm(signum, frame) -> None:
        terminated.append(signum)

    old = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    t0 = time.perf_counter()
    try:
        result = minimize(objective, theta0, method=spec.method, maxiter=spec.maxiter, callback=on_iteration, **spec.options)
    except QsaeError as e:  # NaN from a worker, every worker lost, ...: keep the last good θ
        checkpoint(best["theta"], best["iteration"], False)
        e.add_note(f"the last good θ (iteration {best['iteration']}) is saved in {out / 'model.npz'}; "
                   f"continue with --resume {out}")
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        hist_file.close()
    if terminated:
        result.message = "stopped by SIGTERM"
    checkpoint(result.x, k0 + result.nit, result.success)
    _pictures(out, result, spec.config)
    print(f"{result.message}: {result.nit} iterations, {result.nfev} evaluations, cost {result.fun:.8f}, "
         f"{time.perf_counter() - t0:.1f} s; wrote {out}/model.npz, filters.png, cost.png, history.jsonl")
    return result


def _pictures(out: Path, result, config: SAEConfig) -> None:
    try:
        from .viz import save_cost_curves, save_filters
    except ImportError as e:  # pictures are a convenience; the model is already saved
        log.warning("no pictures: %s", e)
        return
    save_filters(result.x, config, out / "filters.png")
    save_cost_curves({"run": result.history}, out / "cost.png")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
