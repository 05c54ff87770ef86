"""Launchers: hosts files, local workers, and workers over a real sshd on 127.0.0.1.

The workers here are a stand-in script (``STANDIN``) that reads the JSON line from its
stdin, reports it on stderr and waits for stdin EOF; the real qsae.worker is tested
elsewhere. Every process started is stopped and checked gone through /proc.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qsae.errors import ConfigError, HostsFileError, LaunchError
from qsae.launch import HostSpec, LocalLauncher, SSHLauncher, format_hosts_help, parse_hosts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd import SSHServer, keygen, require_sshd  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cr3t-Z85-key-never-on-the-command-line"

STANDIN = textwrap.dedent("""\
    import json, os, signal, sys
    msg = json.loads(sys.stdin.readline())
    if msg.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if msg.get("bye_on_term"):   # as qsae.worker does: SIGTERM -> goodbye, exit 0
        signal.signal(signal.SIGTERM, lambda *a: (print("BYE", file=sys.stderr, flush=True), os._exit(0)))
        signal.signal(signal.SIGINT, lambda *a: (print("got SIGINT", file=sys.stderr, flush=True), os._exit(130)))
    report = dict(msg, pid=os.getpid(), omp=os.environ.get("OMP_NUM_THREADS"))
    print("STANDIN " + json.dumps(report), file=sys.stderr, flush=True)
    print("stdout of " + msg["name"], flush=True)
    if "exit" in msg:
        print("stand-in exits with " + str(msg["exit"]), file=sys.stderr, flush=True)
        sys.exit(msg["exit"])
    while sys.stdin.read(1):   # stdin stays open until the launcher closes it
        pass
    if msg.get("linger"):      # outlive stdin's end: only a signal stops it
        import time
        time.sleep(600)
""")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status or "\nState:\tX" in status


def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def standin_reports(caplog) -> dict[str, dict]:
    """name -> the stand-in's report of the JSON line it read, from the captured log."""
    out = {}
    for r in caplog.records:
        msg = r.getMessage()
        if r.name == "qsae.launch" and "STANDIN " in msg:
            prefix, _, payload = msg.partition(": STANDIN ")
            report = json.loads(payload)
            assert prefix == report["name"], "every log line is prefixed with its worker's name"
            out[prefix] = report
    return out


def log_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qsae.launch"]


@pytest.fixture()
def standin(tmp_path) -> Path:
    p = tmp_path / "standin_worker.py"
    p.write_text(STANDIN)
    return p


@pytest.fixture()
def caplaunch(caplog):
    caplog.set_level(logging.INFO, logger="qsae.launch")
    return caplog


# --------------------------------------------------------------------------------------
# hosts files
# --------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hosts.txt"
    p.write_text(textwrap.dedent(text))
    return p


def test_parse_hosts_good(tmp_path):
    p = write(tmp_path, """\
        # the cluster
        alice@node1.example.org:2222 workers=4 python=/opt/venv/bin/python   # big one

        node2
          node-3 python="/opt/my py/python" workers=2
        [fe80::1]:2200
        bob@fe80::2 workers=1
        node2:2022
        """)
    assert parse_hosts(p) == [
        HostSpec("alice", "node1.example.org", 2222, 4, "/opt/venv/bin/python"),
        HostSpec(None, "node2", None, 1, "python3"),
        HostSpec(None, "node-3", None, 2, "/opt/my py/python"),
        HostSpec(None, "fe80::1", 2200, 1, "python3"),
        HostSpec("bob", "fe80::2", None, 1, "python3"),
        HostSpec(None, "node2", 2022, 1, "python3"),
    ]
    assert str(HostSpec("alice", "fe80::1", 22)) == "alice@[fe80::1]:22"
    assert "workers=N" in format_hosts_help()


