"""The live, read-only page of a run: cost curves, filters, workers and events in a browser.

    qsae-master --workers 2                      # prints  dashboard: http://127.0.0.1:PORT/
    qsae-master --dashboard 0.0.0.0:8787         # other hosts: the URL carries a token
    qsae-master --dashboard off

    with Dashboard("127.0.0.1:0") as board, Master(workers=2, on_event=board.on_event) as master:
        master.scatter_images(images, m=10_000)
        train(master, theta0, spec, dashboard=board)   # or train(..., dashboard="127.0.0.1:0")

The training thread *publishes*: every call (``iteration``, ``on_event``, ``workers``, ...)
appends or replaces a few references under a lock and returns. The server thread only
reads: it copies what it needs under the same lock and does all its work (JSON, the
filters' PNG) outside it, so a page refreshing at 10 Hz never holds up a round. Nothing
a request carries reaches the training; every route is a GET.

The page is one HTML document with its own small script and style (no CDN, nothing from
the network): it polls ``state.json`` about once a second (``?refresh=MS`` to change),
draws the curves as inline SVG and reloads ``filters.png`` (rendered here from θ with
matplotlib's PIL) when new filters are published.

Security (as Jupyter): bound to 127.0.0.1 unless asked; any other address gets a token
made per run (``secrets.token_urlsafe``), printed in the URL, and every request without
it is answered 403. Without a token, a request naming another host than the loopback's
in its Host header is refused too (a web page cannot read the dashboard through DNS
rebinding). Malformed requests are answered 4xx by the standard library's parser.
"""

from __future__ import annotations

import collections
import io
import itertools
import ipaddress
import json
import logging
import math
import secrets
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .errors import ConfigError

__all__ = ["Dashboard", "parse_address", "DEFAULT_ADDRESS"]

log = logging.getLogger("qsae.dashboard")

DEFAULT_ADDRESS = "127.0.0.1:0"  # loopback, any free port
FILTERS_EVERY = 5  # iterations between published filters ...
FILTERS_SECONDS = 2.0  # ... and seconds: each is a PNG drawn in the server (1-9 ms holding the GIL)
WORKERS_EVERY = 0.25  # seconds between samples of the workers' table during a run
MAX_EVENTS = 500  # events kept for the page (workers.jsonl keeps them all)
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request (no idle thread holds on)


