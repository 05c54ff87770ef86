"""A private one-node Slurm cluster for tests, started the way tests/sshd.py starts OpenSSH.

    with SlurmCluster() as cluster:
        cluster.env                              # os.environ + SLURM_CONF: for srun, salloc, squeue, ...
        cluster.run(["salloc", "-n", "2", "python", "-c", "..."])

Three daemons from Debian's packages, each a child process of the test run in the
foreground (``-F`` / ``-D``), run as the current user (root in CI), with their own files
in a private directory:

- ``munged --socket ...`` with its own key, PID, seed and log file;
- ``slurmctld -D`` and ``slurmd -D`` with their own slurm.conf (clients find it through
  ``SLURM_CONF``): free ports (``SlurmctldPort``, ``SlurmdPort``), ``StateSaveLocation``,
  ``SlurmdSpoolDir``, PID and log files, ``AuthInfo=socket=...`` for munge;
- one node, this host's name at ``NodeAddr=127.0.0.1``, with ``CPUs=4`` whatever the
  hardware (``SlurmdParameters=config_overrides``), no cgroups (``proctrack/pgid``,
  ``task/none``), one default partition.

On exit every job is cancelled (scancel), the daemons are stopped and reaped, and the
directory is removed. :func:`require_slurm` skips a test when the binaries are missing, or
fails it when ``CI=true`` (CI must install slurmctld, slurmd, slurm-client and munge).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("srun", "salloc", "sbatch", "sinfo", "squeue", "scancel", "scontrol")

#: CPUs the node offers (more than this 2-core host has, thanks to config_overrides)
CPUS = 4


def require_slurm() -> None:
    """Skip (or, with CI=true, fail) the calling test if Slurm or munge is not installed."""
    missing = [p for p in DAEMONS.values() if not os.access(p, os.X_OK)]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if not missing:
        return
    import pytest  # here, not at the top: `python tests/slurm.py ...` runs where pytest is not installed

    reason = (f"{', '.join(missing)} not found: install Slurm and munge "
              f"(apt-get install slurmctld slurmd slurm-client munge)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, one node of :data:`CPUS` CPUs; a context manager.

    Parameters
    ----------
    start_timeout : float
        Seconds to wait until the node is idle in ``sinfo``.

    The directory is made here, not under pytest's tmp_path: munged wants every directory
    above its socket searchable by all (pytest's base is 0700), and a socket path must fit
    in 108 bytes.
    """

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.root: Path | None = None
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env: dict[str, str] = {}
        self.conf = Path()
        self.munge_socket = Path()
        self.ports = (0, 0)  # SlurmctldPort, SlurmdPort

    # -- setup ---------------------------------------------------------------------

    def _write_files(self, root: Path) -> None:
        self.ports = (free_port(), free_port())
        while self.ports[1] == self.ports[0]:
            self.ports = (self.ports[0], free_port())
        (root / "munge").mkdir(mode=0o755)
        (root / "key").mkdir(mode=0o700)
        (root / "state").mkdir(mode=0o755)
        (root / "spool").mkdir(mode=0o755)
        key = root / "key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = root / "munge" / "socket"
        (root / "plugstack.conf").write_text("")  # none of the system's SPANK plugins
        self.conf = root / "slurm.conf"
        self.conf.write_text(
            "ClusterName=qsaetest\n"
            f"SlurmctldHost={self.node}(127.0.0.1)\n"
            f"SlurmUser={_user()}\n"
            f"SlurmdUser={_user()}\n"
            f"SlurmctldPort={self.ports[0]}\n"
            f"SlurmdPort={self.ports[1]}\n"
            "AuthType=auth/munge\n"
            "CredType=cred/munge\n"
            f"AuthInfo=socket={self.munge_socket}\n"
            f"StateSaveLocation={root / 'state'}\n"
            f"SlurmdSpoolDir={root / 'spool'}\n"
            f"SlurmctldPidFile={root / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={root / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={root / 'slurmctld.log'}\n"
            f"SlurmdLogFile={root / 'slurmd.log'}\n"
            f"PlugStackConfig={root / 'plugstack.conf'}\n"
            "ProctrackType=proctrack/pgid\n"  # no cgroups in a container
            "TaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\n"
            "JobCompType=jobcomp/none\n"
            "MpiDefault=none\n"
            "SelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_CPU\n"
            "SchedulerType=sched/builtin\n"
            "SlurmdParameters=config_overrides\n"  # offer CPUS whatever the hardware has
            "ReturnToService=2\n"
            "KillWait=5\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [v for v in self.env if v.startswith(("SLURM_", "SALLOC_", "SBATCH_", "SRUN_"))]:
            if var != "SLURM_CONF":  # never inherit an outer allocation
                del self.env[var]

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.root is not None
        with open(self.root / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                env=self.env, cwd=self.root)

    def _wait(self, what: str, ready: Any) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {self.start_timeout:g} s"
                raise RuntimeError(f"the test Slurm cluster did not start ({what}: {why}); its logs:\n{self.logs()}")
            time.sleep(0.1)

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node is idle.

        Tries three times: a free port may be taken between probe and bind.
        """
        require_slurm()
        for attempt in range(3):
            try:
                return self._start_once()
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self) -> SlurmCluster:
        self.root = Path(tempfile.mkdtemp(prefix="qsae-slurm-"))
        self.root.chmod(0o755)
        try:
            self._write_files(self.root)
            self._spawn("munged", [DAEMONS["munged"], "--foreground", f"--socket={self.munge_socket}",
                                   f"--key-file={self.root / 'key' / 'munge.key'}",
                                   f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
                                   f"--seed-file={self.root / 'munged.seed'}"])
            self._wait("munged's socket", self.munge_socket.exists)
            self._spawn("slurmctld", [DAEMONS["slurmctld"], "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [DAEMONS["slurmd"], "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait("the node idle in sinfo", lambda: self.node_state() == "idle")
        except BaseException:
            self.stop()
            raise
        return self

    def node_state(self) -> str:
        """The node's state as sinfo reports it (``idle``, ``mix``, ``alloc``, ``down*``, ...)."""
        r = self.run(["sinfo", "-h", "-o", "%t"], check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    def run(self, argv: Sequence[str], timeout: float = 60.0, check: bool = True,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (or anything) against this cluster; text output captured."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(list(argv), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, check=check, **kwargs)

    def jobs(self) -> list[str]:
        """Ids of the jobs in the queue."""
        return self.run(["squeue", "-h", "-o", "%i"]).stdout.split()

    def drained(self, seconds: float = 15.0) -> list[str]:
        """Wait up to ``seconds`` for the queue to empty; the jobs still in it, with their state.
        A job whose salloc or sbatch --wait has returned may still be COMPLETING for a moment."""
        deadline = time.monotonic() + seconds
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.2)
        return [line for line in self.run(["squeue", "-h", "-o", "%i %T"]).stdout.splitlines() if line.strip()]

    def steps(self) -> list[str]:
        """``JOB.STEP NAME`` of every job step that runs."""
        return [line for line in self.run(["squeue", "-s", "-h", "-o", "%i %j"]).stdout.splitlines() if line.strip()]

    def logs(self) -> str:
        """The tail of every daemon's log and output."""
        if self.root is None:
            return ""
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-1500:])
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job, stop the daemons and reap them, remove the directory."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self.jobs()
                if jobs:
                    self.run(["scancel", *jobs], check=False)
                    self.drained()
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):  # clients of munge first
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


