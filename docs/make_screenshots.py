"""Make the README's pictures of the dashboard and the report again, with the tests' browser.

    python docs/make_screenshots.py            # writes docs/dashboard*.png and docs/report.png

A real ``qsae-master --workers 2 --dashboard 0.0.0.0:0`` run is watched in headless Chromium
(tests/browser.py: Debian's chromium and chromedriver): the page mid-run, the page after one
worker is SIGKILLed (it shows as lost), and the page asked for without its token (refused).
Then a short run, resumed once, gets ``qsae-report`` and its report.html is shot offline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "tests"))

import browser  # noqa: E402
from procs import stop  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def master(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "qsae-master"), *args], env=ENV, text=True, **kw)


def wait(what, seconds: float, why: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"make_screenshots: {why} within {seconds} s")


def state(url: str) -> dict:
    base, _, query = url.partition("?")
    with urllib.request.urlopen(f"{base}state.json?{query}", timeout=10) as r:
        return json.loads(r.read())


def dashboard(tmp: Path) -> None:
    p = master("--workers", "2", "--patches", "20000", "--iters", "100000", "--checkpoint-every", "0",
               "--worker-timeout", "2", "--dashboard", "0.0.0.0:0", "--out", str(tmp / "live"),
               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        port, token = re.match(r"dashboard: http://[^:/]+:(\d+)/\?token=([\w-]+)", p.stdout.readline()).groups()
        url, bare = f"http://127.0.0.1:{port}/?token={token}", f"http://127.0.0.1:{port}/"
        with browser.chromium(1400, 1000) as d:
            d.get(url)
            wait(lambda: state(url)["info"]["history_length"] > 150, 120, "150 iterations never completed")
            time.sleep(1.5)  # a refresh or two: the filters of the latest θ
            d.save_screenshot(str(DOCS / "dashboard.png"))
            victim = next(w for w in state(url)["workers"] if w["state"] == "active")
            os.kill(victim["pid"], signal.SIGKILL)
            wait(lambda: d.find_elements("css selector", "#workers tbody tr.lost"), 30, "the lost worker never showed")
            time.sleep(1.5)
            d.execute_script("document.getElementById('workers').scrollIntoView()")
            d.save_screenshot(str(DOCS / "dashboard-lost.png"))
            d.set_window_size(900, 300)
            d.get(bare)
            d.save_screenshot(str(DOCS / "dashboard-refused.png"))
    finally:
        stop(p)


def report(tmp: Path) -> None:
    out = tmp / "report-run"
    common = ("--workers", "2", "--patches", "20000", "-q", "--dashboard", "off")
    for extra in (("--iters", "100", "--out", str(out)), ("--iters", "300", "--resume", str(out))):
        r = master(*common, *extra, stdout=subprocess.DEVNULL)
        if r.wait(300) != 0:
            raise SystemExit(f"make_screenshots: qsae-master {' '.join(extra)} failed")
    subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-report"), str(out)], env=ENV, check=True)
    with browser.chromium(1300, 2300) as d:
        d.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
        d.get((out / "report.html").as_uri())
        height = d.execute_script("return document.documentElement.scrollHeight")
        d.set_window_size(1300, min(height + 40, 4000))
        d.save_screenshot(str(DOCS / "report.png"))


def main() -> int:
    why = browser.missing()
    if why:
        raise SystemExit(f"make_screenshots: {why}")
    with tempfile.TemporaryDirectory(prefix="qsae-shots-") as tmp:
        dashboard(Path(tmp))
        report(Path(tmp))
    for name in ("dashboard.png", "dashboard-lost.png", "dashboard-refused.png", "report.png"):
        print(f"wrote {DOCS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
