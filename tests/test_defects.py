"""Issue 15, defects 1-12: hangs, crashes, lost or wrong data, and tracebacks where one line
belongs. Each test runs the command the issue gives (a real qsae-master or qsae-worker
process, real sockets and files) and checks the one clear line, the exit status and that
no work is lost."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qsae.errors import ConfigError, DataError
from qsae.model import SAEConfig
from qsae.train import load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def run(prog: str, *args: str, timeout: float = 60, cwd=None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """bin/PROG ARGS to its end: (returncode, stdout, stderr); a hang fails the test, never blocks it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bin" / prog), *args], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def start(prog: str, *args: str, cwd=None) -> subprocess.Popen:
    """bin/PROG ARGS in the background; its output goes to files (a pipe nobody reads can fill and
    block it), read back by ``communicate`` as usual."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / prog), *args], env=env, cwd=cwd, stdout=out, stderr=err,
                         text=True)

    def communicate(timeout: float | None = None) -> tuple[str, str]:
        p.wait(timeout)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read()

    p.communicate = communicate
    return p


def one_line(err: str) -> str:
    """The error line of a failed command (qsae-master: error: ...), with no traceback before it."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


# ---------------------------------------------------------------------- 1: a bind failure
@pytest.mark.parametrize("flag, words", [("--port", "another --port"), ("--bind", "1.2.3.4"),
                                         ("--bind", "notanaddress")])
def test_1_a_master_that_cannot_bind_says_so_and_exits_2(tmp_path, busy_port, flag, words):
    value = str(busy_port) if flag == "--port" else words
    p = run("qsae-master", "--workers", "2", "--patches", "2000", "--iters", "2", "--out", str(tmp_path / "r"),
            flag, value)
    assert p.returncode == 2, p.stderr
    line = one_line(p.stderr)
    assert words in line and (str(busy_port) in line if flag == "--port" else "--bind" in line)


def test_1_master_in_python_raises_and_closes(busy_port):
    """`with Master(workers=2, port=busy):` raised nothing and never returned (ctx.term() waited on
    the unbound socket): in a child process, so that a hang fails instead of blocking."""
    code = ("import sys\nfrom qsae import Master\nfrom qsae.errors import ConfigError\n"
            "try:\n    with Master(workers=2, port=int(sys.argv[1])):\n        pass\n"
            "except ConfigError as e:\n    print('refused:', e)\n")
    p = subprocess.run([sys.executable, "-c", code, str(busy_port)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert f"refused: the master cannot listen on tcp://127.0.0.1:{busy_port}" in p.stdout


# ---------------------------------------------------------------------- 3, 9: sizes checked first
def test_3_too_many_parameters_for_lbfgs_is_one_line(tmp_path):
    p = run("qsae-master", "--local", "--patch-size", "100", "--hidden", "5000", "--patches", "100", "--iters", "2",
            "--out", str(tmp_path))
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])  # was -11 (SIGSEGV in scipy's _lbfgsb)
    assert "100,015,000 parameters" in one_line(p.stderr) and "--hidden" in p.stderr
    assert not (tmp_path / "model.npz").exists()


def test_3_the_limit_is_scipys_workspace_index():
    from qsae.train import check_size, lbfgs_limit

    limit = lbfgs_limit()
    assert (2 * 10 + 5) * limit + 11 * 100 + 80 <= 2**31 - 1 < (2 * 10 + 5) * (limit + 1) + 11 * 100 + 80
    cfg = SAEConfig(n_visible=10_000, n_hidden=5_000)
    with pytest.raises(ConfigError, match="scipy's L-BFGS"):
        check_size(cfg, 100, method="lbfgs")
    with pytest.raises(ConfigError, match="64 MiB a message"):  # θ too large to send to workers
        check_size(SAEConfig(n_visible=900, n_hidden=5000), 100, method="cg", workers=2)


@pytest.mark.parametrize("mode, words", [(["--local"], "in this process"), (["--workers", "2"], "per worker")])
def test_9_a_data_set_larger_than_memory_fails_at_once(tmp_path, mode, words):
    t0 = time.monotonic()
    p = run("qsae-master", *mode, "--patches", "1000000000", "--iters", "2", "--out", str(tmp_path / "r"))
    assert p.returncode == 2, p.stderr[-2000:]
    line = one_line(p.stderr)
    assert words in line and "GiB" in line and "of memory" in line and "--patches" in line
    assert time.monotonic() - t0 < 30 and not (tmp_path / "r").exists()  # before any worker or file


