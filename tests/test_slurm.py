"""Slurm: workers started by srun inside an allocation of a private one-node cluster (tests/slurm.py).

Each test runs a small script (or qsae-master) under ``salloc -n N``, as a user would, and
checks what it printed as JSON: the training equals a local run's, every worker process
and every srun step is gone afterwards, add() fits the allocation or says why not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qsae.errors import ConfigError, LaunchError
from qsae.launch import SlurmLauncher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm import SlurmCluster, require_slurm  # noqa: E402
from test_launch import STANDIN  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)

# what every script prints last: the processes of this job that still run a worker, and its steps
LEFTOVERS = textwrap.dedent("""\
    import os, subprocess

    def leftovers(job, tag, marker):
        # right after stop(), no waiting: Slurm ends a step by itself ~2 s after its srun dies,
        # which would hide a launcher that leaves its steps to chance
        procs = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\\0")
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and f"SLURM_JOB_ID={job}".encode() in env and state != "Z":
                procs.append(int(pid))
        out = subprocess.run(["squeue", "-s", "-h", "-j", job, "-o", "%i %j"], capture_output=True,
                             text=True, timeout=30).stdout
        return procs, [line for line in out.splitlines() if tag in line]
""")


@pytest.fixture(scope="module")
def cluster():
    require_slurm()
    with SlurmCluster() as c:
        yield c


def salloc(cluster, n: int, argv: list[str], timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    return cluster.run(["salloc", "-n", str(n), *argv], env=env, timeout=timeout, check=False, cwd=str(ROOT))


def last_json(r: subprocess.CompletedProcess[str]) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_outside_an_allocation_is_one_line(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LaunchError) as info:
        SlurmLauncher()
    msg = str(info.value)
    assert "\n" not in msg and "SLURM_JOB_ID" in msg, msg
    assert "salloc -n N qsae-master --slurm" in msg and "sbatch" in msg and "examples/slurm.sbatch" in msg, msg
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    with pytest.raises(LaunchError) as info:
        SlurmLauncher(srun="no-such-srun-here")
    msg = str(info.value)
    assert "\n" not in msg and "no-such-srun-here on the PATH" in msg and "salloc" in msg and "sbatch" in msg, msg


def test_allocation_sizes(monkeypatch, tmp_path):
    """n_workers and the room for add() come from the allocation's environment."""
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_JOB_CPUS_PER_NODE", "2(x2),4")
    launcher = SlurmLauncher(srun=str(srun))
    assert (launcher.n_workers, launcher.tasks, launcher.slots) == (3, 3, 8)
    assert SlurmLauncher(srun=str(srun), n=8).n_workers == 8
    with pytest.raises(ConfigError, match=r"n=9.*1 to 8"):
        SlurmLauncher(srun=str(srun), n=9)
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("SLURM_NPROCS", "2")
    assert SlurmLauncher(srun=str(srun)).n_workers == 2
    monkeypatch.delenv("SLURM_NPROCS")  # salloc -N 2 without -n: one worker per CPU
    assert SlurmLauncher(srun=str(srun)).n_workers == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert SlurmLauncher(srun=str(srun)).n_workers == 4
    monkeypatch.delenv("SLURM_JOB_CPUS_PER_NODE")
    with pytest.raises(LaunchError, match="salloc -n 8"):
        SlurmLauncher(srun=str(srun))


