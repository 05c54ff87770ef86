"""A worker's network link cut mid-run (a veth into a network namespace), then restored."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from qsae import Master, SAEConfig, init_params
from qsae.data import load_images
from qsae.keys import make_keys
from tests.procs import assert_back
from tests.sshd import free_port

pytestmark = pytest.mark.timeout(120)
CFG = SAEConfig()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture()
def netns():
    """A namespace joined to this one by a veth pair: host 10.231.k.1 <-> namespace 10.231.k.2."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) to make a network namespace")
    k = os.getpid() % 250 + 1
    ns, host_if, ns_if = f"qsae-nf{k}", f"qsv{k}a", f"qsv{k}b"
    try:
        ip("netns", "add", ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make a network namespace here: {e.stderr.decode().strip()}")
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"10.231.{k}.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"10.231.{k}.2/30", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_if, f"10.231.{k}.1"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_cut_link_mid_run_then_restore(netns, tmp_path):
    """The cut-off worker is dropped and its rows rebuilt elsewhere; the run's costs do not
    change; once the link is back, the worker joins again and is given blocks."""
    ns, host_if, address = netns
    images = load_images()
    keys = make_keys(tmp_path / "keys")
    port = free_port()
    worker = [sys.executable, "-m", "qsae.worker", "--connect", f"tcp://{address}:{port}", "--keys", str(keys),
              "--master-timeout", "30"]
    procs = [subprocess.Popen(worker, cwd=os.getcwd()) for _ in range(2)]
    procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *worker]))  # the worker behind the veth
    events = []

    def cut_and_restore(info):
        if info.iteration == 5:
            ip("link", "set", host_if, "down")
            events.append(("down", time.monotonic()))
            time.sleep(3.0)  # silent past worker_timeout: backups would otherwise hide a short cut
        if info.iteration == 15:
            ip("link", "set", host_if, "up")
            events.append(("up", time.monotonic()))

    try:
        # 12 blocks of 250 rows: with m's own 3 blocks, balancing may leave a worker none once the
        # cut one is back (seen: its share taken from a worker measured slower), which assert_back refuses
        with Master(workers=0, wait_for=3, bind=address, port=port, keys=str(keys), config=CFG,
                    worker_timeout=2.0, block_rows=250) as master:
            master.scatter_images(images, m=3000, seed=0)
            inside = next(w for w in master._workers.values() if w.pid not in {p.pid for p in procs[:2]})
            reference = master.fit(init_params(CFG), maxiter=25)
            result = master.fit(init_params(CFG), maxiter=25, callback=cut_and_restore)
            assert [e for e, _ in events] == ["down", "up"]
            assert inside.ident not in master._workers  # dropped while cut off
            assert_back(master, 3, init_params(CFG))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # Bit-for-bit: every worker here inherits this process's environment (the same BLAS kernel), and the
    # blocks' sums are added along the fixed summation tree whoever computed them, cut link or not.
    costs = np.array([c for _, _, c in result.history])
    np.testing.assert_array_equal(costs, [c for _, _, c in reference.history])