def test_shipped_hosts_files_parse():
    root = Path(__file__).resolve().parent.parent / "hosts"
    assert parse_hosts(root / "localhost.txt")
    ygg = parse_hosts(root / "yggdrasil.txt")
    assert [h.host for h in ygg] == [f"yggdrasil{i}" for i in range(1, 5)]
    assert [h.workers for h in ygg] == [4] * 4 and ygg[3].port == 2222


@pytest.mark.parametrize("line, expected", [
    ("node1:0", "bad port '0'"),
    ("node1:65536", "bad port '65536'"),
    ("node1:ssh", "bad port 'ssh'"),
    ("node1: workers=2", "bad port ''"),
    ("node1 workers=0", "bad workers=0"),
    ("node1 workers=-1", "bad workers=-1"),
    ("node1 workers=two", "bad workers=two"),
    ("node1 threads=2", "unknown key 'threads'"),
    ("node1 2", "expected key=value"),
    ("node1 workers=2 workers=3", "workers= given twice"),
    ("node1 python=", "empty python="),
    ("node1 python='/opt/py", "close the quote"),
    ("bad user@node1", "expected key=value"),
    ("al ice@node1", "expected key=value"),
    ("@node1", "bad user name ''"),
    ("node/1", "bad host name 'node/1'"),
    ("[fe80::1", "bad host '[fe80::1'"),
    ("[fe80::1]x", "expected ':port' after ']'"),
])
def test_parse_hosts_malformed(tmp_path, line, expected):
    p = write(tmp_path, f"# header\n\ngood-host workers=2\n{line}\n")
    with pytest.raises(HostsFileError) as info:
        parse_hosts(p)
    msg = str(info.value)
    assert f"{p}, line 4" in msg, msg
    assert repr(line) in msg, msg
    assert expected in msg, msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_parse_hosts_empty(tmp_path, text):
    p = write(tmp_path, text)
    with pytest.raises(HostsFileError, match="lists no hosts"):
        parse_hosts(p)


def test_parse_hosts_duplicate_and_missing(tmp_path):
    p = write(tmp_path, "a workers=2\nb\nalice@a\n")
    with pytest.raises(HostsFileError, match=r"line 3.*already listed on line 1.*workers=N"):
        parse_hosts(p)
    with pytest.raises(HostsFileError, match="cannot read hosts file .*nope.txt"):
        parse_hosts(tmp_path / "nope.txt")


# --------------------------------------------------------------------------------------
# local workers
# --------------------------------------------------------------------------------------

def test_local_start_stop(standin, caplaunch):
    launcher = LocalLauncher(3, args=[str(standin)])
    assert launcher.n_workers == 3 and launcher.bind_address() == "127.0.0.1"
    with launcher:
        launcher.prepare()
        launcher.start("tcp://127.0.0.1:5555", lambda k: {"curve": {"secret": SECRET}, "threads": k + 1})
        wait_until(lambda: len(standin_reports(caplaunch)) == 3, what="3 stand-in reports")
        reports = standin_reports(caplaunch)
        pids = launcher.pids
        assert launcher.names == ["local#0", "local#1", "local#2"]
        for k, pid in enumerate(pids):
            r = reports[f"local#{k}"]
            assert r["pid"] == pid and r["connect"] == "tcp://127.0.0.1:5555"
            assert r["curve"] == {"secret": SECRET} and r["threads"] == k + 1 and r["omp"] == str(k + 1)
            assert SECRET not in Path(f"/proc/{pid}/cmdline").read_text()
        wait_until(lambda: sum("stdout of local#" in m for m in log_lines(caplaunch)) == 3, what="stdout lines")
        assert launcher.wait(0.1) == [None, None, None], "stdin stays open, the workers keep running"
    assert all(gone(p) for p in pids)
    assert launcher.wait(1) == [-signal.SIGTERM] * 3
    assert launcher.failures() == []
    launcher.stop()  # idempotent
    with pytest.raises(LaunchError, match="after stop"):
        launcher.start("tcp://127.0.0.1:5555", {})


