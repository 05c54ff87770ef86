"""Workers inside a Slurm allocation: one ``srun`` job step per worker.

The master runs where ``salloc -n N qsae-master --slurm ...`` (or an sbatch script)
runs it; each worker is ``srun --ntasks=1 --nodes=1 --exact ... PYTHON -m qsae.worker
--stdin``, a child process of the master like a local worker, whose stdin srun forwards to
the task: the worker's JSON line (its CURVE keys) travels over that pipe, never on a
command line or in a file.

Why one step per worker rather than one ``srun -n N`` step: each worker gets its own
keys on its own stdin (one step's stdin goes to every task, or to one), each can be
stopped, lost or added alone (``add``), and the steps start in parallel (the README's
Slurm section has the measured start times of both).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, LaunchError
from .base import WORKER_ARGS, _Worker, log
from .local import ChildProcessLauncher
from .sshcheck import INSTALL_HINT

#: the fix named by every "not inside an allocation" error
OUTSIDE_HINT = ("run `salloc -n N qsae-master --slurm ...`, or put that line in an sbatch script "
                "(see examples/slurm.sbatch)")

#: seconds for each Slurm client command (squeue, scancel, scontrol) and for the preflight step
CLIENT_TIMEOUT = 60.0

#: seconds stop() lets workers end by themselves before it signals their steps: the master
#: has just sent them STOP and they exit within milliseconds; a signal to a step that is
#: ending anyway only adds Slurm's "STEP ... CANCELLED" and "task 0: Terminated" to the log
EXIT_GRACE = 1.0


def _cpus_per_node(value: str) -> int:
    """Total CPUs of ``SLURM_JOB_CPUS_PER_NODE`` (``"2(x3),4"`` is 2+2+2+4 = 10)."""
    total = 0
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(value)
        total += int(m.group(1)) * int(m.group(2) or 1)
    return total


def _cpus_list(value: str) -> list[int]:
    """CPUs of each node, in node order, from ``SLURM_JOB_CPUS_PER_NODE`` (``"2(x3),4"``: 2, 2, 2, 4)."""
    out: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(value)
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


# srun's words for an allocation that no longer exists (Slurm 20-24: "Invalid job id specified",
# "Job/step already completing or completed", "Job has been cancelled"; exit 1 each)
STALE_JOB_WORDS = ("invalid job id", "already completing or completed", "job has been cancelled")

_NO_AGENTS = "start without agents, one step per task (qsae-master --no-agents, SlurmLauncher(agents=False))"


class SlurmLauncher(ChildProcessLauncher):
    """Workers as job steps of the Slurm allocation this process runs in.

    Parameters
    ----------
    python : str
        The interpreter on the allocation's nodes; default the one running the master
        (a shared file system or the same path everywhere).
    n : int, optional
        Workers :meth:`start` starts; default one per task of the allocation
        (``SLURM_NTASKS``). :meth:`add` starts more while the allocation has CPUs free.
    bind : str, optional
        The address of this host that the allocation's nodes reach; default the local
        address of the route to the first node of the allocation that is not this host.
    srun : str
        The srun command.
    srun_args : sequence of str
        Extra srun options for every worker step (e.g. ``["--mem-per-cpu=2G"]`` where
        memory is a consumable resource and a step would otherwise take a node's all).
    env : dict, optional
        Extra environment variables for the workers (srun exports the environment).
    args : sequence of str
        What follows ``python``; default ``-m qsae.worker --stdin``.

    Raises
    ------
    LaunchError
        Not inside an allocation (no ``SLURM_JOB_ID``) or no ``srun`` on the PATH: one
        line naming salloc and sbatch.
    ConfigError
        ``n`` is not between 1 and the allocation's tasks.

    Notes
    -----
    :meth:`stop` sends SIGTERM to each worker's step (``scancel --signal=TERM``), waits,
    cancels the steps left (``scancel``) and checks with ``squeue -s`` that none of its
    steps is left. The srun processes are in their own session and get SIGTERM if the
    master dies (``PR_SET_PDEATHSIG``); srun then ends its step.
    """

    def __init__(self, python: str = sys.executable, *, n: int | None = None, bind: str | None = None,
                 srun: str = "srun", srun_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 args: Sequence[str] = WORKER_ARGS, agents: bool = False) -> None:
        super().__init__(python, env, args)
        self.agents = bool(agents)
        self._nodes: list[tuple[str, int]] | None = None  # agents: (node, CPUs), asked of scontrol when first needed
        self.job_id = os.environ.get("SLURM_JOB_ID", "")
        self.srun = shutil.which(srun) or ""
        if not self.job_id:
            raise LaunchError(f"Slurm workers need a Slurm allocation, and SLURM_JOB_ID is not set: {OUTSIDE_HINT}")
        if not self.srun:
            raise LaunchError(f"Slurm workers need {srun} on the PATH (inside allocation {self.job_id}): load "
                              f"Slurm's module or fix PATH, and {OUTSIDE_HINT}")
        self.cpus_per_task = int(os.environ.get("SLURM_CPUS_PER_TASK") or 1)
        try:
            cpus: int | None = _cpus_per_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE", ""))
        except ValueError:
            cpus = None
        tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS") or ""
        if tasks.isdigit() and int(tasks) >= 1:
            self.tasks = int(tasks)
        elif cpus:  # e.g. salloc -N 2 without -n: one worker per CPU (per task's CPUs)
            self.tasks = max(1, cpus // self.cpus_per_task)
        else:
            raise LaunchError(f"allocation {self.job_id} says neither its tasks (SLURM_NTASKS) nor its CPUs "
                              f"(SLURM_JOB_CPUS_PER_NODE): ask for tasks, e.g. salloc -n 8 (or #SBATCH -n 8)")
        # workers the allocation can hold at once: add() starts more steps up to this
        self.slots = max(self.tasks, (cpus or 0) // self.cpus_per_task)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.slots):
            raise ConfigError(f"SlurmLauncher(n={n!r}): expected 1 to {self.slots} (the workers allocation "
                              f"{self.job_id} can hold)")
        self._n = self.tasks if n is None else n
        if self.agents:  # one step per node, an agent with one compute process per CPU of it
            nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1"
            self.slots = self._n = int(nodes) if nodes.isdigit() else 1
        self.bind = bind
        self.srun_args = tuple(srun_args)
        self.tag = f"qsae-{uuid.uuid4().hex[:8]}"  # step names: TAG.k
        self._prepared = False

    @property
    def n_workers(self) -> int:
        return self._n

    def _name(self, k: int) -> str:
        return f"slurm#{k}"

    def _command(self, message: dict[str, Any]) -> list[str]:
        k = message["name"].rpartition("#")[2]
        place = []
        if self.agents:  # the node's step holds all its CPUs: one agent, one process per CPU
            node, cpus = self._agent_nodes()[int(k) % len(self._agent_nodes())]
            place = [f"--nodelist={node}", f"--cpus-per-task={cpus}"]
        return [self.srun, "--ntasks=1", "--nodes=1", *place, "--exact", "--quiet", "--kill-on-bad-exit=1",
                f"--job-name={self.tag}.{k}", *self.srun_args, self.python, *self.args]

    def _message(self, connect: str, config: Any, k: int, name: str) -> dict[str, Any]:
        message = super()._message(connect, config, k, name)
        if self.agents:
            _, cpus = self._agent_nodes()[k % len(self._agent_nodes())]
            message["procs"] = max(1, cpus // message["threads"])
        return message

    def _agent_nodes(self) -> list[tuple[str, int]]:
        """(node name, CPUs) of every node of the allocation: ``scontrol show hostnames`` and
        ``SLURM_JOB_CPUS_PER_NODE``."""
        if self._nodes is None:
            nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
            try:
                names = self._client(["scontrol", "show", "hostnames", nodelist]).stdout.split() if nodelist else []
                cpus = _cpus_list(os.environ.get("SLURM_JOB_CPUS_PER_NODE", ""))
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                raise LaunchError(f"allocation {self.job_id}: cannot tell its nodes and their CPUs for agents ({e}); "
                                  f"{_NO_AGENTS}") from e
            if not names or len(cpus) != len(names):
                raise LaunchError(f"allocation {self.job_id}: nodes {names} and CPUs per node {cpus} do not match; "
                                  f"{_NO_AGENTS}")
            self._nodes = list(zip(names, cpus))
        return self._nodes

    def _client(self, argv: list[str], timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)

    # -- preflight and address ---------------------------------------------------------

    def prepare(self) -> None:
        """Run ``python -c 'import qsae'`` once on every node of the allocation (one srun step).

        Raises
        ------
        LaunchError
            The step failed, or a node's qsae differs from this one in major.minor.
        """
        if self._prepared:
            return
        from qsae import __version__

        nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1"
        script = "import qsae, sys; sys.stdout.write('QSAE-VERSION ' + qsae.__version__ + '\\n')"
        argv = [self.srun, f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--exact", "--quiet",
                f"--job-name={self.tag}.preflight", *self.srun_args, self.python, "-c", script]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               env=self._env(1), timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"allocation {self.job_id}: `srun ... {self.python} -c 'import qsae'` did not finish "
                              f"within {CLIENT_TIMEOUT:g} s: check that the allocation's nodes are up "
                              f"(squeue -j {self.job_id})") from None
        versions = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("QSAE-VERSION ")]
        if r.returncode != 0 or not versions:
            err = [line for line in r.stderr.splitlines() if line.strip()]
            stale = [line for line in err if any(w in line.lower() for w in STALE_JOB_WORDS)]
            if stale:  # the allocation ended; the shell's SLURM_JOB_ID outlived it
                raise LaunchError(f"allocation {self.job_id} is not running ({stale[-1].strip()}): this shell's "
                                  f"SLURM_JOB_ID is left from an allocation that ended (squeue -j {self.job_id}); "
                                  "start a new one: salloc -n N qsae-master --slurm ..., or sbatch a script")
            raise LaunchError(f"allocation {self.job_id}: {self.python} cannot import qsae on its nodes "
                              f"({err[-1] if err else f'srun exit code {r.returncode}'}): {INSTALL_HINT}, "
                              f"or pass the python that has it")
        bad = sorted({v for v in versions if v.split(".")[:2] != __version__.split(".")[:2]})
        if bad:
            raise LaunchError(f"allocation {self.job_id}: the nodes have qsae {', '.join(bad)}, this master is "
                              f"{__version__} (major.minor must match): "
                              f"{INSTALL_HINT.replace('install it', f'install qsae {__version__}')}")
        self._prepared = True

    def bind_address(self) -> str:
        """This host's address on the route to the allocation's first other node (or its own)."""
        if self.bind:
            return self.bind
        nodes = self._node_addresses()
        me = {socket.gethostname(), socket.gethostname().split(".")[0], os.environ.get("SLURMD_NODENAME", "")}
        others = [addr for name, addr in nodes if name not in me]
        target = (others or [addr for _, addr in nodes] or ["127.0.0.1"])[0]
        try:
            family = socket.getaddrinfo(target, None)[0][0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))  # UDP: picks the route, sends nothing
                return s.getsockname()[0]
        except OSError as e:
            raise LaunchError(f"cannot find this host's address on the route to node {target} ({e}): pass "
                              f"bind= (qsae-master --bind ADDRESS) with an address the nodes reach") from e

    def _node_addresses(self) -> list[tuple[str, str]]:
        """(NodeName, NodeAddr) of every node of the allocation, from scontrol."""
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
        if not nodelist:
            return []
        try:
            r = self._client(["scontrol", "show", "node", "-o", nodelist])
        except (OSError, subprocess.SubprocessError):
            return []
        out = []
        for line in r.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "NodeName" in fields:
                out.append((fields["NodeName"], fields.get("NodeAddr", fields["NodeName"])))
        return out

    # -- room, steps and stopping -----------------------------------------------------

    def _check_room(self, n: int) -> None:
        running = sum(1 for w in self._workers if self._is_alive(w))
        if running + n > self.slots:
            raise LaunchError(f"allocation {self.job_id} has no room for {n} more worker(s): it holds {self.slots} "
                              f"({self.tasks} task(s) of {self.cpus_per_task} CPU(s)) and {running} run; ask for "
                              f"more tasks (salloc -n N, #SBATCH -n N) or stop some workers first")

    def _steps(self) -> dict[str, str]:
        """Step name -> JOB.STEP of this launcher's steps that Slurm still runs."""
        try:
            r = self._client(["squeue", "-s", "-h", "-j", self.job_id, "-o", "%i %j"])
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("squeue failed (%s): cannot list the worker steps of job %s", e, self.job_id)
            return {}
        steps = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].startswith(self.tag + "."):
                steps[parts[1]] = parts[0]
        return steps

    def _scancel(self, step_ids: list[str], signal_name: str | None) -> None:
        if not step_ids:
            return
        argv = ["scancel", "--quiet"] + ([f"--signal={signal_name}"] if signal_name else []) + step_ids
        try:
            self._client(argv)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("%s failed (%s)", " ".join(argv), e)

    def _step_ids(self, workers: list[_Worker]) -> tuple[list[str], list[_Worker]]:
        """The step ids of these workers, and the workers whose step Slurm does not list (yet)."""
        steps = self._steps()
        ids, missing = [], []
        for w in workers:
            sid = steps.get(f"{self.tag}.{w.k}")
            if sid is None:
                missing.append(w)
            else:
                ids.append(sid)
        return ids, missing

    def _terminate(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + EXIT_GRACE
        while workers and time.monotonic() < deadline:
            time.sleep(0.01)
            workers = [w for w in workers if self._is_alive(w)]
        if not workers:
            return
        ids, missing = self._step_ids(workers)
        self._scancel(ids, "TERM")  # to the task itself: the worker says goodbye, srun exits with its code
        super()._terminate(missing)  # srun without a step yet: SIGTERM makes it give up (and end the step)

    def _kill(self, workers: list[_Worker]) -> None:
        ids, _ = self._step_ids(workers)
        self._scancel(ids, None)
        super()._kill(workers)

    def _stop_workers(self, timeout: float) -> None:
        super()._stop_workers(timeout)
        # a step outlives an srun killed with SIGKILL: end every step of ours, and check
        deadline = time.monotonic() + 10.0
        left = self._steps()
        if left:
            self._scancel(sorted(left.values()), None)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self._steps()
        if left:
            log.warning("job %s: steps %s did not end within 10 s of scancel: check squeue -s -j %s",
                        self.job_id, ", ".join(sorted(left.values())), self.job_id)
