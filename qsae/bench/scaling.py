"""The same workload on 1..2N workers, and through the tools a user would pick instead.

Every configuration runs the same fixed sequence of evaluations (θ0 and ``evals − 1``
nearby points) on the same random patches, so runs do equal work; the tables give seconds
per evaluation (best of ``repeat`` passes over the sequence) and the speedup against the
in-process ``cost_and_grad``, and, for k workers on a machine with at least k cores, the
fraction of the k-core ceiling reached: k independent processes, each computing 1/k of
the patches at the same time (``Ceiling``, timed in passes alternating with qsae's), which is what this machine allows with no
messaging at all (memory bandwidth shared as the workers share it).

Alternatives, on 2 worker processes:

* process pool, data re-sent every call — Parallel Python's way, which the report
  complained of: ``multiprocessing.Pool.starmap`` pickles every shard into the workers at
  every evaluation;
* dask.distributed — a LocalCluster of 2 single-threaded worker processes, the shards
  scattered once, every evaluation a ``client.submit`` per shard and a ``gather``.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Callable

import numpy as np

from ..model import SAEConfig, cost_and_grad, finish_sums, init_params, shard_sums
from . import best_of, markdown

__all__ = ["points", "multicore", "Ceiling", "alternatives", "REPORT"]

# The report's own figures (Lahiri, Pasari, Prochnow 2010, §3.3), for the table's last column.
REPORT = {(2, 100_000): "QJAM 2.1×", (4, 100_000): "QJAM 4.0×; Parallel Python 1.75×", (2, 1000): "QJAM 0.8×"}


def points(cfg: SAEConfig, evals: int) -> list[np.ndarray]:
    """The fixed sequence of θ every configuration evaluates."""
    rng = np.random.default_rng(1)
    theta = init_params(cfg, seed=0)
    return [theta + (0.01 * rng.standard_normal(theta.size) if i else 0.0) for i in range(evals)]


def _per_eval(f: Callable, thetas: list[np.ndarray], repeat: int) -> float:
    return best_of(lambda: [f(t) for t in thetas], repeat) / len(thetas)


def _ceiling_part(X: np.ndarray, cfg: SAEConfig, thetas: list[np.ndarray], conn) -> None:
    """One of the ceiling's processes: a pass over ``thetas`` on its rows at every "go", its seconds back."""
    for t in thetas[:2]:
        cost_and_grad(t, X, cfg)  # warm
    while conn.recv():
        t0 = time.perf_counter()
        for t in thetas:
            cost_and_grad(t, X, cfg)
        conn.send(time.perf_counter() - t0)
    conn.close()


