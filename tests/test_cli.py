"""qsae-master --local end to end, in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qsae.cli import master_main
from qsae.data import DataSpec
from qsae.model import cost_and_grad
from qsae.train import load_model, read_history

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def master(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "qsae-master"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_local_run_writes_its_files(tmp_path):
    p = master("--local", "--patches", "2000", "--iters", "30", "--seed", "3", "--out", str(tmp_path))
    out, err = p.communicate(timeout=100)
    assert p.returncode == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("iter ")]
    assert len(lines) == 31  # the start and 30 iterations
    for name in ("model.npz", "filters.png", "cost.png", "history.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    theta, cfg, meta = load_model(tmp_path / "model.npz")
    spec = DataSpec.from_dict(meta["data"])
    assert spec.m == 2000 and spec.seed == 3 and meta["optimizer"] == "lbfgs"
    history = [json.loads(ln) for ln in (tmp_path / "history.jsonl").read_text().splitlines()]
    # the saved θ really has the last recorded cost on the rebuilt patches
    X = spec.build(dtype=meta["dtype"])  # the run's dtype: float32 by default
    assert meta["dtype"] == "float32" and X.dtype == np.float32
    # Bit-for-bit: --local ran the same cost function on the same patches with the same BLAS kernel (this
    # process's environment), and qsae pins its BLAS threads (qsae/_blas.py), so the order of every sum is
    # the code's. A tolerance here once hid nothing and then failed on Haswell kernels with 2 BLAS threads.
    assert cost_and_grad(theta, X, cfg)[0] == history[-1]["cost"]
    assert history[-1]["cost"] < history[0]["cost"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 1)])
def test_signal_saves_the_last_iteration(tmp_path, sig, code):
    p = master("--local", "--patches", "20000", "--iters", "100000", "--out", str(tmp_path), "--checkpoint-every", "100000")
    # Signal once a few iterations are done, not after a fixed sleep: L-BFGS converged on 5,000 float32
    # patches within 1.5 s on a quiet machine, and the signal then reached a finished run.
    deadline, hist = time.monotonic() + 60, tmp_path / "history.jsonl"
    while time.monotonic() < deadline and (not hist.exists() or hist.read_text().count("\n") < 5):
        time.sleep(0.02)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    theta, cfg, meta = load_model(tmp_path / "model.npz")
    assert meta["finished"] is False and meta["iteration"] > 0
    history = [json.loads(ln) for ln in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == list(range(meta["iteration"] + 1))  # every completed one
    last = history[-1]
    X = DataSpec.from_dict(meta["data"]).build(dtype=meta["dtype"])
    assert cost_and_grad(theta, X, cfg)[0] == last["cost"]  # bit-for-bit, as in test_local_run_writes_its_files


@pytest.mark.parametrize("args, words", [
    (["--images", "/no/such/file.mat"], "/no/such/file.mat"),
    (["--patches", "0"], "--patches 0"),
    (["--preset", "report", "--rho", "1.5"], "sparsity_target=1.5"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, words):
    p = master("--local", "--iters", "2", "--out", str(tmp_path), *args)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert words in err and "Traceback" not in err


def test_resume_after_kill_9_of_the_master(tmp_path):
    """SIGKILL the master mid-run; --resume finishes near an uninterrupted run's cost.

    L-BFGS restarts with an empty memory on resume, so the paths differ; a restart costs a
    few iterations of progress, hence the 2% tolerance on a cost still falling ~1% an
    iteration at this stage.
    """
    common = ["--workers", "2", "--patches", "3000", "--iters", "80", "--checkpoint-every", "5", "-q"]
    whole = master(*common, "--out", str(tmp_path / "whole"))
    assert whole.wait(100) == 0, whole.stderr.read()
    run = tmp_path / "killed"
    p = master(*common, "--out", str(run))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait for a checkpoint past iteration 20
        if (run / "model.npz").exists() and load_model(run / "model.npz")[2]["iteration"] >= 20:
            break
        time.sleep(0.05)
    p.kill()
    p.wait(10)
    done = load_model(run / "model.npz")[2]["iteration"]
    assert 20 <= done < 80
    r = master(*common[:-1], "--resume", str(run))
    out, err = r.communicate(timeout=100)
    assert r.returncode == 0, err
    assert f"resuming {run} at iteration {done}" in out and "empty memory" in out
    theta, cfg, meta = load_model(run / "model.npz")
    assert meta["iteration"] == 80 and meta["data"]["m"] == 3000
    final = json.loads((tmp_path / "whole" / "history.jsonl").read_text().splitlines()[-1])["cost"]
    resumed = cost_and_grad(theta, DataSpec.from_dict(meta["data"]).build(), cfg)[0]
    assert resumed <= final * 1.02


def test_workers_follow_local_on_the_same_patches(tmp_path):
    runs = {}
    for mode in (["--local"], ["--workers", "2"]):
        out = tmp_path / mode[0].strip("-")
        p = master(*mode, "--patches", "4000", "--iters", "20", "--seed", "2", "--dtype", "float64", "--out", str(out),
                   "-q")
        _, err = p.communicate(timeout=100)
        assert p.returncode == 0, err
        runs[mode[0]] = [json.loads(ln)["cost"] for ln in (out / "history.jsonl").read_text().splitlines()]
    assert len(runs["--local"]) == 21
    np.testing.assert_allclose(runs["--workers"], runs["--local"], rtol=1e-9)


def test_an_error_mid_run_keeps_the_last_good_theta(tmp_path):
    from qsae.errors import NumericalError
    from qsae.model import SAEConfig, init_params
    from qsae.train import RunSpec, train

    cfg = SAEConfig()
    X = DataSpec(m=500).build()
    calls = []

    def flaky(theta):
        calls.append(1)
        if len(calls) > 8:
            raise NumericalError("worker w#1 returned NaN or Inf in round 9")
        return cost_and_grad(theta, X, cfg)

    spec = RunSpec(config=cfg, data=DataSpec(m=500).to_dict(), maxiter=50, out=tmp_path)
    with pytest.raises(NumericalError) as e:
        train(flaky, init_params(cfg), spec, echo=lambda s: None)
    assert "--resume" in "".join(getattr(e.value, "__notes__", []))
    theta, _, meta = load_model(tmp_path / "model.npz")
    last = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
    assert meta["iteration"] == last["iteration"] > 0 and meta["finished"] is False
    assert cost_and_grad(theta, X, cfg)[0] == last["cost"]  # the same function in this process: the same bits


# ---------------------------------------------------------------------- no data loss (issue 11)
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """qsae-master in this process: (exit status, stdout, stderr)."""
    code = master_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--patches", "1000", "--iters", "5", "-q"]


def test_a_run_never_replaces_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "--local", *SMALL, "--out", str(run))[0] == 0
    saved = {f: (run / f).read_bytes() for f in ("model.npz", "history.jsonl")}
    for again in (["--local", "--iters", "1"], ["--local", "--iters", "0"], ["--workers", "1", "--iters", "3"]):
        code, out, err = run_cli(capsys, *again, "--patches", "1000", "--out", str(run))
        assert code == 2 and len(err.splitlines()) == 1, err
        assert (f"--resume {run}" in err and "--force" in err) or "--iters 0" in err, err
        assert {f: (run / f).read_bytes() for f in saved} == saved
    code, out, err = run_cli(capsys, "--local", "--patches", "1000", "--iters", "2", "--out", str(run), "--force", "-q")
    assert code == 0, err
    assert load_model(run / "model.npz")[2]["iteration"] == 2


def test_runs_latest_given_as_out_is_refused_once_it_holds_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "--local", *SMALL)[0] == 0  # no --out: a new runs/STAMP, runs/latest links to it
    before = (tmp_path / "runs" / "latest" / "model.npz").read_bytes()
    code, _, err = run_cli(capsys, "--local", *SMALL, "--out", "runs/latest")
    assert code == 2 and "runs/latest holds a run" in err and "--resume runs/latest" in err
    assert (tmp_path / "runs" / "latest" / "model.npz").read_bytes() == before


@pytest.mark.parametrize("args, flag", [
    (["--workers", "0"], "--workers 0"),
    (["--workers", "-2"], "--workers -2"),
    (["--local", "--workers", "2"], "--local and --workers"),
    (["--workers", "2", "--hosts", "hosts.txt"], "--workers and --hosts"),
    (["--workers", "2", "--wait-for", "2", "--insecure"], "--workers and --wait-for"),
    (["--workers", "2", "--slurm"], "--workers and --slurm"),
    (["--slurm", "--hosts", "hosts.txt"], "--hosts and --slurm"),
    (["--slurm", "--local"], "--local and --slurm"),
    (["--local", "--patches", "0"], "--patches 0"),
    (["--local", "--iters", "-1"], "--iters -1"),
    (["--local", "--patch-size", "0"], "--patch-size 0"),
    (["--workers", "2", "--worker-timeout", "0"], "--worker-timeout"),
    (["--workers", "2", "--start-timeout", "-1"], "--start-timeout"),
    (["--hosts", "hosts.txt", "--connect-timeout", "0"], "--connect-timeout"),
    (["--workers", "2", "--min-workers", "3"], "--min-workers 3"),
    (["--local", "--hidden", "0"], "--hidden 0"),
    (["--workers", "2", "--patches", "1"], "--patches 1"),
    (["--wait-for", "2"], "--keys"),
    (["--local", "--resume", "no-such-run"], "--resume no-such-run"),
])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, monkeypatch, capsys, args, flag):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts.txt").write_text("127.0.0.1 workers=1\n")
    code, out, err = run_cli(capsys, *args, "--out", "run") if "--resume" not in args else run_cli(capsys, *args)
    assert code == 2, err
    assert flag in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts.txt"]  # nothing written, nothing created


def test_bad_dtype_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        master_main(["--local", "--dtype", "float16"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err


def test_resume_of_a_missing_run_is_one_line(tmp_path):
    p = master("--resume", str(tmp_path / "none"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "no run there" in err and str(tmp_path / "none") in err


def test_resume_refuses_flags_that_contradict_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "--local", *SMALL, "--out", str(run))[0] == 0
    before = (run / "model.npz").read_bytes()
    code, _, err = run_cli(capsys, "--local", "--resume", str(run), "--iters", "8", "--patches", "2000",
                           "--hidden", "40", "--optimizer", "cg", "--seed", "5", "--preset", "report")
    assert code == 2 and len(err.strip().splitlines()) == 1
    for named in ("--patches 2000", "--hidden 40", "--optimizer cg", "--seed 5", "--preset report"):
        assert named in err, (named, err)
    assert (run / "model.npz").read_bytes() == before
    # the same values given explicitly agree with the run: accepted
    code, _, err = run_cli(capsys, "--local", "--resume", str(run), "--iters", "8", "--patches", "1000", "-q")
    assert code == 0, err
    assert load_model(run / "model.npz")[2]["iteration"] == 8


def test_resume_continues_history_seconds_and_the_picture(tmp_path, capsys, monkeypatch):
    import qsae.viz

    drawn = []
    real = qsae.viz.save_cost_curves
    monkeypatch.setattr(qsae.viz, "save_cost_curves", lambda runs, path, **kw: (drawn.append(runs), real(runs, path, **kw))[1])
    run = tmp_path / "run"
    assert run_cli(capsys, "--local", "--patches", "1000", "--iters", "6", "--out", str(run), "-q")[0] == 0
    first = read_history(run / "history.jsonl")
    _, _, meta = load_model(run / "model.npz")
    assert meta["finished"] is True and meta["iteration"] == 6  # L-BFGS's "iteration limit" is a finished run
    assert meta["seconds"] == pytest.approx(first[-1]["seconds"])
    assert run_cli(capsys, "--local", "--resume", str(run), "--iters", "12", "-q")[0] == 0
    history = read_history(run / "history.jsonl")
    assert [h["iteration"] for h in history] == list(range(13))
    secs = [h["seconds"] for h in history]
    assert secs == sorted(secs) and secs[7] > first[-1]["seconds"] > 0  # the clock goes on
    _, _, meta = load_model(run / "model.npz")
    assert meta["finished"] is True and meta["iteration"] == 12 and meta["seconds"] == pytest.approx(secs[-1])
    curve = drawn[-1]["run"]
    assert [it for it, _, _ in curve] == list(range(13))  # cost.png: the whole run, not the resumed part


def test_model_npz_keeps_sigma_and_dtype(tmp_path, capsys):
    from qsae.data import patch_sigma

    assert run_cli(capsys, "--local", *SMALL, "--seed", "4", "--out", str(tmp_path / "r"))[0] == 0
    _, _, meta = load_model(tmp_path / "r" / "model.npz")
    spec = DataSpec.from_dict(meta["data"])
    assert meta["dtype"] == "float32"  # the default
    assert meta["sigma"] == pytest.approx(patch_sigma(spec.images(), spec.patch_size, spec.seed), rel=1e-12)


def test_iteration_lines_show_an_eta_and_quiet_hides_them(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "--local", "--patches", "1000", "--iters", "4", "--out", str(tmp_path / "a"))
    lines = [ln for ln in out.splitlines() if ln.startswith("iter ")]
    assert code == 0 and len(lines) == 5
    assert all(" eta " in ln for ln in lines[1:-1]) and " eta " not in lines[-1]
    code, out, _ = run_cli(capsys, "--local", "--patches", "1000", "--iters", "4", "--out", str(tmp_path / "b"), "-q")
    assert code == 0 and not [ln for ln in out.splitlines() if ln.startswith("iter ")]


def test_help_shows_defaults_and_what_no_mode_flag_means():
    p = master("--help")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0
    assert "none of them   one local process per core" in out
    assert "--workers N    N local processes: one agent that forks them (--no-agents: N workers)" in out
    for text in ("(default: 10000)", "(default: 400)", "(default: a new runs/", "(default: 5.0)", "(default: 60.0)",
                 "(default: 10.0)", "(default: float32)", "(default: measured)", "(default: one per core)"):
        assert text in " ".join(out.split()), text


def test_paramiko_is_quiet_unless_verbose(tmp_path, capsys):
    import logging

    from qsae import cli

    for flags, shown in (([], False), (["-v"], True)):
        args = cli.build_parser().parse_args(["--local", *flags])
        cli._setup_logging(args)
        try:
            assert logging.getLogger("paramiko").isEnabledFor(logging.INFO) is shown
        finally:
            while cli._handlers:
                logging.getLogger().removeHandler(cli._handlers.pop())


def test_run_log_and_workers_jsonl(tmp_path):
    run = tmp_path / "run"
    p = master("--workers", "2", "--no-agents", "--patches", "2000", "--iters", "3", "--out", str(run))
    out, err = p.communicate(timeout=100)
    assert p.returncode == 0, err
    log = (run / "run.log").read_text()
    worker_lines = [ln for ln in log.splitlines() if "local#0" in ln and "HELLO" in ln]
    assert worker_lines, log
    for ln in log.splitlines():
        for name in ("local#0", "local#1"):
            assert ln.count(name) <= 1, ln  # each worker line prefixed once
    assert "master listening" in log
    events = [json.loads(ln) for ln in (run / "workers.jsonl").read_text().splitlines()]
    assert {"join"} <= {e["event"] for e in events}
    last = events[-1]["workers"]
    assert sorted(w["name"] for w in last) == ["local#0", "local#1"] and all("rows" in w for w in last)
    assert "local#0" in out and "rows" in out  # the summary, one line per worker


def test_float32_run_on_workers(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "--workers", "2", "--patches", "2000", "--iters", "5", "--dtype", "float32",
                             "--out", str(run), "-q")
    assert code == 0, err
    theta, cfg, meta = load_model(run / "model.npz")
    assert meta["dtype"] == "float32"
    X = DataSpec.from_dict(meta["data"]).build()
    last = read_history(run / "history.jsonl")[-1]["cost"]
    assert cost_and_grad(theta, X, cfg)[0] == pytest.approx(last, rel=1e-4)  # float32 sums


@pytest.mark.parametrize("mode, words", [
    (["--slurm"], "salloc"),  # outside an allocation
    (["--hosts", "bad-hosts.txt"], "bad-hosts.txt"),  # a malformed line
])
def test_launcher_errors_come_before_anything_is_written(tmp_path, monkeypatch, capsys, mode, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / "bad-hosts.txt").write_text("host workers=many\n")
    code, _, err = run_cli(capsys, *mode, "--patches", "1000", "--out", "run")
    assert code == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_of_a_run_with_workers_warns_of_nothing(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group, workers included: they say BYE and
    exit 0, the master saves the run; no line is a warning."""
    run = tmp_path / "run"
    p = master("--workers", "2", "--patches", "20000", "--iters", "100000", "--out", str(run),
               "--checkpoint-every", "100000", "-q", start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(read_history(run / "history.jsonl")) < 3:
            time.sleep(0.1)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    log = (run / "run.log").read_text()
    assert "WARNING" not in err and "WARNING" not in log and "Traceback" not in err, err
    _, _, meta = load_model(run / "model.npz")
    assert meta["iteration"] == read_history(run / "history.jsonl")[-1]["iteration"] > 0
