"""Two local workers against the in-process cost, and the round trip against a bare pyzmq echo.

Run: python benchmarks/bench_runtime.py [--sizes 1000,10000,100000,1000000] [--repeat 7] [--only crossover]

Prints markdown tables, every figure measured in this run (best of N, one BLAS thread per
process, random patches uniform in 0.1..0.9, the same θ everywhere):

1. seconds per evaluation in process and with 2 workers for the exact protocol in one
   round and in two rounds and for the average protocol; speedups against in-process.
   Targets on 2 cores: ≥ 1.0 at 1K, ≥ 1.7 at 10K, ≥ 1.9 at 100K and 1M.
2. one round against two (2 workers, 20K–1M patches, float64 and float32): why one round is
   the default (``ExactReducer``).
3. the round trip of one evaluation with tiny shards (2 workers × 10 rows) against a bare
   pyzmq ROUTER → 2 DEALER processes echo of the same θ (31 KB), target ≤ 1.3×; and where
   the microseconds go: the same path rebuilt step by step from the bare echo.
4. the report's workload: 100K patches, L-BFGS for 500 iterations, h = 30, on 1 and 2
   workers (the report: 650 s on one core), with --report.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: one core per process
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from qsae import Master, SAEConfig, init_params  # noqa: E402
from qsae.bench import best_of, machine  # noqa: E402
from qsae.bench.roundtrip import echo_round_trip  # noqa: E402
from qsae.model import cost_and_grad  # noqa: E402
from qsae.protocol import EVAL, decode, encode, send  # noqa: E402
from qsae.reduce import OPS, ShardState, make_reducer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(master: Master, theta: np.ndarray, reducer, repeat: int) -> float:
    master.reducer = reducer
    return best_of(lambda: master(theta), repeat)


def scaling(master: Master, cfg: SAEConfig, theta: np.ndarray, sizes: list[int], repeat: int, rng) -> None:
    print("| m | in-process ms | exact 1-round ms | exact 2-round ms | average ms | speedup exact (best) "
          "| speedup average | exact/average |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in sizes:
        X = rng.uniform(0.1, 0.9, size=(m, cfg.n_visible))
        rep = repeat * 20 if m <= 10_000 else repeat if m <= 100_000 else max(2, repeat // 3)
        t_local = best_of(lambda: cost_and_grad(theta, X, cfg), rep)
        master.scatter(X)
        t1 = timed(master, theta, make_reducer("exact", cfg, rounds=1), rep)
        t2 = timed(master, theta, make_reducer("exact", cfg, rounds=2), rep)
        ta = timed(master, theta, make_reducer("average", cfg), rep)
        exact = min(t1, t2)
        print(f"| {m} | {t_local * 1e3:.2f} | {t1 * 1e3:.2f} | {t2 * 1e3:.2f} | {ta * 1e3:.2f} | "
              f"{t_local / exact:.2f} ({'1' if t1 <= t2 else '2'}-round) | {t_local / ta:.2f} | {exact / ta:.3f} |",
              flush=True)


def crossover(cfg: SAEConfig, turns: int = 6) -> None:
    """One round against two, 2 workers, patches cut from the built-in images: the median of
    ``turns`` alternating turns of 9 evaluations (3 θ, 3 times) each, per size and dtype."""
    from qsae.data import load_images

    images = load_images()
    thetas = [init_params(cfg, seed=s) for s in range(3)]
    print("\n| patches | dtype | one round ms | two rounds ms | two / one |")
    print("|---:|---:|---:|---:|---:|")
    for dtype, sizes in (("float64", (20_000, 100_000, 1_000_000)), ("float32", (100_000, 1_000_000))):
        for m in sizes:
            with Master(workers=2, config=cfg, dtype=dtype) as master:
                master.scatter_images(images, m=m, seed=0)
                reducers = {r: make_reducer("exact", cfg, rounds=r) for r in (1, 2)}
                got: dict[int, list[float]] = {1: [], 2: []}
                for _ in range(turns):
                    for r, reducer in reducers.items():
                        master.reducer = reducer
                        for theta in thetas:  # warm: blocks settled, processes awake
                            master(theta)
                        t0 = time.perf_counter()
                        for _ in range(3):
                            for theta in thetas:
                                master(theta)
                        got[r].append((time.perf_counter() - t0) / 9)
            one, two = float(np.median(got[1])), float(np.median(got[2]))
            print(f"| {m:,} | {dtype} | {one * 1e3:.1f} | {two * 1e3:.1f} | {two / one:.2f} |", flush=True)


# A DEALER process for the ladder below: "echo" sends θ back; "reply" sends a RESULT-sized
# vector; "protocol" decodes the EVAL and answers with an encoded RESULT; "compute" also
# runs the one-round sums on 10 rows — each step one more piece of a worker's round.
LADDER_WORKER = """
import sys
sys.path.insert(0, sys.argv[3])
import numpy as np, zmq
from qsae.model import SAEConfig, Sums
from qsae.protocol import RESULT, decode, encode, send
from qsae.reduce import OPS, ShardState
mode, cfg = sys.argv[2], SAEConfig()
st = ShardState(np.random.default_rng(0).uniform(0.1, 0.9, (10, cfg.n_visible)), cfg)
vec = OPS["sums"](st, np.zeros(cfg.n_params))
ctx = zmq.Context()
d = ctx.socket(zmq.DEALER)
d.linger = 0
d.connect(sys.argv[1])
d.send(b"hi")
while d.poll(30000):
    frames = d.recv_multipart(copy=False)
    if frames[0].bytes == b"stop":
        break
    if mode == "echo":
        d.send_multipart(frames, copy=False)
    elif mode == "reply":
        d.send_multipart([b"h", vec], copy=False)
    else:
        msg = decode(frames)
        out = OPS["sums"](st, msg.arrays[0]) if mode == "compute" else vec
        send(d, encode(RESULT, msg.round, [out[None, :]], spans=[0, 1], nodes=[0], rows=10, seconds=0.0))
