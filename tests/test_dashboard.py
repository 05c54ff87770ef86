"""The live page of a run, looked at as a user would: a real qsae-master, real workers, a
real headless Chromium (tests/browser.py), and plain sockets for what a browser will not send."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import browser
from procs import stop, wait_gone
from qsae.dashboard import Dashboard, parse_address
from qsae.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT = 2.0  # --worker-timeout of the run below: the lost worker must show within it (and a poll)
pytestmark = pytest.mark.timeout(180)


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of a GET, 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` as it is to 127.0.0.1:port and return the first line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while b"\r\n" not in out:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    return out.split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``qsae-master --workers 2`` serving its page on 0.0.0.0 (so with a token), long enough to
    watch; yields (process, URL through 127.0.0.1 with the token, the URL without it)."""
    out = tmp_path_factory.mktemp("run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "qsae-master"), "--workers", "2", "--no-agents", "--patches", "20000",
                          "--iters", "100000", "--checkpoint-every", "0", "--worker-timeout", str(WORKER_TIMEOUT),
                          "--dashboard", "0.0.0.0:0", "--out", str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = p.stdout.readline()
        m = re.match(r"dashboard: http://[^:/]+:(\d+)/\?token=([\w-]+)$", first.strip())
        assert m, f"the first line should be the dashboard's URL with a token, got {first!r}"
        port, token = m.groups()
        yield p, f"http://127.0.0.1:{port}/?token={token}", f"http://127.0.0.1:{port}/"
    finally:
        stop(p)


def state(url: str) -> dict:
    base, _, query = url.partition("?")
    status, body = get(f"{base}state.json?{query}")
    assert status == 200, body
    return json.loads(body)


def wait_for(what, seconds: float, message: str, step: float = 0.1):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"{message} within {seconds} s")


def points(driver) -> int:
    return int(driver.find_element("id", "cost_it").get_attribute("data-points"))


def test_the_page_loads_without_console_errors_and_its_chart_grows(run):
    browser.require()
    p, url, _ = run
    with browser.chromium() as d:
        d.get(url)
        first = wait_for(lambda: points(d), 90, "the cost chart never drew a point")
        grown = wait_for(lambda: points(d) > first + 3 and points(d), 30, "the cost chart gained no points")
        assert grown > first
        it = int(d.find_element("id", "iteration").text.split("/")[0])
        assert it >= grown - 1  # one point an iteration, iteration 0 included
        wait_for(lambda: d.execute_script("const i = document.getElementById('filters');"
                                          "return i.complete && i.naturalWidth > 0"), 30, "no filters drawn")
        rows = d.find_elements("css selector", "#workers tbody tr")
        assert len(rows) == 2 and all("active" in r.text for r in rows)
        blas = {w["name"]: w["blas"] for w in state(url)["workers"]}
        for r in rows:  # plain workers: one process each, and the BLAS each reported in its HELLO
            cells = [c.text for c in r.find_elements("css selector", "td")]
            assert cells[2] == "1" and blas[cells[0]] and cells[-1] == blas[cells[0]], cells
        settings = d.find_element("id", "settings").text
        for word in ("lbfgs", "exact", "float32", "n_hidden=30", "m=20000"):
            assert word in settings
        assert int(d.find_element("id", "evals").text) >= it
        assert d.find_element("id", "events").text.count("join") == 2
        assert browser.console_errors(d) == []
    assert p.poll() is None


def test_without_the_token_a_non_loopback_page_is_refused(run):
    browser.require()
    p, url, bare = run
    for wrong in (bare, bare + "state.json", bare + "filters.png", bare + "?token=", bare + "?token=guess",
                  bare + "state.json?token=" + url.rpartition("=")[2][:-1]):
        status, body = get(wrong)
        assert status == 403, wrong
        assert b"history" not in body and b"token" in body
    assert get(url)[0] == 200
    with browser.chromium() as d:
        d.get(bare)
        assert "403" in d.title + d.find_element("tag name", "body").text
        assert "qsae" not in d.title
    assert p.poll() is None