def parse_address(text: str) -> tuple[str, int] | None:
    """``ADDR:PORT``, ``:PORT`` or ``off`` -> (host, port) or None; ConfigError otherwise."""
    if text.strip().lower() == "off":
        return None
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--dashboard {text}: give ADDR:PORT (e.g. 127.0.0.1:8787; port 0: any free one), "
                          ":PORT, or off")
    return host, int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard:
    """A read-only HTTP page of one run, fed by the training thread.

    Parameters
    ----------
    address : "ADDR:PORT" (port 0: any free port); loopback unless asked.
    token : the token the URL must carry. Default: none on a loopback address, a new
        ``secrets.token_urlsafe(16)`` on any other; ``True`` asks for one on loopback too.
    refresh : seconds between the page's updates.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, token: str | bool | None = None, refresh: float = 1.0) -> None:
        parsed = parse_address(address)
        if parsed is None:
            raise ConfigError("Dashboard('off'): to run without a dashboard, do not make one")
        self.host, self.port = parsed
        if token is True or (token is None and not _loopback(self.host)):
            token = secrets.token_urlsafe(16)
        self.token: str | None = token or None
        self.refresh = float(refresh)
        self._lock = threading.Lock()
        self._history: list[list[float]] = []  # [iteration, seconds, cost, |grad|], appended only
        self._events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self._n_events = 0
        self._workers: list[dict] = []
        self._backups: dict = {}
        self._info: dict[str, Any] = {"state": "starting", "evaluations": 0}
        self._settings: dict[str, Any] = {}
        self._filters: tuple[int, np.ndarray, Any] | None = None  # (iteration, θ, config)
        self._filters_at = 0.0  # time.monotonic() of the last published filters
        self._png: tuple[int, bytes] | None = None  # the last rendered filters (server side only)
        self._png_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._config: Any = None  # the model's settings (SAEConfig), to draw the filters
        self._master: Any = None  # a Master given to watch(): callback() samples its table
        self._sampled = 0.0  # time.monotonic() of that sample

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Dashboard":
        """Bind and serve in a daemon thread; ConfigError when the address cannot be bound."""
        handler = type("Handler", (_Handler,), {"board": self})
        try:
            server = _Server6 if ":" in self.host else _Server
            self._server = server((self.host, self.port), handler)
        except OSError as e:
            raise ConfigError(f"--dashboard {self.host}:{self.port}: cannot listen there ({e.strerror}); give another "
                              f"port (0: any free one) or --dashboard off") from e
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="qsae-dashboard", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Dashboard":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The page's address, with the token when there is one."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    # ------------------------------------------------------------------ publishing (training thread)
    def settings(self, **settings: Any) -> None:
        """The run's settings (model, data, optimizer, protocol, dtype, ...): shown as a table."""
        with self._lock:
            self._settings.update(settings)

    def begin(self, maxiter: int, start_iteration: int = 0, history: list[dict] | None = None,
              config: Any = None) -> None:
        """A run starts: its last iteration, where it starts (a resumed run), its earlier history."""
        rows = [[h["iteration"], h["seconds"], h["cost"], h.get("grad_norm", float("nan"))] for h in history or []]
        with self._lock:
            self._history = rows
            self._config = config
            self._info.update(state="running", maxiter=int(maxiter) or None, start_iteration=int(start_iteration),
                              resumed_at=int(start_iteration) if start_iteration else None,
                              session_started=time.time())

    def iteration(self, iteration: int, seconds: float, cost: float, grad_norm: float,
                  theta: np.ndarray | None = None) -> None:
        """A completed iteration. ``theta`` is kept by reference (the caller must not change it
        afterwards) and drawn as filters every ``FILTERS_EVERY`` iterations and
        ``FILTERS_SECONDS`` seconds at most."""
        with self._lock:
            self._history.append([int(iteration), float(seconds), float(cost), float(grad_norm)])
            now = time.monotonic()
            if theta is not None and (self._filters is None or (iteration - self._filters[0] >= FILTERS_EVERY
                                                                and now - self._filters_at >= FILTERS_SECONDS)):
                self._filters, self._filters_at = (int(iteration), theta, self._config), now

    def evaluations(self, n: int) -> None:
        """The cost function has been evaluated ``n`` times."""
        self._info["evaluations"] = int(n)  # one store of a reference: atomic under the GIL

    def workers(self, status: list[dict], backups: dict | None = None) -> None:
        """The workers' table (``Master.status()``) and backups computed, by worker name."""
        with self._lock:
            self._workers = status
            if backups is not None:
                self._backups = dict(backups)

    def on_event(self, event: dict) -> None:
        """``Master(on_event=...)``: a membership or placement event (and the table after it)."""
        with self._lock:
            self._n_events += 1
            self._events.append({"n": self._n_events, "time": event.get("time", time.time()),
                                 "event": event.get("event", "?"), "detail": event.get("detail", "")})
            if event.get("workers") is not None:
                self._workers = event["workers"]

    def watch(self, master) -> "Dashboard":
        """Show a ``Master``'s membership and placement events (chained after its own
        ``on_event``) and, through ``callback``, its workers' table; returns self.

            with Master(workers=2) as master, Dashboard() as board:
                board.watch(master)
                master.scatter_images(images, m=10_000)
                master.fit(maxiter=400, callback=board.callback)
        """
        previous = master.members.on_event

        def on_event(event: dict) -> None:
            if previous is not None:
                previous(event)
            self.on_event(event)

        master.members.on_event = on_event
        self._master = master
        with self._lock:
            self._config = master.config
        self.settings(model=master.config.to_dict(), protocol=master.reducer.name, dtype=master.dtype.name,
                      master=master.address)
        self.workers(master.status(), master.backups_by)
        return self

    def callback(self, info) -> None:
        """``callback=`` of ``qsae.optim.minimize`` and ``Master.fit``: an iteration (and the
        watched master's table, every ``WORKERS_EVERY`` seconds at most)."""
        if self._info.get("state") == "starting":
            self.begin(0, config=self._config)
        self.iteration(info.iteration, info.seconds, info.cost, info.grad_norm, info.x)  # x: the optimizer's copy
        now = time.monotonic()
        if self._master is not None and now - self._sampled >= WORKERS_EVERY:
            self._sampled = now
            self.workers(self._master.status(), self._master.backups_by)

    def end(self, message: str, filters: tuple[int, np.ndarray] | None = None) -> None:
        """The run ended (``message``: converged, ran its iterations, stopped, failed)."""
        with self._lock:
            self._info.update(state="finished", message=message)
            if filters is not None:
                self._filters = (int(filters[0]), filters[1], self._config)

    # ------------------------------------------------------------------ reading (server threads)
    def state(self, since: int = 0, events_after: int = 0) -> dict:
        """What the page shows: history lines from ``since`` on, events numbered after
        ``events_after``, and everything else whole."""
        with self._lock:  # copies of references and short lists only; the work is done outside
            history = self._history[since:]
            n = len(self._history)
            last = self._history[-1] if self._history else None
            first = self._events[0]["n"] if self._events else 0  # numbers are consecutive in the deque
            events = list(itertools.islice(self._events, max(0, events_after - first + 1), None))
            workers, backups = self._workers, dict(self._backups)
            info, settings = dict(self._info), dict(self._settings)
            filters = self._filters[0] if self._filters is not None else None
        info.update(history_length=n, filters_iteration=filters, now=time.time())
        info["eta"] = _eta(last, info)
        table = [{**w, "backups": backups.get(w.get("name"), 0)} for w in workers]
        return {"info": info, "history_from": since, "history": [_finite(r) for r in history],
                "workers": [{k: _json_safe(v) for k, v in w.items()} for w in table], "events": events,
                "settings": {k: _json_safe(v) for k, v in settings.items()}}

    def filters_png(self) -> bytes | None:
        """The published filters as a PNG, rendered once per published θ (in the server thread)."""
        with self._lock:
            published = self._filters
        if published is None or published[2] is None:
            return None
        it, theta, config = published
        with self._png_lock:
            if self._png is None or self._png[0] != it:
                self._png = (it, _render_filters(theta, config))
            return self._png[1]