"""


def ladder_step(mode: str, theta: np.ndarray, reducer, repeat: int) -> float:
    """Seconds per round of a bare ROUTER and 2 ``LADDER_WORKER`` processes in ``mode``."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    procs = [subprocess.Popen([sys.executable, "-c", LADDER_WORKER, f"tcp://127.0.0.1:{port}", mode, ROOT])
             for _ in range(2)]
    idents: list[bytes] = []
    rnd = [0]
    try:
        router.rcvtimeo = 60_000
        idents = [router.recv_multipart()[0] for _ in range(2)]

        def scatter(op: str, arg: np.ndarray) -> list:
            rnd[0] += 1
            raw = mode in ("echo", "reply")
            frames = [b"header", arg] if raw else encode(EVAL, rnd[0], [arg], op=op, spans=[0, 1], evaluation=rnd[0])
            for ident in idents:
                send(router, frames, prefix=(ident,))
            out = []
            for _ in idents:
                got = router.recv_multipart(copy=False)
                if raw:
                    out.append((10, np.frombuffer(got[-1], dtype=np.float64)))
                else:
                    msg = decode(got[1:])
                    out.append((msg["rows"], msg.arrays[0][0]))
            return out

        once = (lambda: reducer.evaluate(theta, scatter)) if reducer is not None else (lambda: scatter("sums", theta))
        for _ in range(50):
            once()
        return best_of(once, repeat)
    finally:
        for ident in idents:
            router.send_multipart([ident, b"stop"])
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        router.close()
        ctx.term()


def round_trip(cfg: SAEConfig, theta: np.ndarray, repeat: int) -> None:
    n = repeat * 100
    X = np.random.default_rng(1).uniform(0.1, 0.9, size=(20, cfg.n_visible))
    qsae = {}
    for curve in (True, False):
        with Master(workers=2, config=cfg, curve=curve, reducer_options={"rounds": 1}, block_rows=10) as master:
            master.scatter(X)
            for _ in range(50):
                master(theta)
            qsae[curve] = best_of(lambda: master(theta), n)
    echo = echo_round_trip(theta, 2, n)
    reducer = make_reducer("exact", cfg, rounds=1)
    steps = [("bare echo of θ (the floor)", ladder_step("echo", theta, None, n)),
             ("reply with a RESULT-sized vector (47 KB) instead", ladder_step("reply", theta, None, n)),
             ("+ qsae header, encode and validation both ways", ladder_step("protocol", theta, None, n)),
             ("+ the worker's one-round sums on its 10 rows", ladder_step("compute", theta, None, n)),
             ("+ the master's reduce (exact, one round)", ladder_step("compute", theta, reducer, n)),
             ("qsae Master and Worker, no CURVE", qsae[False]),
             ("qsae Master and Worker, CURVE (the default)", qsae[True])]
    st = ShardState(X[:10], cfg)
    vec = OPS["sums"](st, theta)
    t_op = best_of(lambda: OPS["sums"](st, theta), n)
    t_red = best_of(lambda: reducer.evaluate(theta, lambda op, arg: [(10, vec), (10, vec)]), n)
    print(f"\n| round trip, 2 workers × 10 rows (best of {n}) | µs | step µs | / bare echo |\n|---|---:|---:|---:|")
    prev = None
    for name, t in steps:
        step = "" if prev is None else f"{(t - prev) * 1e6:+.0f}"
        print(f"| {name} | {t * 1e6:.0f} | {step} | {t / steps[0][1]:.2f} |")
        prev = t
    print(f"| CURVE echo by qsae.bench.roundtrip (the floor of the CURVE row, measured separately) | {echo * 1e6:.0f} | | |")
    print(f"\nIn a warm loop in this process: the sums on 10 rows take {t_op * 1e6:.0f} µs, the reduce "
          f"{t_red * 1e6:.0f} µs; in a round each runs cold, after its process slept in poll.")
    print(f"qsae (CURVE) / bare echo = {qsae[True] / echo:.2f}; qsae (no CURVE) / bare echo = {qsae[False] / echo:.2f}"
          " (target ≤ 1.3)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated m")
    ap.add_argument("--repeat", type=int, default=7, help="timed evaluations per figure (best is kept)")
    ap.add_argument("--report", action="store_true", help="also run the report's 100K × 500-iteration workload")
    ap.add_argument("--only", choices=("scaling", "crossover", "roundtrip"), help="one of the tables")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the insecure-run warning is expected here
    cfg = SAEConfig()
    theta = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    print(f"# {machine()}; h={cfg.n_hidden}; best of {args.repeat}\n")
    if args.only in (None, "scaling"):
        with Master(workers=2, config=cfg) as master:
            scaling(master, cfg, theta, [int(s) for s in args.sizes.split(",")], args.repeat, rng)
    if args.only in (None, "crossover"):
        crossover(cfg)
    if args.only in (None, "roundtrip"):
        round_trip(cfg, theta, args.repeat)
    if args.report:
        report_workload(cfg)


def report_workload(cfg: SAEConfig) -> None:
    """The report's run: 100K patches, 500 L-BFGS iterations, h = 30."""
    from qsae.data import load_images, sample_patches
    from qsae.optim import minimize

    images = load_images()
    X = sample_patches(images, 100_000, seed=0)
    theta0 = init_params(cfg, seed=0)
    print("\n| report workload: 100K patches, 500 L-BFGS iterations | seconds | evaluations | final cost |"
          "\n|---|---:|---:|---:|")
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