def test_malformed_requests_get_4xx_and_the_run_goes_on(run):
    p, url, _ = run
    port = int(url.split(":")[2].split("/")[0])
    token = url.rpartition("=")[2]
    before = state(url)["info"]["history_length"]
    answers = {
        b"GARBAGE\r\n\r\n": b"400",
        b"GET / HTTP/9.9\r\n\r\n": b"505",
        b"POST /?token=" + token.encode() + b" HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc": b"405",
        b"DELETE / HTTP/1.1\r\n\r\n": b"405",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n": b"414",
        b"GET /state.json?since=-1&token=" + token.encode() + b" HTTP/1.1\r\n\r\n": b"400",
        b"GET /state.json?since=99999999999&token=" + token.encode() + b" HTTP/1.1\r\n\r\n": b"400",
        b"GET /state.json?since=%C2%B2&token=" + token.encode() + b" HTTP/1.1\r\n\r\n": b"400",  # '²': isdigit()
        b"GET /state.json?events=%D9%A3&token=" + token.encode() + b" HTTP/1.1\r\n\r\n": b"400",  # Arabic-Indic 3
        b"GET /../../etc/passwd?token=" + token.encode() + b" HTTP/1.1\r\n\r\n": b"404",
        b"\x00\xff\x16\x03\x01" * 20 + b"\r\n\r\n": b"400",
    }
    for request, code in answers.items():
        line = raw(port, request)
        assert line.startswith(b"HTTP/1.") and line.split()[1] == code, (request[:40], line)
    after = wait_for(lambda: state(url)["info"]["history_length"] > before and state(url)["info"]["history_length"],
                     30, "the run made no progress after the bad requests")
    assert after > before and p.poll() is None


def test_a_killed_worker_shows_as_lost(run):
    """SIGKILL one worker: its row says lost within the worker timeout (and a refresh)."""
    browser.require()
    p, url, _ = run
    with browser.chromium() as d:
        d.get(url)
        wait_for(lambda: len(d.find_elements("css selector", "#workers tbody tr.active")) == 2, 90,
                 "two active workers never showed")
        victim = next(w for w in state(url)["workers"] if w["state"] == "active")
        os.kill(victim["pid"], signal.SIGKILL)
        t0 = time.monotonic()

        def lost_row():
            for r in d.find_elements("css selector", "#workers tbody tr.lost"):
                if r.find_element("css selector", "td").text == victim["name"]:
                    return r
            return None

        wait_for(lost_row, WORKER_TIMEOUT + 3, f"{victim['name']} (pid {victim['pid']}) never showed as lost")
        seconds = time.monotonic() - t0
        assert seconds <= WORKER_TIMEOUT + 2.5, seconds  # the timeout, a round's check and a page refresh
        assert "lost" in d.find_element("id", "events").text
        assert browser.console_errors(d) == []
        # the run goes on with the other worker
        n = state(url)["info"]["history_length"]
        wait_for(lambda: state(url)["info"]["history_length"] > n, 30, "no iteration after the loss")
    assert wait_gone([victim["pid"]], 5) == [] and p.poll() is None