class Ceiling:
    """k processes, each holding 1/k of X's rows, that compute a pass over ``thetas`` together.

    ``run()`` starts a pass in all of them at once and returns the seconds per evaluation of
    the slowest: what k cores do with no messaging at all. The processes are forked once and
    wait on a pipe between passes, so ``multicore`` can alternate passes of qsae and of the
    ceiling and both see the same neighbours.
    """

    def __init__(self, X: np.ndarray, cfg: SAEConfig, thetas: list[np.ndarray], k: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.evals = len(thetas)
        self.pipes = [ctx.Pipe() for _ in range(k)]
        self.procs = [ctx.Process(target=_ceiling_part, args=(part, cfg, thetas, child), daemon=True)
                      for part, (_, child) in zip(np.array_split(X, k), self.pipes)]
        for p in self.procs:
            p.start()

    def run(self) -> float:
        for conn, _ in self.pipes:
            conn.send(True)
        times = []
        for (conn, _), p in zip(self.pipes, self.procs):
            if not conn.poll(600):
                raise TimeoutError(f"a ceiling process (pid {p.pid}) finished no pass in 600 s")
            times.append(conn.recv())
        return max(times) / self.evals

    def close(self) -> None:
        for conn, _ in self.pipes:
            try:
                conn.send(False)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


def _alternating(f: Callable[[], float], g: Callable[[], float], repeat: int) -> tuple[float, float]:
    """Best of ``repeat`` alternating calls of f and of g (after one warm-up each); each returns seconds."""
    f(), g()
    bf = bg = float("inf")
    for _ in range(repeat):
        bf, bg = min(bf, f()), min(bg, g())
    return bf, bg


def multicore(sizes: list[int], workers: list[int], evals: int, repeat: int) -> tuple[str, dict]:
    """Seconds per evaluation and speedup, workers × patches × protocol. Returns (markdown, figures)."""
    from ..master import Master

    cfg = SAEConfig()
    thetas = points(cfg, evals)
    rng = np.random.default_rng(0)
    data = {m: rng.uniform(0.1, 0.9, size=(m, cfg.n_visible)) for m in sizes}
    local = {m: _per_eval(lambda t, X=data[m]: cost_and_grad(t, X, cfg), thetas, repeat) for m in sizes}
    figures: dict = {"local": local}
    rows = []
    for k in workers:
        ceilings = {m: Ceiling(data[m], cfg, thetas, k) for m in sizes} if 1 < k <= (os.cpu_count() or 1) else {}
        try:
            for protocol in ("exact", "average"):
                with Master(workers=k, config=cfg, protocol=protocol) as master:
                    for m in sizes:
                        master.scatter(data[m])
                        top = None
                        if m in ceilings:  # qsae and the ceiling in alternating passes
                            t, top = _alternating(lambda: _per_eval(master, thetas, 1), ceilings[m].run, repeat)
                            figures[("ceiling", k, m)] = min(top, figures.get(("ceiling", k, m), top))
                        else:
                            t = _per_eval(master, thetas, repeat)
                        figures[(k, m, protocol)] = t
                        rows.append([k, m, protocol, f"{local[m] * 1e3:.2f}", f"{t * 1e3:.2f}",
                                     f"{t * evals:.2f}", f"{local[m] / t:.2f}", f"{top / t:.2f}" if top else "",
                                     REPORT.get((k, m), "")])
        finally:
            for c in ceilings.values():
                c.close()
    head = ["workers", "patches", "protocol", "in-process ms/eval", "ms/eval", f"s for {evals} evals",
            "speedup", "of the k-core ceiling", "the report"]
    return markdown(head, rows), figures


def _sums(theta: np.ndarray, X: np.ndarray, cfg: SAEConfig):
    return shard_sums(theta, X, cfg)


def alternatives(m: int, evals: int, repeat: int, qsae_seconds: float | None) -> tuple[str, dict, list[str]]:
    """The 2-worker workload through a re-sending process pool and through dask. Returns
    (markdown, {name: seconds per evaluation}, notes on what was skipped)."""
    cfg = SAEConfig()
    thetas = points(cfg, evals)
    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(m, cfg.n_visible))
    shards = np.array_split(X, 2)
    local = _per_eval(lambda t: cost_and_grad(t, X, cfg), thetas, repeat)
    times, notes = {}, []

    def reduce(parts, theta):
        total = parts[0] + parts[1]
        return finish_sums(theta, total, cfg, s_folded=False)

    with multiprocessing.get_context("fork").Pool(2) as pool:
        def pool_eval(theta):
            return reduce(pool.starmap(_sums, [(theta, s, cfg) for s in shards]), theta)

        times["process pool, data re-sent every call"] = _per_eval(pool_eval, thetas, repeat)
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        notes.append("dask.distributed skipped: not installed (pip install 'qsae[bench]' or pip install "
                     "'dask[distributed]')")
    else:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}) as cluster, \
                Client(cluster) as client:
            futures = client.scatter(shards, broadcast=False)

            def dask_eval(theta):
                return reduce(client.gather([client.submit(_sums, theta, f, cfg, pure=False) for f in futures]), theta)

            times["dask.distributed, shards scattered once"] = _per_eval(dask_eval, thetas, repeat)
    if qsae_seconds is not None:
        times["qsae, 2 workers (exact)"] = qsae_seconds
    rows = [[name, f"{t * 1e3:.2f}", f"{local / t:.2f}",
             f"{t / qsae_seconds:.1f}" if qsae_seconds else ""] for name, t in times.items()]
    head = ["2 workers through", "ms/eval", "speedup vs in-process", "× qsae's time"]
    return markdown(head, rows), times, notes
