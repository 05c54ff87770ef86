"""Scale benchmark (issue 17): what the master and a host agent cost per evaluation, and a projection.

    python benchmarks/bench_scale.py              # every table (about 10 minutes on 2 cores)
    python benchmarks/bench_scale.py --quick      # fewer cells and evaluations

Tables:

1. The master's own CPU seconds per evaluation (``time.process_time`` of this process: the
   master's receive loop and its heartbeat thread) and the bytes it receives per evaluation
   (every frame counted at its socket), for H agents (each one connection standing for one
   host) × P compute processes per agent, with shards so small (4 rows a block, 256
   blocks) that compute is negligible. Beside it, "today's" shape: H·P plain workers, and
   what lies under table 1 (1c): a bare pyzmq CURVE echo's CPU per round (the sockets' floor)
   and the master's own per-evaluation code run warm, in a loop without sockets (the rest of
   table 1 is that code run cold, after each sleep in poll), with the master's CPU split by
   thread; and (1d) what the same code costs right after 1 or 10 ms away, here.
2. An agent's own CPU per evaluation against P (``/proc/PID/task/*/schedstat``: all its threads, not its
   compute processes).
3. A projection of seconds per evaluation and speedup at 100K, 1M and 10M patches on 8 ...
   1,024 cores, from figures measured here and two stated network figures; checked against
   evaluations measured here on 1 and 2 processes.

On 2 cores the compute processes of a cell share the cores with everything else: only the
master's and the agent's CPU are the figures; the round's wall time is printed for context.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: one BLAS thread, as
    os.environ.setdefault(_var, "1")  # a worker has (the per-row compute is measured in this process)

import numpy as np  # noqa: E402

from qsae import Master, SAEConfig, init_params  # noqa: E402
from qsae.bench import machine  # noqa: E402
from qsae.data import load_images  # noqa: E402
from qsae.launch import LocalLauncher  # noqa: E402

CFG = SAEConfig()  # the report's model: 8×8 patches, h = 30
BLOCK_ROWS, BLOCKS = 4, 256  # tiny blocks: compute negligible (a block costs ~0.1 ms of Python), one a process
MAX_PROCS = 256  # compute processes in one cell on this machine (2 cores, 24 GB): larger cells are skipped
CORES_PER_HOST = 16  # the projection's hosts: 16 cores each, one agent of 16 processes
RTT = 0.5e-3  # s, one network round trip between hosts: "round trip within same datacenter 500 µs"
#               (J. Dean, P. Norvig, "Latency Numbers Every Programmer Should Know"); a cautious figure
RTT_FAST = 50e-6  # s, the same on an idle 10 GbE switch (kernel TCP, ~25 µs each way): the optimistic column
BANDWIDTH = 1.25e9  # B/s into the master: one 10 GbE link


class _Counting:
    """The master's ROUTER socket, counting the bytes of every message it receives."""

    def __init__(self, sock) -> None:
        self._sock, self.bytes, self.messages = sock, 0, 0

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def recv_multipart(self, *args, **kw):
        frames = self._sock.recv_multipart(*args, **kw)
        self.messages += 1
        self.bytes += sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames[1:])  # not the identity
        return frames