def test_9_memory_needed_counts_rows_and_activations():
    from qsae.train import WORKER_BASELINE, memory_needed

    cfg = SAEConfig()  # n = 64, h = 30
    one, master = memory_needed(cfg, 1_000_000, "float32", "lbfgs", workers=2)  # one round: the rows
    two, _ = memory_needed(cfg, 1_000_000, "float32", "lbfgs", workers=2, rounds=2)  # and the kept hidden layer
    assert 500_000 * 64 * 4 <= one - WORKER_BASELINE < 500_000 * (64 + 31) * 4 <= two - WORKER_BASELINE
    _, local = memory_needed(cfg, 1_000_000, "float32", "lbfgs", workers=None)
    assert local >= 1_000_000 * 64 * (8 + 4)  # built in float64, then cast


# ---------------------------------------------------------------------- 7, 8: one line, not a traceback
@pytest.fixture
def odd_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, shape in (("tiny", (5, 5)), ("thin", (7, 300))):
        (tmp_path / name).mkdir()
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(tmp_path / name / "a.png")
    np.save(tmp_path / "rgb.npy", rng.random((512, 512, 3)))
    return tmp_path


@pytest.mark.parametrize("args, words", [
    (["--images", "{d}/tiny"], "5×5, smaller than the 8×8 patch"),
    (["--images", "{d}/thin"], "7×300, smaller than the 8×8 patch"),
    (["--images", "{d}/rgb.npy"], "looks like one colour image"),
    (["--patch-size", "600"], "smaller than the 600×600 patch"),
    (["--seed", "-1"], "--seed -1"),
])
def test_7_8_bad_images_patch_sizes_and_seeds_are_one_line(odd_images, args, words):
    args = [a.format(d=odd_images) for a in args]
    p = run("qsae-master", "--local", "--iters", "2", "--out", str(odd_images / "r"), *args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert words in one_line(p.stderr)
    assert not (odd_images / "r").exists()


def test_7_patch_sigma_checks_the_images_itself():
    from qsae.data import patch_sigma

    with pytest.raises(DataError, match="smaller than the 8×8 patch"):
        patch_sigma([np.zeros((5, 5))], 8)


# ---------------------------------------------------------------------- 10: junk model.npz
@pytest.fixture
def junk_models(tmp_path):
    from qsae.model import init_params
    from qsae.train import save_model

    good = save_model(tmp_path / "good.npz", init_params(SAEConfig()), SAEConfig(), {"m": 1})
    files = {"text": b"hello, this is not a model\n", "random": np.random.default_rng(1).bytes(3000),
             "truncated": good.read_bytes()[:2000]}
    out = {}
    for name, content in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.npz").write_bytes(content)
        out[name] = tmp_path / name
    np.savez(tmp_path / "other.npz", theta=np.zeros(3))
    (tmp_path / "other").mkdir()
    os.replace(tmp_path / "other.npz", tmp_path / "other" / "model.npz")
    out["other"] = tmp_path / "other"
    return out


@pytest.mark.parametrize("kind", ["text", "random", "truncated", "other"])
def test_10_a_junk_model_npz_is_one_line_naming_the_file(junk_models, kind):
    run_dir = junk_models[kind]
    p = run("qsae-master", "--local", "--resume", str(run_dir), "--iters", "3")
    assert p.returncode == 2, p.stderr[-2000:]
    line = one_line(p.stderr)
    assert str(run_dir / "model.npz") in line and "pickle" not in line
    from qsae import SparseAutoencoder

    with pytest.raises(DataError, match="model.npz"):
        SparseAutoencoder.load(run_dir / "model.npz")


# ---------------------------------------------------------------------- 12: qsae-worker's arguments
@pytest.mark.parametrize("address, words", [
    ("tcp://127.0.0.1", "no port"),
    ("http://127.0.0.1:5555", "http://"),
    ("tcp://127.0.0.1:99999", "1 to 65535"),
    ("127.0.0.1:", "no port"),
])
def test_12_a_bad_connect_address_is_one_line(address, words):
    p = run("qsae-worker", "--connect", address, "--master-timeout", "1", timeout=30)
    assert p.returncode == 2, p.stderr[-2000:]
    line = one_line(p.stderr)
    assert words in line and "tcp://HOST:PORT" in line


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "localhost:{port}"])
def test_12_host_colon_port_means_tcp(address):
    """HOST:PORT is read as tcp://HOST:PORT (it was a ZMQError): with no master there, the worker
    says it could not reach tcp://HOST:PORT."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    address = address.format(port=port)
    p = run("qsae-worker", "--connect", address, "--master-timeout", "1", timeout=30)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and f"could not reach the master at tcp://{address}" in p.stderr


@pytest.mark.parametrize("line, words", [
    ("{}", '"connect"'),
    ("[1, 2]", "not an object"),
    ("not json", "one JSON line"),
    ('{"connect": "tcp://127.0.0.1"}', "no port"),
    ('{"connect": "tcp://127.0.0.1:5555", "curve": 3}', '"curve"'),
])
def test_12_a_bad_stdin_configuration_is_one_line(line, words):
    p = run("qsae-worker", "--stdin", stdin=line + "\n", timeout=30)
    assert p.returncode == 2, p.stderr[-2000:]
    assert words in one_line(p.stderr)


# ---------------------------------------------------------------------- 2: workers cutting many rows
def test_2_a_worker_cutting_many_rows_keeps_pinging(tmp_path):
    """A worker cutting 1M rows (~5-8 s here) stayed silent and was lost after --worker-timeout;
    it now cuts in a thread and pings, so the run finishes."""
    p = run("qsae-master", "--workers", "1", "--patches", "1000000", "--iters", "2", "--worker-timeout", "3",
            "--out", str(tmp_path / "r"), "-q", timeout=110)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "lost" not in p.stderr
    assert load_model(tmp_path / "r" / "model.npz")[2]["iteration"] == 2


# ---------------------------------------------------------------------- 5: one process per run folder
def wait_for(path: Path, seconds: float = 60, check=lambda p: True, proc: subprocess.Popen | None = None) -> None:
    """Until ``path`` exists and passes ``check``; fails at once with its output if ``proc`` ends first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended ({proc.returncode}) before {path} was ready:\n{out}\n{err[-3000:]}")
        try:
            if path.exists() and check(path):
                return
        except (DataError, OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {seconds} s")


def test_5_a_second_process_on_a_running_run_is_refused_naming_the_first(tmp_path):
    run_dir = tmp_path / "r"
    first = start("qsae-master", "--local", "--patches", "2000", "--iters", "100000", "--checkpoint-every", "5",
                  "--out", str(run_dir), "-q")
    try:
        wait_for(run_dir / "model.npz", 60, proc=first)
        second = run("qsae-master", "--local", "--resume", str(run_dir), "--iters", "100000", "-q")
        assert second.returncode == 2, second.stderr[-2000:]
        line = one_line(second.stderr)
        assert f"{run_dir} is in use" in line and f"pid {first.pid} on {socket.gethostname()}" in line
        assert first.poll() is None  # the first goes on, untouched
    finally:
        first.kill()  # kill -9: the OS releases the lock with the process
        first.communicate(timeout=30)
    done = load_model(run_dir / "model.npz")[2]["iteration"]
    again = run("qsae-master", "--local", "--resume", str(run_dir), "--iters", str(done + 3), "-q")
    assert again.returncode == 0, again.stderr[-2000:]
    iterations = [json.loads(ln)["iteration"] for ln in (run_dir / "history.jsonl").read_text().splitlines()]
    assert iterations == list(range(done + 4))  # one run's lines, none twice


def test_5_the_lock_is_released_when_the_process_ends(tmp_path):
    from qsae.errors import RunLocked
    from qsae.train import lock_run

    lock = lock_run(tmp_path)
    code = "import sys\nfrom qsae.train import lock_run\nlock_run(sys.argv[1])\nprint('locked')\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                           timeout=60)
    assert other.returncode == 1 and "RunLocked" in other.stderr and f"pid {os.getpid()}" in other.stderr
    lock.close()
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                           timeout=60)
    assert other.returncode == 0 and other.stdout.strip() == "locked", other.stderr
    with pytest.raises(RunLocked):  # a lock the process holds twice is still one process's
        lock2 = lock_run(tmp_path)
        lock_run(tmp_path)
    lock2.close()


