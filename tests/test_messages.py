"""What users are told (issue 15, defects 13–36): each message names the thing and the fix that works.

Every test runs the real command or the real master and reads what it printed or wrote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qsae import Master, SAEConfig
from qsae.cli import _EventLog
from qsae.errors import ConfigError, RoundTimeout
from qsae.keys import make_keys

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def run(*args: str, cwd: Path | None = None, timeout: float = 100, env: dict | None = None,
        exe: str = "qsae-master") -> subprocess.CompletedProcess[str]:
    """``bin/EXE ARGS`` in a process of its own, as a user types it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "bin" / exe), *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ["--local", "--patches", "500", "--iters", "3"]


# ---------------------------------------------------------------------- 18: a fresh run folder per run
def test_two_runs_without_out_never_collide_and_latest_follows(tmp_path):
    first, second = run(*TINY, cwd=tmp_path), run(*TINY, cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all((p / "model.npz").is_file() for p in runs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[1].resolve()
    assert f"run folder: {Path('runs') / runs[1].name}" in second.stdout
    again = run("--local", "--resume", "runs/latest", "--iters", "5", "-q", cwd=tmp_path)  # resume through the link
    assert again.returncode == 0, again.stderr
    assert json.loads((runs[1] / "history.jsonl").read_text().splitlines()[-1])["iteration"] == 5
    refused = run(*TINY, "--out", "runs/latest", cwd=tmp_path)  # an explicit folder holding a run: refused
    assert refused.returncode == 2 and "runs/latest holds a run" in refused.stderr


# ---------------------------------------------------------------------- 20, 21: -v and run.log
def test_verbose_has_no_library_debug_and_run_log_holds_what_the_terminal_showed(tmp_path):
    r = run(*TINY, "-v", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    noise = [ln for ln in r.stderr.splitlines() if any(f" {n}" in ln for n in ("matplotlib", "PIL.", "numba"))]
    assert not noise, noise[:5]
    log = (tmp_path / "r" / "run.log").read_text()
    for needle in ("qsae 0.1.0: SAEConfig", "iter     3", "STOP", "data: 10 images"):
        assert needle in log, needle
    assert sum(ln.startswith("iter ") for ln in r.stdout.splitlines()) == 4


def test_the_final_error_is_in_run_log(tmp_path):
    keys = make_keys(tmp_path / "keys")
    r = run("--wait-for", "1", "--keys", str(keys), "--start-timeout", "0.5", "--patches", "500",
            "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "qsae-master: error: 0 of 1 workers said HELLO" in (tmp_path / "r" / "run.log").read_text()


# ---------------------------------------------------------------------- 22: events once, tables only when small
def test_an_event_is_printed_once(tmp_path):
    r = run("--workers", "2", "--no-agents", "--patches", "2000", "--iters", "2", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert not [ln for ln in r.stdout.splitlines() if ln.startswith("workers: join")]
    joins = [ln for ln in r.stderr.splitlines() if " join: local#" in ln]
    assert len(joins) == 2, r.stderr
    assert sum("local#0" in ln and "rows" in ln for ln in r.stdout.splitlines()) >= 1  # the small table


def test_many_workers_are_one_summary_line():
    workers = [{"name": f"w{i}", "state": "active", "rows": 1000 + i, "rows_per_s": 5e5 + i} for i in range(64)]
    lines = _EventLog.lines(workers)
    assert len(lines) == 1 and "64 (64 active), 66,016 rows" in lines[0], lines
    assert len(_EventLog.lines(workers[:3])) == 3


# ---------------------------------------------------------------------- 23, 25, 28, 31, 35: bad input
@pytest.mark.parametrize("args, words, not_words", [
    (["--out", ""], ["--out", "current folder"], []),
    (["--beta", "inf"], ["--beta inf", "finite"], ["sparsity_weight"]),
    (["--weight-decay", "nan"], ["--weight-decay nan"], ["weight_decay="]),
    (["--patch-size", "1"], ["--patch-size 1", "2 or more"], ["pass the σ"]),
    (["--ssh-config", "/nonexistent/config"], ["--ssh-config /nonexistent/config", "--hosts"], []),
])
def test_bad_input_names_the_flag(tmp_path, args, words, not_words):
    r = run("--local", "--patches", "500", "--iters", "2", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    error = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(error) == 1, r.stderr
    for w in words:
        assert w in error[0], error
    for w in not_words:
        assert w not in error[0], error
    assert not list(tmp_path.iterdir())  # nothing written


def test_ssh_config_that_does_not_exist_is_refused_with_hosts(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost workers=1\n")
    r = run("--hosts", str(hosts), "--ssh-config", "/nonexistent/config", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "--ssh-config /nonexistent/config: no such file" in r.stderr, r.stderr


def test_constant_images_say_so(tmp_path):
    np.save(tmp_path / "flat.npy", np.full((2, 64, 64), 0.5))
    r = run(*TINY, "--images", str(tmp_path / "flat.npy"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "contrast" in r.stderr and "pass the σ" not in r.stderr, r.stderr


def test_help_groups_ssh_flags_and_describes_presets():
    out = run("--help").stdout
    ssh = out.split("SSH (--hosts):")[1].split("\n\n")[0]
    assert "--accept-new-host-keys" in ssh and "--ssh-config" in ssh and "--connect-timeout" in ssh
    keys = out.split("keys (hand-started workers):")[1].split("\n\n")[0]
    assert "--accept-new-host-keys" not in keys
    assert "ufldl (the UFLDL" in " ".join(out.split())
    version = run("--version", exe="qsae-worker")
    assert version.returncode == 0 and version.stdout.startswith("qsae ")


# ---------------------------------------------------------------------- 30, 32, 33: what a run leaves
def test_stop_line_counts_every_iteration_of_a_resumed_run(tmp_path):
    out = tmp_path / "r"
    assert run(*TINY, "--out", str(out)).returncode == 0
    r = run("--local", "--resume", str(out), "--iters", "5")
    assert r.returncode == 0, r.stderr
    assert "5 iterations (2 in this session)" in r.stdout, r.stdout


def test_cg_stop_line_has_no_doubled_stop(tmp_path):
    r = run(*TINY, "--optimizer", "cg", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    last = r.stdout.splitlines()[-1]
    assert ".:" not in last and "3 iterations" in last, last


def test_model_npz_is_readable_like_the_other_outputs(tmp_path):
    r = run(*TINY, "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "r").iterdir()}
    umask = os.umask(0o022)
    os.umask(umask)
    assert modes["model.npz"] == 0o666 & ~umask == modes["history.jsonl"], modes


def _curve_rows(png: Path) -> np.ndarray:
    """Rows of the picture that the plotted line (matplotlib's first colour) crosses in the right 80%
    of its extent (the legend's short sample adds two)."""
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    blue = (np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255).sum(axis=2) < 0.15)
    cols = np.nonzero(blue.any(axis=0))[0]
    right = blue[:, cols[0] + (cols[-1] - cols[0]) // 5:cols[-1] + 1]
    return np.nonzero(right.any(axis=1))[0]


def test_cost_png_shows_the_whole_run(tmp_path):
    """After the first fast drop the curve still spans a good part of the picture (issue 15, 33)."""
    r = run("--local", "--patches", "2000", "--iters", "60", "-q", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    rows = _curve_rows(tmp_path / "r" / "cost.png")
    assert len(rows) > 100, rows  # pixel rows of a 400-pixel figure; the J axis gave ~6


def test_save_cost_curves_above_best(tmp_path):
    from qsae.viz import save_cost_curves

    history = [(i, 0.1 * i, 0.37 + 60 * np.exp(-3 * i) + 0.05 * np.exp(-0.05 * i)) for i in range(100)]
    flat = _curve_rows(save_cost_curves({"run": history}, tmp_path / "j.png"))
    seen = _curve_rows(save_cost_curves({"run": history}, tmp_path / "gap.png", above_best=True))
    assert len(flat) < 40 < 100 < len(seen), (flat, seen)


# ---------------------------------------------------------------------- 34: which images were loaded
def test_a_folder_of_images_says_what_it_loaded_and_skipped(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.tif"):
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(photos / name)
    r = run(*TINY, "--images", str(photos), "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("data: "))
    assert "2 images (40×50)" in line and "c.tif" in line and "more" in line and "not searched" in line, line


# ---------------------------------------------------------------------- 14, 24, 27, 36: starting workers
def test_wait_for_says_how_long_and_what_to_run_and_a_keyless_worker_is_told_the_real_fix(tmp_path):
    keys, port = make_keys(tmp_path / "keys"), free_port()
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "qsae-master"), "--wait-for", "1", "--keys", str(keys),
                          "--port", str(port), "--bind", "127.0.0.1", "--start-timeout", "20", "--patches", "500",
                          "--out", str(tmp_path / "r")], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline and not any("qsae-worker --connect" in ln for ln in lines):
            lines.append(p.stderr.readline())
        told = "".join(lines)
        assert "waiting up to 20.0 s for 1 hand-started worker;" in told, told
        assert f"qsae-worker --connect tcp://127.0.0.1:{port} --keys {keys}/worker" in told, told
        for _ in range(3):  # HELLO queued before the handshake hung the keyless worker in send() every other time
            w = run("--connect", f"tcp://127.0.0.1:{port}", "--handshake-timeout", "3", exe="qsae-worker", timeout=40)
            assert w.returncode == 1
            assert "start both with --insecure" not in w.stderr and "start the master with --insecure" in w.stderr
            assert "said HELLO" not in w.stderr, w.stderr
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)


def test_a_worker_without_a_master_never_says_hello():
    w = run("--connect", f"tcp://127.0.0.1:{free_port()}", "--master-timeout", "1", exe="qsae-worker", timeout=60)
    assert w.returncode == 1 and "could not reach the master" in w.stderr
    assert "said HELLO" not in w.stderr, w.stderr


def test_start_timeout_message_keeps_the_seconds_and_names_the_fix(tmp_path):
    keys = make_keys(tmp_path / "keys")
    master = Master(wait_for=1, keys=str(keys), start_timeout=0.05)
    with pytest.raises(RoundTimeout) as e:
        with master:
            pass
    text = str(e.value)
    assert "said HELLO within 0.0" in text and "within 0.1 s" not in text, text
    assert "--start-timeout" in text and "qsae-worker --connect tcp://127.0.0.1:" in text, text


def test_a_killed_worker_is_reported_as_gone_not_silent(caplog):
    cfg = SAEConfig(n_visible=64, n_hidden=8)
    X = np.random.default_rng(0).uniform(0.1, 0.9, (4000, 64))
    with Master(workers=2, config=cfg, worker_timeout=30) as master:
        master.scatter(X)
        from qsae import init_params

        theta = init_params(cfg, seed=0)
        master(theta)
        victim = master.status()[0]
        os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(0.5)
        with caplog.at_level("ERROR", logger="qsae.master"):
            t0 = time.monotonic()
            master(theta)
        lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
        assert lost and "connection closed" in lost[0] and "silent" not in lost[0], lost
        assert time.monotonic() - t0 < 20  # not after worker_timeout


# ---------------------------------------------------------------------- 29: a master used without starting it
def test_an_unstarted_master_says_how_to_start_it():
    master = Master(workers=2)
    with pytest.raises(ConfigError, match="not started.*with Master"):
        master.fit(maxiter=1)
    with pytest.raises(ConfigError, match="not started"):
        master.scatter(np.full((10, 64), 0.5))
    master.close()


# ---------------------------------------------------------------------- 16, 17: the examples and helpers
def test_compare_optimizers_help_shows_defaults_and_writes_no_tracked_file():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "compare_optimizers.py"), "--help"], text=True,
                       capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "(default: 15.0)" in text and "(default: 10000)" in text, text
    assert "(default: runs/compare_optimizers.png)" in text, text  # not the tracked docs/compare_optimizers.png


def test_slurm_helper_runs_without_pytest():
    """`python tests/slurm.py CMD` (a README command) in a Python that has no pytest."""
    sys.path.insert(0, str(ROOT / "tests"))
    from slurm import require_slurm

    require_slurm()
    code = ("import sys, runpy; sys.modules['pytest'] = None; sys.argv = ['slurm.py', 'sinfo', '-h', '-o', '%%D']; "
            "runpy.run_path(%r, run_name='__main__')" % str(ROOT / "tests" / "slurm.py"))
    r = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, timeout=90)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


def test_a_stale_slurm_job_id_is_named_as_such(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from slurm import SlurmCluster, require_slurm

    require_slurm()
    with SlurmCluster() as cluster:
        env = {**cluster.env, "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "987654", "SLURM_NTASKS": "2"}
        r = subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), "--slurm", "--patches", "500",
                            "--out", str(tmp_path / "r")], env=env, text=True, capture_output=True, timeout=90)
    assert r.returncode == 2, r.stderr
    assert "allocation 987654 is not running" in r.stderr and "SLURM_JOB_ID" in r.stderr, r.stderr
    assert "cannot import qsae" not in r.stderr, r.stderr


def test_bound_to_every_interface_the_worker_command_names_this_host(tmp_path):
    keys = make_keys(tmp_path / "keys")
    with pytest.raises(RoundTimeout) as e:
        with Master(wait_for=2, keys=str(keys), bind="0.0.0.0", start_timeout=0.3):
            pass
    assert f"qsae-worker --connect tcp://{socket.getfqdn()}:" in str(e.value), e.value
    assert "0.0.0.0" not in str(e.value).split("start them with")[1].split("`")[1]


def test_an_unknown_host_key_names_a_fix_every_caller_has():
    """SparseAutoencoder(workers=hostsfile) cannot pass --accept-new-host-keys: ssh once works for all."""
    from types import SimpleNamespace

    from qsae.launch.sshcheck import _UnknownHostKey, explain

    line = explain(_UnknownHostKey("node1", "ssh-ed25519", "SHA256:abc"), SimpleNamespace(where="node1:22"), 10.0)
    assert line.index("ssh to it once") < line.index("--accept-new-host-keys"), line
    assert "accept_new_host_keys=True" in line, line
