"""Start qsae workers, on this machine, over SSH or in a Slurm allocation, and stop them again.

A worker is the command ``PYTHON -m qsae.worker --stdin``. Its configuration arrives as
ONE line of JSON on its stdin (never on the command line, which ``ps`` shows)::

    {"connect": "tcp://HOST:PORT", "curve": null or {...}, "name": "host#k", "threads": 1}

The launcher writes that line and keeps stdin open. Every line the worker writes to its
stderr (its log) or stdout is passed to the logger ``qsae.launch``, prefixed with the
worker's name.

Launchers
---------
:class:`LocalLauncher`
    ``n`` worker processes on this machine (``subprocess``), which die with the master
    even if it is killed with SIGKILL (Linux ``PR_SET_PDEATHSIG``).
:class:`SSHLauncher`
    workers on the hosts of a hosts file, one SSH connection per host (paramiko), one
    channel per worker.
:class:`SlurmLauncher`
    inside a Slurm allocation (salloc, sbatch): one ``srun`` job step per worker, one
    worker per task.

All follow :class:`Launcher`: ``prepare()`` (preflight), ``bind_address()``,
``start(connect, config)``, ``add(n, connect, config)`` (more workers later), ``wait()``,
``stop()``, ``failures()``; use them as context managers so that ``stop()`` always runs.

Layout: ``base`` (the interface, the stop sequence, bookkeeping, log pumps), ``local``
(child processes: local workers, and the srun children of Slurm workers), ``ssh``
(and ``sshcheck``: each way a host can fail, in one line), ``slurm``, ``hosts`` (hosts files).

Hosts file format
-----------------
One host per line::

    [user@]host[:port] [workers=N] [python=/path/to/python]

- ``host`` is a name, an address, or a ``Host`` alias of ``~/.ssh/config`` (whose
  ``HostName``, ``User``, ``Port`` and ``IdentityFile`` are honoured); an IPv6 address
  with a port is written ``[::1]:22``;
- ``workers=N`` worker processes on that host (default 1, N >= 1);
- ``python=PATH`` the interpreter that has qsae installed there (default ``python3``);
- ``#`` starts a comment (a whole line, or the rest of a line after a blank);
  blank lines are ignored; values with blanks may be quoted (``python="/opt/my py/python"``).
"""

from __future__ import annotations

from .base import WORKER_ARGS, Launcher
from .hosts import HostSpec, format_hosts_help, parse_hosts
from .local import LocalLauncher
from .slurm import SlurmLauncher
from .ssh import SSHLauncher

__all__ = [
    "HostSpec",
    "parse_hosts",
    "format_hosts_help",
    "Launcher",
    "LocalLauncher",
    "SSHLauncher",
    "SlurmLauncher",
    "WORKER_ARGS",
]
