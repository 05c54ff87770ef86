"""Process and membership checks shared by the tests (reads /proc: Linux)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, seconds: float = 10.0) -> list[int]:
    """Wait up to ``seconds`` for every pid to end; return those still alive."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def stop(p: subprocess.Popen) -> None:
    """SIGTERM a qsae-master (it saves and stops its workers); SIGKILL it after 60 s (tests and docs/make_screenshots.py)."""
    p.send_signal(signal.SIGTERM)
    try:
        p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()


@contextlib.contextmanager
def stuttering(pid: int, seed: int = 1):
    """SIGSTOP ``pid`` for 0.15–0.35 s every 0.02–0.2 s while the block runs (a straggler in
    rounds of every kind); SIGCONT at the end, whatever happened."""
    import numpy as np

    stop = threading.Event()

    def stutter() -> None:
        rng = np.random.default_rng(seed)
        while not stop.wait(float(rng.uniform(0.02, 0.2))):
            os.kill(pid, signal.SIGSTOP)
            time.sleep(float(rng.uniform(0.15, 0.35)))
            os.kill(pid, signal.SIGCONT)

    t = threading.Thread(target=stutter)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        os.kill(pid, signal.SIGCONT)


def assert_back(master, n: int, theta, seconds: float = 30.0) -> None:
    """Wait up to ``seconds`` for ``master`` to count ``n`` workers again (one came back after a
    cut), then check that an evaluation gives every one of them blocks."""
    deadline = time.monotonic() + seconds
    while master.n_workers < n and time.monotonic() < deadline:
        time.sleep(0.2)
    assert master.n_workers == n  # back
    master(theta)
    assert all(w.blocks for w in master._workers.values())  # and given blocks