# --------------------------------------------------------------------------------------
# python tests/slurm.py --start-times: how long starting N workers takes, by way of starting
# --------------------------------------------------------------------------------------

_STARTER = """\
import json, sys
msg = json.loads(sys.stdin.readline())
print("READY", msg.get("name"), file=sys.stderr, flush=True)
while sys.stdin.read(1):
    pass
"""


def _time_until_ready(start: Any, n: int, lines: list[str]) -> float:
    start = start()  # set-up, not timed: a launcher's preflight
    t0 = time.perf_counter()
    stop = start()
    try:
        while sum(line.startswith("READY") or ": READY" in line for line in lines) < n:
            if time.perf_counter() - t0 > 60:
                raise RuntimeError(f"{n} workers not ready within 60 s")
            time.sleep(0.002)
        return time.perf_counter() - t0
    finally:
        stop()


def _start_times_inside(n: int, reps: int) -> None:  # pragma: no cover - a benchmark
    """Run inside ``salloc -n n``: print the table of start times."""
    import json
    import logging
    import statistics
    import sys
    import threading

    from qsae.launch import LocalLauncher, SlurmLauncher

    script = Path(tempfile.mkdtemp()) / "starter.py"
    script.write_text(_STARTER)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("qsae.launch").addHandler(handler)
    logging.getLogger("qsae.launch").setLevel(logging.INFO)

    def launcher_start(make: Any) -> Any:
        def setup() -> Any:
            launcher = make()
            launcher.prepare()

            def start() -> Any:
                launcher.start("tcp://127.0.0.1:1", {})
                return launcher.stop
            return start
        return setup

    def preflight() -> Any:
        def start() -> Any:
            SlurmLauncher(n=n, args=[str(script)]).prepare()
            lines.extend(["READY"] * n)
            return lambda: None
        return start

    def one_step() -> Any:
        return one_step_start

    def one_step_start() -> Any:  # one srun step of n tasks; srun sends its stdin to every task
        proc = subprocess.Popen(["srun", f"--ntasks={n}", "--exact", "--quiet", sys.executable, str(script)],
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write((json.dumps({"name": "step"}) + "\n").encode())
        proc.stdin.flush()
        reader = threading.Thread(target=lambda: lines.extend(x.decode() for x in proc.stderr), daemon=True)
        reader.start()

        def stop() -> None:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(30)
            reader.join(5)
        return stop

    ways = {
        "local processes (LocalLauncher)": launcher_start(lambda: LocalLauncher(n, args=[str(script)])),
        "one srun step per worker (SlurmLauncher)": launcher_start(lambda: SlurmLauncher(n=n, args=[str(script)])),
        f"one srun step of {n} tasks": one_step,
        "SlurmLauncher.prepare() (preflight step, once)": preflight,
    }
    print(f"seconds until {n} workers have read their configuration line (median of {reps})")
    print(f"{'how':48s} {'median':>8s} {'min':>8s}")
    for how, start in ways.items():
        times = []
        for _ in range(reps):
            lines.clear()
            times.append(_time_until_ready(start, n, lines))
        print(f"{how:48s} {statistics.median(times):8.3f} {min(times):8.3f}")


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - a tool
    """``python tests/slurm.py --start-times [N]``: the start-time table; ``python tests/slurm.py
    CMD ...``: run CMD (e.g. ``salloc -n 2 qsae-master --slurm ...``) against a private cluster."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    root = str(Path(__file__).resolve().parents[1])
    if args[:1] == ["--inside"]:
        _start_times_inside(int(args[1]), int(args[2]))
        return 0
    with SlurmCluster() as cluster:
        env = {**cluster.env, "PYTHONPATH": root}
        if not args or args[0] == "--start-times":
            n = int(args[1]) if len(args) > 1 else CPUS
            cmd = ["salloc", "-n", str(n), sys.executable, __file__, "--inside", str(n), "5"]
        else:
            cmd = args
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