# ---------------------------------------------------------------------- 6: stopping
def history_of(run_dir: Path) -> list[dict]:
    from qsae.train import read_history

    return read_history(run_dir / "history.jsonl")


def test_6_sigterm_saves_at_once_even_mid_evaluation(tmp_path):
    """Slurm sends SIGKILL KillWait seconds after SIGTERM: θ must be on disk before anything slow.
    A run whose evaluations take over a second (h = 1000) gets SIGTERM just as an iteration
    closed (the next evaluation has begun), then SIGKILL 0.5 s later: the old handler only
    flagged the stop for the end of the iteration, which never came."""
    run_dir = tmp_path / "r"
    p = start("qsae-master", "--local", "--patches", "60000", "--hidden", "1000", "--iters", "100000",
              "--checkpoint-every", "100000", "--out", str(run_dir), "-q")
    try:
        wait_for(run_dir / "history.jsonl", 100, lambda f: len(history_of(run_dir)) >= 2, p)
        wait_for(run_dir / "history.jsonl", 100, lambda f: len(history_of(run_dir)) >= 3, p)  # polled fast: just closed
        p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        p.kill()
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
    theta, cfg, meta = load_model(run_dir / "model.npz")  # there: saved in the signal handler
    lines = history_of(run_dir)
    assert meta["finished"] is False and meta["iteration"] >= 2
    assert meta["iteration"] in [h["iteration"] for h in lines]