def test_slurm_training_equals_local_and_leaves_nothing(cluster, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(LEFTOVERS + textwrap.dedent("""\
        import json, sys
        import numpy as np
        from qsae import Master, SAEConfig, SlurmLauncher, init_params
        from qsae.data import load_images

        cfg, images = SAEConfig(), load_images()
        theta0 = init_params(cfg, seed=1)
        launcher = SlurmLauncher()
        with Master(launcher=launcher, config=cfg) as master:
            n, curve, address = master.n_workers, master.curve, master.address
            master.scatter_images(images, m=2000, seed=1)
            slurm = master.fit(theta0, maxiter=10)
        procs, steps = leftovers(launcher.job_id, launcher.tag, "qsae.worker")
        with Master(workers=2, config=cfg) as master:
            master.scatter_images(images, m=2000, seed=1)
            local = master.fit(theta0, maxiter=10)
        print(json.dumps({"n": n, "curve": curve, "address": address, "names": launcher.names,
                          "codes": launcher.wait(5), "failures": launcher.failures(),
                          "slurm": [c for _, _, c in slurm.history], "local": [c for _, _, c in local.history],
                          "procs": procs, "steps": steps}))
    """))
    out = last_json(salloc(cluster, 2, [sys.executable, str(script)]))
    assert out["n"] == 2 and out["curve"] and out["names"] == ["slurm#0", "slurm#1"]
    assert out["address"].startswith("tcp://127.0.0.1:")
    assert len(out["slurm"]) == 11
    assert max(abs(a - b) for a, b in zip(out["slurm"], out["local"])) <= 1e-10 * abs(out["local"][0])
    assert out["procs"] == [] and out["steps"] == [], "every worker process and srun step ended"
    assert out["failures"] == [] and None not in out["codes"]
    assert cluster.drained() == []


def test_slurm_add_and_keys_on_stdin(cluster, tmp_path):
    """add() starts srun steps while the allocation has room, then says it has none; the
    workers' keys arrive on stdin, never on a command line."""
    standin = tmp_path / "standin_worker.py"
    standin.write_text(STANDIN)
    script = tmp_path / "add.py"
    script.write_text(LEFTOVERS + textwrap.dedent(f"""\
        import json, logging, os, time
        from qsae.errors import LaunchError
        from qsae.launch import SlurmLauncher

        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logging.getLogger("qsae.launch").addHandler(handler)
        logging.getLogger("qsae.launch").setLevel(logging.INFO)
        # linger: a stand-in that outlives its stdin, so only a signal to its step ends it
        secret = lambda k: {{"curve": {{"secret": f"SECRET-{{k}}-not-on-argv"}}, "linger": True}}
        launcher = SlurmLauncher(n=2, args=[{str(standin)!r}])
        with launcher:
            launcher.prepare()
            launcher.start("tcp://127.0.0.1:1", secret)
            added = launcher.add(1, "tcp://127.0.0.1:1", secret)
            try:
                launcher.add(1, "tcp://127.0.0.1:1", secret)
                full = None
            except LaunchError as e:
                full = str(e)
            deadline = time.monotonic() + 60
            while sum("STANDIN " in m for m in lines) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            reports = [json.loads(m.partition(": STANDIN ")[2]) for m in lines if "STANDIN " in m]
            argv = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    argv.append(open(f"/proc/{{pid}}/cmdline", "rb").read().decode(errors="replace"))
                except OSError:
                    pass
            running = subprocess.run(["squeue", "-s", "-h", "-j", launcher.job_id, "-o", "%j"],
                                     capture_output=True, text=True).stdout.split()
        procs, steps = leftovers(launcher.job_id, launcher.tag, {str(standin)!r})
        print(json.dumps({{"added": added, "full": full, "n_started": launcher.n_started,
                          "secrets": sorted(r["curve"]["secret"] for r in reports),
                          "on_argv": any("SECRET-" in a for a in argv),
                          "running": sorted(s for s in running if s.startswith(launcher.tag)),
                          "tag": launcher.tag, "procs": procs, "steps": steps, "failures": launcher.failures()}}))
    """))
    out = last_json(salloc(cluster, 3, [sys.executable, str(script)]))
    assert out["added"] == ["slurm#2"] and out["n_started"] == 3
    assert out["full"] and "no room for 1 more worker" in out["full"] and "salloc -n N" in out["full"]
    assert out["secrets"] == [f"SECRET-{k}-not-on-argv" for k in range(3)] and not out["on_argv"]
    assert out["running"] == [f"{out['tag']}.{k}" for k in range(3)]
    assert out["procs"] == [] and out["steps"] == [] and out["failures"] == []


def test_cli_slurm(cluster, tmp_path):
    """The issue's command line: salloc -n 2 qsae-master --slurm ... (one agent on the node, by default)."""
    run = tmp_path / "run"
    master = [sys.executable, str(ROOT / "bin" / "qsae-master")]
    r = salloc(cluster, 2, [*master, "--slurm", "--patches", "2000", "--iters", "10", "--out", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2000 patches on 1 agent of 2 processes" in r.stdout, r.stdout[-3000:]  # one step on the node, by default
    assert len((run / "history.jsonl").read_text().splitlines()) == 11
    assert (run / "model.npz").exists()
    assert cluster.drained() == []


@pytest.mark.parametrize("other", [["--local"], ["--hosts", "hosts/localhost.txt"]])
def test_cli_slurm_conflicts(other, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), "--slurm", *other, "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    assert r.returncode == 2, r.stderr
    assert "--slurm" in r.stderr and other[0] in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_slurm_outside_allocation(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "qsae-master"), "--slurm", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=60, env={**env, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "salloc -n N qsae-master --slurm" in lines[0] and "sbatch" in lines[0], r.stderr


def test_example_sbatch_script(cluster, tmp_path):
    """examples/slurm.sbatch, with a small run, trains as a batch job and leaves no job behind."""
    text = (ROOT / "examples" / "slurm.sbatch").read_text()
    assert "#SBATCH -n 8" in text and "--patches 1000000 --iters 500" in text
    script = tmp_path / "small.sbatch"
    script.write_text(text.replace("#SBATCH -n 8", "#SBATCH -n 2")
                      .replace("--patches 1000000 --iters 500", "--patches 2000 --iters 5 -q"))
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists() or not (venv / "bin" / "qsae-master").exists():
        pytest.skip(f"{venv} is not a venv with qsae-master installed (pip install -e .)")
    env = {**cluster.env, "PYTHONPATH": str(ROOT), "QSAE_VENV": str(venv)}
    r = cluster.run(["sbatch", "--wait", "--parsable", f"--chdir={tmp_path}", str(script)], env=env, timeout=150,
                    check=False)
    job = r.stdout.strip().split(";")[0]
    log = tmp_path / f"qsae-{job}.log"
    assert r.returncode == 0, (r.stderr, log.read_text() if log.exists() else "no log")
    assert len((tmp_path / "runs" / job / "history.jsonl").read_text().splitlines()) == 6, log.read_text()
    assert cluster.drained() == []
