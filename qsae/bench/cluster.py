"""Uneven and changing clusters: balance by measured speed, churn, a straggler.

heterogeneous  two workers, one pinned to a core it shares with a busy process: seconds per
               evaluation and rows held with balance="static" (by declared cores) and
               "measured", beside the ideal split by speed (rows / (sum of rows per second))
churn          L-BFGS for N iterations while a worker joins (``add_workers``) at iteration
               N/6 and another leaves by SIGTERM at N/2, against an undisturbed run
straggler      one worker SIGSTOPped for 1.5 s at the start of a round (worker_timeout 5 s):
               that round's seconds against the undisturbed rounds'
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from . import markdown

__all__ = ["heterogeneous", "churn", "straggler"]


def _master(**options):
    from .. import Master, SAEConfig

    return Master(config=SAEConfig(), **options)


def _busy(cpu: int) -> subprocess.Popen:
    """A process spinning on one core: a node shared with someone else's job."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.sched_setaffinity(p.pid, {cpu})
    return p


def _timed_evals(master, theta: np.ndarray, n: int) -> float:
    """Median seconds of ``n`` evaluations."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        master(theta)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def heterogeneous(m: int, evals: int, warmup: int = 12) -> tuple[str, dict]:
    """Static against measured balance on two workers, one sharing its core with a busy process."""
    from .. import init_params
    from ..data import load_images

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "needs two cores to pin the workers apart: skipped\n", {}
    images, theta = load_images(), init_params(__import__("qsae").SAEConfig())
    rows, out = [], {}
    busy = _busy(cpus[0])
    try:
        for balance in ("static", "measured"):
            with _master(workers=2, balance=balance) as master:
                w0, w1 = list(master._workers.values())
                os.sched_setaffinity(w0.pid, {cpus[0]})  # shares its core with the busy process
                os.sched_setaffinity(w1.pid, {cpus[1]})
                master.scatter_images(images, m=m, seed=0)
                for _ in range(warmup):  # speeds measured, blocks moved
                    master(theta)
                t = _timed_evals(master, theta, evals)
                st = {s["name"]: s for s in master.status() if s["state"] == "active"}
                s0, s1 = st[w0.name], st[w1.name]
                ideal = m / ((s0["rows_per_s"] or 0) + (s1["rows_per_s"] or 0)) if balance == "measured" else None
                out[balance] = t
                if ideal:
                    out["ideal"] = ideal
                    share = (s0["rows_per_s"] or 0) / ((s0["rows_per_s"] or 0) + (s1["rows_per_s"] or 0))
                    out["ideal_rows0"] = share * m
                rows.append([balance, f"{t * 1e3:.1f}", s0["rows"], s1["rows"], master.stats["blocks moved"],
                             master.stats["backups"]])
    finally:
        busy.kill()
        busy.wait()
    rows.append(["ideal split by measured speed", f"{out['ideal'] * 1e3:.1f}", f"{out['ideal_rows0']:.0f}",
                 f"{m - out['ideal_rows0']:.0f}", "", ""])
    text = markdown(["balance", "ms per evaluation (median)", "rows on the shared core", "rows on the free core",
                     "blocks moved", "straggler backups"], rows)
    text += (f"\nmeasured / static = {out['measured'] / out['static']:.2f} (target ≤ 0.80); "
             f"ideal / static = {out['ideal'] / out['static']:.2f}\n")
    return text, out


def churn(m: int, iters: int) -> tuple[str, dict]:
    """An L-BFGS run in which a worker joins at iters/6 and another leaves (SIGTERM) at iters/2."""
    from .. import init_params
    from ..data import load_images

    images = load_images()
    theta0 = init_params(__import__("qsae").SAEConfig())
    join_at, leave_at = iters // 6, iters // 2

    def run(disturb: bool) -> tuple[float, np.ndarray, int]:
        with _master(workers=2) as master:
            master.scatter_images(images, m=m, seed=0)

            def callback(info):
                if disturb and info.iteration == join_at:
                    master.add_workers(1)
                if disturb and info.iteration == leave_at:
                    os.kill(next(iter(master._workers.values())).pid, signal.SIGTERM)

            t0 = time.perf_counter()
            res = master.fit(theta0, maxiter=iters, callback=callback)
            return time.perf_counter() - t0, np.array([c for _, _, c in res.history]), res.nfev

    t_calm, h_calm, n_calm = run(False)
    t_churn, h_churn, n_churn = run(True)
    diff = float(np.max(np.abs(h_churn - h_calm) / np.abs(h_calm))) if len(h_calm) == len(h_churn) else float("inf")
    out = {"calm": t_calm, "churn": t_churn, "diff": diff}
    text = markdown(["run", "seconds", "evaluations", "final cost"],
                    [["undisturbed, 2 workers", f"{t_calm:.2f}", n_calm, f"{h_calm[-1]:.10f}"],
                     [f"a worker joins at {join_at}, one leaves (SIGTERM) at {leave_at}", f"{t_churn:.2f}", n_churn,
                      f"{h_churn[-1]:.10f}"]])
    text += (f"\nextra time {t_churn - t_calm:+.2f} s (target ≤ 3 s); largest relative difference of the cost "
             f"histories {diff:.1e} (target ≤ 1e-10)\n")
    return text, out


def straggler(m: int, rounds: int = 7) -> tuple[str, dict]:
    """One worker SIGSTOPped for 1.5 s at the start of a round; worker_timeout 5 s."""
    from .. import init_params
    from ..data import load_images

    images = load_images()
    theta = init_params(__import__("qsae").SAEConfig())
    with _master(workers=3, worker_timeout=5.0) as master:
        master.scatter_images(images, m=m, seed=0)
        calm = _timed_evals(master, theta, rounds)
        victim = next(iter(master._workers.values()))
        os.kill(victim.pid, signal.SIGSTOP)
        timer = threading.Timer(1.5, os.kill, (victim.pid, signal.SIGCONT))
        timer.start()
        t0 = time.perf_counter()
        master(theta)
        stopped = time.perf_counter() - t0
        timer.join()
        after = _timed_evals(master, theta, rounds)
        backups = master.stats["backups"]
    out = {"calm": calm, "stopped": stopped, "after": after}
    text = markdown(["round", "ms"], [["undisturbed (median)", f"{calm * 1e3:.1f}"],
                                      ["a worker SIGSTOPped for 1.5 s", f"{stopped * 1e3:.1f}"],
                                      ["after it resumed (median)", f"{after * 1e3:.1f}"]])
    text += (f"\nthe stopped round took {stopped / calm:.1f}× an undisturbed one, {backups} backup(s) sent; "
             f"without backups it would have waited the 1.5 s\n")
    return text, out
