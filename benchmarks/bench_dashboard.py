"""Does watching a run slow it? Evaluations per second of a 2-worker run, the dashboard's page
open and refreshing at 10 Hz against closed.

    python benchmarks/bench_dashboard.py                  # headless Chromium, then a plain HTTP poller
    python benchmarks/bench_dashboard.py --client http --pairs 6 --seconds 5

One Master with 2 local workers evaluates the cost at a fixed θ for ``--seconds`` per phase,
through the same wrapper train() uses with a dashboard (evaluations counted, the workers'
table published) and with one history line published per evaluation, so the page always
has new points to fetch and draw (more than a real run, whose iterations are rarer).
Phases alternate closed / open ``--pairs`` times, so slow drifts of a shared machine fall on
both; the ratio is of the medians. "open" is a real headless Chromium (tests/browser.py)
showing the page with ``?refresh=100`` (the browser is on about:blank while closed), or,
with ``--client http``, a thread fetching state.json 10 times a second (the server's cost
alone, no browser competing for the cores).
"""

from __future__ import annotations

import argparse
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


def phase(objective, board: Dashboard, theta: np.ndarray, seconds: float, start_it: int) -> tuple[int, float]:
    """Evaluate for ``seconds``; (evaluations, evaluations per second)."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        cost, grad = objective(theta)
        n += 1
        board.iteration(start_it + n, time.perf_counter() - t0, cost, float(np.linalg.norm(grad)), theta)
    return n, n / (time.perf_counter() - t0)


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


def measure(client: str, pairs: int, seconds: float, patches: int) -> dict:
    cfg = SAEConfig()
    theta = init_params(cfg, seed=0)
    rates = {"closed": [], "open": []}
    with Master(workers=2, config=cfg, dtype="float32") as master, Dashboard() as board:
        master.scatter_images(load_images(), m=patches, seed=0)
        spec = RunSpec(config=cfg, data={"m": patches}, maxiter=10**9, meta={"dtype": "float32"})
        objective = board_feed(board, master, spec, [])
        phase(objective, board, theta, 1.0, 0)  # warm up: speeds measured, blocks settled
        it = 10**6
        browser_ctx = None
        if client == "browser":
            import browser

            why = browser.missing()
            if why:
                raise SystemExit(f"bench_dashboard: no browser: {why} (or --client http)")
            browser_ctx = browser.chromium()
            driver = browser_ctx.__enter__()
        try:
            for k in range(pairs):
                for state in ("closed", "open") if k % 2 == 0 else ("open", "closed"):
                    if client == "browser":
                        driver.get(board.url + "?refresh=100" if state == "open" else "about:blank")
                        if state == "open":
                            time.sleep(0.5)  # the page loaded and polling
                        n, rate = phase(objective, board, theta, seconds, it)
                    elif state == "open":
                        with Poller(board.url):
                            n, rate = phase(objective, board, theta, seconds, it)
                    else:
                        n, rate = phase(objective, board, theta, seconds, it)
                    it += n
                    rates[state].append(rate)
                    print(f"  {client:<8} {state:<7} {n:6d} evaluations  {rate:8.1f} /s", flush=True)
            if client == "browser":
                driver.get(board.url + "?refresh=100")
                time.sleep(1.5)
                points = int(driver.find_element("id", "cost_it").get_attribute("data-points") or 0)
                assert points > 0, "the page drew nothing: not a fair 'open'"
        finally:
            if browser_ctx is not None:
                browser_ctx.__exit__(None, None, None)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--client", choices=("browser", "http", "both"), default="both")
    p.add_argument("--pairs", type=int, default=4, help="closed/open pairs (alternating order)")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per phase")
    p.add_argument("--patches", type=int, default=20_000, help="patches m (20000: ~5 ms an evaluation on 2 workers)")
    args = p.parse_args(argv)
    rows = []
    for client in (("browser", "http") if args.client == "both" else (args.client,)):
        rates = measure(client, args.pairs, args.seconds, args.patches)
        closed, opened = statistics.median(rates["closed"]), statistics.median(rates["open"])
        rows.append((client, closed, opened, opened / closed))
    print(f"\n{'page open by':<14}{'closed /s':>11}{'open /s':>11}{'open/closed':>13}")
    for client, closed, opened, ratio in rows:
        print(f"{client:<14}{closed:>11.1f}{opened:>11.1f}{ratio:>13.3f}")
    print(f"(medians of {args.pairs} alternating phases of {args.seconds:g} s; 2 workers, {args.patches} patches, float32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