def _eta(last: list | None, info: dict) -> float | None:
    """Seconds left at this session's pace (``last``: the latest history line); None before
    the session's first iteration, when it ended, or without a last iteration."""
    if last is None or not info.get("maxiter"):
        return None
    last_it = last[0]
    done = last_it - info.get("start_iteration", 0)
    if done <= 0 or info.get("state") != "running":
        return None
    elapsed = time.time() - info["session_started"]
    return max(0.0, elapsed / done * (info["maxiter"] - last_it))


def _finite(row: list) -> list:
    return [v if isinstance(v, int) or math.isfinite(v) else None for v in row]


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    return str(v)


def _render_filters(theta: np.ndarray, config: Any) -> bytes:
    """One pixel a weight (the page enlarges it, pixelated): ~0.3 ms where a 6× PNG took 8."""
    from PIL import Image  # a dependency of matplotlib

    from .viz import filter_grid

    grid = np.round(filter_grid(theta, config) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------- the server
def _host_name(header: str) -> str:
    """The name in a Host header, without its port: 'localhost:8787' -> 'localhost', '[::1]:80' -> '::1'."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never keeps the process alive
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """GET / (the page), /state.json, /filters.png; anything else 4xx."""

    board: Dashboard  # set by Dashboard.start
    protocol_version = "HTTP/1.1"  # keep-alive: the page's polls reuse one connection
    default_request_version = "HTTP/1.0"  # a garbled request line is answered with a status line too
    timeout = REQUEST_TIMEOUT
    server_version = "qsae-dashboard"
    error_message_format = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
                            "<title>%(code)d %(message)s</title></head><body style=\"font:15px system-ui,sans-serif;"
                            'margin:24px\"><h1 style=\"font-size:20px\">%(code)d %(message)s</h1><p>%(explain)s</p>'
                            "</body></html>")
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self._get(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._get(body=False)

    def _get(self, body: bool) -> None:
        url = urlsplit(self.path)
        try:
            query = parse_qs(url.query, strict_parsing=False, max_num_fields=16)
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "malformed query string")
        board = self.board
        host = _host_name(self.headers.get("Host", ""))
        if board.token is None and host and not _loopback(host):  # a page on another site, via DNS rebinding
            return self._error(HTTPStatus.FORBIDDEN, f"this dashboard answers to 127.0.0.1 or localhost, not "
                                                     f"{host[:80]!r}: open http://127.0.0.1:{board.port}/")
        if board.token is not None:
            given = (query.get("token") or [""])[0]
            if not secrets.compare_digest(given.encode(), board.token.encode()):
                return self._error(HTTPStatus.FORBIDDEN, "this dashboard needs the token of its URL (printed by "
                                                         "qsae-master at the start of the run): add ?token=...")
        if url.path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, "text/html; charset=utf-8", _page(board), body)
        if url.path == "/state.json":
            since, after = (query.get("since") or ["0"])[0], (query.get("events") or ["0"])[0]
            if not all(v.isascii() and v.isdigit() and len(v) <= 9 for v in (since, after)):  # "²" is a digit too
                return self._error(HTTPStatus.BAD_REQUEST, "since= and events= take whole numbers (lines and "
                                                           "events the page has)")
            data = json.dumps(board.state(int(since), int(after)), separators=(",", ":")).encode()
            return self._send(HTTPStatus.OK, "application/json", data, body)
        if url.path == "/filters.png":
            png = board.filters_png()
            if png is None:
                return self._error(HTTPStatus.NOT_FOUND, "no filters yet")
            return self._send(HTTPStatus.OK, "image/png", png, body)
        if url.path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, "image/x-icon", b"", body)
        return self._error(HTTPStatus.NOT_FOUND, f"no page {url.path[:80]!r}: try /")

    def _send(self, status: HTTPStatus, ctype: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                    "style-src 'unsafe-inline'; img-src 'self' data:")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: HTTPStatus, why: str) -> None:
        self.send_error(status, explain=why)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method: the client's mistake, not ours
            code = HTTPStatus.METHOD_NOT_ALLOWED
        super().send_error(code, message, explain)
        if code == HTTPStatus.METHOD_NOT_ALLOWED:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's name)
        log.debug("%s %s", self.address_string(), format % args)


def _page(board: Dashboard) -> bytes:
    token = json.dumps(board.token or "")
    return (_HTML.replace("__TOKEN__", token).replace("__REFRESH__", str(int(board.refresh * 1000)))
            ).encode()


_HTML = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>qsae run</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#222}
header{background:#24303f;color:#fff;padding:8px 16px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
header .k{opacity:.7;margin-right:4px}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:12px;padding:12px}
section{background:#fff;border:1px solid #dde;border-radius:6px;padding:8px 12px;min-width:0}
.wide{grid-column:span 2}
@media (max-width:900px){.wide{grid-column:auto}}
h2{font-size:15px;margin:4px 0 8px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
td:first-child,th:first-child,td.l{text-align:left}
tr.lost td{color:#b00;font-weight:bold} tr.leaving td{color:#a60} tr.joining td{color:#06a}
svg{width:100%;height:220px;display:block}
svg .ax{stroke:#999;stroke-width:1} svg text{font-size:10px;fill:#555}
svg polyline{fill:none;stroke:#1f6fd0;stroke-width:1.5}
#events{max-height:260px;overflow:auto} #events td{text-align:left;white-space:normal}
#settings td{white-space:normal;text-align:left}
#filters{image-rendering:pixelated;max-width:100%;border:1px solid #ccc;width:330px}
#status.bad{color:#f88}
</style></head><body>
<header><h1>qsae</h1>
<span><span class="k">state</span><b id="state">starting</b></span>
<span><span class="k">iteration</span><b id="iteration">-</b></span>
<span><span class="k">cost</span><b id="cost">-</b></span>
<span><span class="k">|grad|</span><b id="grad">-</b></span>
<span><span class="k">evaluations</span><b id="evals">0</b></span>
<span><span class="k">seconds</span><b id="seconds">-</b></span>
<span><span class="k">eta</span><b id="eta">-</b></span>
<span id="status"></span></header>
<main>
<section><h2>cost against iteration (log)</h2><svg id="cost_it" data-points="0"></svg></section>
<section><h2>cost against seconds (log)</h2><svg id="cost_s" data-points="0"></svg></section>
<section><h2>|grad| against iteration (log)</h2><svg id="grad_it" data-points="0"></svg></section>
<section><h2>filters <small id="filters_it"></small></h2><img id="filters" alt="the hidden units' input weights"></section>
<section class="wide"><h2>workers</h2><table id="workers"><thead><tr><th>name</th><th>host</th><th>processes</th>
<th>state</th><th>rows</th><th>blocks</th><th>rows/s</th><th>last compute ms</th><th>backups</th><th>BLAS</th></tr>
</thead><tbody></tbody></table>
<h2>hosts</h2><table id="hosts"><thead><tr><th>host</th><th>workers</th><th>processes</th><th>active</th><th>rows</th><th>rows/s</th></tr>
</thead><tbody></tbody></table></section>
<section class="wide"><h2>membership and placement</h2><div id="events"><table><tbody></tbody></table></div></section>
<section><h2>settings</h2><table id="settings"><tbody></tbody></table></section>
</main>
<script>
"use strict";
const TOKEN = __TOKEN__, REFRESH = Number(new URLSearchParams(location.search).get("refresh")) || __REFRESH__;
const H = [];  // [iteration, seconds, cost, |grad|]
const DRAW_EVERY = 1000;  // ms between redraws of the curves at most (polls may come faster: ?refresh=100)
let filtersShown = null, lastEvent = 0, drawn = -1, drawnAt = 0, failures = 0, tables = "";
const $ = id => document.getElementById(id);
const put = (id, text) => { const e = $(id); if (e.textContent !== text) e.textContent = text; };  // no layout if same
const q = p => p + (TOKEN ? (p.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : "");
const fmt = (v, d) => v == null ? "-" : Number(v).toPrecision(d || 6);
const num = v => v == null ? "-" : Math.round(v).toLocaleString("en");
function dur(s) {
  if (s == null) return "-";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
}
function el(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text != null) e.textContent = text;
  return e;
}
function plot(svg, xs, ys, logy) {
  const pts = [];
  for (let i = 0; i < xs.length; i++) {
    let y = ys[i];
    if (y == null || !isFinite(y) || (logy && y <= 0)) continue;
    pts.push([xs[i], logy ? Math.log10(y) : y]);
  }
  const W = svg.clientWidth || 400, Ht = svg.clientHeight || 220, L = 56, R = 8, T = 8, B = 22;
  svg.setAttribute("viewBox", `0 0 ${W} ${Ht}`);
  svg.replaceChildren();
  svg.dataset.points = pts.length;
  const MAX_DRAWN = Math.max(100, Math.round(W));  // a point a pixel: more cost the browser CPU and show nothing
  if (pts.length > MAX_DRAWN) {  // long runs: a bounded polyline, the last point kept
    const k = Math.ceil(pts.length / MAX_DRAWN), last = pts[pts.length - 1];
    pts.splice(0, pts.length, ...pts.filter((_, i) => i % k === 0), last);
  }
  svg.appendChild(el("line", {class: "ax", x1: L, y1: Ht - B, x2: W - R, y2: Ht - B}));
  svg.appendChild(el("line", {class: "ax", x1: L, y1: T, x2: L, y2: Ht - B}));
  if (!pts.length) return;
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5 * Math.abs(y0 || 1); y1 += 0.5 * Math.abs(y1 || 1); }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => Ht - B - (y - y0) / (y1 - y0) * (Ht - T - B);
  for (let k = 0; k <= 4; k++) {
    const yv = y0 + (y1 - y0) * k / 4, xv = x0 + (x1 - x0) * k / 4;
    svg.appendChild(el("text", {x: L - 4, y: sy(yv) + 3, "text-anchor": "end"},
                       logy ? Number(10 ** yv).toPrecision(3) : yv.toPrecision(4)));
    svg.appendChild(el("text", {x: sx(xv), y: Ht - 6, "text-anchor": "middle"},
                       Math.abs(x1 - x0) >= 10 ? Math.round(xv) : xv.toPrecision(3)));
  }
  svg.appendChild(el("polyline", {points: pts.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ")}));
}
function row(tbody, cells, cls) {
  const tr = document.createElement("tr");
  if (cls) tr.className = cls;
  for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
  tbody.appendChild(tr);
}
function show(s) {
  for (const r of s.history) H.push(r);
  const i = s.info, last = H[H.length - 1];
  put("state", i.state + (i.message ? ": " + i.message : "") + (i.resumed_at ? " (resumed at " + i.resumed_at + ")" : ""));
  put("iteration", last ? last[0] + (i.maxiter ? " / " + i.maxiter : "") : "-");
  put("cost", last ? fmt(last[2], 8) : "-");
  put("grad", last ? fmt(last[3], 3) : "-");
  put("evals", String(i.evaluations));
  put("seconds", last ? last[1].toFixed(1) : "-");
  put("eta", i.state === "running" ? dur(i.eta) : "-");
  // redraw when points came, at most every DRAW_EVERY ms (a poll without new points draws what waits)
  if (H.length !== drawn && (Date.now() - drawnAt >= DRAW_EVERY || !s.history.length)) {
    drawn = H.length; drawnAt = Date.now();
    const it = H.map(r => r[0]);
    plot($("cost_it"), it, H.map(r => r[2]), true);
    plot($("cost_s"), H.map(r => r[1]), H.map(r => r[2]), true);
    plot($("grad_it"), it, H.map(r => r[3]), true);
  }
  if (i.filters_iteration != null && i.filters_iteration !== filtersShown) {
    filtersShown = i.filters_iteration;
    $("filters").src = q("filters.png?it=" + filtersShown);
    $("filters_it").textContent = "(iteration " + filtersShown + ")";
  }
  const key = JSON.stringify([s.workers, s.settings]);
  if (key !== tables) { tables = key; showTables(s); }
  const eb = $("events").querySelector("tbody");
  for (const e of s.events) {
    if (e.n <= lastEvent) continue;
    lastEvent = e.n;
    const tr = document.createElement("tr");
    for (const c of [new Date(e.time * 1000).toLocaleTimeString(), e.event, e.detail]) {
      const td = document.createElement("td"); td.textContent = c; tr.appendChild(td);
    }
    eb.insertBefore(tr, eb.firstChild);
  }
}
function showTables(s) {  // only when they changed: a DOM rebuild costs layout
  const wb = $("workers").tBodies[0], hb = $("hosts").tBodies[0], hosts = {};
  wb.replaceChildren(); hb.replaceChildren();
  for (const w of s.workers) {
    const procs = w.procs == null ? 1 : (Array.isArray(w.procs) ? w.procs.length : w.procs);  // an agent's, or 1
    row(wb, [w.name, w.host, procs, w.state, num(w.rows), w.blocks, num(w.rows_per_s),
             w.seconds == null ? "-" : (w.seconds * 1000).toFixed(1), w.backups, w.blas || "-"], w.state);
    const h = hosts[w.host] || (hosts[w.host] = {n: 0, procs: 0, active: 0, rows: 0, rate: 0});
    h.n++; h.procs += procs;
    if (w.state === "active") { h.active++; h.rows += w.rows; h.rate += w.rows_per_s || 0; }
  }
  for (const [name, h] of Object.entries(hosts)) row(hb, [name, h.n, h.procs, h.active, num(h.rows), num(h.rate)]);
  const sb = $("settings").tBodies[0];
  sb.replaceChildren();
  for (const [k, v] of Object.entries(s.settings))
    row(sb, [k, typeof v === "object" && v !== null ? Object.entries(v).map(([a, b]) => a + "=" + b).join(", ") : String(v)]);
}
async function tick() {
  try {
    const r = await fetch(q("state.json?since=" + H.length + "&events=" + lastEvent), {cache: "no-store"});
    if (r.ok) { show(await r.json()); failures = 0; put("status", ""); $("status").className = ""; }
  } catch (e) {
    failures++;
    put("status", "the run's server does not answer (ended?)"); $("status").className = "bad";
  }
  if (failures < 5) setTimeout(tick, REFRESH);
}
tick();
</script></body></html>
"""
