"""Two local workers against the in-process cost, and the round trip against a bare pyzmq echo.

Run: python benchmarks/bench_runtime.py [--sizes 1000,10000,100000,1000000] [--repeat 7]

Prints markdown tables, every figure measured in this run:

1. seconds per evaluation in process (one BLAS thread) and with 2 workers (one BLAS thread
   each) for the exact protocol in one round and in two rounds and for the average
   protocol; speedups against in-process. Targets on 2 cores: ≥ 1.0 at 1K, ≥ 1.7 at 10K,
   ≥ 1.9 at 100K and 1M; exact ≤ 1.03× average at 100K.
2. the round trip of one evaluation with tiny shards (2 workers × 10 rows) against a bare
   pyzmq ROUTER → 2 DEALER processes echo of the same θ (31 KB). Target ≤ 1.3×.
3. the report's workload: 100K patches, L-BFGS for 500 iterations, h = 30, on 1 and 2
   workers (the report: 650 s on one core; target ≤ 26 s on 2), with --report.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: one core per process
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from qsae import Master, SAEConfig, init_params  # noqa: E402
from qsae.bench import best_of  # noqa: E402
from qsae.bench.roundtrip import echo_round_trip  # noqa: E402
from qsae.model import cost_and_grad  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated m")
    ap.add_argument("--repeat", type=int, default=7, help="timed evaluations per figure (best is kept)")
    ap.add_argument("--report", action="store_true", help="also run the report's 100K × 500-iteration workload")
    args = ap.parse_args()
    cfg = SAEConfig()
    theta = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    print(f"# {os.cpu_count()} cores; one BLAS thread per process; h={cfg.n_hidden}; best of {args.repeat}\n")
    print("| m | in-process ms | exact 1-round ms | exact 2-round ms | average ms | speedup exact (best) | speedup average | exact/average |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with Master(workers=2, config=cfg) as master:
        for m in (int(s) for s in args.sizes.split(",")):
            X = rng.uniform(0.1, 0.9, size=(m, cfg.n_visible))
            rep = args.repeat * 20 if m <= 10_000 else args.repeat if m <= 100_000 else max(2, args.repeat // 3)
            t_local = best_of(lambda: cost_and_grad(theta, X, cfg), rep)
            master.scatter(X)
            times = {}
            for name, reducer, opts in (("1", "exact", {"rounds": 1}), ("2", "exact", {"rounds": 2}),
                                        ("avg", "average", {})):
                from qsae.reduce import make_reducer

                master.reducer = make_reducer(reducer, cfg, **opts)
                times[name] = best_of(lambda: master(theta), rep)
            exact = min(times["1"], times["2"])
            print(f"| {m} | {t_local * 1e3:.2f} | {times['1'] * 1e3:.2f} | {times['2'] * 1e3:.2f} | "
                  f"{times['avg'] * 1e3:.2f} | {t_local / exact:.2f} ({'1' if times['1'] <= times['2'] else '2'}-round)"
                  f" | {t_local / times['avg']:.2f} | {exact / times['avg']:.3f} |", flush=True)
        X = rng.uniform(0.1, 0.9, size=(20, cfg.n_visible))
        master.scatter(X)
        from qsae.reduce import make_reducer

        master.reducer = make_reducer("exact", cfg, rounds=1)
        t_round = best_of(lambda: master(theta), args.repeat * 20)
    t_echo = echo_round_trip(theta, 2, args.repeat * 20)
    print("\n| round trip, 2 workers × 10 rows | µs |\n|---|---:|")
    print(f"| qsae evaluation (exact, 1 round) | {t_round * 1e6:.0f} |")
    print(f"| bare pyzmq ROUTER→2 DEALER processes, echo of θ ({theta.nbytes // 1000} KB) | {t_echo * 1e6:.0f} |")
    print(f"| ratio | {t_round / t_echo:.2f} |")
    if args.report:
        report_workload(cfg, rng)


def report_workload(cfg: SAEConfig, rng) -> None:
    """The report's run: 100K patches, 500 L-BFGS iterations, h = 30."""
    from qsae.data import load_images, sample_patches
    from qsae.optim import minimize

    images = load_images()
    X = sample_patches(images, 100_000, seed=0)
    theta0 = init_params(cfg, seed=0)
    print("\n| report workload: 100K patches, 500 L-BFGS iterations | seconds | evaluations | final cost |\n|---|---:|---:|---:|")
    t0 = time.perf_counter()
    res = minimize(lambda th: cost_and_grad(th, X, cfg), theta0, maxiter=500)
    print(f"| in process, 1 core | {time.perf_counter() - t0:.1f} | {res.nfev} | {res.fun:.6f} |", flush=True)
    for workers in (1, 2):
        with Master(workers=workers, config=cfg) as master:
            master.scatter_images(images, m=100_000, seed=0)
            t0 = time.perf_counter()
            res = master.fit(theta0, maxiter=500)
            print(f"| {workers} worker(s) | {time.perf_counter() - t0:.1f} | {res.nfev} | {res.fun:.6f} |", flush=True)
    print("| the report, 1 core (2010) | 650 | | |")


if __name__ == "__main__":
    main()
