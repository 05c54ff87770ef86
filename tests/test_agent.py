"""Host agents (qsae.agent): one connection per host, P forked compute processes, rows added
along the summation tree; faults at the new level leave the cost history bit-equal."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest

from qsae import Master, SAEConfig, init_params
from qsae.agent import split
from qsae.data import load_images
from qsae.errors import ProtocolError
from qsae.launch import LocalLauncher
from qsae.protocol import HELLO, decode, encode

from procs import alive, assert_back, stuttering, wait_gone

pytestmark = pytest.mark.timeout(180)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = SAEConfig()
M, ITERS = 3000, 25
OPTS = dict(config=CFG, block_rows=250, reducer_options={"rounds": 2})  # 12 blocks; the two-round protocol


@pytest.fixture(scope="module")
def images():
    return load_images()


@pytest.fixture(scope="module")
def plain(images):
    """The reference: three plain single-process workers."""
    with Master(workers=3, **OPTS) as master:
        master.scatter_images(images, m=M, seed=0)
        return master.fit(init_params(CFG), maxiter=ITERS)


def costs(result) -> np.ndarray:
    return np.array([c for _, _, c in result.history])


def children(pid: int) -> list[int]:
    """The compute processes of the agent ``pid`` (Linux: /proc's children list)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def agent_pids(master: Master) -> list[int]:
    return sorted(w.pid for w in master._workers.values())


def test_split_gives_contiguous_runs() -> None:
    assert split([5, 1, 2, 3, 4, 0, 6], 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert split([7], 3) == [[], [], [7]]
    assert split([], 2) == [[], []]


def test_compute_framing_carries_every_size_whole() -> None:
    """The agent ↔ compute process framing: messages from empty to several MB (past the socket
    buffer: the gathering send goes out in pieces) arrive whole and in order; EOF reads None."""
    import socket

    from qsae.compute import read, write

    rng = np.random.default_rng(5)
    sent = [("EVAL", [], {"ids": []}),
            ("EVAL", [rng.random(3934)], {"op": "sums", "ids": list(range(64)), "evaluation": 3}),
            ("ROWS", [rng.random((3, 5945)), rng.random(0)], {"nodes": [1, 2, 3]}),
            ("HOLD", [rng.random((40_000, 64)).astype(np.float32), rng.random((7, 64))], {"ids": [1, 2]})]
    a, b = socket.socketpair()
    a.settimeout(20)  # a socket with a timeout sends what fits and returns: the loop must send the rest
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: read(b), None)))
    reader.start()
    try:
        for t, arrays, fields in sent:
            write(a, t, arrays, **fields)
    finally:
        a.close()
        reader.join(30)
        b.close()
    assert not reader.is_alive() and len(got) == len(sent)
    for (t, arrays, fields), (head, back) in zip(sent, got):
        assert head == {"t": t, **fields}
        assert len(back) == len(arrays)
        for x, y in zip(arrays, back):
            assert x.dtype == y.dtype and np.array_equal(x, y)