def test_local_early_death_and_kill(standin, caplaunch):
    with LocalLauncher(2, args=[str(standin)]) as launcher:
        launcher.start("tcp://127.0.0.1:1", lambda k: {"exit": 3} if k == 0 else {"ignore_term": True})
        wait_until(lambda: launcher.failures(), what="the failure of local#0")
        assert launcher.failures() == ["local#0: exited with code 3 before stop(); its last line: "
                                       "stand-in exits with 3"]
        wait_until(lambda: "local#1" in standin_reports(caplaunch), what="local#1 to ignore SIGTERM")
        t0 = time.monotonic()
        launcher.stop(timeout=0.3)  # local#1 ignores SIGTERM: SIGKILL after 0.3 s
        assert time.monotonic() - t0 < 3
    assert launcher.wait(0) == [3, -signal.SIGKILL]
    assert all(gone(p) for p in launcher.pids)


def test_local_errors():
    with pytest.raises(ConfigError, match="n=0"):
        LocalLauncher(0)
    with pytest.raises(LaunchError, match="not found"):
        LocalLauncher(1, python="/nonexistent/python").prepare()
    with pytest.raises(LaunchError, match="cannot import qsae"):
        LocalLauncher(1, env={"PYTHONPATH": ""}, python="/bin/false").prepare()


def test_local_pdeathsig(standin, tmp_path):
    """A worker dies with its master even when the master is killed with SIGKILL."""
    master = textwrap.dedent(f"""\
        import sys, time, threading
        from qsae.launch import LocalLauncher
        launcher = LocalLauncher(1, args=[{str(standin)!r}])
        # started from a short-lived thread: PDEATHSIG must still wait for the process
        t = threading.Thread(target=launcher.start, args=("tcp://127.0.0.1:1", {{}})); t.start(); t.join()
        print(launcher.pids[0], flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", master], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        pid = int(proc.stdout.readline())
        time.sleep(0.3)
        assert not gone(pid), "the worker outlives its starting thread"
        proc.kill()
        proc.wait()
        wait_until(lambda: gone(pid), timeout=5, what=f"worker {pid} to die with its master")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


# --------------------------------------------------------------------------------------
# SSH: a real sshd on 127.0.0.1
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    require_sshd()
    root = tmp_path_factory.mktemp("sshd")
    with SSHServer(root, alias="qsae-test-host") as server:
        server.bad_key = keygen(root / "id_not_authorized")
        server.empty_known_hosts = root / "empty_known_hosts"
        server.empty_known_hosts.write_text("")
        server.add_alias("qsae-badkey", IdentityFile=str(server.bad_key), UserKnownHostsFile=str(server.known_hosts))
        for alias in ("qsae-nopython", "qsae-noqsae"):
            server.add_alias(alias, IdentityFile=str(server.client_key), UserKnownHostsFile=str(server.known_hosts))
        server.add_alias("qsae-newkey", IdentityFile=str(server.client_key),
                         UserKnownHostsFile=str(server.empty_known_hosts))
        yield server


@pytest.fixture(scope="module")
def python_without_qsae(tmp_path_factory) -> str:
    """An interpreter that cannot import qsae: a bare venv (no site-packages of ours)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60,
                   capture_output=True)
    python = str(venv / "bin" / "python")
    r = subprocess.run([python, "-c", "import qsae"], capture_output=True, cwd="/", env={}, timeout=30)
    if r.returncode == 0:
        pytest.skip("the bare venv imports qsae anyway")
    return python


def ssh_launcher(sshd, hosts, **kw) -> SSHLauncher:
    kw.setdefault("ssh_config", str(sshd.ssh_config))
    kw.setdefault("connect_timeout", 5.0)
    return SSHLauncher(hosts, **kw)


def host(sshd, alias=None, workers=1, python=sys.executable, port=None) -> HostSpec:
    return HostSpec(None, alias or sshd.alias, port, workers, python)