def _thread_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (name, CPU seconds on a core) of every thread of process ``pid``, from
    ``/proc/PID/task/*/schedstat`` in ns (``/proc/PID/stat`` counts 10 ms ticks, too coarse for
    30 evaluations); a thread that ends meanwhile is left out."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = (name, int(f.read().split()[0]) / 1e9)
        except OSError:
            continue
    return out


def _cpu(pid: int) -> float:
    """CPU seconds of process ``pid``: all its threads, not its children."""
    return sum(seconds for _, seconds in _thread_seconds(pid).values())


def _threads_cpu() -> dict[str, float]:
    """This process's CPU seconds by thread kind: "main", "zmq I/O" (libzmq's ZMQbg/IO threads:
    the sockets' reads and writes, CURVE), "other" (the heartbeat, CURVE's ZAP handler)."""
    out = {"main": 0.0, "zmq I/O": 0.0, "other": 0.0}
    for tid, (name, seconds) in _thread_seconds(os.getpid()).items():
        out["main" if tid == os.getpid() else "zmq I/O" if name.startswith("ZMQbg/IO") else "other"] += seconds
    return out


def master_cell(images, hosts: int, procs: int, agents: bool, evals: int, **opts) -> dict:
    """One cell: the master's CPU and bytes per evaluation, the agents' CPU, the round's wall time."""
    launcher = LocalLauncher(hosts, procs=procs) if agents else LocalLauncher(hosts * procs)
    m = opts.pop("m", BLOCK_ROWS * BLOCKS)
    with Master(launcher=launcher, config=CFG, block_rows=opts.pop("block_rows", BLOCK_ROWS), start_timeout=600,
                worker_timeout=60.0, **opts) as master:
        master.scatter_images(images, m=m, seed=0)
        theta = init_params(CFG)
        for _ in range(5):  # placement settles, speeds measured
            master(theta)
        owner, attr = (master.router, "sock") if hasattr(master, "router") else (master, "_sock")  # after/before
        counter = _Counting(getattr(owner, attr))  # the master's split into a coordinator and a socket shell
        setattr(owner, attr, counter)
        pids = [w.pid for w in master._workers.values()]
        cpu0, c0, t0, th0 = [_cpu(p) for p in pids], time.process_time(), time.perf_counter(), _threads_cpu()
        for _ in range(evals):
            master(theta)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        threads = {k: (v - th0[k]) / evals for k, v in _threads_cpu().items()}
        agent = statistics.mean(_cpu(p) - c for p, c in zip(pids, cpu0)) / evals
        setattr(owner, attr, counter._sock)
        return dict(master=cpu / evals, bytes=counter.bytes / evals, msgs=counter.messages / evals,
                    wall=wall / evals, agent=agent, connections=master.n_workers, threads=threads)


def row_bytes(op: str) -> int:
    """Bytes of one result row of ``op`` (float64)."""
    from qsae.reduce import Sums

    return 8 * {"sums": Sums.size(CFG, one_round=True), "backward": Sums.size(CFG, one_round=False),
                "forward": 2 * CFG.n_hidden}[op]


def table_master(images, hosts_list, procs_list, evals: int) -> dict:
    print("\n## 1. The master per evaluation: H agents × P processes (4-row blocks, 256 of them; one round)\n")
    print("| H | P | processes | master CPU ms | bytes in | msgs in | H result rows (bytes) | round ms (wall) "
          "| master CPU ms, two rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = {}
    for H in hosts_list:
        for P in procs_list:
            if H * P > MAX_PROCS:
                print(f"| {H} | {P} | {H * P} | skipped: more than {MAX_PROCS} processes on this machine | | | | | |")
                continue
            r = master_cell(images, H, P, True, evals)
            out[H, P] = r
            two = ""
            if P == procs_list[0]:  # what the projection's large data sets cost the master (the master sees hosts)
                r["master2"] = master_cell(images, H, P, True, evals, reducer_options={"rounds": 2})["master"]
                two = f"{1e3 * r['master2']:.3f}"
            print(f"| {H} | {P} | {H * P} | {1e3 * r['master']:.3f} | {r['bytes']:,.0f} | {r['msgs']:.1f} | "
                  f"{H * row_bytes('sums'):,} | {1e3 * r['wall']:.2f} | {two} |", flush=True)
    for H in hosts_list:
        got = [out[H, P]["master"] for P in procs_list if (H, P) in out]
        if len(got) > 1:
            print(f"\nH = {H}: master CPU from P = {procs_list[0]} to the largest P measured: "
                  f"{100 * (got[-1] / got[0] - 1):+.1f}% (target: within ±10%)", end="")
    print()
    return out


def table_today(images, evals: int) -> None:
    print("\n## 1b. Today's shape for comparison: H·P plain workers, each its own connection (H = 2)\n")
    print("| H·P workers | master CPU ms | bytes in | msgs in | round ms (wall) |")
    print("|---|---|---|---|---|")
    for n in (2, 8, 16):
        r = master_cell(images, n, 1, True, evals)
        print(f"| {n} | {1e3 * r['master']:.3f} | {r['bytes']:,.0f} | {r['msgs']:.1f} | {1e3 * r['wall']:.2f} |",
              flush=True)


def master_evaluation(hosts: int, blocks: int = BLOCKS):
    """The master's work for one evaluation as a function, run without sockets: the
    settle check, the round opened and its EVALs encoded, ``hosts`` RESULTs (one row each,
    made beforehand) decoded, checked and added along the tree, the reducer's finish: what
    table 1's main thread does, minus the socket calls and poll (and the I/O thread's CURVE)."""
    from qsae import tree
    from qsae.coordinator import Coordinator
    from qsae.layout import Layout
    from qsae.membership import ACTIVE
    from qsae.model import Sums
    from qsae.protocol import RESULT, decode, encode
    from qsae.reduce import make_reducer

    layout = Layout(CFG, np.dtype("float64"), "measured", BLOCK_ROWS)
    layout.set_source({"kind": "images"}, BLOCK_ROWS * blocks)
    coord, theta, per = Coordinator(layout, 1.0, 60.0), init_params(CFG), blocks // hosts
    results = {}
    for k in range(hosts):
        w = coord.members.join(b"h%d" % k, f"h{k}", "host", k, 1, "", now=0.0)
        w.state, w.blocks = ACTIVE, set(range(k * per, (k + 1) * per))
        w.record(BLOCK_ROWS * per, 0.01)  # a measured speed: balanced, nothing moves
        spans = [(k * per, (k + 1) * per)]
        nodes = tree.cover_runs(spans, blocks)
        rows = np.full((len(nodes), Sums.size(CFG, one_round=True)), 1.0 + k)
        results[w.ident] = encode(RESULT, 0, [rows], spans=tree.flat(spans), nodes=[tree.code(n) for n in nodes],
                                  rows=BLOCK_ROWS * per, seconds=0.01)
    reducer = make_reducer("exact", CFG)

    def evaluation() -> None:
        assert coord.settle_step(0.0) is None
        coord.begin_evaluation()
        steps = reducer.steps(theta)
        op, arg = steps.send(None)
        for send in coord.begin_round(op, arg, 0.0):  # encoded as the shell does, not sent
            encode(send.type, send.round, send.arrays, **send.fields)
        for ident, frames in results.items():
            msg = decode(frames)
            msg.round = coord.round  # made for round 0: this round's number, without encoding it again
            coord.handle(ident, msg, 0.0)
        coord.tick(0.0)
        try:
            steps.send(coord.end_round())
        except StopIteration:
            pass
        coord.end_evaluation()

    return evaluation


def warm_evaluation(hosts: int) -> float:
    """Seconds of ``master_evaluation(hosts)`` in a warm loop (table 1 runs it after each sleep in poll)."""
    import timeit

    evaluation = master_evaluation(hosts)
    for _ in range(100):
        evaluation()
    n = max(200, 4000 // hosts)
    return min(timeit.repeat(evaluation, number=n, repeat=5)) / n


def echo_cpu(hosts: int, rounds: int = 300) -> float:
    """CPU seconds of this process per round of a bare pyzmq CURVE echo of θ by ``hosts``
    DEALER processes (``qsae.bench.roundtrip.Echo``): what the sockets, CURVE and poll cost a
    master with no code of its own — the floor under table 1."""
    from qsae.bench.roundtrip import Echo

    theta = init_params(CFG)
    with Echo(hosts) as echo:
        for _ in range(50):
            echo.round(theta)
        c0 = time.process_time()
        for _ in range(rounds):
            echo.round(theta)
        return (time.process_time() - c0) / rounds


def table_warm(cells: dict, hosts_list) -> None:
    print("\n## 1c. Under table 1: its threads, a bare CURVE echo's CPU, and the master's own code run warm\n")
    print("| H | master CPU µs (table 1, P = 1) | its main thread | its zmq I/O thread | bare CURVE echo of θ by H "
          "processes, CPU µs/round | the master's per-evaluation code, warm in a loop without sockets, µs |")
    print("|---|---|---|---|---|---|")
    for H in hosts_list:
        cell = cells.get((H, 1), {})
        m, th = cell.get("master"), cell.get("threads", {})
        us = [f"{1e6 * v:.0f}" if v else "" for v in (m, th.get("main"), th.get("zmq I/O"))]
        print(f"| {H} | {' | '.join(us)} | {1e6 * echo_cpu(H):.0f} | {1e6 * warm_evaluation(H):.0f} |", flush=True)


def _run_after(fn, away: float, busy: bool, times: int = 150) -> float:
    """Median seconds of one ``fn()`` run right after ``away`` seconds spent elsewhere: asleep
    (as the master in poll) or in a busy loop that touches nothing else (no sleep at all)."""
    samples = []
    for _ in range(times):
        if busy:
            end = time.perf_counter() + away
            while time.perf_counter() < end:
                pass
        elif away:
            time.sleep(away)
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def table_cold() -> None:
    """Table 1d: what running after 10 ms away costs on this machine, for code of a few sizes."""
    import zmq

    from qsae.protocol import RESULT, decode, encode
    from qsae.reduce import Sums

    frames = [zmq.Frame(f) for f in encode(RESULT, 1, [np.ones((1, Sums.size(CFG, one_round=True)))],
                                           spans=[0, 128], nodes=[5], rows=512, seconds=0.01)]
    print("\n## 1d. Cold: the same code right after 1 or 10 ms away (medians of 150; wall µs)\n")
    print("Rounds here last 14–90 ms. Where a core keeps its caches and branch predictors while the code is away,")
    print("the columns differ little; where another tenant or the hypervisor takes them meanwhile, code that runs")
    print("once a round pays the cold column every time.\n")
    print("| code | warm (in a loop) | after 1 ms asleep | after 10 ms asleep | after 10 ms busy elsewhere "
          "| 10 ms asleep / warm |")
    print("|---|---|---|---|---|---|")
    for name, fn in (("a call of a function that does nothing", lambda: None),
                     ("decode one RESULT (`protocol.decode`)", lambda: decode(frames)),
                     ("the master's per-evaluation code, H = 2 (table 1c)", master_evaluation(2))):
        warm = _run_after(fn, 0.0, False)
        one, ten, busy = _run_after(fn, 1e-3, False), _run_after(fn, 10e-3, False), _run_after(fn, 10e-3, True)
        print(f"| {name} | {1e6 * warm:.1f} | {1e6 * one:.1f} | {1e6 * ten:.1f} | {1e6 * busy:.1f} | "
              f"{ten / warm:.0f}× |", flush=True)


def table_agent(cells: dict, procs_list) -> dict:
    print("\n## 2. An agent's own CPU per evaluation against P (H = 1; its compute processes not counted)\n")
    print("| P | agent CPU ms | per process µs |")
    print("|---|---|---|")
    out = {}
    for P in procs_list:
        if (1, P) in cells and P > 1:  # P = 1 is a plain worker: its CPU is its compute
            a = cells[1, P]["agent"]
            out[P] = a
            print(f"| {P} | {1e3 * a:.3f} | {1e6 * a / P:.1f} |")
    return out


def compute_per_row(images) -> dict[str, float]:
    """Seconds per row of each op, one process, 4,032-row blocks (placement's default)."""
    from qsae.data import sample_patches
    from qsae.reduce import ShardState, run_blocks

    X = sample_patches(images, 32256, patch_size=8, seed=0)
    states = [ShardState(X[i:i + 4032], CFG) for i in range(0, len(X), 4032)]
    theta = init_params(CFG)
    best = {}
    for op in ("sums", "forward", "backward"):
        times = []
        for _ in range(5):
            arg = theta if op != "backward" else np.full(CFG.n_hidden, 0.1)
            if op == "backward":  # the activations it uses: a forward round first, not timed
                run_blocks("forward", theta, states)
            t0 = time.perf_counter()
            run_blocks(op, arg, states)
            times.append(time.perf_counter() - t0)
        best[op] = min(times) / len(X)
    best["two"] = best["forward"] + best["backward"]
    return best


def projected(m: int, n: int, per_row: dict, master_fit, agent_of, rtt: float = RTT,
              rounds: int = 1) -> tuple[float, int, int, int]:
    """(seconds per evaluation, hosts, processes per host, rounds) on ``n`` cores; the exact
    protocol in ``rounds`` rounds (1, the default, or 2)."""
    H, P = -(-n // CORES_PER_HOST), min(n, CORES_PER_HOST)
    compute = (per_row["two"] if rounds == 2 else per_row["sums"]) * math.ceil(m / n)
    rows = row_bytes("backward") + row_bytes("forward") if rounds == 2 else row_bytes("sums")
    wire = H * (rows + rounds * 8 * CFG.n_params) / BANDWIDTH  # result rows in, θ (and s) out
    return compute + master_fit(H, rounds) + rounds * (agent_of(P) + rtt) + wire, H, P, rounds


def table_projection(images, cells: dict, agent: dict, check: bool) -> None:
    per_row = compute_per_row(images)
    hs = sorted({H for H, _ in cells})
    fits = {}
    for rounds, key in ((1, "master"), (2, "master2")):
        ms = [next(c[key] for (h, _), c in sorted(cells.items()) if h == H and key in c) for H in hs]
        slope, icpt = np.polyfit(hs, ms, 1) if len(hs) > 1 else (0.0, ms[0])
        fits[rounds] = (float(icpt), max(float(slope), 0.0))

    def master_fit(H: int, rounds: int) -> float:  # per evaluation: measured at H ≤ 16, linear beyond
        icpt, slope = fits[rounds]
        return icpt + slope * H

    def agent_of(P: int) -> float:  # measured at P in the table, linear between
        ps = sorted(agent)
        return float(np.interp(P, ps, [agent[p] for p in ps])) if P <= ps[-1] else agent[ps[-1]] * P / ps[-1]

    print("\n## 3. Projection: seconds per evaluation and speedup\n")
    print(f"T(N) = compute per row × ⌈m/N⌉ + master CPU(H, rounds) + rounds × (agent CPU(P) + RTT) + H × bytes / bandwidth, "
          f"with H = ⌈N/{CORES_PER_HOST}⌉ hosts of P = min(N, {CORES_PER_HOST}) processes; speedup = compute of m "
          f"rows on one core ÷ T(N).")
    print(f"Measured here: compute {1e6 * per_row['sums']:.2f} µs/row (one round), {1e6 * per_row['two']:.2f} µs/row "
          f"(two rounds); master CPU per evaluation, one round (the default), {1e3 * fits[1][0]:.3f} ms + "
          f"{1e3 * fits[1][1]:.4f} ms × H (a line through table 1's cells at its first P; two rounds: "
          f"{1e3 * fits[2][0]:.3f} + {1e3 * fits[2][1]:.4f} × H, its last column); agent CPU per round from table 2; "
          f"speedup against the faster of the two on one core. Stated: RTT {1e3 * RTT:.1f} ms per network "
          f"hop (Dean and Norvig's 'round trip within same datacenter'; and {1e6 * RTT_FAST:.0f} µs, an idle 10 GbE "
          f"switch, in the last column); depth 2 is one network hop, master↔agent (agent↔process is a local socket, "
          f"in the agent's CPU); {BANDWIDTH * 8 / 1e9:.0f} Gbit/s into the master.\n")
    print(f"| patches | cores N | hosts H | T(N) s | speedup | efficiency | QJAM (report) | "
          f"speedup at RTT {1e6 * RTT_FAST:.0f} µs | speedup, two rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    qjam = {(100_000, 4): "4.0×", (100_000, 8): "5.5×"}
    for m in (100_000, 1_000_000, 10_000_000):
        base = min(per_row["two"], per_row["sums"]) * m
        for n in (8, 16, 32, 64, 128, 256, 512, 1024):
            t, H, P, _ = projected(m, n, per_row, master_fit, agent_of)
            fast, *_ = projected(m, n, per_row, master_fit, agent_of, rtt=RTT_FAST)
            two, *_ = projected(m, n, per_row, master_fit, agent_of, rounds=2)
            print(f"| {m:,} | {n} | {H} | {t:.4f} | {base / t:.1f}× | {base / t / n:.2f} | "
                  f"{qjam.get((m, n), '')} | {base / fast:.1f}× | {base / two:.1f}× |")
    if check:
        print("\n## 3b. The projection against evaluations measured here (100K patches, loopback: RTT 0)\n")
        print("The three shapes run at once and take turns, 5 evaluations each, 6 turns (a shared machine's load")
        print("changes by the minute); the median turn.\n")
        print("| processes | shape | measured s/eval | projected s/eval | ratio |")
        print("|---|---|---|---|---|")
        shapes = [(1, 1, "1 worker"), (1, 2, "1 agent × 2"), (2, 1, "2 workers")]
        for line in _interleaved(images, shapes, 100_000):
            hosts, procs, shape, wall = line
            t, *_ = projected(100_000, hosts * procs, per_row, master_fit, agent_of, rtt=0.0)
            print(f"| {hosts * procs} | {shape} | {wall:.4f} | {t:.4f} | {wall / t:.2f} |", flush=True)


def _interleaved(images, shapes, m: int, turns: int = 6, evals: int = 5) -> list[tuple]:
    """Seconds per evaluation of each (hosts, procs, name), the masters taking turns."""
    import contextlib

    with contextlib.ExitStack() as stack:
        masters = []
        for hosts, procs, _ in shapes:
            master = stack.enter_context(Master(launcher=LocalLauncher(hosts, procs=procs), config=CFG))
            master.scatter_images(images, m=m, seed=0)
            masters.append(master)
        theta = init_params(CFG)
        walls: list[list[float]] = [[] for _ in shapes]
        for _ in range(turns):
            for master, out in zip(masters, walls):
                for _ in range(2):  # its processes wake up again
                    master(theta)
                t0 = time.perf_counter()
                for _ in range(evals):
                    master(theta)
                out.append((time.perf_counter() - t0) / evals)
    return [(*shape, statistics.median(w)) for shape, w in zip(shapes, walls)]




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="H in 1, 2, 4; P in 1, 4, 16; 30 evaluations a cell")
    p.add_argument("--evals", type=int, default=100, help="evaluations measured per cell")
    p.add_argument("--no-check", action="store_true", help="skip the measured 100K-patch evaluations")
    args = p.parse_args()
    hosts, procs = ([1, 2, 4], [1, 4, 16]) if args.quick else ([1, 2, 4, 8, 16], [1, 4, 16, 64])
    evals = 30 if args.quick else args.evals
    print(f"# bench_scale — {machine()}")
    images = load_images()
    cells = table_master(images, hosts, procs, evals)
    table_warm(cells, hosts)
    table_cold()
    table_today(images, evals)
    agent = table_agent(cells, procs)
    table_projection(images, cells, agent, not args.no_check)


if __name__ == "__main__":
    main()
