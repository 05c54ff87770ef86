"""Does watching a run slow it? Evaluations per second of a 2-worker run, the dashboard's page
open and refreshing at 10 Hz against closed.

    python benchmarks/bench_dashboard.py                  # headless Chromium, then a plain HTTP poller
    python benchmarks/bench_dashboard.py --client http --pairs 6 --seconds 5

One Master with 2 local workers evaluates the cost at a fixed θ for ``--seconds`` per phase,
through the same wrapper train() uses with a dashboard (evaluations counted, the workers'
table published) and with one history line published per evaluation, so the page always
has new points to fetch and draw (more than a real run, whose iterations are rarer).
Phases alternate closed / open ``--pairs`` times (short phases, so slow drifts of a shared
machine fall on both); printed are the ratio of each pair's rates (median, quartiles) and
of the medians. "open" is a real headless Chromium (tests/browser.py) showing the page with
``?refresh=100``; "closed" is the same page frozen (``Page.setWebLifecycleState``: no timer
runs, nothing is fetched or drawn, as if nobody had it open), or,
with ``--client http``, a thread fetching state.json 10 times a second (the server's cost
alone, no browser competing for the cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from qsae.dashboard import Dashboard  # noqa: E402
from qsae.data import load_images  # noqa: E402
from qsae.master import Master  # noqa: E402
from qsae.model import SAEConfig, init_params  # noqa: E402
from qsae.train import RunSpec, board_feed  # noqa: E402


def tree_cpu(root: int | None) -> float:
    """CPU seconds (user + system) of ``root`` and all its descendants, from /proc."""
    if root is None:
        return 0.0
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            stats[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    keep, total = {root}, 0.0
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in stats.items():
            if ppid in keep and pid not in keep:
                keep.add(pid)
                changed = True
    return sum(stats[p][1] for p in keep if p in stats)


def phase(objective, board: Dashboard, theta: np.ndarray, seconds: float, start_it: int,
          browser_pid: int | None = None) -> tuple[int, float, float, float]:
    """Evaluate for ``seconds``; (evaluations, evaluations per second, this process's CPU
    seconds per wall second (master and server threads), the browser's)."""
    n, t0, c0, b0 = 0, time.perf_counter(), time.process_time(), tree_cpu(browser_pid)
    while time.perf_counter() - t0 < seconds:
        cost, grad = objective(theta)
        n += 1
        board.iteration(start_it + n, time.perf_counter() - t0, cost, float(np.linalg.norm(grad)), theta)
    wall = time.perf_counter() - t0
    return n, n / wall, (time.process_time() - c0) / wall, (tree_cpu(browser_pid) - b0) / wall


class Poller:
    """A thread fetching state.json (since the last line, as the page does) ``hz`` times a second."""

    def __init__(self, url: str, hz: float = 10.0) -> None:
        self.url, self.period, self.stop, self.requests = url, 1.0 / hz, threading.Event(), 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        since = 0
        while not self.stop.wait(self.period):
            with urllib.request.urlopen(f"{self.url}state.json?since={since}", timeout=10) as r:
                since += len(__import__("json").loads(r.read())["history"])
            self.requests += 1

    def __enter__(self) -> "Poller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)


def measure(client: str, pairs: int, seconds: float, patches: int, verbose: bool = False) -> tuple[dict, dict]:
    cfg = SAEConfig()
    theta = init_params(cfg, seed=0)
    rates = {"closed": [], "open": []}
    cpu = {"closed": [], "open": []}
    with Master(workers=2, config=cfg, dtype="float32") as master, Dashboard() as board:
        master.scatter_images(load_images(), m=patches, seed=0)
        spec = RunSpec(config=cfg, data={"m": patches}, maxiter=10**9, meta={"dtype": "float32"})
        objective = board_feed(board, master, spec, [])
        phase(objective, board, theta, 1.0, 0)  # warm up: speeds measured, blocks settled
        it = 10**6
        browser_ctx, browser_pid = None, None
        if client == "browser":
            import browser

            why = browser.missing()
            if why:
                raise SystemExit(f"bench_dashboard: no browser: {why} (or --client http)")
            browser_ctx = browser.chromium()
            driver = browser_ctx.__enter__()
            browser_pid = driver.service.process.pid  # chromedriver: chromium and its renderers below it
            driver.get(board.url + "?refresh=100")
            time.sleep(1.0)

            def page(state: str) -> None:  # a frozen page runs no timer and fetches nothing: "closed"
                driver.execute_cdp_cmd("Page.setWebLifecycleState", {"state": "active" if state == "open" else "frozen"})
        try:
            for k in range(pairs):
                for state in ("closed", "open") if k % 2 == 0 else ("open", "closed"):
                    if client == "browser":
                        page(state)
                        n, rate, own, other = phase(objective, board, theta, seconds, it, browser_pid)
                    elif state == "open":
                        with Poller(board.url):
                            n, rate, own, other = phase(objective, board, theta, seconds, it)
                    else:
                        n, rate, own, other = phase(objective, board, theta, seconds, it)
                    it += n
                    rates[state].append(rate)
                    cpu[state].append((own / rate * 1e3, other))
                    if verbose:
                        print(f"  {client:<8} {state:<7} {n:6d} evaluations  {rate:8.1f} /s   master+server "
                              f"{own / rate * 1e3:6.2f} ms CPU an evaluation   browser {other * 100:5.1f}% of a core",
                              flush=True)
            if client == "browser":
                page("open")
                time.sleep(1.5)
                points = int(driver.find_element("id", "cost_it").get_attribute("data-points") or 0)
                assert points > 0, "the page drew nothing: not a fair 'open'"
        finally:
            if browser_ctx is not None:
                browser_ctx.__exit__(None, None, None)
    return rates, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--client", choices=("browser", "http", "both"), default="both")
    p.add_argument("--pairs", type=int, default=30, help="closed/open pairs (alternating order)")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per phase")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per phase")
    p.add_argument("--patches", type=int, default=20_000, help="patches m (20000: ~5 ms an evaluation on 2 workers)")
    args = p.parse_args(argv)
    from qsae.bench import machine

    print(f"# {machine()}")
    rows = []
    for client in (("browser", "http") if args.client == "both" else (args.client,)):
        rates, cpu = measure(client, args.pairs, args.seconds, args.patches, args.verbose)
        closed, opened = statistics.median(rates["closed"]), statistics.median(rates["open"])
        pair = sorted(o / c for o, c in zip(rates["open"], rates["closed"]))
        print(f"{client}: open/closed of each pair: median {statistics.median(pair):.3f}, quartiles "
              f"{pair[len(pair) // 4]:.3f}-{pair[3 * len(pair) // 4]:.3f}, mean {statistics.fmean(pair):.3f}")
        own = {k: statistics.median(c[0] for c in v) for k, v in cpu.items()}
        other = {k: statistics.median(c[1] for c in v) for k, v in cpu.items()}
        rows.append((client, closed, opened, opened / closed, own["closed"], own["open"], other["open"] - other["closed"]))
    print(f"\n{'page open by':<14}{'closed /s':>11}{'open /s':>11}{'open/closed':>13}{'master ms/eval closed':>23}"
          f"{'open':>8}{'browser extra':>15}")
    for client, closed, opened, ratio, own_c, own_o, extra in rows:
        extra_s = f"{extra * 100:.1f}% core" if client == "browser" else "-"
        print(f"{client:<14}{closed:>11.1f}{opened:>11.1f}{ratio:>13.3f}{own_c:>23.3f}{own_o:>8.3f}{extra_s:>15}")
    print(f"(medians of {args.pairs} alternating phases of {args.seconds:g} s; 2 workers, {args.patches} patches, float32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