def test_ssh_preflight_ok(sshd):
    with ssh_launcher(sshd, [host(sshd, workers=2)]) as launcher:
        t0 = time.monotonic()
        launcher.prepare()
        assert time.monotonic() - t0 < 5
        assert launcher.bind_address() == "127.0.0.1"
        assert launcher.n_workers == 2 and launcher.failures() == []


def test_ssh_start_stop(sshd, standin, caplaunch):
    """Workers get their JSON on stdin (not argv), log with their prefix, and die at stop()."""
    hosts = [host(sshd, workers=3), HostSpec(sshd.user, "127.0.0.1", sshd.port, 1, sys.executable)]
    launcher = ssh_launcher(sshd, hosts, known_hosts=str(sshd.known_hosts), key_filename=str(sshd.client_key),
                            args=[str(standin)])
    with launcher:
        launcher.start("tcp://127.0.0.1:5555", lambda k: {"curve": {"secret": SECRET}, "threads": 2, "k": k})
        names = [f"{sshd.user}@qsae-test-host#{i}" for i in range(3)] + [f"{sshd.user}@127.0.0.1#0"]
        assert launcher.names == names and launcher.n_workers == 4
        wait_until(lambda: len(standin_reports(caplaunch)) == 4, what="4 stand-in reports")
        reports = standin_reports(caplaunch)
        for k, (name, pid) in enumerate(zip(names, launcher.pids)):
            r = reports[name]
            assert r["pid"] == pid, "the PID line of the remote shell is the worker's own PID"
            assert r["k"] == k and r["curve"] == {"secret": SECRET} and r["omp"] == "2"
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert str(standin) in cmdline and SECRET not in cmdline and "connect" not in cmdline
        wait_until(lambda: sum("stdout of " in m for m in log_lines(caplaunch)) == 4, what="stdout lines")
        assert launcher.wait(0.2) == [None] * 4, "the channels stay open, the workers keep running"
        pids = launcher.pids
    wait_until(lambda: all(gone(p) for p in pids), timeout=5, what="remote workers gone")
    assert launcher.failures() == []
    launcher.stop()  # idempotent


def test_ssh_many_workers_and_sigkill(sshd, standin, caplaunch):
    """More workers than sshd's MaxSessions (10) on one host; a worker ignoring SIGTERM is killed."""
    launcher = ssh_launcher(sshd, [host(sshd, workers=11)], args=[str(standin)])
    with launcher:
        launcher.start("tcp://127.0.0.1:5555", lambda k: {"ignore_term": k == 5})
        wait_until(lambda: len(standin_reports(caplaunch)) == 11, what="11 stand-in reports")
        pids = launcher.pids
        t0 = time.monotonic()
        launcher.stop(timeout=0.5)
        assert time.monotonic() - t0 < 5
    wait_until(lambda: all(gone(p) for p in pids), timeout=5, what="remote workers gone")
    assert any("ignored SIGTERM" in m and str(pids[5]) in m for m in log_lines(caplaunch))


def test_ssh_early_death(sshd, standin):
    with ssh_launcher(sshd, [host(sshd, workers=2)], args=[str(standin)]) as launcher:
        launcher.start("tcp://127.0.0.1:1", lambda k: {"exit": 4} if k == 1 else {})
        wait_until(lambda: launcher.failures(), what="the failure of worker #1")
        assert launcher.failures() == [f"{sshd.user}@qsae-test-host#1: exited with code 4 before stop(); "
                                       f"its last line: stand-in exits with 4"]
    assert launcher.wait(0)[1] == 4