def test_an_agent_shows_as_one_row_with_its_processes(tmp_path):
    """`qsae-master --workers 2` (one agent of 2 processes, the default): one row, processes 2, and
    the hosts table counts one worker of 2 processes."""
    browser.require()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "qsae-master"), "--workers", "2", "--patches", "20000",
                          "--iters", "100000", "--checkpoint-every", "0", "--dashboard", "127.0.0.1:0",
                          "--out", str(tmp_path / "run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        url = p.stdout.readline().strip().partition("dashboard: ")[2]
        assert url.startswith("http://127.0.0.1:"), url
        with browser.chromium() as d:
            d.get(url)
            row = wait_for(lambda: d.find_elements("css selector", "#workers tbody tr.active"), 90,
                           "the agent never showed as active")
            cells = [c.text for c in row[0].find_elements("css selector", "td")]
            assert len(row) == 1 and cells[0] == "local#0" and cells[2] == "2", cells
            hosts = [c.text for c in d.find_elements("css selector", "#hosts tbody tr td")]
            assert hosts[1:4] == ["1", "2", "1"], hosts  # workers, processes, active
            assert browser.console_errors(d) == []
    finally:
        stop(p)


# ---------------------------------------------------------------------- in-process: the API and the flag
def test_train_starts_a_dashboard_for_the_embedded_api(tmp_path):
    from qsae.data import DataSpec
    from qsae.model import SAEConfig, cost_and_grad, init_params
    from qsae.train import RunSpec, train

    cfg = SAEConfig()
    X = DataSpec(m=500).build()
    seen = {}
    with Dashboard() as board:
        assert board.token is None and board.url.startswith("http://127.0.0.1:")

        def objective(theta):
            if "mid" not in seen and board.state()["info"]["history_length"] >= 3:
                seen["mid"] = json.loads(get(board.url + "state.json?since=1")[1])
            return cost_and_grad(theta, X, cfg)

        spec = RunSpec(config=cfg, data={"m": 500}, maxiter=12, out=tmp_path, meta={"dtype": "float64"})
        result = train(objective, init_params(cfg), spec, echo=lambda s: None, dashboard=board)
        s = json.loads(get(board.url + "state.json")[1])
        status, png = get(board.url + "filters.png")
    mid = seen["mid"]
    assert mid["info"]["state"] == "running" and mid["history_from"] == 1 and mid["history"][0][0] == 1
    assert s["info"]["state"] == "finished" and s["info"]["evaluations"] == result.nfev
    assert [h[0] for h in s["history"]] == list(range(13))
    assert s["history"][-1][2] == pytest.approx(result.fun)
    assert s["settings"]["optimizer"] == "lbfgs" and s["settings"]["model"]["n_hidden"] == cfg.n_hidden
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n" and s["info"]["filters_iteration"] == 12
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(board.url.split(":")[2].strip("/"))), timeout=2).close()


def test_an_address_string_starts_and_closes_its_own_page(tmp_path):
    from qsae.data import DataSpec
    from qsae.model import SAEConfig, cost_and_grad, init_params
    from qsae.train import RunSpec, train

    cfg = SAEConfig()
    X = DataSpec(m=300).build()
    lines = []
    spec = RunSpec(config=cfg, data={"m": 300}, maxiter=3, out=tmp_path)
    train(lambda th: cost_and_grad(th, X, cfg), init_params(cfg), spec, echo=lines.append, dashboard="127.0.0.1:0")
    url = next(ln.split()[1] for ln in lines if ln.startswith("dashboard: "))
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


@pytest.mark.parametrize("text, expected", [("127.0.0.1:8787", ("127.0.0.1", 8787)), (":0", ("127.0.0.1", 0)),
                                            ("off", None), ("OFF", None), ("[::1]:80", ("::1", 80))])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["8787", "host:", "host:port", "1.2.3.4:70000", ""])
def test_a_bad_address_names_the_forms(text):
    with pytest.raises(ConfigError, match="ADDR:PORT"):
        parse_address(text)


def test_loopback_needs_no_token_and_any_other_address_gets_one():
    assert Dashboard("127.0.0.1:0").token is None and Dashboard("localhost:0").token is None
    assert len(Dashboard("0.0.0.0:0").token) >= 20
    assert Dashboard("0.0.0.0:0").token != Dashboard("0.0.0.0:0").token  # one per run
    assert Dashboard("127.0.0.1:0", token=True).token


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), *args], env=env, capture_output=True,
                          text=True, timeout=100)