def test_6_sigterm_stops_a_long_evaluation_and_exits_as_a_stop(tmp_path):
    run_dir = tmp_path / "r"
    p = start("qsae-master", "--local", "--patches", "600000", "--iters", "100000", "--checkpoint-every", "100000",
              "--out", str(run_dir), "-q")
    wait_for(run_dir / "history.jsonl", 100, lambda f: len(history_of(run_dir)) >= 2, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err[-2000:]  # stopped (status 99), as before, not a failure (2)
    assert "stopped by SIGTERM" in out + err and "Traceback" not in err
    meta = load_model(run_dir / "model.npz")[2]
    assert meta["iteration"] == history_of(run_dir)[-1]["iteration"]


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def test_6_workers_leaving_in_a_shutdown_is_a_stop_not_every_worker_lost(tmp_path):
    """scancel signals every step at once: the workers' BYEs can reach the master before its own
    SIGTERM. That is a stop with θ saved (exit 1, "stopped by SIGTERM"), not exit 2 "every
    worker is lost ... check the workers' logs"."""
    from tests.procs import wait_gone

    run_dir = tmp_path / "r"
    p = start("qsae-master", "--workers", "2", "--no-agents", "--patches", "20000", "--iters", "100000", "--checkpoint-every",
              "100000", "--worker-timeout", "60", "--out", str(run_dir), "-q")
    try:
        wait_for(run_dir / "history.jsonl", 100, lambda f: len(history_of(run_dir)) >= 3, p)
        workers = [c for c in children(p.pid)]
        assert len(workers) == 2
        for w in workers:
            os.kill(w, signal.SIGTERM)
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
    assert not wait_gone(workers, 10)
    assert p.returncode == 1, err[-3000:]
    assert "every worker is lost" not in err and "stopped by SIGTERM" in out + err
    meta = load_model(run_dir / "model.npz")[2]
    assert meta["iteration"] == history_of(run_dir)[-1]["iteration"] >= 2


# ---------------------------------------------------------------------- 11: disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs (root only): room for a few checkpoints of the default model and a few
    hundred history lines, so a long run fills it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {r.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_11_a_full_disk_is_one_line_and_the_last_checkpoint_is_intact(small_disk, tmp_path):
    run_dir = small_disk / "r"
    p = start("qsae-master", "--local", "--patches", "20000", "--iters", "100000", "--checkpoint-every", "5",
              "--out", str(run_dir), "-q")
    # Once a checkpoint past iteration 5 is on disk, fill what is left of the tmpfs: the run's next write
    # meets ENOSPC. (Letting the run fill it raced L-BFGS: on 2,000 patches it converged first on some
    # BLAS kernels.)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if load_model(run_dir / "model.npz")[2]["iteration"] >= 5:
                break
        except (OSError, DataError):
            pass
        time.sleep(0.05)
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:  # ENOSPC: the disk is full
        pass
    finally:
        os.close(fd)
    _, err = p.communicate(timeout=110)
    assert p.returncode == 2, err[-3000:]
    line = one_line(err)
    assert "Logging error" not in err  # run.log's lines that did not fit are dropped quietly
    assert "No space left on device" in line and "is intact" in line and f"--resume {run_dir}" in line
    theta, cfg, meta = load_model(run_dir / "model.npz")  # whole: written atomically
    assert f"at iteration {meta['iteration']}," in line and meta["iteration"] >= 5
    lines = history_of(run_dir)
    assert meta["iteration"] in [h["iteration"] for h in lines]
    # once there is room again the run goes on from that checkpoint
    subprocess.run(["cp", "-r", str(run_dir), str(tmp_path / "moved")], check=True)
    again = run("qsae-master", "--local", "--resume", str(tmp_path / "moved"), "--iters", str(meta["iteration"] + 2),
                "-q")
    assert again.returncode == 0, again.stderr[-2000:]


# ---------------------------------------------------------------------- 4: resume finds the same images
def photos(folder: Path, seed: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(2):
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_4_resume_finds_the_runs_images_from_any_folder_or_refuses(tmp_path):
    a, b, c = (tmp_path / x for x in "abc")
    photos(a / "photos", 1)
    b.mkdir()
    photos(c / "photos", 2)  # other images under the same relative name
    common = ["--local", "--patches", "500", "--checkpoint-every", "1", "-q"]
    p = run("qsae-master", *common, "--images", "photos", "--iters", "2", "--out", "run", cwd=a)
    assert p.returncode == 0, p.stderr[-2000:]
    data = load_model(a / "run" / "model.npz")[2]["data"]
    assert data["source"] == str(a / "photos") and data["fingerprint"].startswith("sha256:")

    p = run("qsae-master", *common, "--resume", str(a / "run"), "--iters", "3", cwd=b)  # from elsewhere
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("qsae-master", *common, "--resume", "run", "--images", str(a / "photos"), "--iters", "4", cwd=a)
    assert p.returncode == 0, p.stderr[-2000:]  # the same folder given absolute

    p = run("qsae-master", *common, "--resume", str(a / "run"), "--images", "photos", "--iters", "5", cwd=c)
    assert p.returncode == 2  # another photos/ was trained on silently
    assert "other images than the run's" in one_line(p.stderr)

    (a / "photos").rename(tmp_path / "moved")  # moved: named, and found with --images
    p = run("qsae-master", *common, "--resume", str(a / "run"), "--iters", "5", cwd=b)
    assert p.returncode == 2 and "--images PATH" in one_line(p.stderr)
    p = run("qsae-master", *common, "--resume", str(a / "run"), "--images", str(tmp_path / "moved"), "--iters", "5",
            cwd=b)
    assert p.returncode == 0, p.stderr[-2000:]
    assert load_model(a / "run" / "model.npz")[2]["iteration"] == 5

    first = tmp_path / "moved" / "0.png"  # changed in place: refused, naming the difference
    first.write_bytes((c / "photos" / "0.png").read_bytes())
    p = run("qsae-master", *common, "--resume", str(a / "run"), "--images", str(tmp_path / "moved"), "--iters", "6",
            cwd=b)
    assert p.returncode == 2 and "fingerprint" in one_line(p.stderr)


def test_4_dataspec_checks_its_images(tmp_path):
    from qsae.data import DataSpec

    spec = DataSpec.of(photos(tmp_path / "p", 1), m=100)
    assert Path(spec.source).is_absolute() and len(spec.images()) == 2
    (tmp_path / "p" / "1.png").unlink()
    with pytest.raises(DataError, match="not the ones"):
        spec.images()
    assert DataSpec.of("builtin").fingerprint is None


def test_2_workers_lost_while_preparing_say_nothing_was_saved(tmp_path):
    """Workers lost before the first iteration (here: killed while they cut 1M rows each) are not
    told to resume a checkpoint that does not exist."""
    run_dir = tmp_path / "r"
    p = start("qsae-master", "--workers", "2", "--no-agents", "--patches", "2000000", "--iters", "2", "--out", str(run_dir))
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = children(p.pid) if p.poll() is None else []
            time.sleep(0.1)
        wait_for(run_dir / "run.log", 60, lambda f: f.read_text().count("said HELLO") >= 2, p)
        time.sleep(0.5)  # cutting now
        for w in workers:
            os.kill(w, signal.SIGKILL)
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
    assert p.returncode == 2, err[-3000:]
    line = one_line(err)
    assert "before the first iteration (no iteration ran and nothing was saved)" in line
    assert "resume the run from its checkpoint" not in err and not (run_dir / "model.npz").exists()


# ---------------------------------------------------------------------- 6 under Slurm: scancel, the time limit
@pytest.fixture(scope="module")
def slurm_cluster():
    sys.path.insert(0, str(ROOT / "tests"))
    from slurm import SlurmCluster, require_slurm

    require_slurm()
    with SlurmCluster() as c:
        yield c


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", [["--batch", "--signal=TERM"], []],
                         ids=["time-limit-signal", "scancel"])
def test_6_a_slurm_job_told_to_stop_saves_its_run(slurm_cluster, tmp_path, how):
    """examples/slurm.sbatch asks for SIGTERM to the batch shell before the time limit
    (--signal=B:TERM@...): `scancel --batch --signal=TERM` sends exactly that signal now. Plain
    scancel signals every step at once (workers too) and kills after KillWait (5 s here). Either
    way the master, exec'ed by the script, saves the last good θ and the job ends as a stop."""
    text = (ROOT / "examples" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@" in text and "\nexec qsae-master" in text
    script = tmp_path / "long.sbatch"
    script.write_text(text.replace("#SBATCH -n 8", "#SBATCH -n 2").replace(
        "--patches 1000000 --iters 500", "--patches 20000 --iters 1000000 --checkpoint-every 1000000 -q"))
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists() or not (venv / "bin" / "qsae-master").exists():
        pytest.skip(f"{venv} is not a venv with qsae-master installed (pip install -e .)")
    cluster = slurm_cluster
    env = {**cluster.env, "PYTHONPATH": str(ROOT), "QSAE_VENV": str(venv)}
    job = cluster.run(["sbatch", "--parsable", f"--chdir={tmp_path}", str(script)], env=env).stdout.strip()
    job = job.split(";")[0]
    run_dir, log = tmp_path / "runs" / job, tmp_path / f"qsae-{job}.log"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(history_of(run_dir)) < 3:
            assert job in cluster.jobs(), log.read_text() if log.exists() else "no log"
            time.sleep(0.2)
        assert len(history_of(run_dir)) >= 3, log.read_text() if log.exists() else "no log"
        cluster.run(["scancel", *how, job])
        assert cluster.drained(60) == []
    finally:
        cluster.run(["scancel", job], check=False)
    text = log.read_text()
    assert "Traceback" not in text and "every worker is lost" not in text, text[-3000:]
    meta = load_model(run_dir / "model.npz")[2]
    assert meta["finished"] is False and meta["iteration"] >= 2
    assert meta["iteration"] in [h["iteration"] for h in history_of(run_dir)]
    if how:  # the batch shell's signal alone: the master stops its workers itself and reports the stop
        assert "stopped by SIGTERM" in text, text[-3000:]


def test_2_9_a_worker_refuses_blocks_its_host_cannot_hold():
    """Workers on other hosts are judged where they run: a worker told to hold more rows than
    its host's memory says so (the master's own check cannot know remote hosts), before cutting."""
    from qsae import Master, load_images
    from qsae.errors import WorkerError

    with Master(workers=1, worker_timeout=30) as master:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="its host has .* GiB of memory"):
            master.scatter_images(load_images(), m=10**9)
        assert time.monotonic() - t0 < 20  # refused before cutting anything