@pytest.fixture()
def silent_port():
    """A port that accepts TCP connections but never says anything (no SSH banner)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture()
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound, never listened: connections are refused
    return port


def test_ssh_failures_reported_together(sshd, python_without_qsae, closed_port, silent_port):
    hosts = [
        HostSpec(None, "127.0.0.1", closed_port, 2, sys.executable),
        HostSpec(None, "qsae-badkey", None, 1, sys.executable),
        HostSpec(None, "qsae-newkey", None, 1, sys.executable),
        HostSpec(None, "qsae-nopython", None, 1, "/nonexistent/python"),
        HostSpec(None, "qsae-noqsae", None, 1, python_without_qsae),
        HostSpec(None, "127.0.0.1", silent_port, 1, sys.executable),
        HostSpec(None, sshd.alias, None, 1, sys.executable),  # the good one
    ]
    launcher = ssh_launcher(sshd, hosts, connect_timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launcher.prepare()
    elapsed = time.monotonic() - t0
    assert elapsed < 6, f"the hosts are checked concurrently ({elapsed:.1f} s)"
    lines = str(info.value).splitlines()
    assert lines[0] == "6 of 7 hosts cannot run workers:", lines
    assert len(lines) == 7, lines
    refused, badkey, newkey, nopython, noqsae, silent = lines[1:]
    assert f"127.0.0.1:{closed_port}" in refused and "connection refused" in refused and "sshd running" in refused
    assert "qsae-badkey" in badkey and "authentication refused" in badkey and "authorized_keys" in badkey
    assert "qsae-newkey" in newkey and "unknown host key" in newkey and "--accept-new-host-keys" in newkey
    assert "/nonexistent/python" in nopython and "not found" in nopython and "set python= in the hosts file" in nopython
    assert ("cannot import qsae" in noqsae and "pip wheel" in noqsae and "pip install qsae-*.whl" in noqsae
            and "pip install qsae==" not in noqsae and "set python= to an interpreter that has it" in noqsae)
    assert f"127.0.0.1:{silent_port}" in silent and "no SSH banner/handshake within 2 s" in silent
    launcher.stop()


def test_ssh_incompatible_qsae(sshd, tmp_path):
    fake = tmp_path / "fakeqsae" / "qsae"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '99.1.0'\n")
    wrapper = tmp_path / "python-old-qsae"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={fake.parent} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    with pytest.raises(LaunchError, match=r"has qsae 99\.1\.0, this master is .*pip wheel.*pip install qsae-\*\.whl"):
        ssh_launcher(sshd, [host(sshd, python=str(wrapper))]).prepare()


def test_ssh_accept_new_host_keys(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    spec = [host(sshd)]
    with pytest.raises(LaunchError, match="unknown host key"):
        ssh_launcher(sshd, spec, known_hosts=str(known)).prepare()
    with ssh_launcher(sshd, spec, known_hosts=str(known), accept_new_host_keys=True) as launcher:
        launcher.prepare()
    assert known.read_text().split() == [f"[127.0.0.1]:{sshd.port}", *sshd.host_public_key().split()]
    with ssh_launcher(sshd, spec, known_hosts=str(known)) as launcher:  # now known: no opt-in needed
        launcher.prepare()


def test_ssh_changed_host_key(sshd, tmp_path):
    other = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} " + " ".join(other.with_suffix(".pub").read_text().split()[:2]) + "\n")
    with pytest.raises(LaunchError, match="host key CHANGED.*ssh-keygen -R"):
        ssh_launcher(sshd, [host(sshd)], known_hosts=str(known), accept_new_host_keys=True).prepare()


def test_ssh_min_workers(sshd, standin, closed_port, caplaunch):
    hosts = [host(sshd, workers=2), HostSpec(None, "127.0.0.1", closed_port, 3, sys.executable)]
    with pytest.raises(LaunchError, match=r"min_workers=3, the others have 2"):
        ssh_launcher(sshd, hosts, min_workers=3).prepare()
    with pytest.raises(ConfigError, match="min_workers=6"):
        ssh_launcher(sshd, hosts, min_workers=6)
    with ssh_launcher(sshd, hosts, min_workers=2, args=[str(standin)]) as launcher:
        launcher.prepare()
        assert launcher.n_workers == 2
        assert len(launcher.failures()) == 1 and "connection refused" in launcher.failures()[0]
        assert any("dropping host" in m for m in log_lines(caplaunch))
        launcher.start("tcp://127.0.0.1:1", {})
        wait_until(lambda: len(standin_reports(caplaunch)) == 2, what="2 stand-in reports")
        pids = launcher.pids
    wait_until(lambda: all(gone(p) for p in pids), timeout=5, what="remote workers gone")


def test_worker_config_validation(standin, caplaunch):
    launcher = LocalLauncher(1, args=[str(standin)])
    with pytest.raises(ConfigError, match="threads=0 for worker local#0"):
        launcher.start("tcp://127.0.0.1:1", {"threads": 0})
    assert launcher.pids == []
    with pytest.raises(ConfigError, match="cannot be sent as JSON"):
        LocalLauncher(1, args=[str(standin)]).start("tcp://127.0.0.1:1", {"x": object()})
    with LocalLauncher(1, args=[str(standin)]) as launcher:  # z85 keys as bytes, as zmq makes them
        launcher.start("tcp://127.0.0.1:1", {"curve": {"public": b"abc", "secret": b"def", "server_public": b"x"}})
        wait_until(lambda: standin_reports(caplaunch), what="the stand-in report")
        assert standin_reports(caplaunch)["local#0"]["curve"]["secret"] == "def"


# --------------------------------------------------------------------------------------
# add(): more workers after start(), indices continuing
# --------------------------------------------------------------------------------------

def test_local_add(standin, caplaunch):
    seen = []

    def config(k):
        seen.append(k)
        return {"curve": {"secret": f"key-{k}"}}

    launcher = LocalLauncher(2, args=[str(standin)])
    with pytest.raises(LaunchError, match="before start"):
        launcher.add(1, "tcp://127.0.0.1:1", config)
    with launcher:
        launcher.start("tcp://127.0.0.1:1", config)
        assert launcher.n_started == 2
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ConfigError, match=r"add\(n="):
                launcher.add(bad, "tcp://127.0.0.1:1", config)
        assert launcher.add(2, "tcp://127.0.0.1:1", config) == ["local#2", "local#3"]
        assert launcher.add(1, "tcp://127.0.0.1:1", config) == ["local#4"]
        assert seen == [0, 1, 2, 3, 4] and launcher.n_workers == 2 and launcher.n_started == 5
        wait_until(lambda: len(standin_reports(caplaunch)) == 5, what="5 stand-in reports")
        reports = standin_reports(caplaunch)
        assert [reports[f"local#{k}"]["curve"]["secret"] for k in range(5)] == [f"key-{k}" for k in range(5)]
        assert launcher.names == [f"local#{k}" for k in range(5)]
        pids = launcher.pids
    assert all(gone(p) for p in pids) and launcher.wait(1) == [-signal.SIGTERM] * 5
    with pytest.raises(LaunchError, match="after stop"):
        launcher.add(1, "tcp://127.0.0.1:1", config)


def test_exit_code_zero_is_not_a_failure(standin, caplaunch):
    with LocalLauncher(1, args=[str(standin)]) as launcher:
        launcher.start("tcp://127.0.0.1:1", {"exit": 0})
        assert launcher.wait(10) == [0]
        wait_until(lambda: any("exited (code 0)" in m for m in log_lines(caplaunch)), what="the exit line")
        assert launcher.failures() == []
    assert not [r for r in caplaunch.records if r.levelno >= logging.WARNING]


def test_local_workers_in_own_session_ctrl_c(standin, tmp_path):
    """A Ctrl-C (SIGINT to the terminal's process group) reaches only the master, which stops
    its workers with SIGTERM: they exit 0, and nothing is logged at WARNING."""
    master = textwrap.dedent(f"""\
        import logging, os, sys, time
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
        from qsae.launch import LocalLauncher
        launcher = LocalLauncher(2, args=[{str(standin)!r}])
        launcher.start("tcp://127.0.0.1:1", {{"bye_on_term": True}})
        def say(*words):  # one write a line: the launcher logs its workers' lines from another thread
            sys.stdout.write(" ".join(map(str, words)) + "\\n")
            sys.stdout.flush()
        say("PIDS", *launcher.pids)
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            launcher.stop()
            say("CODES", *launcher.wait(5))
    """)
    # the master leads its own process group, as a shell's foreground job does
    proc = subprocess.Popen([sys.executable, "-c", master], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        line = proc.stdout.readline()
        while not line.startswith("PIDS"):  # past the launcher's own log lines
            assert line, "the master ended before it printed its workers' pids"
            line = proc.stdout.readline()
        pids = [int(x) for x in line.split()[1:]]
        for pid in pids:
            assert os.getsid(pid) == pid != os.getsid(proc.pid), "each worker leads a session of its own"
        time.sleep(0.5)  # the stand-ins have read their line and set their handlers
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "CODES 0 0" in out, out
    assert "got SIGINT" not in out and "WARNING" not in out, out
    assert all(gone(p) for p in pids)


def ssh_two_hosts(sshd, workers=1):
    return [host(sshd, workers=workers), HostSpec(sshd.user, "127.0.0.1", sshd.port, workers, sys.executable)]


def test_ssh_add_round_robin(sshd, standin, caplaunch):
    launcher = ssh_launcher(sshd, ssh_two_hosts(sshd), known_hosts=str(sshd.known_hosts),
                            key_filename=str(sshd.client_key), args=[str(standin)])
    with launcher:
        launcher.start("tcp://127.0.0.1:1", lambda k: {"k": k})
        a, b = f"{sshd.user}@qsae-test-host", f"{sshd.user}@127.0.0.1"
        assert launcher.names == [f"{a}#0", f"{b}#0"]
        assert launcher.add(3, "tcp://127.0.0.1:1", lambda k: {"k": k}) == [f"{a}#1", f"{b}#1", f"{a}#2"]
        assert launcher.n_started == 5 and launcher.n_workers == 2
        wait_until(lambda: len(standin_reports(caplaunch)) == 5, what="5 stand-in reports")
        reports = standin_reports(caplaunch)
        assert sorted(r["k"] for r in reports.values()) == [0, 1, 2, 3, 4]
        assert reports[f"{a}#2"]["k"] == 4
        with pytest.raises(ConfigError):
            launcher.add(0, "tcp://127.0.0.1:1", {})
        pids = launcher.pids
    wait_until(lambda: all(gone(p) for p in pids), timeout=5, what="remote workers gone")
    assert launcher.failures() == []


@pytest.fixture()
def hangup_port():
    """A port that accepts TCP connections and closes each one at once (no SSH banner)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)

    def serve():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    yield s.getsockname()[1]
    s.close()


def test_ssh_fast_failure_says_what_and_when(hangup_port):
    """A connection closed at once is not reported as a 10 s handshake timeout."""
    launcher = SSHLauncher([HostSpec(None, "127.0.0.1", hangup_port, 1, sys.executable)], ssh_config=None,
                           connect_timeout=10.0)
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launcher.prepare()
    elapsed = time.monotonic() - t0
    line = str(info.value).splitlines()[1]
    assert elapsed < 5, elapsed
    assert ("closed the connection" in line or "reset the connection" in line) and f"port {hangup_port}" in line, line
    assert "within 10 s" not in line, line
    took = float(line.split(" after ")[1].split(" s")[0])
    assert took <= elapsed + 0.01, line  # printed to 0.01 s
    with pytest.raises(ConfigError, match="connect_timeout"):
        SSHLauncher([HostSpec(None, "127.0.0.1", hangup_port, 1, sys.executable)], ssh_config=None,
                    connect_timeout=0)