def test_the_flag_off_bad_and_taken(tmp_path):
    r = cli("--local", "--patches", "300", "--iters", "2", "--dashboard", "off", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "dashboard" not in r.stdout
    r = cli("--local", "--patches", "300", "--iters", "2", "--out", str(tmp_path / "b"))
    assert r.returncode == 0 and re.match(r"dashboard: http://127\.0\.0\.1:\d+/\n", r.stdout), r.stdout
    r = cli("--local", "--iters", "2", "--dashboard", "everywhere", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "--dashboard everywhere: give ADDR:PORT" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()  # checked before anything is written
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("--local", "--iters", "2", "--dashboard", f"127.0.0.1:{port}", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and f"--dashboard 127.0.0.1:{port}: cannot listen there" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_watched_master_fits_with_the_page_fed(tmp_path):
    """The embedded Master: watch() chains its events, callback= feeds Master.fit's iterations."""
    from qsae.data import load_images
    from qsae.master import Master
    from qsae.model import SAEConfig

    cfg = SAEConfig()
    events = []
    with Master(workers=2, config=cfg, on_event=events.append) as master, Dashboard() as board:
        board.watch(master)
        master.scatter_images(load_images(), m=3000, seed=0)
        result = master.fit(maxiter=6, callback=board.callback)
        s = json.loads(get(board.url + "state.json")[1])
    assert [h[0] for h in s["history"]] == list(range(result.nit + 1))
    assert s["history"][-1][2] == pytest.approx(result.fun)
    assert sorted(w["name"] for w in s["workers"]) == ["local#0", "local#1"]
    assert all(w["state"] == "active" and w["rows"] > 0 for w in s["workers"])
    assert sum(w["rows"] for w in s["workers"]) == 3000
    assert [e["event"] for e in s["events"]] == [e["event"] for e in events][-len(s["events"]):]
    assert any(e["event"] == "move" for e in s["events"])  # the placement after watch()
    assert s["settings"]["protocol"] == "exact" and s["settings"]["dtype"] == "float64"
    assert s["info"]["filters_iteration"] is not None and s["info"]["eta"] is None  # maxiter unknown to the page


def test_the_eta_stays_when_a_poll_brings_no_new_line():
    board = Dashboard()
    board.begin(100)
    for it in range(5):
        board.iteration(it, it * 0.1, 1.0 / (it + 1), 0.1)
    time.sleep(0.05)
    full, empty = board.state(0), board.state(5)
    assert empty["history"] == [] and empty["info"]["history_length"] == 5
    assert full["info"]["eta"] > 0 and empty["info"]["eta"] > 0
    board.end("done")
    assert board.state(5)["info"]["eta"] is None


def test_a_loopback_page_answers_only_to_loopback_host_names():
    """No token on 127.0.0.1: a Host header of another name (DNS rebinding) is refused."""
    with Dashboard() as board:
        for host, code in (("evil.example", b"403"), ("evil.example:%d" % board.port, b"403"),
                           ("10.0.0.1", b"403"), ("127.0.0.1:%d" % board.port, b"200"),
                           ("localhost:%d" % board.port, b"200"), ("[::1]:%d" % board.port, b"200")):
            line = raw(board.port, f"GET /state.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert line.split()[1] == code, (host, line)
        assert get(board.url)[0] == 200  # urllib sends Host: 127.0.0.1:PORT


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(browser, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and no browser: no /nonexistent/chromium"):
        browser.require()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        browser.require()


def test_a_poll_gets_only_the_events_it_lacks():
    board = Dashboard()
    for k in range(600):  # more than the page keeps (MAX_EVENTS)
        board.on_event({"time": 1.0, "event": "move", "detail": f"move {k + 1}"})
    every = board.state()["events"]
    assert len(every) == 500 and every[0]["n"] == 101 and every[-1]["n"] == 600
    assert [e["n"] for e in board.state(0, 598)["events"]] == [599, 600]
    assert board.state(0, 600)["events"] == [] and len(board.state(0, 50)["events"]) == 500
