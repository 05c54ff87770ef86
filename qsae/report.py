"""The report of a run: one HTML file to keep, every picture and datum inside it.

    qsae-report runs/latest              # writes runs/latest/report.html
    python -m qsae.report runs/latest

It reads what a run leaves in its directory (``qsae.train``, ``qsae.cli``): model.npz (θ,
settings, iteration, seconds, where it was resumed), history.jsonl (cost and |grad| per
iteration), workers.jsonl (membership and placement events, and the workers' table every
few seconds) and run.log (its warnings and errors). The pictures are PNGs drawn with
matplotlib and inlined as base64; the file needs no server and no network to open (like
dask's ``performance_report``).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ConfigError, QsaeError
from .membership import processes

__all__ = ["write_report", "main"]

RUN_FILES = ("model.npz", "history.jsonl")  # a directory holding either holds a run
LOG_LINES = 50  # warnings and errors of run.log shown (the last ones)
EVENTS = 300  # events listed (the last ones; workers.jsonl keeps them all)


def write_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write the report of the run in ``run_dir`` to ``path`` (default ``run_dir/report.html``).

    Raises
    ------
    ConfigError
        ``run_dir`` holds no run (neither model.npz nor history.jsonl).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run}: no such directory; give the --out directory of a qsae-master run")
    if not any((run / f).is_file() for f in RUN_FILES):
        raise ConfigError(f"{run} holds no run (no model.npz or history.jsonl): give the --out directory of a "
                          f"qsae-master run")
    out = Path(path) if path is not None else run / "report.html"
    data = _read(run)
    out.write_text(_html(run, data), encoding="utf-8")
    return out


# ---------------------------------------------------------------------- reading
def _read(run: Path) -> dict:
    from .train import load_model, read_history

    theta, config, meta = None, None, {}
    if (run / "model.npz").is_file():
        theta, config, meta = load_model(run / "model.npz")
    history = read_history(run / "history.jsonl")
    events = []
    if (run / "workers.jsonl").is_file():
        for line in (run / "workers.jsonl").read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    problems = []
    if (run / "run.log").is_file():
        problems = [ln for ln in (run / "run.log").read_text(errors="replace").splitlines()
                    if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln][-LOG_LINES:]
    return {"theta": theta, "config": config, "meta": meta, "history": history, "events": events,
            "problems": problems}


def _resumed(meta: dict, history: list[dict]) -> list[int]:
    """Iterations the run was resumed at (model.npz's "resumed", as qsae-master saves it)."""
    return [int(k) for k in meta.get("resumed", []) if any(h["iteration"] == k for h in history) or not history]


# ---------------------------------------------------------------------- pictures
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def _curves(history: list[dict], resumed: list[int]) -> str | None:
    from matplotlib.figure import Figure

    if not history:
        return None
    it = np.array([h["iteration"] for h in history], dtype=float)
    secs = np.array([h["seconds"] for h in history], dtype=float)
    cost = np.array([h["cost"] for h in history], dtype=float)
    grad = np.array([h.get("grad_norm", np.nan) if h.get("grad_norm") is not None else np.nan for h in history],
                    dtype=float)
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, x, y, xl, yl in ((axes[0], it, cost, "iteration", "cost J"), (axes[1], secs, cost, "seconds", "cost J"),
                             (axes[2], it, grad, "iteration", "|grad|")):
        ok = np.isfinite(y) & (y > 0)
        ax.plot(x[ok], y[ok], lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        for k in resumed:
            at = k if xl == "iteration" else next((h["seconds"] for h in history if h["iteration"] == k), None)
            if at is not None:
                ax.axvline(at, color="tab:red", ls="--", lw=1, label=f"resumed at {k}")
        if resumed:
            ax.legend(fontsize=8)
    axes[0].set_title("cost against iteration")
    axes[1].set_title("cost against seconds")
    axes[2].set_title("|grad| against iteration")
    return _png(fig)


def _filters(theta: np.ndarray | None, config) -> str | None:
    from PIL import Image

    from .viz import filter_grid

    if theta is None:
        return None
    try:
        grid = filter_grid(theta, config)
    except ConfigError:  # not square patches: no tiles to draw
        return None
    big = np.kron(grid, np.ones((6, 6)))
    buf = io.BytesIO()
    Image.fromarray(np.round(big * 255).astype(np.uint8)).save(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _speeds(events: list[dict]) -> str | None:
    """Each worker's rows/s and rows held against seconds since the first event."""
    from matplotlib.figure import Figure

    samples: dict[str, list[tuple[float, float, float]]] = {}
    t0 = min((e["time"] for e in events if "time" in e), default=None)
    for e in events:
        for w in e.get("workers") or []:
            rate = w.get("rows_per_s")  # the median of recent samples of 10 ms or more (membership.py)
            if not _number(rate) and _number(w.get("seconds")) and w["seconds"] > 0 and w.get("rows"):
                rate = w["rows"] / w["seconds"]  # faster evaluations give no samples: the last one's speed
            if "time" in e and _number(rate):
                rows = w.get("rows", 0) if w.get("state") == "active" else 0
                samples.setdefault(str(w.get("name")), []).append((e["time"] - t0, rate, rows))
    if not samples:
        return None
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for name, rows in sorted(samples.items()):
        t, rate, held = map(np.array, zip(*rows))
        ax.plot(t, rate, marker=".", lw=1, label=name)
        bx.step(t, held, where="post", lw=1, label=name)
    for a, yl, title in ((ax, "rows/s", "each worker's measured speed"), (bx, "rows held", "rows each worker held")):
        a.set_xlabel("seconds since the first worker joined")
        a.set_ylabel(yl)
        a.set_title(title)
        a.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    bx.set_ylim(bottom=0)
    if len(samples) <= 12:
        ax.legend(fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------------- the page
def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(rows: list[tuple], head: tuple | None = None, cls: str = "") -> str:
    out = [f'<table class="{cls}">']
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _img(b64: str | None, alt: str, missing: str) -> str:
    if b64 is None:
        return f"<p class=note>{_e(missing)}</p>"
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _html(run: Path, d: dict) -> str:
    meta, history, config = d["meta"], d["history"], d["config"]
    resumed = [int(k) for k in meta.get("resumed", [])]
    last = history[-1] if history else {}
    iteration = meta.get("iteration", last.get("iteration"))
    seconds = meta.get("seconds", last.get("seconds"))
    finished = meta.get("finished")
    state = ("finished (converged or ran its iterations)" if finished else
             "stopped before its end (resume it with qsae-master --resume DIR)" if finished is False else "unknown")
    summary = [("final cost", f"{last['cost']:.8f}" if history else "-"),
               ("|grad|", f"{last['grad_norm']:.3e}" if history and last.get("grad_norm") is not None else "-"),
               ("iterations", iteration if iteration is not None else "-"),
               ("time", f"{_duration(seconds)} ({seconds:.1f} s of optimizer time)" if seconds is not None else "-"),
               ("state", state),
               ("resumed at iteration", ", ".join(map(str, resumed)) if resumed else "never")]
    settings = []
    if config is not None:
        settings.append(("model", ", ".join(f"{k}={v}" for k, v in config.to_dict().items())))
    if meta.get("data"):
        settings.append(("data", ", ".join(f"{k}={v}" for k, v in meta["data"].items())))
    for key in ("optimizer", "protocol", "dtype"):
        if key in meta:
            settings.append((key, meta[key]))
    events = [e for e in d["events"] if e.get("event") != "speeds"]
    t0 = min((e["time"] for e in d["events"] if "time" in e), default=None)
    names = sorted({str(w.get("name")) for e in d["events"] for w in e.get("workers") or []})
    final = next((e["workers"] for e in reversed(d["events"]) if e.get("workers")), [])
    workers_rows = [(w.get("name"), w.get("host"), w.get("pid"), processes(w.get("procs")), w.get("state"), w.get("rows"),
                     w.get("blocks"), f"{w['rows_per_s']:,.0f}" if isinstance(w.get("rows_per_s"), (int, float)) else "-",
                     f"{w['seconds'] * 1e3:.1f}" if isinstance(w.get("seconds"), (int, float)) else "-",
                     w.get("blas") or "-")
                    for w in final]
    event_rows = [(_when(e["time"]) if "time" in e else "-",
                   f"{e['time'] - t0:.1f}" if "time" in e and t0 is not None else "-", e.get("event"), e.get("detail"))
                  for e in events[-EVENTS:]]
    no_workers = "no workers.jsonl: the run computed in one process (--local) or never started its workers"
    parts = [
        f"<h1>qsae run: {_e(run.resolve().name)}</h1>",
        f"<p class=note>{_e(run.resolve())} · report written {_e(_when(datetime.datetime.now().timestamp()))} by "
        f"qsae {_e(__version__)}</p>",
        "<h2>Result</h2>", _table(summary, cls="kv"),
        "<h2>Settings</h2>", _table(settings, cls="kv") if settings else "<p class=note>no model.npz</p>",
        "<h2>Cost</h2>", _img(_curves(history, resumed), "cost curves", "no history.jsonl lines"),
        "<h2>Filters</h2>", _img(_filters(d["theta"], config), "the hidden units' input weights",
                                  "no model.npz (the run stopped before its first checkpoint)"),
        "<h2>Workers</h2>",
        _img(_speeds(d["events"]), "the workers' speeds over the run",
             "no speeds recorded" if d["events"] else no_workers),
        (f"<p>{len(names)} workers over the run; the table as last recorded:</p>"
         + _table(workers_rows, ("name", "host", "pid", "processes", "state", "rows", "blocks", "rows/s",
                                 "last compute ms", "BLAS"))
         if final else ""),
        "<h2>Membership and placement events</h2>",
        _table(event_rows, ("time", "s", "event", "detail"), cls="events") if event_rows else
        f"<p class=note>{_e(no_workers if not d['events'] else 'no events')}</p>",
    ]
    if len(events) > EVENTS:
        parts.append(f"<p class=note>the last {EVENTS} of {len(events)} events; workers.jsonl has them all</p>")
    if d["problems"]:
        parts += ["<h2>Warnings and errors in run.log</h2>",
                  "<pre>" + _e("\n".join(d["problems"])) + "</pre>"]
    body = "\n".join(parts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qsae run {_e(run.resolve().name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body{{font:14px/1.45 system-ui,sans-serif;max-width:1240px;margin:16px auto;padding:0 16px;color:#222}}
h1{{font-size:22px}} h2{{font-size:17px;border-bottom:1px solid #ddd;margin-top:28px}}
table{{border-collapse:collapse;font-variant-numeric:tabular-nums}} td,th{{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}}
table.kv td:first-child{{color:#555;white-space:nowrap}} table.events td:nth-child(2){{text-align:right}}
img{{max-width:100%}} .note{{color:#666}} pre{{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}}
</style></head><body>
{body}
</body></html>
"""


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qsae-report``; returns the exit status (2: no run there)."""
    p = argparse.ArgumentParser(prog="qsae-report", description="Write DIR/report.html: one self-contained file with "
                                "a finished (or stopped) run's settings, cost curves, filters, workers and events.")
    p.add_argument("run", type=Path, metavar="DIR", help="the run's directory (qsae-master's --out)")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="FILE", help="where to write (default: DIR/report.html)")
    p.add_argument("--version", action="version", version=f"qsae {__version__}")
    args = p.parse_args(argv)
    try:
        out = write_report(args.run, args.output)
    except QsaeError as e:
        print(f"qsae-report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"qsae-report: error: cannot write the report ({e.strerror}: {e.filename}); give -o FILE somewhere "
              f"writable", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