def test_rows_of_ranges_equal_rows_of_their_blocks() -> None:
    """The rows a RESULT reports, from its ranges (``rows_in``) as from its block ids: the
    last block may be short; ranges with and without it, of data sets with and without a short one."""
    from qsae import tree
    from qsae.compute import rows_in, rows_of

    rng = np.random.default_rng(3)
    for _ in range(500):
        block_rows = int(rng.integers(1, 9))
        m = int(rng.integers(1, 200))
        B = -(-m // block_rows)
        ids = sorted(set(rng.integers(0, B, size=int(rng.integers(0, B + 1))).tolist()))
        if rng.random() < 0.3:
            ids = sorted(set(ids) | {B - 1})
        spans = tree.runs(ids)
        assert rows_in(spans, m, block_rows) == rows_of(ids, m, block_rows) == sum(
            min((b + 1) * block_rows, m) - b * block_rows for b in ids)


def test_blocks_more_than_the_host_can_hold_are_refused_before_cutting() -> None:
    """A worker asked for more rows than its host's memory refuses them (naming the fix) and
    cuts nothing; what it can hold, it takes."""
    from qsae.compute import Blocks
    from qsae.errors import ConfigError

    cfg, memory = SAEConfig(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    m = 2 * memory // (cfg.n_visible * 8)  # float64 rows: twice this host's memory
    store = Blocks({"config": cfg, "kind": "images", "images": [], "m": m, "block_rows": m // 4, "patch_size": 8,
                    "seed": 0, "sigma": 1.0, "dtype": np.dtype("float64")})
    store.check_room([0])  # a quarter of it: half the memory
    with pytest.raises(ConfigError, match=r"GiB on this worker, but its host has .* give fewer --patches"):
        store.check_room([0, 1, 2])
    assert store.held == {}


def test_rows_given_in_blocks_are_checked_against_the_source() -> None:
    """BLOCKS of an array source carry one array per block, in the run's dtype and its block's
    shape; an images source's carry none (workers and agents check them alike)."""
    from qsae.compute import Blocks

    cfg = SAEConfig()
    source = {"config": cfg, "kind": "array", "m": 250, "block_rows": 100, "dtype": np.dtype("float32")}
    store = Blocks(source)
    store.check_given([0, 2], [np.zeros((100, 64), np.float32), np.zeros((50, 64), np.float32)])
    for arrays, words in (([np.zeros((100, 64), np.float32)], "names 2 blocks but carries 1"),
                          ([np.zeros((100, 64)), np.zeros((50, 64), np.float32)], "came as float64"),
                          ([np.zeros((100, 64), np.float32), np.zeros((100, 64), np.float32)], r"block 2 has shape")):
        with pytest.raises(ValueError, match=words):
            store.check_given([0, 2], arrays)
    with pytest.raises(ValueError, match="carries no rows"):
        Blocks(dict(source, kind="images")).check_given([0], [np.zeros((100, 64), np.float32)])


def test_hello_procs_is_optional_and_checked() -> None:
    base = dict(name="a", host="h", pid=1, cores=4, version="x", blas="")
    assert "procs" not in decode(encode(HELLO, **base)).fields
    assert decode(encode(HELLO, **base, procs=4))["procs"] == 4
    with pytest.raises(ProtocolError, match="procs"):
        decode(encode(HELLO, **base, procs="4"))


@pytest.mark.parametrize("hosts,procs", [(1, 3), (2, 2)])
def test_agents_give_the_bits_of_plain_workers(images, plain, hosts: int, procs: int) -> None:
    """One agent of 3 processes, or 2 agents of 2: the master sees one connection per agent with
    P cores, each agent holds about P times a one-core worker's blocks, and the history and θ of
    20+ L-BFGS iterations are bit-equal to three plain workers'."""
    with Master(launcher=LocalLauncher(hosts, procs=procs), **OPTS) as master:
        master.scatter_images(images, m=M, seed=0)
        assert master.n_workers == hosts
        for pid in agent_pids(master):
            assert len(children(pid)) == procs
        result = master.fit(init_params(CFG), maxiter=ITERS)
        assert sum(row["blocks"] for row in master.status()) == M // 250
    assert result.nit == plain.nit == ITERS
    np.testing.assert_array_equal(costs(result), costs(plain))
    np.testing.assert_array_equal(result.x, plain.x)


def test_one_round_protocol_through_an_agent(images) -> None:
    opts = dict(config=CFG, block_rows=250, reducer_options={"rounds": 1})
    with Master(workers=2, **opts) as master:
        master.scatter_images(images, m=M, seed=0)
        quiet = master.fit(init_params(CFG), maxiter=ITERS)
    with Master(launcher=LocalLauncher(1, procs=2), **opts) as master:
        master.scatter_images(images, m=M, seed=0)
        result = master.fit(init_params(CFG), maxiter=ITERS)
    np.testing.assert_array_equal(costs(result), costs(quiet))


def test_a_compute_process_killed_mid_round_changes_nothing(images, plain) -> None:
    """SIGKILL one compute process at iteration 5 and another one while rounds run: the agent
    forks each again, gives it its blocks again and asks again; the master loses nobody and
    no partial sum reaches L-BFGS."""
    with Master(launcher=LocalLauncher(1, procs=3), worker_timeout=10.0, **OPTS) as master:
        master.scatter_images(images, m=M, seed=0)
        agent = agent_pids(master)[0]
        killed: list[int] = []

        def kill_one() -> None:
            victim = children(agent)[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

        def at_5(info) -> None:
            if info.iteration == 5:
                kill_one()
            if info.iteration == 12:  # and one mid-round: a moment after the next evaluation began
                threading.Timer(0.002, kill_one).start()

        result = master.fit(init_params(CFG), maxiter=ITERS, callback=at_5)
        assert master.n_workers == 1 and master.stats["backups"] == 0
        assert len(killed) == 2 and not any(alive(p) for p in killed)
        assert len(children(agent)) == 3  # forked again
    np.testing.assert_array_equal(costs(result), costs(plain))
    np.testing.assert_array_equal(result.x, plain.x)


def test_an_agent_killed_is_a_lost_worker(images, plain) -> None:
    """SIGKILL one of two agents at iteration 5: its compute processes die with it and its
    blocks go to the other agent (the master's lost-worker path); the history is unchanged."""
    with Master(launcher=LocalLauncher(2, procs=2), worker_timeout=2.0, **OPTS) as master:
        master.scatter_images(images, m=M, seed=0)
        victim = agent_pids(master)[0]
        compute = children(victim)

        def at_5(info) -> None:
            if info.iteration == 5:
                os.kill(victim, signal.SIGKILL)

        result = master.fit(init_params(CFG), maxiter=ITERS, callback=at_5)
        assert master.n_workers == 1
        assert wait_gone(compute, 5.0) == []  # PR_SET_PDEATHSIG: none computes on as an orphan
    assert result.nit == ITERS
    np.testing.assert_array_equal(costs(result), costs(plain))
    np.testing.assert_array_equal(result.x, plain.x)


def test_an_agent_stopped_is_a_straggler(images, plain) -> None:
    """SIGSTOP one of two agents again and again (0.15-0.35 s): the other computes its blocks
    in forward rounds and in backward rounds; the history and θ are bit-equal."""
    with Master(launcher=LocalLauncher(2, procs=2), worker_timeout=10.0, **OPTS) as master:
        master.scatter_images(images, m=M, seed=0)
        for _ in range(3):  # speeds measured: stragglers are told by their predicted time
            master(init_params(CFG))
        with stuttering(agent_pids(master)[0]):
            result = master.fit(init_params(CFG), maxiter=ITERS)
        assert master.n_workers == 2
        assert master.stats["backups"] >= 1, master.stats
    np.testing.assert_array_equal(costs(result), costs(plain))
    np.testing.assert_array_equal(result.x, plain.x)


def test_an_agent_moves_blocks_to_its_faster_process_and_the_bits_stay(images, caplog) -> None:
    """One agent of 2 processes, one of them stopped half the time (SIGSTOP 10 ms, SIGCONT 10 ms,
    as a core shared with a busy neighbour): the agent measures both and moves blocks to the fast
    one with the master's planner, and the L-BFGS history and θ are those of 2 plain workers, bit
    for bit (60,000 patches in 20 blocks: rounds long enough to time, blocks moved mid-run)."""
    import logging

    m, iters, opts = 60_000, 15, dict(config=CFG, block_rows=3000)  # exact, one round; rounds of 20+ ms
    with Master(workers=2, **opts) as master:
        master.scatter_images(images, m=m, seed=0)
        ref = master.fit(init_params(CFG), maxiter=iters)
    caplog.set_level(logging.INFO)
    with Master(launcher=LocalLauncher(1, procs=2), **opts) as master:
        master.scatter_images(images, m=m, seed=0)
        slow = sorted(children(agent_pids(master)[0]))[1]  # slot 1: forked second
        stop = threading.Event()

        def duty() -> None:
            while not stop.is_set():
                os.kill(slow, signal.SIGSTOP)
                time.sleep(0.01)
                os.kill(slow, signal.SIGCONT)
                time.sleep(0.01)

        t = threading.Thread(target=duty)
        t.start()
        try:
            result = master.fit(init_params(CFG), maxiter=iters)
        finally:
            stop.set()
            t.join()
            os.kill(slow, signal.SIGCONT)
    moved = [r.getMessage() for r in caplog.records if "moved between its processes" in r.getMessage()]
    assert moved, "no blocks moved between the agent's processes"
    held = re.search(r"blocks now 0: (\d+), 1: (\d+)", moved[-1])
    assert held and int(held[1]) > int(held[2]) and int(held[1]) + int(held[2]) == 20, moved
    np.testing.assert_array_equal(costs(result), costs(ref))
    np.testing.assert_array_equal(result.x, ref.x)


def test_a_stalled_compute_process_is_forked_again_and_the_bits_stay(images, caplog) -> None:
    """One agent of 2 processes, the only worker (a single machine: the master has nobody to back
    it up with): one process SIGSTOPped for good mid-run is told stalled (4× its predicted time,
    2 s at least, while the other answered), killed and forked again, and its blocks computed by
    the new one; the L-BFGS history and θ are those of 2 plain workers, bit for bit."""
    import logging

    m, iters, opts = 60_000, 12, dict(config=CFG, block_rows=3000)  # rounds of 20+ ms: timed, so predicted
    with Master(workers=2, **opts) as master:
        master.scatter_images(images, m=m, seed=0)
        ref = master.fit(init_params(CFG), maxiter=iters)
    caplog.set_level(logging.INFO)
    with Master(launcher=LocalLauncher(1, procs=2), worker_timeout=30.0, **opts) as master:
        master.scatter_images(images, m=m, seed=0)
        agent = agent_pids(master)[0]
        victim = sorted(children(agent))[1]
        calls = 0

        def stop_at_the_fourth(theta):
            nonlocal calls
            calls += 1
            if calls == 4:  # speeds measured by then: the agent predicts each process's time
                os.kill(victim, signal.SIGSTOP)
            return master(theta)

        from qsae.optim import minimize

        result = minimize(stop_at_the_fourth, init_params(CFG), method="lbfgs", maxiter=iters)
        assert wait_gone([victim], 10) == []  # killed, though stopped
        assert len(children(agent)) == 2 and victim not in children(agent)
        assert master.n_workers == 1
    stalled = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
    assert stalled and f"pid {victim}" in stalled[0], stalled
    np.testing.assert_array_equal(costs(result), costs(ref))
    np.testing.assert_array_equal(result.x, ref.x)


def test_an_agent_stops_its_processes_on_sigterm(images) -> None:
    """SIGTERM: the agent says BYE, closes its processes' sockets and reaps them."""
    with Master(launcher=LocalLauncher(2, procs=2), **OPTS) as master:
        master.scatter_images(images, m=M, seed=0)
        master(init_params(CFG))
        victim = agent_pids(master)[0]
        compute = children(victim)
        os.kill(victim, signal.SIGTERM)
        assert wait_gone([victim, *compute], 10.0) == []
        master(init_params(CFG))
        assert master.n_workers == 1


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    from tests.sshd import two_aliases

    yield from two_aliases(tmp_path_factory.mktemp("sshd"))


def test_a_hosts_file_starts_one_agent_per_host(sshd, tmp_path, images) -> None:
    """SSHLauncher(agents=True): `workers=2` on each of two hosts is two connections with two
    compute processes each; the history equals two plain local workers' to 1e-9 (sshd gives the
    remote processes their own environment, so possibly another BLAS kernel: not bits)."""
    from qsae.launch import SSHLauncher, parse_hosts

    path = tmp_path / "hosts.txt"
    path.write_text(f"node1 workers=2 python={sys.executable}\nnode2 workers=2 python={sys.executable}\n")
    launcher = SSHLauncher(parse_hosts(path), ssh_config=str(sshd.ssh_config), connect_timeout=5, agents=True)
    assert launcher.n_workers == 2
    with Master(launcher=launcher, **OPTS) as master:
        assert master.n_workers == 2
        assert all(w.cores == 2 for w in master._workers.values())
        agents = agent_pids(master)
        master.scatter_images(images, m=M, seed=0)  # the SOURCE: each agent forks its processes
        assert all(len(children(p)) == 2 for p in agents)
        result = master.fit(init_params(CFG), maxiter=ITERS)
    assert wait_gone(agents, 10.0) == []
    with Master(workers=2, **OPTS) as master:
        master.scatter_images(images, m=M, seed=0)
        ref = master.fit(init_params(CFG), maxiter=ITERS)
    np.testing.assert_allclose(costs(result), costs(ref), rtol=1e-9)


def test_cli_runs_one_agent_per_machine_by_default(tmp_path) -> None:
    """`qsae-master --workers 2` is one agent of two processes by default, `--no-agents` two plain
    workers, and both give the same cost history to the last bit; `--workers 1` and `--workers N
    --min-workers K` start plain workers; --agents with --local, or with --min-workers locally, is refused."""
    import json
    import subprocess

    def run(*flags):
        out = tmp_path / "-".join(flags).replace("-", "")
        r = subprocess.run([sys.executable, "bin/qsae-master", *flags, "--patches", "2000", "--iters", "6",
                            "--dtype", "float64", "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        history = [json.loads(ln)["cost"] for ln in (out / "history.jsonl").read_text().splitlines()]
        last = json.loads((out / "workers.jsonl").read_text().splitlines()[-1])["workers"]
        return r.stdout, (out / "run.log").read_text(), history, last

    out, log, agent_history, workers = run("--workers", "2")
    assert "patches on 1 agent of 2 processes" in out and "2 compute processes forked" in log
    assert re.search(r"local#0 +active +2000 rows .*\(2 processes\)", out), out  # the workers' table
    assert len(workers) == 1 and workers[0]["procs"] == 2
    out, log, plain_history, workers = run("--workers", "2", "--no-agents")
    assert "patches on 2 workers" in out and "compute processes forked" not in log and len(workers) == 2
    assert agent_history == plain_history and len(agent_history) >= 6  # the same bits, json's repr round-trips
    out, log, _, workers = run("--workers", "2", "--min-workers", "1")  # may start before the second said HELLO
    assert re.search(r"patches on [12] workers?,", out) and "compute processes forked" not in log
    out, log, _, workers = run("--workers", "1")
    assert "patches on 1 worker," in out and "compute processes forked" not in log
    for flags, words in ((["--local", "--agents"], "drop --agents"),
                         (["--workers", "2", "--agents", "--min-workers", "1"], "drop --agents")):
        r = subprocess.run([sys.executable, "bin/qsae-master", *flags], capture_output=True, text=True, cwd=ROOT,
                           timeout=60)
        assert r.returncode == 2 and words in r.stderr, r.stderr


def test_slurm_starts_one_agent_per_node(tmp_path) -> None:
    """SlurmLauncher(agents=True) in `salloc -n 4` on the private one-node cluster of 4 CPUs:
    one srun step for the node holding its 4 CPUs, one agent of 4 compute processes; the
    history equals two local plain workers' (the step exports this environment: one kernel)."""
    import textwrap

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from slurm import SlurmCluster, require_slurm
    from test_slurm import LEFTOVERS, last_json, salloc

    require_slurm()
    script = tmp_path / "agents.py"
    script.write_text(LEFTOVERS + textwrap.dedent("""\
        import json
        from qsae import Master, SAEConfig, SlurmLauncher, init_params
        from qsae.data import load_images

        def children(pid):
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return len(f.read().split())

        cfg, images = SAEConfig(), load_images()
        opts = dict(config=cfg, block_rows=250, reducer_options={"rounds": 2})
        launcher = SlurmLauncher(agents=True)
        with Master(launcher=launcher, **opts) as master:
            n = master.n_workers
            master.scatter_images(images, m=3000, seed=0)
            cores = [w.cores for w in master._workers.values()]
            procs = [children(w.pid) for w in master._workers.values()]
            slurm = master.fit(init_params(cfg), maxiter=10)
        left, steps = leftovers(launcher.job_id, launcher.tag, "qsae.worker")
        with Master(workers=2, **opts) as master:
            master.scatter_images(images, m=3000, seed=0)
            local = master.fit(init_params(cfg), maxiter=10)
        print(json.dumps({"n": n, "cores": cores, "procs": procs, "slurm": [c for _, _, c in slurm.history],
                          "local": [c for _, _, c in local.history], "left": left, "steps": steps}))
    """))
    with SlurmCluster() as cluster:
        out = last_json(salloc(cluster, 4, [sys.executable, str(script)]))
    assert out["n"] == 1 and out["cores"] == [4] and out["procs"] == [4]
    np.testing.assert_allclose(out["slurm"], out["local"], rtol=1e-10)
    assert out["left"] == [] and out["steps"] == []


def test_a_hosts_link_cut_mid_run_then_restored(tmp_path, images) -> None:
    """Two hand-started agents of 2 processes (`qsae-worker --procs 2`), one behind a veth in a
    network namespace; its link is cut at iteration 5 (past worker_timeout) and restored at 15.
    The agent is dropped with its host's blocks, which the other agent's processes compute; the
    history is bit-equal to an undisturbed run; once the link is back the agent joins again."""
    import contextlib
    import subprocess

    from qsae.keys import make_keys
    from tests.sshd import free_port
    from tests.test_netfault import ip, netns

    with contextlib.contextmanager(netns.__wrapped__)() as (ns, host_if, address):
        keys = make_keys(tmp_path / "keys")
        port = free_port()
        agent = [sys.executable, "-m", "qsae.worker", "--connect", f"tcp://{address}:{port}", "--keys", str(keys),
                 "--master-timeout", "30", "--procs", "2"]
        procs = [subprocess.Popen(agent, cwd=ROOT), subprocess.Popen(["ip", "netns", "exec", ns, *agent], cwd=ROOT)]
        events = []

        def cut_and_restore(info) -> None:
            if info.iteration == 5:
                ip("link", "set", host_if, "down")
                events.append("down")
                time.sleep(3.0)  # silent past worker_timeout: backups would otherwise hide a short cut
            if info.iteration == 15:
                ip("link", "set", host_if, "up")
                events.append("up")

        try:
            with Master(workers=0, wait_for=2, bind=address, port=port, keys=str(keys), worker_timeout=2.0,
                        **OPTS) as master:
                master.scatter_images(images, m=M, seed=0)
                assert all(w.cores == 2 for w in master._workers.values())
                inside = next(w for w in master._workers.values() if w.pid != procs[0].pid)
                reference = master.fit(init_params(CFG), maxiter=ITERS)
                result = master.fit(init_params(CFG), maxiter=ITERS, callback=cut_and_restore)
                assert events == ["down", "up"]
                assert inside.ident not in master._workers  # dropped while cut off
                assert_back(master, 2, init_params(CFG))
        finally:
            for p in procs:
                p.kill()
                p.wait()
    np.testing.assert_array_equal(costs(result), costs(reference))
